"""How well Grad-CAM overlays find the lesions, against ground-truth lesion masks.

Two figures over the positive studies that have a mask (the synthetic cohort writes one
per study; the manifest's ``mask`` column points to it, on the study's own grid):

- hit rate: the share of studies whose CAM peak lies inside the lesion mask dilated by
  ``margin_mm`` (a Euclidean distance in millimetres, so anisotropic voxels count right);
- inside/outside ratio: the mean CAM inside that dilated mask over the mean CAM in the
  rest of the body (voxels above ``body_hu``; air outside the patient would flatter it),
  averaged over studies.

Both are computed on the original grid from the written ``<study>_cam.nii.gz`` files, so
they test the whole chain: CAM, stitching and the mapping back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt

from volttl.errors import VolttlError
from volttl.manifests import read_manifest
from volttl.outputs.folders import CamDir


@dataclass
class Localisation:
    studies: int
    hits: int
    mean_ratio: float
    per_study: list[dict]
    margin_mm: float = 5.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.studies if self.studies else float("nan")

    def line(self) -> str:
        return (f"CAM peak inside the lesion mask dilated by {self.margin_mm:g} mm in "
                f"{self.hits}/{self.studies} positive studies ({100 * self.hit_rate:.0f}%); "
                f"mean CAM inside / outside the mask {self.mean_ratio:.1f}x")


def dilate_mm(mask: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of the mask (Euclidean, in millimetres)."""
    if not mask.any():
        return mask.astype(bool)
    return distance_transform_edt(~mask.astype(bool), sampling=spacing) <= margin_mm


def study_localisation(cam: np.ndarray, mask: np.ndarray, ct: np.ndarray, spacing: tuple[float, ...],
                       margin_mm: float = 5.0, body_hu: float = -950.0) -> dict:
    """Hit and inside/outside ratio for one study; all arrays on the same grid."""
    region = dilate_mm(mask, spacing, margin_mm)
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    outside = ~region & (ct > body_hu)
    inside_mean = float(cam[region].mean()) if region.any() else 0.0
    outside_mean = float(cam[outside].mean()) if outside.any() else 0.0
    ratio = inside_mean / outside_mean if outside_mean > 0 else float("inf") if inside_mean > 0 else 0.0
    return {"hit": bool(cam.max() > 0 and region[peak]), "inside_mean": inside_mean,
            "outside_mean": outside_mean, "ratio": ratio}


def localisation(cam_dir: str | Path, manifest: str | Path, records: list[dict], margin_mm: float = 5.0
                 ) -> Localisation:
    """Score the CAMs of ``records`` (as `volttl cam` returns them) for the positive studies."""
    cam_dir = Path(cam_dir)
    rows = {r.study_id: r for r in read_manifest(manifest, check_paths=False)}
    base = Path(manifest).resolve().parent
    per_study = []
    for rec in records:
        row = rows.get(rec["study_id"])
        if row is None or rec["label"] != 1 or not row.extras.get("mask"):
            continue
        cam_img = nib.load(cam_dir / rec["files"]["cam"])
        mask_img = nib.load(base / row.extras["mask"])
        ct_name = rec["files"].get("ct")
        ct_img = nib.load(cam_dir / ct_name) if ct_name else nib.load(row.path)
        for name, img in (("lesion mask", mask_img), ("CT", ct_img)):
            if img.shape != cam_img.shape or not np.allclose(img.affine, cam_img.affine, atol=1e-3):
                raise VolttlError(f"{rec['study_id']}: the {name} is not on the CAM's grid")
        spacing = tuple(float(v) for v in cam_img.header.get_zooms()[:3])
        score = study_localisation(np.asarray(cam_img.dataobj, dtype=np.float32),
                                   np.asarray(mask_img.dataobj) > 0, np.asarray(ct_img.dataobj),
                                   spacing, margin_mm)
        per_study.append({"study_id": rec["study_id"], **score})
    ratios = [s["ratio"] for s in per_study if np.isfinite(s["ratio"])]
    return Localisation(len(per_study), sum(s["hit"] for s in per_study),
                        float(np.mean(ratios)) if ratios else float("nan"), per_study, margin_mm)


def write_localisation(cam_dir: str | Path, manifest: str | Path, records: list[dict],
                       margin_mm: float = 5.0) -> Localisation | None:
    """Score the overlays against the manifest's lesion masks and write
    ``localisation.json`` beside them; None (nothing written) when no positive study of
    ``records`` has a mask, as on real cohorts."""
    found = localisation(cam_dir, manifest, records, margin_mm)
    if not found.studies:
        return None
    CamDir(cam_dir).localisation.write_text(json.dumps(
        {"summary": found.line(), "margin_mm": margin_mm, "studies": found.studies, "hits": found.hits,
         "hit_rate": found.hit_rate, "mean_ratio": found.mean_ratio, "per_study": found.per_study},
        indent=2), encoding="utf-8")
    return found
