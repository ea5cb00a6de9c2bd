"""DICOM objects for PACS beside an overlay (``--dicom``, DICOM sources only), written with
highdicom: a Parametric Map of the Grad-CAM, a Secondary Capture of the preview, and a
Comprehensive 3D Structured Report with the study's probability, the call at the run's
operating point, the model and run, and the best window's centre.

**Patient data.** These objects are filed with the patient's study, so they carry the
patient and study identifiers the standard requires (Patient: name, ID, birth date, sex;
General Study: instance UID, date, time, ID, accession number, referring physician) and
nothing else of the source: each source header is reduced to those identifiers and its
geometry before highdicom sees it (:func:`reference_header`). Nothing of them is logged
or written anywhere else.

The map is stored as 8-bit values with a real-world value mapping of slope 1/255 (0 to 1,
no unit), on the source series' own grid and Frame of Reference, one frame per slice of
the volume volttl read; it references every source instance.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from volttl import __version__
from volttl.errors import VolttlError
from volttl.io.geometry import Geometry

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
GEOMETRY_AND_IDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "InstanceNumber", "SeriesNumber",
                    "Laterality")
SERIES_NUMBERS = {"map": 9901, "capture": 9902, "report": 9903}
PM_MAX = 65535  # the Parametric Map's stored value for a map value of 1
MANUFACTURER = "volttl"
_LOCAL = "99VOLTTL"  # the private coding scheme of this report's own concepts


class DicomOutputError(VolttlError):
    """DICOM objects that cannot be derived from this source."""


def reference_header(ds: Dataset) -> Dataset:
    """The part of a source header a derived object may copy: the required patient and
    study identifiers (Type 2 ones left empty where the source lacks them) and the
    image's own identity and geometry."""
    out = Dataset()
    for key in IDENTIFIERS:
        setattr(out, key, ds.data_element(key).value if key in ds else None)
    for key in GEOMETRY_AND_IDS:
        if key in ds:
            setattr(out, key, ds.data_element(key).value)
    return out


def _plane_positions(geo: Geometry):
    """Each slice's position on the volume's grid (the source's positions, or their
    uniform resampling), so frame k holds slice k of the map."""
    import highdicom as hd

    direction = np.asarray(geo.direction, dtype=float)
    origin, dz = np.asarray(geo.origin, dtype=float), float(geo.spacing[2])
    return [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                     [float(v) for v in origin + k * dz * direction[:, 2]])
            for k in range(geo.shape[0])]


def parametric_map(headers: list[Dataset], cam: np.ndarray, geo: Geometry, description: str,
                   compression: str = "none"):
    """The map ``(slices, rows, cols)`` in [0, 1] on the source grid ``geo``, its pixels
    RLE Lossless compressed with ``compression: rle``."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    if tuple(cam.shape) != tuple(geo.shape) or len(headers) == 0:
        raise DicomOutputError(f"the map's grid {cam.shape} is not the source series' {geo.shape}")
    direction = np.asarray(geo.direction, dtype=float)
    orientation = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
    # integer Pixel Data of a Parametric Map is 16 bits (PS3.3 C.8.32.2); the real-world
    # value mapping takes it back to the map's 0..1
    stored = np.rint(np.clip(cam, 0, 1) * PM_MAX).astype(np.uint16)
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    mapping = hd.pm.RealWorldValueMapping(lut_label="GradCAM", lut_explanation="Grad-CAM relevance, 0 to 1",
                                          unit=unit, value_range=(0, PM_MAX), slope=1 / PM_MAX, intercept=0.0)
    return hd.pm.ParametricMap(
        source_images=headers, pixel_array=stored, series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["map"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="volttl Grad-CAM", software_versions=__version__,
        device_serial_number="0", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=PM_MAX / 2,
                                                          window_width=float(PM_MAX))],
        plane_positions=_plane_positions(geo),
        plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, orientation),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[float(geo.spacing[1]), float(geo.spacing[0])],
                                                slice_thickness=float(geo.spacing[2]),
                                                spacing_between_slices=float(geo.spacing[2])),
        content_description=description[:64], content_label="GRADCAM",
        transfer_syntax_uid=RLELossless if compression == "rle" else ExplicitVRLittleEndian)


def secondary_capture(header: Dataset, rgb: np.ndarray):
    """The preview picture (RGB, 8 bit) for viewers that cannot show parametric maps."""
    import highdicom as hd

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=np.ascontiguousarray(rgb[..., :3]), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["capture"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "P"))
    # the picture's text is orientation letters, view names, p(PE) and the colour bar's
    # label: nothing that identifies the patient or the date (the preview leaves the study id out)
    sc.BurnedInAnnotation = "NO"
    return sc


def report(headers: list[Dataset], record: dict, frame_of_reference: str, centre_lps: list[float] | None):
    """A Comprehensive 3D SR: probability, call and threshold, model and run, best window."""
    import highdicom as hd
    from highdicom.sr import CodedConcept

    contains = hd.sr.RelationshipTypeValues.CONTAINS

    def concept(code: str, meaning: str) -> CodedConcept:
        return CodedConcept(code, _LOCAL, meaning)

    no_unit = CodedConcept("1", "UCUM", "no units")
    items = [hd.sr.NumContentItem(name=concept("PEPROB", "Probability of pulmonary embolism"),
                                  value=float(record["probability"]), unit=no_unit,
                                  relationship_type=contains),
             hd.sr.TextContentItem(name=concept("MODEL", "Model"), value=record["model_text"][:1024],
                                   relationship_type=contains)]
    if record.get("predicted_label") is not None:
        call = "positive" if record["predicted_label"] else "negative"
        items.append(hd.sr.TextContentItem(
            name=concept("CALL", "Call at the operating point"),
            value=f"{call} (threshold {record['threshold']:.4f}, chosen on validation studies)",
            relationship_type=contains))
    if centre_lps is not None:
        items.append(hd.sr.Scoord3DContentItem(
            name=concept("BESTWIN", "Centre of the highest-scoring window"),
            graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=np.asarray([centre_lps], dtype=float),
            frame_of_reference_uid=frame_of_reference, relationship_type=contains))
    root = hd.sr.ContainerContentItem(name=concept("REPORT", "volttl pulmonary embolism analysis"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.Comprehensive3DSR(evidence=headers, content=root, series_instance_uid=hd.UID(),
                                 series_number=SERIES_NUMBERS["report"], sop_instance_uid=hd.UID(),
                                 instance_number=1, manufacturer=MANUFACTURER)
    # the private scheme of the report's own concepts, declared as PS3.3 C.12.1.1.2 asks
    scheme = Dataset()
    scheme.CodingSchemeDesignator = _LOCAL
    scheme.CodingSchemeName = "volttl pulmonary embolism analysis concepts"
    scheme.CodingSchemeResponsibleOrganization = "volttl"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _laterality_as_source(obj: Dataset, source: Dataset) -> None:
    """General Series' Laterality (Type 2C): the source's, or sent empty (unknown), as a
    derived image of a thorax series should carry it."""
    obj.Laterality = source.get("Laterality") or None


def write_dicom_objects(meta, cam: np.ndarray, record: dict, folder, preview_png, best_centre_ras,
                        compression: str = "none") -> dict:
    """The three objects of a DICOM study, written beside its overlay; returns their
    file names by kind. ``cam``: the map on the original grid; ``record``: the overlay's
    record (probability, call); ``best_centre_ras``: the best window's centre (RAS mm);
    ``compression``: the Parametric Map's (``cam.dicom_compression``)."""
    from pathlib import Path

    from volttl.io.dicom import series_headers
    from volttl.outputs.folders import CamDir

    if meta.source_kind != "dicom":
        raise DicomOutputError(f"{meta.source}: DICOM objects are derived from DICOM sources only "
                               f"(this one is {meta.source_kind})")
    headers = [reference_header(h) for h in series_headers(meta.source, meta.series_uid or None)]
    geo = meta.original
    if len(headers) != geo.shape[0]:
        raise DicomOutputError(f"{meta.source}: the series now has {len(headers)} slices, the store recorded "
                               f"{geo.shape[0]}; preprocess it again")
    for h in headers:  # Type 2 in CT images, so sometimes absent: the grid volttl read says it
        if "SliceThickness" not in h or h.SliceThickness in (None, ""):
            h.SliceThickness = float(geo.spacing[2])
    folder = CamDir(folder)
    model = f"Grad-CAM of {record['model_text']}"
    files = {}
    try:
        pm = parametric_map(headers, cam, geo, model, compression)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:  # highdicom's checks of the source
        raise DicomOutputError(f"{meta.source}: no Parametric Map could be derived from this series "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    _laterality_as_source(pm, headers[0])
    pm.save_as(folder.parametric_map(meta.study_id))
    files["parametric_map"] = folder.parametric_map(meta.study_id).name
    if preview_png is not None and Path(preview_png).is_file():
        from matplotlib.image import imread

        rgb = np.rint(imread(preview_png)[..., :3] * 255).astype(np.uint8)
        sc = secondary_capture(headers[0], rgb)
        _laterality_as_source(sc, headers[0])
        sc.save_as(folder.secondary_capture(meta.study_id))
        files["secondary_capture"] = folder.secondary_capture(meta.study_id).name
    r, a, s = best_centre_ras
    sr = report(headers, record, str(headers[0].FrameOfReferenceUID), [-r, -a, s])
    sr.save_as(folder.report(meta.study_id))
    files["report"] = folder.report(meta.study_id).name
    return files
