"""One study, read, checked, reoriented and resampled in memory: what `volttl preprocess`
stores and what `volttl predict` scores, by the same code; and the stamps that tell the
store whether a stored study is still this one (its settings, its source files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volttl.io.addresses import source_file, split_hdf5_address
from volttl.io.orientation import OrientationError, to_canonical
from volttl.io.studies import StudyReadError, read_study
from volttl.manifests.schema import StudyRow, format_slices
from volttl.preprocess.resample import resample_to_store
from volttl.preprocess.store import StudyMeta, settings_hash
from volttl.preprocess.windows import pe_flags_on_stored_grid

INT16_MIN, INT16_MAX = -32768, 32767


def _hdf5_geometry(row: StudyRow) -> dict:
    if split_hdf5_address(row.path)[1] is None:
        return {}
    return {"slice_thickness": float(row.extras.get("slice_thickness") or 1.25),
            "pixel_spacing": float(row.extras.get("pixel_spacing") or 1.0)}


def study_settings(row: StudyRow, thickness: float, size: int, penet_rules: bool = False) -> str:
    return settings_hash({
        "path": row.path, "series_uid": row.extras.get("series_uid", ""), "label": row.label,
        "split": row.split, "pe_slices": row.pe_slices, "thickness": thickness, "size": size,
        **_hdf5_geometry(row), **({"penet_rules": True} if penet_rules else {}),
    })


def source_stamp(path: str) -> str:
    """The number, total size and latest modification time of a study's source files (a
    file, or every file under a series folder): a study exported again to the same path
    gets another stamp and is preprocessed again."""
    source = Path(source_file(path))
    files = [source] if source.is_file() else [f for f in source.rglob("*") if f.is_file()]
    stats = [f.stat() for f in files]
    return settings_hash({"files": len(stats), "bytes": sum(st.st_size for st in stats),
                          "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)})


def scan_float_hu(hu: np.ndarray) -> tuple[int, bool]:
    """For float HU, one pass a slice at a time (no volume-sized temporaries): how many
    voxels lie outside int16, and whether every voxel is a whole number."""
    outside, whole = 0, True
    for plane in hu:
        outside += int(np.count_nonzero((plane < INT16_MIN) | (plane > INT16_MAX)))
        whole = whole and bool(np.all(plane == np.floor(plane)))
    return outside, whole


@dataclass
class PreparedStudy:
    """A study as the store holds it, built in memory."""

    hu: np.ndarray  # int16 (slices, size, size), canonical voxel order
    meta: StudyMeta
    pe_flags: np.ndarray  # per stored slice
    warnings: list[str]
    adjusted: str = ""  # what preprocess.penet_rules changed ("" when nothing)


def prepare_study(row: StudyRow, thickness: float, size: int, window: int, settings: str = "",
                  penet_rules: bool = False) -> PreparedStudy:
    """Read, check, reorient and resample one study in memory: what `volttl preprocess`
    stores and what `volttl predict` scores, by the same code. ``penet_rules``: a study
    shorter than one window is kept (read padded with air) and pe_slices past its end are
    dropped, as PENet does with its own dataset; otherwise both are refused."""
    vol = read_study(row.path, row.extras.get("series_uid") or None, **_hdf5_geometry(row))
    source, warnings, adjusted = vol.geometry, list(vol.notes), []
    pe_slices = list(row.pe_slices)
    outside = [p for p in pe_slices if p >= source.shape[0]]
    if outside and penet_rules:
        pe_slices = [p for p in pe_slices if p < source.shape[0]]
        adjusted.append(f"pe_slices {format_slices(outside)} past its {source.shape[0]} slices dropped "
                        f"({len(pe_slices)} kept)")
    elif outside:
        raise StudyReadError(f"{row.path}: pe_slices {format_slices(outside)} lie outside the study's "
                             f"{source.shape[0]} slices (0-{source.shape[0] - 1})")
    clipped, whole = scan_float_hu(vol.hu) if vol.hu.dtype.kind == "f" else (0, False)
    if clipped:
        warnings.append(f"{clipped} voxels outside the int16 range [{INT16_MIN}, {INT16_MAX}] HU "
                        "were clipped to it")
    try:
        vol, canonical_to_source = to_canonical(vol)
    except OrientationError as exc:
        raise StudyReadError(f"{row.path}: {exc}") from None
    if pe_slices and canonical_to_source[2, 2] == 0:
        raise StudyReadError(f"{row.path}: pe_slices count along the file's third voxel axis, which is not "
                             "the patient's head-foot axis here; give pe_slices for an axial volume")
    # whole-number float HU (most NIfTI and NRRD CT) go through int16 as DICOM pixels do, so
    # a study resizes identically whichever format it came in
    hu = vol.hu.astype(np.int16) if whole and not clipped else vol.hu
    geo = vol.geometry
    stored, grid = resample_to_store(hu, geo.spacing[2], thickness, size)
    if grid.num_slices < window and penet_rules:
        adjusted.append(f"{grid.num_slices} slice(s), shorter than one {window}-slice window: "
                        "padded with air")
    elif grid.num_slices < window:
        raise StudyReadError(f"{row.path}: {geo.shape[0]} slice(s) of {geo.spacing[2]:g} mm give "
                             f"{grid.num_slices} stored slice(s) of {thickness:g} mm; at least one window "
                             f"of real data ({window} slices, {window * thickness:g} mm) is needed")
    stored_to_source = canonical_to_source @ grid.stored_to_original()
    source_k = stored_to_source[2, 2] * np.arange(grid.num_slices) + stored_to_source[2, 3]
    flags = pe_flags_on_stored_grid(pe_slices, source.shape[0], source_k)
    meta = StudyMeta(
        study_id=row.study_id, label=row.label, split=row.split,
        pe_slices=np.flatnonzero(flags), pe_slices_original=np.asarray(pe_slices, dtype=np.int64),
        source=row.path, source_kind=vol.source_kind,
        series_uid=row.extras.get("series_uid") or vol.series_uid,
        settings=settings, slice_thickness=thickness, size=size, original=source,
        stored_to_original=stored_to_source, adjusted="; ".join(adjusted))
    return PreparedStudy(stored, meta, flags, warnings, meta.adjusted)
