"""The RSNA STR Pulmonary Embolism dataset (Kaggle 2020).

Layout: ``<root>/train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and
``train.csv`` with one row per image (``pe_present_on_image``) and per-study columns
such as ``negative_exam_for_pe``. PE images are mapped to slice indices in volttl's
order (sorted along the slice normal) by reading the series' headers once.
The dataset has no official split: studies are split by a hash of their UID.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom

from volttl.manifests.schema import ManifestError, StudyRow
from volttl.progress import progress_bar


def hash_split(uid: str, val: float, test: float, seed: int = 0) -> str:
    """Deterministic split from the UID, so adding studies never moves old ones."""
    h = int(hashlib.sha256(f"{seed}:{uid}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test else "val" if h < test + val else "train"


def _sorted_sops(folder: Path) -> list[str]:
    entries = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(o[:3], o[3:])
        entries.append((float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal),
                        str(ds.SOPInstanceUID)))
    return [sop for _, sop in sorted(entries)]


def rsna_rows(root: str | Path, csv_path: str | Path | None = None, val: float = 0.15,
              test: float = 0.15, seed: int = 0, progress: bool = True) -> list[StudyRow]:
    """Manifest rows for every study listed in ``train.csv`` that has its DICOM folder."""
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else root / "train.csv"
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: RSNA train.csv not found")
    images: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    negative: dict[tuple[str, str], int] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                "pe_present_on_image", "negative_exam_for_pe"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        for rec in reader:
            key = (rec["StudyInstanceUID"], rec["SeriesInstanceUID"])
            images[key][rec["SOPInstanceUID"]] = int(rec["pe_present_on_image"])
            negative[key] = int(rec["negative_exam_for_pe"])
    rows = []
    for (study, series), sops in progress_bar(images.items(), desc="rsna", disable=not progress):
        folder = root / "train" / study / series
        if not folder.is_dir():
            raise ManifestError(f"{folder}: series folder listed in {csv_path.name} is missing")
        order = _sorted_sops(folder)
        pe = [i for i, sop in enumerate(order) if sops.get(sop, 0)]
        rows.append(StudyRow(study, str(folder), 1 - negative[(study, series)],
                             hash_split(study, val, test, seed), pe, {"series_uid": series}))
    return rows
