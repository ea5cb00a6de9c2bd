"""The manifest CSV: ``study_id, path, label, split[, pe_slices][, extra columns...]``.

``pe_slices`` lists slice indices with PE as ``12-30;45`` (ranges inclusive), 0-based,
in the order volttl reads the study: for DICOM, sorted by position along the slice
normal (ascending); for NIfTI/NRRD, the third voxel index k; for PENet's HDF5, the
dataset's first axis. Extra columns are kept (``series_uid`` picks a DICOM series,
``slice_thickness``/``pixel_spacing`` give the grid of an HDF5 dataset).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from volttl.errors import VolttlError
from volttl.io.addresses import source_file, split_hdf5_address

REQUIRED = ("study_id", "path", "label", "split")
SPLITS = ("train", "val", "test")
# letters, digits, _ . - ; not starting with a dot (hidden files, "." and ".." as names)
STUDY_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class ManifestError(VolttlError):
    """A manifest problem; the message names the file and the line."""


@dataclass
class StudyRow:
    study_id: str
    path: str
    label: int
    split: str
    pe_slices: list[int] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)


def parse_slices(text: str) -> list[int]:
    """``'12-14;20'`` -> ``[12, 13, 14, 20]``."""
    out: list[int] = []
    for part in (p.strip() for p in text.replace(",", ";").split(";")):
        if not part:
            continue
        if part.startswith("-"):
            raise ValueError(f"negative slice index in {part!r}")
        if not re.fullmatch(r"\d+(\s*-\s*\d+)?", part):
            raise ValueError(f"{part!r} is not an index or a range like 12-30")
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"range {part} runs backwards")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if any(v < 0 for v in out):
        raise ValueError("negative slice index")
    return sorted(set(out))


def format_slices(slices) -> str:
    """Inverse of :func:`parse_slices`, with runs collapsed to ranges."""
    values = sorted(set(int(v) for v in slices))
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ";".join(parts)


def _resolve(path: str, base: Path) -> str:
    file, name = split_hdf5_address(path)
    p = Path(file).expanduser()
    if not p.is_absolute():
        p = (base / p).resolve()
    return f"{p}#{name}" if name is not None else str(p)


def read_manifest(path: str | Path, check_paths: bool = True) -> list[StudyRow]:
    """Read and validate a manifest; relative study paths are resolved to its folder.

    Every problem of the file is collected and reported in one error (line by line),
    not only the first: bad ids (letters, digits, _ . -, not starting with a dot),
    duplicates, labels, splits, ``pe_slices``, and with ``check_paths`` study paths that
    do not exist. A UTF-8 byte-order mark (Excel's CSV) is accepted."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    problems: list[str] = []
    rows, seen = [], set()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(found: {', '.join(reader.fieldnames or []) or 'none'})")
        for line, rec in enumerate(reader, start=2):
            bad = []
            sid = (rec["study_id"] or "").strip()
            if not STUDY_ID.match(sid):
                bad.append(f"study_id {sid!r} must be letters, digits, _ . - and not start with a dot")
            elif sid in seen:
                bad.append(f"duplicate study_id {sid}")
            seen.add(sid)
            label = (rec["label"] or "").strip()
            if label not in ("0", "1"):
                bad.append(f"label must be 0 or 1, got {label!r}")
            split = (rec["split"] or "").strip()
            if split not in SPLITS:
                bad.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
            try:
                pe = parse_slices(rec.get("pe_slices") or "")
            except ValueError as exc:
                bad.append(f"bad pe_slices ({exc})")
                pe = []
            raw_path = (rec["path"] or "").strip()
            resolved = _resolve(raw_path, path.parent) if raw_path else ""
            if not raw_path:
                bad.append("empty path")
            elif check_paths and not Path(source_file(resolved)).exists():
                bad.append(f"path {raw_path} does not exist")
            if bad:
                problems += [f"line {line}: {b}" for b in bad]
                continue
            extras = {k: v for k, v in rec.items() if k not in REQUIRED and k != "pe_slices"
                      and k is not None}
            rows.append(StudyRow(sid, resolved, int(label), split, pe, extras))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ManifestError(f"{path}: {len(problems)} problem(s): {shown}")
    if not rows:
        raise ManifestError(f"{path}: no studies")
    return rows


def write_manifest(rows: list[StudyRow], path: str | Path) -> None:
    """Write rows as a manifest CSV (paths as given)."""
    extra_cols: list[str] = []
    for r in rows:
        extra_cols += [k for k in r.extras if k not in extra_cols]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*REQUIRED, "pe_slices", *extra_cols])
        for r in rows:
            w.writerow([r.study_id, r.path, r.label, r.split, format_slices(r.pe_slices),
                        *(r.extras.get(c, "") for c in extra_cols)])
