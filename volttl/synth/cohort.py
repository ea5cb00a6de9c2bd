"""A synthetic CTPA cohort that looks like the real thing to the pipeline.

Each study is an analytic thorax phantom in LPS millimetres (body, fat, lungs around
-850 HU, mediastinum, heart, spine, aorta, and a contrast-filled pulmonary arterial
tree from the trunk into both lungs), sampled on its own scanner-like grid (0.6-0.8 mm
pixels, 1.0-2.5 mm slices, non-zero origin, some grids rotated). Positive studies have
emboli: filling defects of +20..+60 HU over a run of slices, one in a central artery
and one to three more in central or lobar arteries. Half the studies are written as DICOM
series (one file per slice, random file names, InstanceNumber running against position,
a scout image beside one series, fake patient tags), the rest as NIfTI. A lesion mask
per study and ``manifest.csv`` go with them. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from volttl.io.geometry import Geometry
from volttl.io.nifti import write_nifti
from volttl.manifests.schema import StudyRow, write_manifest
from volttl.outputs.folders import SynthDir

AIR, FAT, SOFT, LUNG, BONE = -1000.0, -100.0, 40.0, -850.0, 700.0
THICKNESSES = (1.0, 1.25, 1.5, 2.0, 2.5)


@dataclass
class Segment:
    """A tube from ``a`` to ``b`` (mm, LPS) of radius ``r`` mm."""

    a: np.ndarray
    b: np.ndarray
    r: float
    level: str  # "central", "lobar" or "segmental"


def _grid_geometry(rng: np.random.Generator, index: int, matrix: int) -> Geometry:
    px = float(np.round(rng.uniform(0.6, 0.8), 4))
    dz = float(rng.choice(THICKNESSES))
    extent = rng.uniform(80.0, 110.0)
    n = int(extent / dz)
    angle = np.deg2rad(18.0) if index % 5 == 1 else 0.0  # some gantry-rotated grids
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    fov = matrix * px
    centre_offset = direction[:, :2] @ np.array([fov / 2, fov / 2])
    origin = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-260, -120)])
    origin[:2] -= centre_offset[:2]
    return Geometry(
        shape=(n, matrix, matrix),
        spacing=(px, px, dz),
        origin=tuple(float(v) for v in np.round(origin, 3)),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )


def _world_coords(geo: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, r, c = geo.shape
    a = geo.affine_lps()
    k, j, i = np.arange(n, dtype=np.float32), np.arange(r, dtype=np.float32), np.arange(c, dtype=np.float32)
    out = []
    for axis in range(3):
        out.append((a[axis, 3] + a[axis, 0] * i[None, None, :] + a[axis, 1] * j[None, :, None]
                    + a[axis, 2] * k[:, None, None]).astype(np.float32))
    return out[0], out[1], out[2]


def _box_slices(geo: Geometry, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index-space bounding box (k, j, i slices) of a world-space box."""
    inv = np.linalg.inv(geo.affine_lps())
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    idx = (inv @ corners.T)[:3]
    mins, maxs = np.floor(idx.min(axis=1)).astype(int), np.ceil(idx.max(axis=1)).astype(int) + 1
    n, r, c = geo.shape
    sl = []
    for lo_i, hi_i, size in zip(mins[::-1], maxs[::-1], (n, r, c), strict=True):
        lo_i, hi_i = max(lo_i, 0), min(hi_i, size)
        if lo_i >= hi_i:
            return None
        sl.append(slice(lo_i, hi_i))
    return tuple(sl)


def _tube_mask(geo, coords, a, b, r) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    box = _box_slices(geo, np.minimum(a, b) - r, np.maximum(a, b) + r)
    if box is None:
        return None
    x, y, z = (c[box] for c in coords)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    return box, d2 <= r * r


def _arterial_tree(rng, centre: np.ndarray, half: np.ndarray) -> list[Segment]:
    """Pulmonary trunk, main, lobar and segmental arteries in mm (normalised layout)."""

    def p(u, v, w):
        jit = rng.uniform(-0.04, 0.04, 3)
        return centre + (np.array([u, v, w]) + jit) * half

    ax = half[0]
    bif = p(0.0, -0.05, 0.15)
    segs = [Segment(p(0.12, -0.35, -0.55), bif, 0.14 * ax, "central")]
    for side in (-1.0, 1.0):
        hilum = p(side * 0.38, 0.05, 0.12)
        segs.append(Segment(bif, hilum, 0.10 * ax, "central"))
        for end in (p(side * 0.5, -0.05, 0.75), p(side * 0.62, -0.15, -0.1),
                    p(side * 0.45, 0.25, -0.75)):
            segs.append(Segment(hilum, end, 0.07 * ax, "lobar"))
            for _ in range(2):
                tip = end + np.array([side * rng.uniform(0.05, 0.15), rng.uniform(-0.15, 0.15),
                                      rng.uniform(-0.2, 0.2)]) * half
                segs.append(Segment(end, tip, 0.035 * ax, "segmental"))
    return segs


def render_study(geo: Geometry, rng: np.random.Generator, positive: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """HU volume and lesion mask, both ``(k, j, i)``, for one phantom on grid ``geo``."""
    x, y, z = _world_coords(geo)
    n, r, c = geo.shape
    centre_idx = np.array([(c - 1) / 2, (r - 1) / 2, (n - 1) / 2, 1.0])
    centre = (geo.affine_lps() @ centre_idx)[:3] + np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), 0])
    fov = c * geo.spacing[0]
    half = np.array([0.42 * fov, 0.32 * fov, 0.5 * n * geo.spacing[2]])
    u, v, w = (x - centre[0]) / half[0], (y - centre[1]) / half[1], (z - centre[2]) / half[2]

    hu = np.full(geo.shape, AIR, dtype=np.float32)
    body = u ** 2 + v ** 2 <= 1.0
    hu[body] = FAT
    hu[u ** 2 / 0.88 ** 2 + v ** 2 / 0.86 ** 2 <= 1.0] = SOFT
    apex = np.sqrt(np.clip(1.0 - np.clip(w - 0.55, 0, None) ** 2 / 0.45 ** 2, 0.0, 1.0))
    for side in (-1.0, 1.0):
        lung = ((u - side * 0.45) / (0.33 * apex + 1e-6)) ** 2 + (v / (0.62 * apex + 1e-6)) ** 2 <= 1
        hu[lung] = LUNG + rng.normal(0, 30, size=int(lung.sum())).astype(np.float32)
    heart = ((u - 0.12) / 0.3) ** 2 + ((v + 0.3) / 0.35) ** 2 + ((w + 0.45) / 0.5) ** 2 <= 1
    hu[heart] = 55.0
    hu[(u / 0.12) ** 2 + ((v - 0.78) / 0.14) ** 2 <= 1] = BONE
    hu[((u - 0.16) / 0.08) ** 2 + ((v - 0.5) / 0.1) ** 2 <= 1] = rng.uniform(250, 380)

    coords = (x, y, z)
    contrast = float(rng.uniform(250, 400))
    tree = _arterial_tree(rng, centre, half)
    for seg in tree:
        m = _tube_mask(geo, coords, seg.a, seg.b, seg.r)
        if m is not None:
            box, inside = m
            hu[box][inside] = contrast
    mask = np.zeros(geo.shape, dtype=np.uint8)
    if positive:
        # one embolus in a central artery (saddle or main), one to three more central or lobar
        central = [s for s in tree if s.level == "central"]
        others = [s for s in tree if s.level in ("central", "lobar")]
        first = central[int(rng.integers(len(central)))]
        rest = [s for s in others if s is not first]
        picks = [first] + [rest[int(k)] for k in rng.choice(len(rest), size=int(rng.integers(1, 4)),
                                                             replace=False)]
        for seg in picks:
            t0 = rng.uniform(0.05, 0.25)
            t1 = min(1.0, t0 + rng.uniform(0.55, 0.75))
            a, b = seg.a + t0 * (seg.b - seg.a), seg.a + t1 * (seg.b - seg.a)
            m = _tube_mask(geo, coords, a, b, 0.9 * seg.r)
            if m is not None:
                box, inside = m
                hu[box][inside] = rng.uniform(20, 60)
                mask[box][inside] = 1
    hu += rng.normal(0, 10, size=hu.shape).astype(np.float32)
    hu[~body] = AIR + rng.normal(0, 5, size=int((~body).sum())).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), mask


def write_dicom_series(hu: np.ndarray, geo: Geometry, folder: Path, rng: np.random.Generator,
                       index: int, seed: int, with_scout: bool) -> None:
    """One CT Image Storage file per slice, random names, fake patient tags."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = hu.shape
    d = np.asarray(geo.direction)
    study_uid = generate_uid(entropy_srcs=[str(seed), str(index), "study"])
    series_uid = generate_uid(entropy_srcs=[str(seed), str(index), "series"])
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)

    def base(sop_uid: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.PatientName = f"Synthetic^Patient{index:03d}"
        ds.PatientID = f"SYNPID{seed:04d}{index:04d}"
        ds.PatientBirthDate = "19600101"
        ds.OtherPatientIDs = f"SYNOTHER{index:04d}"
        ds.InstitutionName = "Synthetic General Hospital"
        ds.Modality = "CT"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(seed), str(index), "for"])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.KVP = 100
        return ds

    for k in range(n):
        ds = base(generate_uid(entropy_srcs=[str(seed), str(index), "sop", str(k)]))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 2
        ds.InstanceNumber = n - k  # scanners often number from the top: order must come from positions
        position = np.asarray(geo.origin) + d[:, 2] * geo.spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{geo.spacing[1]:.4f}", f"{geo.spacing[0]:.4f}"]
        ds.SliceThickness = f"{geo.spacing[2]:.3f}"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"{uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | k).hex}.dcm",
                   enforce_file_format=True)
    if with_scout:  # a localizer in the same folder: the series rule must pass over it
        ds = base(generate_uid(entropy_srcs=[str(seed), str(index), "scout"]))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), str(index), "scout-series"])
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in geo.origin]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.PixelSpacing = ["1.0", "1.0"]
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = stored[n // 2].tobytes()
        ds.save_as(SynthDir.scout(folder), enforce_file_format=True)


def _stratified_splits(studies: int, seed: int) -> list[str]:
    """Half train, a quarter val, a quarter test, within negatives (even) and positives (odd)."""
    splits = [""] * studies
    rng = np.random.default_rng(seed)
    for parity in (0, 1):
        members = rng.permutation(np.arange(parity, studies, 2))
        m = len(members)
        for rank, index in enumerate(members):
            splits[int(index)] = "train" if rank < m // 2 else "val" if rank < 3 * m // 4 else "test"
    return splits


def _write_study(out: Path, seed: int, index: int, matrix: int, split: str) -> StudyRow:
    """Render and write study ``index``; deterministic for (seed, index), whichever process runs it."""
    rng = np.random.default_rng([seed, index])
    sid, folder = f"synth{index:03d}", SynthDir(out)
    positive = index % 2 == 1
    geo = _grid_geometry(rng, index, matrix)
    hu, mask = render_study(geo, rng, positive)
    if (index // 2) % 2 == 0:  # pairs of (negative, positive): the format says nothing of the label
        path = folder.series(sid)
        write_dicom_series(hu, geo, path, rng, index, seed, with_scout=index == 0)
    else:
        path = folder.nifti(sid)
        write_nifti(hu, geo, path)
    write_nifti(mask, geo, folder.mask(sid))
    path, mask_path = path.relative_to(out), folder.mask(sid).relative_to(out)  # the manifest's paths
    pe = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()
    return StudyRow(sid, str(path), int(positive and bool(pe)), split, pe, {"mask": str(mask_path)})


def synth_cohort(out: str | Path, studies: int = 40, seed: int = 0, matrix: int = 160,
                 progress: bool = True, workers: int = 1) -> Path:
    """Write the cohort under ``out`` (``workers`` processes); returns the manifest path."""
    from concurrent.futures import ProcessPoolExecutor

    from volttl.progress import progress_bar

    out = Path(out)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    splits = _stratified_splits(studies, seed)
    jobs = [(out, seed, index, matrix, str(splits[index])) for index in range(studies)]
    bar = progress_bar(total=studies, desc="synth", unit="study", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_study, *job) for job in jobs]
            for fut in futures:
                fut.add_done_callback(lambda _: bar.update())
            rows = [fut.result() for fut in futures]
    else:
        rows = []
        for job in jobs:
            rows.append(_write_study(*job))
            bar.update()
    bar.close()
    folder = SynthDir(out)
    write_manifest(rows, folder.manifest)
    folder.cohort.write_text(json.dumps({"synthetic": True, "made_by": "volttl synth", "studies": studies,
                                         "seed": seed, "matrix": matrix}, indent=2), encoding="utf-8")
    return folder.manifest
