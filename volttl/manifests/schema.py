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

REQUIRED = ("study_id", "path", "label", "split")
SPLITS = ("train", "val", "test")
STUDY_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


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
    file, sep, name = path.partition("#")
    p = Path(file).expanduser()
    if not p.is_absolute():
        p = (base / p).resolve()
    return f"{p}{sep}{name}"


def read_manifest(path: str | Path) -> list[StudyRow]:
    """Read and validate a manifest; relative study paths are resolved to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        rows, seen = [], set()
        for line, rec in enumerate(reader, start=2):
            where = f"{path}:{line}"
            sid = (rec["study_id"] or "").strip()
            if not STUDY_ID.match(sid):
                raise ManifestError(f"{where}: study_id {sid!r} must be letters, digits, _ . -")
            if sid in seen:
                raise ManifestError(f"{where}: duplicate study_id {sid}")
            seen.add(sid)
            label = (rec["label"] or "").strip()
            if label not in ("0", "1"):
                raise ManifestError(f"{where}: label must be 0 or 1, got {label!r}")
            split = (rec["split"] or "").strip()
            if split not in SPLITS:
                raise ManifestError(f"{where}: split must be one of {', '.join(SPLITS)}")
            try:
                pe = parse_slices(rec.get("pe_slices") or "")
            except ValueError as exc:
                raise ManifestError(f"{where}: bad pe_slices ({exc})") from None
            if not (rec["path"] or "").strip():
                raise ManifestError(f"{where}: empty path")
            extras = {k: v for k, v in rec.items() if k not in REQUIRED and k != "pe_slices"
                      and k is not None}
            rows.append(StudyRow(sid, _resolve(rec["path"].strip(), path.parent), int(label),
                                 split, pe, extras))
    if not rows:
        raise ManifestError(f"{path}: no studies")
    return rows


def write_manifest(rows: list[StudyRow], path: str | Path) -> None:
    """Write rows as a manifest CSV (paths as given)."""
    extra_cols: list[str] = []
    for r in rows:
        extra_cols += [k for k in r.extras if k not in extra_cols]
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*REQUIRED, "pe_slices", *extra_cols])
        for r in rows:
            w.writerow([r.study_id, r.path, r.label, r.split, format_slices(r.pe_slices),
                        *(r.extras.get(c, "") for c in extra_cols)])
