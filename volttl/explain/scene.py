"""A 3D Slicer scene beside each overlay: open ``<study>_scene.mrml`` and the CT appears
at a CT-angiography window with the Grad-CAM over it (colour table, opacity and threshold
of :mod:`volttl.explain.display`) and a point at the map's peak, named with the study's
probability. No manual step.

The scene references its files by paths relative to itself (the overlay, the CT written
beside it or the source NIfTI, the colour table, the peak as a Markups JSON file), so the
folder can be moved with the data it points at. Only Slicer's built-in grey colour table
is referenced by name.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from volttl.explain.display import CAM_OPACITY, CAM_THRESHOLD, COLOUR_TABLE, CT_LEVEL, CT_WIDTH, colour_table
from volttl.outputs.folders import CamDir

BUILT_IN = {"vtkMRMLColorTableNodeGrey"}  # Slicer's own nodes a scene may name without defining
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")


def write_colour_table(folder: Path) -> Path:
    """The overlay's colour table in Slicer's text format (index name R G B A)."""
    path = CamDir(folder).colour_table
    if not path.is_file():
        rows = [f"{i} {COLOUR_TABLE}{i} {r} {g} {b} 255" for i, (r, g, b) in enumerate(colour_table())]
        header = f"# {COLOUR_TABLE}, written by volttl for its Grad-CAM overlays"
        path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_peak(path: Path, peak_ras: list[float], label: str) -> None:
    """A Markups point at the peak; Slicer's files are in LPS."""
    r, a, s = peak_ras
    path.write_text(json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [{
        "type": "Fiducial", "coordinateSystem": "LPS", "locked": True,
        "controlPoints": [{"id": "1", "label": label, "position": [-r, -a, s], "locked": True}]}]}, indent=2),
        encoding="utf-8")


def _node(root: ET.Element, tag: str, **attrs: str) -> ET.Element:
    return ET.SubElement(root, tag, {k: str(v) for k, v in attrs.items()})


def _volume(root: ET.Element, n: int, name: str, file: str, display: dict) -> str:
    volume, shown, stored = (f"vtkMRMLScalarVolumeNode{n}", f"vtkMRMLScalarVolumeDisplayNode{n}",
                             f"vtkMRMLVolumeArchetypeStorageNode{n}")
    _node(root, "VolumeArchetypeStorage", id=stored, name=f"{name} storage", fileName=file,
          useCompression="1")
    _node(root, "VolumeDisplay", id=shown, name=f"{name} display", interpolate="1",
          autoWindowLevel="0", **display)
    _node(root, "Volume", id=volume, name=name, references=f"display:{shown};storage:{stored};")
    return volume


def write_scene(folder: Path, study_id: str, cam_file: str, ct_path: Path | None,
                peak_ras: list[float] | None, probability: float) -> Path:
    """``<study>_scene.mrml`` in ``folder``; ``ct_path`` is the CT on the overlay's grid
    (written beside it, or the source NIfTI), ``peak_ras`` None for an all-zero map."""
    folder = Path(folder)
    root = ET.Element("MRML", version="Slicer4.4.0", userTags="")
    colours = write_colour_table(folder)
    _node(root, "ColorTableStorage", id="vtkMRMLColorTableStorageNode1", name=f"{COLOUR_TABLE} storage",
          fileName=colours.name)
    _node(root, "ColorTable", id="vtkMRMLColorTableNode1", name=f"volttl {COLOUR_TABLE}", type="13",
          numcolors="256", references="storage:vtkMRMLColorTableStorageNode1;")
    background = ""
    if ct_path is not None:
        relative = Path(os.path.relpath(ct_path, folder)).as_posix()
        grey = {"colorNodeID": "vtkMRMLColorTableNodeGrey", "window": CT_WIDTH, "level": CT_LEVEL}
        background = _volume(root, 1, f"{study_id} CT", relative, grey)
    foreground = _volume(root, 2, f"{study_id} Grad-CAM", cam_file,
                         {"colorNodeID": "vtkMRMLColorTableNode1", "window": 1.0, "level": 0.5,
                          "applyThreshold": "1", "autoThreshold": "0", "lowerThreshold": CAM_THRESHOLD,
                          "upperThreshold": 1.0})
    if peak_ras is not None:
        peak_file = CamDir(folder).peak(study_id).name
        write_peak(folder / peak_file, peak_ras, f"Grad-CAM peak, p(PE) = {probability:.3f}")
        # the .mrk.json reader; MarkupsFiducialStorage is the legacy .fcsv (CSV) reader
        _node(root, "MarkupsJsonStorage", id="vtkMRMLMarkupsJsonStorageNode1", name="peak storage",
              fileName=peak_file)
        _node(root, "MarkupsFiducial", id="vtkMRMLMarkupsFiducialNode1", name=f"{study_id} peak",
              references="storage:vtkMRMLMarkupsJsonStorageNode1;")
    for view in ("Red", "Yellow", "Green"):
        # singletonTag: the view's own composite node takes these settings (Slicer writes it so);
        # without it the scene adds a second node that no view shows
        _node(root, "SliceComposite", id=f"vtkMRMLSliceCompositeNode{view}", singletonTag=view,
              layoutName=view, backgroundVolumeID=background, foregroundVolumeID=foreground,
              foregroundOpacity=CAM_OPACITY)
    ET.indent(root)
    path = CamDir(folder).scene(study_id)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path
