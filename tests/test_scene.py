"""The 3D Slicer scene written beside each overlay: every reference resolves, every file
is there and relative, and it shows what the previews show."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from volttl.explain.display import CAM_OPACITY, CAM_THRESHOLD, CT_LEVEL, CT_WIDTH
from volttl.explain.scene import BUILT_IN, write_scene


def check_scene(path: Path) -> dict[str, ET.Element]:
    """Parse a scene: each node id once, each reference to a node of the scene (or one of
    Slicer's built-in nodes), each file relative and present. Returns the nodes by id."""
    root = ET.parse(path).getroot()
    assert root.tag == "MRML"
    nodes = {n.get("id"): n for n in root}
    assert len(nodes) == len(root) and None not in nodes
    for node in root:
        targets = [v for k, v in node.attrib.items() if k.endswith("ID") and v]
        for pair in filter(None, node.get("references", "").split(";")):
            role, _, ids = pair.partition(":")
            assert role and ids, pair
            targets += ids.split()
        for target in targets:
            assert target in nodes or target in BUILT_IN, f"{node.get('id')} -> {target}"
        if "fileName" in node.attrib:
            file = Path(node.get("fileName"))
            assert not file.is_absolute() and (path.parent / file).is_file(), file
    return nodes


def test_the_scene_opens_the_overlay_over_its_ct_with_the_preview_settings(tmp_path):
    from matplotlib import colormaps

    (tmp_path / "s1_cam.nii.gz").write_bytes(b"x")
    source = tmp_path / "data" / "s1.nii.gz"  # a NIfTI source: the scene points at it where it is
    source.parent.mkdir()
    source.write_bytes(b"x")
    out = tmp_path / "cam"
    out.mkdir()
    (out / "s1_cam.nii.gz").write_bytes(b"x")
    path = write_scene(out, "s1", "s1_cam.nii.gz", source, [10.0, -20.0, 30.5], 0.8771)
    nodes = check_scene(path)
    volumes = [n for n in nodes.values() if n.tag == "Volume"]
    storage = {n.get("id"): n.get("fileName") for n in nodes.values() if n.tag == "VolumeArchetypeStorage"}
    assert sorted(storage.values()) == ["../data/s1.nii.gz", "s1_cam.nii.gz"]
    ct_display = next(n for n in nodes.values() if n.get("colorNodeID") == "vtkMRMLColorTableNodeGrey")
    assert float(ct_display.get("window")) == CT_WIDTH and float(ct_display.get("level")) == CT_LEVEL
    cam_display = next(n for n in nodes.values() if n.get("colorNodeID") == "vtkMRMLColorTableNode1")
    assert float(cam_display.get("lowerThreshold")) == CAM_THRESHOLD
    assert cam_display.get("applyThreshold") == "1"
    for view in ("Red", "Yellow", "Green"):
        composite = nodes[f"vtkMRMLSliceCompositeNode{view}"]
        assert composite.get("backgroundVolumeID") == volumes[0].get("id")
        assert composite.get("foregroundVolumeID") == volumes[1].get("id")
        assert float(composite.get("foregroundOpacity")) == CAM_OPACITY
    # the colour table is the previews' (inferno), 256 entries
    table = (out / nodes["vtkMRMLColorTableStorageNode1"].get("fileName")).read_text().splitlines()[1:]
    rgb = np.array([[int(v) for v in row.split()[2:5]] for row in table])
    expected = np.rint(255 * colormaps["inferno"].resampled(256)(np.arange(256))[:, :3])
    assert rgb.shape == (256, 3) and np.abs(rgb - expected).max() <= 1
    # the peak: in LPS, as Slicer's Markups files are, named with the probability
    peak = json.loads((out / "s1_peak.mrk.json").read_text())["markups"][0]
    assert peak["coordinateSystem"] == "LPS"
    point = peak["controlPoints"][0]
    assert point["position"] == [-10.0, 20.0, 30.5] and "p(PE) = 0.877" in point["label"]


def test_an_all_zero_map_gets_a_scene_without_a_peak(tmp_path):
    (tmp_path / "s2_cam.nii.gz").write_bytes(b"x")
    nodes = check_scene(write_scene(tmp_path, "s2", "s2_cam.nii.gz", None, None, 0.1))
    assert not [n for n in nodes.values() if n.tag.startswith("Markups")]
    assert not (tmp_path / "s2_peak.mrk.json").exists()


@pytest.mark.parametrize("name", ["a study", "CT Chest #2", "ünïcode"])
def test_names_that_need_escaping_stay_valid_xml(tmp_path, name):
    (tmp_path / f"{name}_cam.nii.gz").write_bytes(b"x")
    check_scene(write_scene(tmp_path, name, f"{name}_cam.nii.gz", None, [0.0, 0.0, 0.0], 0.5))


# What Slicer's own source reads, per XML tag (checked against the Slicer repository): the tag
# is the class's GetNodeTagName(), the attributes are those its ReadXMLAttributes (and its
# superclasses') reads. vtkMRMLNode: id, name, singletonTag, references (Libs/MRML/Core/
# vtkMRMLNode.cxx); vtkMRMLStorageNode: fileName, useCompression; vtkMRMLDisplayNode:
# colorNodeID (vtkMRMLDisplayNode.cxx); vtkMRMLScalarVolumeDisplayNode ("VolumeDisplay"):
# window, level, upperThreshold, lowerThreshold, interpolate, autoWindowLevel, applyThreshold,
# autoThreshold (vtkMRMLScalarVolumeDisplayNode.cxx); vtkMRMLColorTableNode ("ColorTable"):
# type, numcolors; vtkMRMLSliceCompositeNode ("SliceComposite"): foregroundOpacity, layoutName,
# and backgroundVolumeID / foregroundVolumeID as the MRML attribute names of its node
# reference roles (vtkMRMLSliceCompositeNode.cxx); the Markups JSON storage node is
# "MarkupsJsonStorage" (Modules/Loadable/Markups/MRML/vtkMRMLMarkupsJsonStorageNode.h); the
# "MarkupsFiducialStorage" tag is the legacy .fcsv reader, which cannot read a .mrk.json.
NODE = {"id", "name", "singletonTag", "references"}
SLICER_READS = {
    "Volume": ("vtkMRMLScalarVolumeNode", NODE),
    "VolumeDisplay": ("vtkMRMLScalarVolumeDisplayNode", NODE | {
        "colorNodeID", "window", "level", "upperThreshold", "lowerThreshold", "interpolate",
        "autoWindowLevel", "applyThreshold", "autoThreshold"}),
    "VolumeArchetypeStorage": ("vtkMRMLVolumeArchetypeStorageNode", NODE | {"fileName", "useCompression"}),
    "ColorTable": ("vtkMRMLColorTableNode", NODE | {"type", "numcolors"}),
    "ColorTableStorage": ("vtkMRMLColorTableStorageNode", NODE | {"fileName"}),
    "MarkupsFiducial": ("vtkMRMLMarkupsFiducialNode", NODE),
    "MarkupsJsonStorage": ("vtkMRMLMarkupsJsonStorageNode", NODE | {"fileName"}),
    "SliceComposite": ("vtkMRMLSliceCompositeNode", NODE | {
        "layoutName", "backgroundVolumeID", "foregroundVolumeID", "foregroundOpacity"}),
}


def test_every_node_and_attribute_is_one_slicer_reads(tmp_path):
    """Each node is written under its class's own tag (its id names the class), with only
    attributes that Slicer's ReadXMLAttributes reads; the slice views' composite nodes carry
    their singleton tag, as Slicer's own scenes do, so the views take them instead of
    gaining a second node."""
    (tmp_path / "s1_cam.nii.gz").write_bytes(b"x")
    (tmp_path / "s1_ct.nii.gz").write_bytes(b"x")
    nodes = check_scene(write_scene(tmp_path, "s1", "s1_cam.nii.gz", tmp_path / "s1_ct.nii.gz",
                                    [1.0, 2.0, 3.0], 0.5))
    assert {n.tag for n in nodes.values()} == set(SLICER_READS)
    for node_id, node in nodes.items():
        cls, reads = SLICER_READS[node.tag]
        assert node_id.startswith(cls), (node.tag, node_id)
        assert set(node.attrib) <= reads, (node.tag, set(node.attrib) - reads)
    for view in ("Red", "Yellow", "Green"):
        assert nodes[f"vtkMRMLSliceCompositeNode{view}"].get("singletonTag") == view
