"""DICOM CT series to an HU volume, sorted by position along the slice normal.

Why not MONAI's PydicomReader: it sorts by InstanceNumber. Why not SimpleITK's series
reader: it silently accepts gaps and mixed geometry. Here every file is read once with
pydicom, the axial CT series is chosen by a documented rule, and each way a series can
be broken is reported by name. No patient-identifying tag is ever read into a message.

Speed: headers are parsed with the pixel data left on disk (pydicom's ``defer_size``) and
the few tags needed are taken from their raw bytes once per file; native pixel data is
then read with one ``numpy.fromfile`` at its recorded offset. This is what lets reading
beat a plain ``dcmread(...).pixel_array`` loop (see benchmarks/bench_preprocess.py).

Series rule: among CT series (localizers excluded) take the axial ones (slice normal
within ~37 degrees of the patient's z axis); pick the one with the most slices, ties
to the lowest SeriesNumber. ``series_uid`` overrides the rule.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from volttl.errors import VolttlError
from volttl.io.geometry import Geometry, Volume

SKIP_SUFFIXES = {".txt", ".json", ".xml", ".csv", ".md", ".nii", ".gz", ".png", ".jpg"}
AXIAL_MIN_COS = 0.8
DUPLICATE_TOL_MM = 1e-3
GAP_FACTOR = 1.5
# Slice positions further than this from a uniform grid (a share of the slice step) are
# resampled at their true positions: file positions are written to a few decimals, so
# real rounding stays far below it, while uneven series (variable-pitch helical scans,
# merged stacks) exceed it.
UNEVEN_TOLERANCE = 0.02
TILT_TOLERANCE_PX = 0.5  # shear across the whole stack, in pixels, treated as none
DEFER_BYTES = 4096  # elements larger than this (pixel data) stay on disk until read
# DICOM tags read on every slice (group, element)
IMAGE_POSITION = 0x00200032
IMAGE_ORIENTATION = 0x00200037
SERIES_UID = 0x0020000E
ROWS = 0x00280010
COLUMNS = 0x00280011
PIXEL_SPACING = 0x00280030
RESCALE_SLOPE = 0x00281053
RESCALE_INTERCEPT = 0x00281052
BITS_ALLOCATED = 0x00280100
BITS_STORED = 0x00280101
PIXEL_REPRESENTATION = 0x00280103
SAMPLES_PER_PIXEL = 0x00280002
NUMBER_OF_FRAMES = 0x00280008
PIXEL_DATA = 0x7FE00010
SOP_CLASS = 0x00080016
CT_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # one multi-frame file per series


class DicomSeriesError(VolttlError):
    """A DICOM folder that cannot become one clean volume; the message says why."""


def _raw_text(ds: pydicom.Dataset, tag: int) -> list[str] | None:
    """A text element's values (DS, IS, UI, CS) straight from its bytes; None when absent.

    Converting through pydicom's value classes costs more than parsing the file, and
    these few tags are read from every slice."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        text = elem.value.decode("ascii", "replace").strip(" \x00")
        return [v.strip(" \x00") for v in text.split("\\")] if text else []
    value = ds[tag].value
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple | MultiValue) else [str(value)]


def _raw_floats(ds: pydicom.Dataset, tag: int) -> list[float] | None:
    values = _raw_text(ds, tag)
    return [float(v) for v in values] if values else None


def _raw_us(ds: pydicom.Dataset, tag: int, default: int) -> int:
    """An unsigned-short (US) element as int, from its two bytes when still raw."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    if (isinstance(elem, RawDataElement) and isinstance(elem.value, bytes)
            and elem.VR in ("US", None) and elem.length == 2):  # VR None: implicit VR files
        return int.from_bytes(elem.value, "little" if elem.is_little_endian else "big")
    value = ds[tag].value
    return default if value in (None, "") else int(value)


@dataclass
class _Slice:
    """One image file: its header (pixel data still on disk) and the values used often."""

    path: Path
    ds: pydicom.Dataset
    series_uid: str
    position: np.ndarray
    orientation: np.ndarray
    rows: int
    columns: int
    pixel_spacing: np.ndarray
    slope: float | None  # None: RescaleSlope absent
    intercept: float | None  # None: RescaleIntercept absent
    bits_stored: int
    signed: bool


def _sop_class(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = (_raw_text(ds, SOP_CLASS) or [""])[0] if SOP_CLASS in ds else ""
    return uid or str(getattr(meta, "MediaStorageSOPClassUID", "") if meta is not None else "")


def _slice_of(path: Path, ds: pydicom.Dataset) -> _Slice | None:
    """The slice's values, or None for files that are not positioned images (structured
    reports, presentation states). A CT image file that lacks its position, orientation
    or pixel data, or a file with no elements at all, was cut short: named, never skipped."""
    if _sop_class(ds) == ENHANCED_CT:  # geometry lives in per-frame functional groups
        raise DicomSeriesError(f"{path}: Enhanced CT (one multi-frame file) is not supported; export the "
                               "series as classic single-frame CT images (one file per slice)")
    position, orientation = _raw_text(ds, IMAGE_POSITION), _raw_text(ds, IMAGE_ORIENTATION)
    incomplete = not position or not orientation or PIXEL_DATA not in ds
    if incomplete and (len(ds) == 0 or _sop_class(ds) in CT_IMAGE_CLASSES):
        raise DicomSeriesError(f"{path}: unreadable, a truncated or incomplete CT image file "
                               f"({path.stat().st_size} bytes)")
    if not position or not orientation:
        return None
    try:
        position = [float(v) for v in position]
        orientation = [float(v) for v in orientation]
        if len(position) != 3:
            raise ValueError("ImagePositionPatient needs 3 values")
        spacing = _raw_floats(ds, PIXEL_SPACING)
        if not spacing or len(spacing) != 2:
            raise ValueError("PixelSpacing missing or not 2 values")
        return _Slice(
            path=path,
            ds=ds,
            series_uid=(_raw_text(ds, SERIES_UID) or [""])[0],
            position=np.asarray(position, dtype=float),
            orientation=_unit_orientation(orientation),
            rows=_raw_us(ds, ROWS, 0),
            columns=_raw_us(ds, COLUMNS, 0),
            pixel_spacing=np.asarray(spacing, dtype=float),
            slope=(_raw_floats(ds, RESCALE_SLOPE) or [None])[0],
            intercept=(_raw_floats(ds, RESCALE_INTERCEPT) or [None])[0],
            bits_stored=_raw_us(ds, BITS_STORED, 16),
            signed=_raw_us(ds, PIXEL_REPRESENTATION, 0) == 1,
        )
    except (ValueError, IndexError) as exc:  # geometry and rescale tags carry no identity
        raise DicomSeriesError(f"{path}: malformed geometry or rescale tags ({exc})") from None


def _candidate_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            if p.suffix.lower() in SKIP_SUFFIXES:
                continue
            files.append(p)
    return files


def _read_file(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except InvalidDicomError:
        try:  # files written without the 128-byte preamble
            ds = pydicom.dcmread(path, force=True, defer_size=DEFER_BYTES)
        except Exception:
            raise DicomSeriesError(f"{path}: unreadable, not a DICOM file") from None
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            raise DicomSeriesError(f"{path}: unreadable, not a DICOM image file") from None
        return ds
    except Exception as exc:  # truncated header, I/O errors
        raise DicomSeriesError(
            f"{path}: unreadable or truncated DICOM file ({type(exc).__name__})"
        ) from None


def _unit_orientation(values) -> np.ndarray:
    """Row and column direction cosines, renormalised (files round them to a few digits)."""
    o = np.asarray(values, dtype=float)
    if o.shape != (6,):
        raise ValueError("ImageOrientationPatient needs 6 values")
    return np.concatenate([o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])])


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def _is_localizer(s: _Slice) -> bool:
    return "LOCALIZER" in [str(t).upper() for t in getattr(s.ds, "ImageType", [])]


def _describe(uid: str, slices: list[_Slice]) -> str:
    """A series as the manifest's ``series_uid`` names it, with its number and size; never
    its free-text description, which can hold a patient's name."""
    number = getattr(slices[0].ds, "SeriesNumber", "")
    return f"{uid} (number {number}, {len(slices)} slices)"


def _choose_series(series: dict[str, list[_Slice]], folder: Path, series_uid: str | None
                   ) -> tuple[str, list[_Slice], list[str]]:
    """The one series to read, its UID and notes for the user. Never a silent choice: the
    manifest's ``series_uid`` names one; else the folder must hold exactly one axial CT
    series (localizer images left out, each kind of skip said in a note), or it is refused
    with every candidate listed."""
    if series_uid:
        if series_uid not in series:
            raise DicomSeriesError(f"{folder}: series {series_uid} not found in the folder")
        return series_uid, series[series_uid], []
    ct, modalities, notes = {}, set(), []
    for uid, slices in series.items():
        modality = str(getattr(slices[0].ds, "Modality", ""))
        modalities.add(modality or "unknown")
        images = [s for s in slices if not _is_localizer(s)]
        if modality == "CT" and images:
            ct[uid] = images
    if not ct:
        raise DicomSeriesError(
            f"{folder}: no CT series (modality {', '.join(sorted(modalities))}, not CT)"
        )
    axial = {u: s for u, s in ct.items()
             if abs(_normal(s[0].orientation)[2]) >= AXIAL_MIN_COS}
    pool = axial or ct
    if len(pool) > 1:
        listed = "; ".join(_describe(u, s) for u, s in sorted(pool.items()))
        raise DicomSeriesError(f"{folder}: {len(pool)} CT series, none chosen: {listed}; give the one to "
                               "read in the manifest's series_uid column")
    (uid, slices), = pool.items()
    skipped = [u for u in series if u != uid]
    if skipped:
        notes.append(f"read series {_describe(uid, slices)}; left out {len(skipped)} other series "
                     f"(localizers, other modalities or non-axial reformats): {', '.join(sorted(skipped))}")
    localizers = len(series[uid]) - len(slices)
    if localizers:
        notes.append(f"{localizers} localizer image(s) inside series {uid} left out")
    return uid, slices, notes


def _check_consistent(slices: list[_Slice], folder: Path) -> None:
    first = slices[0]
    orientations = np.stack([s.orientation for s in slices])
    bad = np.flatnonzero(np.abs(orientations - first.orientation).max(axis=1) > 1e-4)
    if bad.size:
        raise DicomSeriesError(
            f"{folder}: mixed orientation within the series ({slices[bad[0]].path.name})")
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DicomSeriesError(
                f"{folder}: mixed matrix size within the series ({s.rows}x{s.columns} in "
                f"{s.path.name}, {first.rows}x{first.columns} elsewhere)"
            )
        if s.pixel_spacing.shape != first.pixel_spacing.shape or \
                np.abs(s.pixel_spacing - first.pixel_spacing).max() > 1e-4:
            raise DicomSeriesError(f"{folder}: mixed pixel spacing within the series ({s.path.name})")


def _slice_spacing(slices: list[_Slice], along: np.ndarray, folder: Path) -> float:
    """The series' slice step: the median distance between neighbouring slice positions
    (after :func:`_check_positions`), or the header's spacing for a single slice."""
    if len(slices) == 1:
        ds = slices[0].ds
        return float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", 1.0))
    _check_positions(slices, along, folder)
    return float(np.median(np.diff(along)))


def _check_positions(slices: list[_Slice], along: np.ndarray, folder: Path) -> None:
    """Two slices at one position, or a gap of more than ``GAP_FACTOR`` slice steps
    (missing slices), refused by name."""
    diffs = np.diff(along)
    dup = np.flatnonzero(diffs < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise DicomSeriesError(
            f"{folder}: duplicate slice position {along[i]:.3f} mm "
            f"({slices[i].path.name}, {slices[i + 1].path.name})"
        )
    step = float(np.median(diffs))
    gaps = np.flatnonzero(diffs > GAP_FACTOR * step)
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(diffs[i] / step)) - 1
        raise DicomSeriesError(
            f"{folder}: missing slices, gap of {diffs[i]:.2f} mm after position {along[i]:.2f} mm "
            f"(slice step {step:.2f} mm, about {missing} slice(s) missing)"
        )


def _check_tilt(slices: list[_Slice], normal: np.ndarray, along: np.ndarray, folder: Path) -> None:
    """A gantry-tilted series steps its slice origins off the slice normal: stored as a
    box it would be sheared (about 29 mm over a 20-degree, 80 mm stack). Refused by name."""
    if len(slices) < 2:
        return
    step = slices[-1].position - slices[0].position
    shear = np.linalg.norm(step - (along[-1] - along[0]) * normal)
    if shear > TILT_TOLERANCE_PX * float(min(slices[0].pixel_spacing)):
        degrees = float(np.degrees(np.arctan2(shear, abs(along[-1] - along[0]))))
        raise DicomSeriesError(
            f"{folder}: gantry tilt of {degrees:.1f} degrees (slices shear by {shear:.1f} mm over the "
            "series); volttl does not correct tilt: resample the series first (e.g. dcm2niix, which "
            "corrects it)")


def _onto_uniform_positions(hu: np.ndarray, along: np.ndarray, step: float, folder: Path) -> np.ndarray:
    """Slices at their true positions, resampled linearly onto the uniform grid of ``step``
    from the first slice when any sits further than ``UNEVEN_TOLERANCE`` of a step from it."""
    uniform = along[0] + step * np.arange(len(along))
    if len(along) < 3 or np.abs(along - uniform).max() <= UNEVEN_TOLERANCE * step:
        return hu
    count = int(np.floor((along[-1] - along[0]) / step + 1e-6)) + 1
    targets = along[0] + step * np.arange(count)
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
    lower = upper - 1
    w = ((targets - along[lower]) / (along[upper] - along[lower])).astype(np.float32)
    w = np.clip(w, 0.0, 1.0)[:, None, None]
    out = hu[lower].astype(np.float32) * (1 - w) + hu[upper].astype(np.float32) * w
    return out


def decoder_available(ts) -> bool:
    """Whether pydicom has a working decoder (plugin installed) for a transfer syntax."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:
        return False


NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _decode_native(s: _Slice) -> np.ndarray | None:
    """Uncompressed little-endian 16-bit monochrome read straight from the file at the pixel
    data's offset (what pixel_array does, without its checks and copies); None when
    another path is needed."""
    ds = s.ds
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    if ts not in NATIVE_LITTLE_ENDIAN or _raw_us(ds, BITS_ALLOCATED, 0) != 16:
        return None
    frames = _raw_text(ds, NUMBER_OF_FRAMES)
    if _raw_us(ds, SAMPLES_PER_PIXEL, 1) != 1 or (frames and frames[0] and int(frames[0]) > 1):
        return None  # colour or multi-frame: pydicom's own decoder
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise DicomSeriesError(f"{s.path}: no pixel data")
    dtype = np.dtype("<i2" if s.signed else "<u2")
    count = s.rows * s.columns
    if isinstance(elem, RawDataElement) and elem.value is None:  # deferred: still on disk
        pixels = np.fromfile(s.path, dtype=dtype, count=min(count, elem.length // 2),
                             offset=elem.value_tell)
    else:
        pixels = np.frombuffer(elem.value, dtype=dtype, count=min(count, len(elem.value) // 2))
    if pixels.size < count:
        raise DicomSeriesError(f"{s.path}: truncated pixel data ({pixels.size * 2} of "
                               f"{count * 2} bytes)")
    pixels = pixels.reshape(s.rows, s.columns)
    unused = 16 - s.bits_stored
    if unused:  # bits above HighBit carry no pixel value (overlays, garbage)
        if s.signed:
            pixels = (pixels << unused) >> unused
        else:
            pixels = pixels & np.uint16((1 << (16 - unused)) - 1)
    return pixels


def _decode(s: _Slice) -> np.ndarray:
    ts = getattr(s.ds.file_meta, "TransferSyntaxUID", None)
    native = _decode_native(s)
    if native is not None:
        return native
    try:
        return s.ds.pixel_array
    except Exception as exc:
        if ts is not None and ts.is_compressed and not decoder_available(ts):
            raise DicomSeriesError(
                f"{s.path}: compressed transfer syntax '{ts.name}' and no decoder installed for it "
                "(install pylibjpeg with its plugins, or gdcm)"
            ) from None
        raise DicomSeriesError(
            f"{s.path}: truncated or corrupt pixel data ({type(exc).__name__})"
        ) from None


def _fits_int16(s: _Slice) -> bool:
    """Whether every storable pixel value plus the intercept fits int16 (from the header)."""
    bits = s.bits_stored
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if s.signed else (0, (1 << bits) - 1)
    return -32768 <= lo + s.intercept and hi + s.intercept <= 32767


def _rescaled_stack(slices: list[_Slice], folder: Path) -> np.ndarray:
    """Decode and rescale slice by slice into one array: int16 when the rescale is exact
    (slope 1, integer intercept, range fits: nearly every CT), else float32."""
    slope = [s.slope for s in slices]
    intercept = [s.intercept for s in slices]
    exact = (all(v == 1.0 for v in slope) and all(v.is_integer() for v in intercept)
             and all(_fits_int16(s) for s in slices))
    out = None
    for k, s in enumerate(slices):
        pixels = _decode(s)
        if pixels.ndim != 2:
            raise DicomSeriesError(f"{folder}: multi-frame or colour images are not supported")
        if out is None:
            out = np.empty((len(slices), *pixels.shape), np.int16 if exact else np.float32)
        if exact and pixels.dtype == np.uint16 and s.bits_stored < 16:
            np.add(pixels.view(np.int16), np.int16(intercept[k]), out=out[k])  # exact: < 2**15
        elif exact:
            np.add(pixels, np.int32(intercept[k]), out=out[k], casting="unsafe")
        else:
            np.multiply(pixels, slope[k], out=out[k], casting="unsafe")
            out[k] += intercept[k]
    return out


def _check_rescale(slices: list[_Slice]) -> list[str]:
    """The stored values' meaning (CT: HU = slope * stored + intercept; both tags required).
    A slope that is not a positive finite number, or a non-finite intercept, is refused by
    file name. A missing pair is read as dcm2niix and ITK read it (slope 1, intercept 0)
    and said so: the stored values are then taken as HU, which they may not be. One of
    the two without the other is refused (no reading of it is safe)."""
    for s in slices:
        if s.slope is not None and not (math.isfinite(s.slope) and s.slope > 0):
            raise DicomSeriesError(f"{s.path}: RescaleSlope {s.slope:g} is not a positive number (HU = "
                                   "slope x stored value + intercept); fix the tag or export the series "
                                   "again")
        if s.intercept is not None and not math.isfinite(s.intercept):
            raise DicomSeriesError(f"{s.path}: RescaleIntercept {s.intercept} is not a finite number")
        if (s.slope is None) != (s.intercept is None):
            present = "RescaleSlope" if s.slope is not None else "RescaleIntercept"
            raise DicomSeriesError(f"{s.path}: {present} without its pair; HU cannot be computed")
    missing = [s for s in slices if s.slope is None]
    for s in missing:
        s.slope, s.intercept = 1.0, 0.0
    if not missing:
        return []
    return [f"{len(missing)} of {len(slices)} slice file(s) have no RescaleSlope/RescaleIntercept (required "
            "for CT); their stored values were taken as HU (slope 1, intercept 0), as dcm2niix and ITK do: "
            "check that air reads about -1000"]


def _sorted_series(folder: Path, series_uid: str | None) -> tuple[str, list[_Slice], list[str]]:
    """The chosen series' slices (headers; pixels still on disk), sorted along the slice
    normal as the volume's slices are, with the notes of the choice."""
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: not a folder")
    files = _candidate_files(folder)
    if not files:
        raise DicomSeriesError(f"{folder}: no DICOM files found")
    series: dict[str, list[_Slice]] = {}
    for path in files:
        s = _slice_of(path, _read_file(path))
        if s is not None:
            series.setdefault(s.series_uid, []).append(s)
    if not series:
        raise DicomSeriesError(f"{folder}: no DICOM image with a position and orientation")
    chosen_uid, slices, notes = _choose_series(series, folder, series_uid)
    _check_consistent(slices, folder)
    normal = _normal(slices[0].orientation)
    slices.sort(key=lambda s: float(s.position @ normal))
    return chosen_uid, slices, notes


def series_headers(folder: str | Path, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """The headers of the series :func:`read_dicom_series` reads, in its slice order: what
    DICOM objects derived from the study reference."""
    return [s.ds for s in _sorted_series(Path(folder), series_uid)[1]]


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read the study's axial CT series from ``folder`` as HU, sorted along the slice normal.

    HU come back as int16 when the rescale is exact (slope 1, integer intercept), else float32.
    """
    folder = Path(folder)
    chosen_uid, slices, notes = _sorted_series(folder, series_uid)
    normal = _normal(slices[0].orientation)
    along = np.asarray([float(s.position @ normal) for s in slices])
    dz = _slice_spacing(slices, along, folder)

    _check_tilt(slices, normal, along, folder)
    notes += _check_rescale(slices)
    hu = _rescaled_stack(slices, folder)
    hu = _onto_uniform_positions(hu, along, dz, folder)
    row_spacing, col_spacing = slices[0].pixel_spacing[:2]
    direction = np.stack([slices[0].orientation[:3], slices[0].orientation[3:], normal], axis=1)
    geometry = Geometry(
        shape=tuple(int(v) for v in hu.shape),
        spacing=(float(col_spacing), float(row_spacing), float(dz)),
        origin=tuple(float(v) for v in slices[0].position),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )
    return Volume(hu=hu, geometry=geometry, source_kind="dicom", notes=notes, series_uid=chosen_uid)
