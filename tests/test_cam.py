"""Grad-CAM overlays: geometry checked against pydicom/nibabel directly, and the files `cam` writes."""

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from volttl.config import config_from_dict
from volttl.data.input_spec import InputSpec
from volttl.explain.gradcam import (
    WindowGradCAM,
    default_target_layer,
    feature_stride,
    sliding_window_starts,
    stitch_study,
)
from volttl.explain.regrid import to_original_grid
from volttl.explain.step import cam_step, overlay_on_original
from volttl.io import read_study
from volttl.io.nifti import write_nifti
from volttl.models.checkpoints import state_digest
from volttl.preprocess.step import preprocess_step
from volttl.preprocess.store import StudyMeta
from volttl.train.step import train_run

from .conftest import shared_path, small_config

SIZE, THICKNESS = 48, 2.0


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("camstore") / "s.h5"
    assert not preprocess_step(small_config(cohort, path, size=SIZE, slice_thickness=THICKNESS),
                          progress=False).failed
    return path


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    """A tiny trained model: one epoch of TTL on ResNeXt3D-50 after its first block."""
    out = tmp_path_factory.mktemp("camrun")
    cfg = config_from_dict({
        "data": {"store": str(store), "crop": 40},
        "model": {"name": "resnext3d_50"},
        "transfer": {"strategy": "ttl", "cut": "layer1.0"},
        "train": {"epochs": 1, "batch_size": 4, "workers": 0, "seed": 1, "out_dir": str(out)},
        "eval": {"bootstrap": 0}, "cam": {"batch_size": 3}})
    train_run(cfg, out / "run", progress=False)
    # one epoch leaves the head's sign arbitrary, and Grad-CAM of a model that finds no positive
    # evidence anywhere is all zero; positive head weights make every window's map non-trivial
    best = out / "run" / "best.pt"
    ckpt = torch.load(best, weights_only=False)
    ckpt["model_state"]["fc.weight"] = ckpt["model_state"]["fc.weight"].abs()
    ckpt["state_sha256"] = state_digest(ckpt["model_state"])  # an edit made on purpose
    torch.save(ckpt, best)
    return out / "run"


def _dicom_world_ras(folder: Path, ijk: np.ndarray) -> np.ndarray:
    """RAS mm of original voxel (i, j, k), from the DICOM tags alone (pydicom, no volttl)."""
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    slices = [d for d in slices if "AXIAL" in list(d.ImageType)]
    row, col = (np.array(d, dtype=float) for d in np.split(np.array(slices[0].ImageOrientationPatient,
                                                                      dtype=float), 2))
    normal = np.cross(row, col)
    slices.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), normal)))
    first = np.array(slices[0].ImagePositionPatient, dtype=float)
    step = np.array(slices[1].ImagePositionPatient, dtype=float) - first
    dy, dx = (float(v) for v in slices[0].PixelSpacing)  # (row spacing, column spacing)
    i, j, k = ijk
    lps = first + i * dx * row + j * dy * col + k * step
    return lps * np.array([-1.0, -1.0, 1.0])


def test_a_hot_region_lands_on_the_same_world_coordinates(cohort, store, tmp_path):
    """synth001 is a DICOM series on a rotated grid with anisotropic voxels and an offset origin."""
    with h5py.File(store, "r") as f:
        attrs = dict(f["studies/synth001"].attrs)
        stored_shape = f["studies/synth001/hu"].shape
    assert not np.allclose(np.asarray(attrs["original_direction"]), np.eye(3))
    hot = np.zeros(stored_shape, dtype=np.float32)
    s0, r0, c0 = stored_shape[0] // 2, 30, 9  # off-centre and asymmetric: a transpose would show
    hot[s0: s0 + 2, r0: r0 + 4, c0: c0 + 3] = 1.0
    cam_map, geo = overlay_on_original(hot, StudyMeta.from_attrs(attrs))
    write_nifti(cam_map, geo, tmp_path / "hot.nii.gz")

    img = nib.load(tmp_path / "hot.nii.gz")
    data = np.asarray(img.dataobj)  # (i, j, k)
    idx = np.argwhere(data > 0.5)
    written = (img.affine @ np.append(idx.mean(axis=0), 1.0))[:3]
    # where that box is, by the preprocessing rule: stored (c, r, s) -> original (i, j, k)
    n, rows, cols = (int(v) for v in attrs["original_shape"])
    dz = float(attrs["original_spacing"][2])
    centre = np.array([c0 + 1.0, r0 + 1.5, s0 + 0.5])
    ijk = np.array([(centre[0] + 0.5) * cols / SIZE - 0.5, (centre[1] + 0.5) * rows / SIZE - 0.5,
                    centre[2] * THICKNESS / dz])
    expected = _dicom_world_ras(Path(str(attrs["source"])), ijk)
    voxel = np.asarray(img.header.get_zooms()[:3])
    assert np.abs(written - expected).max() < voxel.max()
    assert data.shape == (cols, rows, n) and data.dtype == np.float32


def test_regrid_is_separable_linear_interpolation():
    stored = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    s2o = np.diag([2.0, 1.0, 3.0, 1.0])
    s2o[0, 3] = 0.5  # original i = 2 c + 0.5
    out = to_original_grid(stored, s2o, (4, 3, 8))
    assert out.shape == (4, 3, 8)
    np.testing.assert_allclose(out[0, :, 0], stored[0, :, 0])  # i = 0 -> c = -0.25, clamped
    np.testing.assert_allclose(out[0, 1, 4], stored[0, 1, 1] * 0.25 + stored[0, 1, 2] * 0.75)  # c = 1.75
    np.testing.assert_allclose(out[3, 2, 2], stored[1, 2, 0] * 0.25 + stored[1, 2, 1] * 0.75)


def test_window_starts_centre_a_window_on_every_slice():
    assert sliding_window_starts(20, 8, 4) == [-4, 0, 4, 8, 12, 16]  # centres 0, 4, ..., 20
    assert sliding_window_starts(5, 8, 4) == [-4, 0]
    assert sliding_window_starts(1, 8, 4) == [-4]
    assert set(sliding_window_starts(20, 8, 4)) >= {0, 8, 16}  # the evaluation windows are among them


@pytest.mark.parametrize("name,strategy,cut", [("resnext3d_50", "ttl", "layer2"),
                                               ("penet", "tf", "encoders.1"),
                                               ("resnext3d_50", "lwft", "layer1")])
def test_default_target_layer_is_the_last_unit_for_any_strategy(name, strategy, cut):
    from volttl.transfer import build_transfer_model

    setup = build_transfer_model(name, strategy, cut)
    model = setup.model
    layer = default_target_layer(model)
    assert layer == model.units[-1].paths[0]
    cam = WindowGradCAM(model, "")
    assert cam.from_scoring_pass  # average pooling and a linear head: no backward pass
    maps, probs = cam(torch.randn(2, 1, 8, 32, 32))
    assert maps.shape == (2, 8, 32, 32) and probs.shape == (2,)
    assert maps.min() >= 0


def _library_cam(model, layer: str, x: torch.Tensor, method) -> np.ndarray:
    """pytorch-grad-cam's own map on the target layer's cells: its hooks, a backward pass
    through the whole network, its CAM rule, without its per-map rescaling and zoom."""
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    cam = method(model=model, target_layers=[model.get_submodule(layer)])
    cam.activations_and_grads.release()
    hooks = ActivationsAndGradients(model, [model.get_submodule(layer)], None)
    targets = [BinaryClassifierOutputTarget(1)] * len(x)
    try:
        outputs = hooks(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward()
        acts, grads = hooks.activations[0].numpy(), hooks.gradients[0].numpy()
    finally:
        hooks.release()
        model.zero_grad(set_to_none=True)
    return np.maximum(cam.get_cam_image(x, cam.target_layers[0], targets, acts, grads, False), 0)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++", "layercam"])
@pytest.mark.parametrize("name,strategy,cut,norm", [("resnext3d_50", "ttl", "layer1", True),
                                                    ("resnext3d_50", "ftl", "", False),
                                                    ("penet", "tf", "encoders.1", False)])
def test_the_map_from_the_scoring_pass_is_pytorch_grad_cams(method, name, strategy, cut, norm):
    """At the default target (average pooling, an optional BatchNorm and the linear head
    above it) the map comes from the forward pass alone, and equals the library's map with
    a backward pass through the whole network, for each of its CAM rules; a trained head
    BatchNorm (running statistics, scale and shift away from their start) included."""
    import pytorch_grad_cam as pgc

    from volttl.transfer import build_transfer_model

    methods = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
               "layercam": pgc.LayerCAM}
    torch.manual_seed(0)
    model = build_transfer_model(name, strategy, cut, head_norm=norm).model
    if norm:
        bn = model.head_norm
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    head = model.get_submodule(model.head_path)
    head.weight.data = head.weight.data.abs()  # some positive evidence in every window: maps not all 0
    x = torch.randn(3, 1, 16, 64, 64)  # layer4 of FTL keeps 1 x 2 x 2 cells
    cam = WindowGradCAM(model, "", method=method)
    assert cam.from_scoring_pass
    cells, probs = cam.cell_maps(x)
    expected = _library_cam(model.eval(), cam.target_layer, x, methods[method])
    assert expected.max() > 0
    np.testing.assert_allclose(cells.numpy(), expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.sigmoid(model(x)[:, 0]).numpy(), rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_other_targets_and_heads_take_the_backward_pass():
    """An earlier block, or a max-pooled head, does not see the same gradient at every
    position: those maps keep the backward pass from the target layer."""
    from volttl.transfer import build_transfer_model

    avg = build_transfer_model("resnext3d_50", "ttl", "layer1").model
    assert WindowGradCAM(avg, "").from_scoring_pass
    assert not WindowGradCAM(avg, "layer1.1").from_scoring_pass
    peak = build_transfer_model("resnext3d_50", "ttl", "layer1", pool="max").model
    assert not WindowGradCAM(peak, "").from_scoring_pass


def test_window_maps_are_grad_cam_without_per_window_rescaling():
    """Grad-CAM by its definition (ReLU of the activations weighted by their spatially
    averaged gradients), computed here with plain hooks, and kept on one scale across
    windows: a window's map is not stretched to [0, 1] on its own."""
    from volttl.transfer import build_transfer_model

    torch.manual_seed(0)
    model = build_transfer_model("resnext3d_50", "ttl", "layer1").model.eval()
    x = torch.randn(3, 1, 8, 32, 32)
    maps, probs = WindowGradCAM(model, "layer1.2")(x)
    with pytest.raises(ValueError, match="'layer1' is not called by the model's forward"):
        WindowGradCAM(model, "layer1")(x)  # a container the forward pass never calls

    store = {}
    layer = model.get_submodule("layer1.2")
    h1 = layer.register_forward_hook(lambda m, i, o: store.update(act=o))
    model.zero_grad()
    logits = model(x)
    act = store["act"]
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), act)
    h1.remove()
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    expected = torch.relu((weights * act).sum(1)).detach()  # (3, 4, 8, 8) feature cells
    assert model.units[-1].stride == (2, 4, 4)
    # feature cell j of stride s sits on window voxel s * j: there the map is the cell's value
    centres = maps[:, ::2, ::4, ::4]
    np.testing.assert_allclose(centres, expected.numpy(), rtol=1e-3, atol=1e-5 * float(expected.max()))
    np.testing.assert_allclose(probs, torch.sigmoid(logits[:, 0]).detach().numpy(), rtol=1e-5)
    peaks = maps.reshape(3, -1).max(1)
    assert peaks.max() > 0 and not np.allclose(peaks, peaks.max())  # windows keep their own scale


def test_backward_pass_starts_at_the_target_layer():
    """Grad-CAM needs the gradient at the target layer only: no parameter receives a
    gradient, every layer below the target runs without a graph (its hooks see no tensor
    that asks for one), the model's own requires_grad flags are left as they were, and a
    target whose output the next layer changes in place (bn1, then an inplace ReLU) gives
    the same map as the full backward pass through plain hooks."""
    from volttl.transfer import build_transfer_model

    torch.manual_seed(0)
    model = build_transfer_model("resnext3d_50", "lwft", "layer1").model.eval()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(model.parameters()))  # LWFT freezes the bottom only
    below = []
    hook = model.get_submodule("layer1.0").register_forward_hook(
        lambda m, i, o: below.append(o.requires_grad))
    x = torch.randn(2, 1, 8, 32, 32)
    maps, _ = WindowGradCAM(model, "layer1.1.bn1")(x)
    hook.remove()
    assert below == [False]
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen

    for m in model.modules():  # the reference: plain hooks on the same model, nothing in place
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(True)
    store = {}
    h = model.get_submodule("layer1.1.bn1").register_forward_hook(lambda m, i, o: store.update(act=o))
    logits = model(x)
    h.remove()
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), store["act"])
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    expected = torch.relu((weights * store["act"]).sum(1)).detach()
    assert feature_stride(model, "layer1.1.bn1") == (2, 4, 4)  # bn1 is inside unit layer1.1
    centres = maps[:, ::2, ::4, ::4]
    np.testing.assert_allclose(centres, expected.numpy(), rtol=1e-3, atol=1e-5 * float(expected.max()))


def test_feature_cells_land_on_their_true_centres():
    """A 'same'-padded layer of cumulative stride s centres cell j on input voxel s * j;
    the map interpolates linearly between those centres (an end-to-end resize would put
    every cell (s - 1) / 2 voxels further on: 1.5 pixels in-plane at stride 4)."""
    from volttl.explain.gradcam import upsample_to_window

    ramp = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 3, 3)  # cell j holds j along slices
    up = upsample_to_window(ramp, (8, 12, 12), (2, 4, 4))[0]
    np.testing.assert_allclose(up[:7, 5, 5], np.arange(7) / 2, atol=1e-6)  # voxel v: v / s
    assert float(up[7, 5, 5]) == pytest.approx(3.0)  # past the last centre: the edge value
    delta = torch.zeros(1, 4, 6, 6)
    delta[0, 2, 3, 1] = 1.0
    up = upsample_to_window(delta, (8, 24, 24), (2, 4, 4))[0]
    assert np.unravel_index(int(up.argmax()), up.shape) == (4, 12, 4)
    assert float(up.sum()) == pytest.approx(2 * 4 * 4)  # linear weights share each cell out whole
    # a layer that is no declared unit: the map spans the window end to end, as a resize does
    plain = upsample_to_window(ramp, (8, 12, 12), None)[0]
    expected = F.interpolate(ramp[None], size=(8, 12, 12), mode="trilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(plain, expected, atol=1e-5)
    # the axes are interpolated one at a time: the same as all three at once, on any maps
    from volttl.explain.gradcam import interpolation_matrix

    maps = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    up = upsample_to_window(maps, (6, 20, 24), (2, 4, 4))
    mz, my, mx = (interpolation_matrix(n, c, s, 0.0) for n, c, s in ((6, 3, 2), (20, 5, 4), (24, 6, 4)))
    np.testing.assert_allclose(up, torch.einsum("zd,yh,xw,ndhw->nzyx", mz, my, mx, maps), atol=1e-6)


class _FlatCAM:
    """A CAM stand-in: every window's map is 1 everywhere; the first window has p = 0.9,
    the others 0.1. It also records what each window was given."""

    target_layer = "x"

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.extend(x.numpy())
        probs = np.array([0.9 if len(self.inputs) - len(x) + i == 0 else 0.1 for i in range(len(x))])
        return np.ones((len(x), *x.shape[2:]), dtype=np.float32), probs


def test_stitching_weights_windows_by_probability():
    hu = np.full((16, 20, 20), 500, dtype=np.int16)
    fake = _FlatCAM()
    spec = InputSpec(8, 12, (-100.0, 900.0), 0.15897)
    out = stitch_study(hu, fake, spec, stride=4, batch_size=8, blend="constant")
    assert out.starts == [-4, 0, 4, 8, 12]
    m = out.stored_map
    assert m.shape == (16, 20, 20) and m.max() == pytest.approx(1.0)
    # slices 0-3: the 0.9 window and a 0.1 window, averaged -> 0.5, the peak
    np.testing.assert_allclose(m[0:4, 10, 10], 1.0, rtol=1e-5)
    np.testing.assert_allclose(m[4:16, 10, 10], 0.1 / 0.5, rtol=1e-5)  # two 0.1 windows
    assert (m[:, :4] == 0).all() and (m[:, :, 16:] == 0).all()  # outside the centre crop
    first = fake.inputs[0][0]  # the window starting 4 slices before the study: air there
    assert np.allclose(first[:4], first[0, 0, 0]) and first[:4].max() < first[4:].min()


def test_gaussian_blending_favours_the_window_whose_centre_a_slice_is_near():
    from monai.data.utils import compute_importance_map

    hu = np.zeros((16, 20, 20), dtype=np.int16)
    spec = InputSpec(8, 12, (-100.0, 900.0), 0.15897)
    m = stitch_study(hu, _FlatCAM(), spec, stride=4, batch_size=8).stored_map
    w = compute_importance_map((8,), mode="gaussian").numpy()
    # slice 2: position 6 of the 0.9 window (start -4), position 2 of a 0.1 window (start 0)
    mixed = lambda a, b: (0.9 * w[a] + 0.1 * w[b]) / (w[a] + w[b])  # noqa: E731
    peak = max(mixed(a, a - 4) for a in range(4, 8))
    assert m[2, 10, 10] == pytest.approx(mixed(6, 2) / peak, rel=1e-4)
    assert m[0, 10, 10] > m[3, 10, 10] > m[6, 10, 10]  # the 0.9 window fades out


@pytest.mark.slow
def test_cam_writes_overlays_on_the_original_grid(cohort, run, tmp_path):
    records = cam_step(run, tmp_path / "cam", studies=["synth001", "synth003"], progress=False).records
    rows = {r["study_id"]: r for r in csv.DictReader(open(cohort))}
    preds = {}
    from volttl.evaluate.step import evaluate_run

    for split in ("train", "val", "test"):
        evaluate_run(run, split, bootstrap=0)
        with open(run / f"predictions_{split}.csv") as fh:
            preds.update({r["study_id"]: float(r["probability"]) for r in csv.DictReader(fh)})
    for rec in records:
        sid = rec["study_id"]
        cam = nib.load(tmp_path / "cam" / f"{sid}_cam.nii.gz")
        data = np.asarray(cam.dataobj)
        assert cam.get_data_dtype() == np.uint8 and cam.dataobj.slope == pytest.approx(1 / 255)
        assert 0 <= data.min() and data.max() == pytest.approx(1.0)
        assert cam.header.get_xyzt_units()[0] == "mm" and cam.header["cal_max"] == 1.0
        source = Path(cohort).parent / rows[sid]["path"]
        if source.suffix == ".gz":  # a NIfTI source: the overlay carries its exact shape and affine
            ct = nib.load(source)
            assert "ct" not in rec["files"]
        else:  # DICOM: the CT is written beside it, on the same grid
            ct = nib.load(tmp_path / "cam" / rec["files"]["ct"])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source)))
            assert ct.shape == sitk.GetArrayFromImage(reader.Execute()).T.shape
        assert cam.shape == ct.shape
        np.testing.assert_allclose(cam.affine, ct.affine, atol=1e-4)
        # the JSON's peak (from the unquantised map) is one of the file's maximal voxels
        ijk = np.rint(np.linalg.inv(cam.affine) @ np.append(rec["peak_ras_mm"], 1.0))[:3].astype(int)
        assert data[tuple(ijk)] == data.max() and list(ijk) == rec["peak_voxel_ijk"]
        # the study score evaluate gives: the same windows and numerics (one inference path);
        # only the batches differ, which moves float32 sums by ~1e-7
        assert rec["probability"] == pytest.approx(preds[sid], abs=2e-6)
        assert rec["label"] == int(rows[sid]["label"])
        assert (tmp_path / "cam" / f"{sid}_cam.png").stat().st_size > 1000
        saved = json.loads((tmp_path / "cam" / f"{sid}_cam.json").read_text())
        assert saved["target_layer"] == "layer1.0" and saved["files"]["cam"] == f"{sid}_cam.nii.gz"
        assert saved["source"] == str(source)
    text = (tmp_path / "cam" / "cam_summary.json").read_text()
    assert "Synthetic" not in text and "SYNPID" not in text  # no patient tag travels along
    with pytest.raises(ValueError, match="no study nope"):
        cam_step(run, tmp_path / "cam2", studies=["nope"], progress=False)


def test_real_ct_overlay_has_the_cts_shape_and_affine(run, tmp_path):
    path = shared_path("data", "real_ct", "lung1_image.nrrd")
    manifest = tmp_path / "real.csv"
    manifest.write_text(f"study_id,path,label,split,pe_slices\nlung1,{path},0,test,\n")
    store = tmp_path / "real.h5"
    assert not preprocess_step(small_config(manifest, store, size=SIZE, slice_thickness=5.0),
                          progress=False).failed
    records = cam_step(run, tmp_path / "cam", overrides=[f"data.store={store}"], progress=False).records
    assert [r["study_id"] for r in records] == ["lung1"]
    cam = nib.load(tmp_path / "cam" / "lung1_cam.nii.gz")
    img = sitk.ReadImage(str(path))
    assert cam.shape == sitk.GetArrayFromImage(img).T.shape == (512, 512, 48)
    lps = np.eye(4)  # the NRRD's own geometry, straight from SimpleITK
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    np.testing.assert_allclose(cam.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-4)
    ct = nib.load(tmp_path / "cam" / "lung1_ct.nii.gz")
    np.testing.assert_array_equal(np.asarray(ct.dataobj), sitk.GetArrayFromImage(img).T)


def test_unit_maps_are_uint8_with_a_slope_or_float32(tmp_path):
    from volttl.io.geometry import Geometry
    from volttl.io.nifti import write_unit_map

    geo = Geometry((30, 64, 64), (0.7, 0.7, 2.5), (1.0, 2.0, 3.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    smooth = np.random.default_rng(0).random((30, 64, 64)).astype(np.float32)
    write_unit_map(smooth, geo, tmp_path / "u8.nii.gz")
    write_unit_map(smooth, geo, tmp_path / "f32.nii.gz", dtype="float32")
    u8, f32 = nib.load(tmp_path / "u8.nii.gz"), nib.load(tmp_path / "f32.nii.gz")
    assert u8.get_data_dtype() == np.uint8 and f32.get_data_dtype() == np.float32
    back = np.asarray(u8.dataobj, dtype=np.float64).transpose(2, 1, 0)
    assert np.abs(back - smooth).max() <= 1 / 510 + 1e-6  # at most half a step of 1/255
    np.testing.assert_array_equal(np.asarray(f32.dataobj).transpose(2, 1, 0), smooth)
    for img in (u8, f32):
        assert img.header.get_xyzt_units()[0] == "mm"
        assert (float(img.header["cal_min"]), float(img.header["cal_max"])) == (0.0, 1.0)
        np.testing.assert_allclose(img.affine, geo.affine_ras(), atol=1e-5)
    assert (tmp_path / "u8.nii.gz").stat().st_size < 0.5 * (tmp_path / "f32.nii.gz").stat().st_size


def _share_at_period(profile: np.ndarray, period: int) -> float:
    """The share of a profile's spectrum (mean removed) in the bins at ``period`` slices."""
    power = np.abs(np.fft.rfft(profile - profile.mean())) ** 2
    k = int(round(len(profile) / period))
    return float(power[max(k - 1, 1): k + 2].sum() / power[1:].sum())


def test_a_quarter_window_stride_leaves_no_bands_on_a_real_ct():
    """On the real CT: the stitched map's slice profile has at most 2% of its spectrum at
    the stride period with a quarter-window stride (``cam.stride`` for a seamless map);
    half a window showed bands."""
    from volttl.explain.gradcam import seamless_stride
    from volttl.inference import model_from_config
    from volttl.io.orientation import to_canonical
    from volttl.preprocess.resample import resample_to_store

    vol, _ = to_canonical(read_study(shared_path("data", "real_ct", "lung1_image.nrrd")))
    hu, _ = resample_to_store(vol.hu.astype(np.int16), vol.geometry.spacing[2], 2.5, 64)
    cfg = config_from_dict({"data": {"crop": 48}, "preprocess": {"slice_thickness": 2.5, "size": 64,
                                                                 "window": 16},
                            "transfer": {"strategy": "ttl", "cut": "layer1", "head": {"norm": True}}})
    torch.manual_seed(0)
    cam = WindowGradCAM(model_from_config(cfg, weights=False).model)
    shares = {}
    for stride in (seamless_stride(16), 8, 0):
        result = stitch_study(hu, cam, InputSpec(16, 48, (-100.0, 900.0), 0.15897), stride, batch_size=8)
        shares[stride] = _share_at_period(result.stored_map.mean(axis=(1, 2)), stride or 16)
    print(shares)
    assert seamless_stride(16) == 4
    assert shares[4] <= 0.02 < shares[8]


def test_cam_on_four_voxel_orders_of_a_real_ct_lands_on_each_file(run, tmp_path):
    """`volttl cam` on the same CT as LPS NRRD, RAS NIfTI, LAS NIfTI and DICOM: each
    overlay has its own source's grid, and the peaks are the same place in the patient."""
    from .test_orientation import write_four_voxel_orders

    files = write_four_voxel_orders(tmp_path)
    manifest = tmp_path / "four.csv"
    manifest.write_text("study_id,path,label,split,pe_slices\n"
                        + "".join(f"{name},{path},0,test,\n" for name, path in files.items()))
    store = tmp_path / "four.h5"
    assert not preprocess_step(small_config(manifest, store, size=SIZE, slice_thickness=THICKNESS),
                          progress=False).failed
    records = cam_step(run, tmp_path / "cam", overrides=[f"data.store={store}", "cam.write_ct=always"],
                       progress=False).records
    peaks = {}
    for r in records:
        cam = nib.load(tmp_path / "cam" / r["files"]["cam"])
        source = files[r["study_id"]]
        written_ct = tmp_path / "cam" / r["files"]["ct"]
        own = nib.load(source) if str(source).endswith(".nii.gz") else nib.load(written_ct)
        assert cam.shape == own.shape and np.allclose(cam.affine, own.affine, atol=1e-4), r["study_id"]
        peaks[r["study_id"]] = np.asarray(r["peak_ras_mm"])
    assert len(peaks) == 4
    for name, peak in peaks.items():
        np.testing.assert_allclose(peak, peaks["dicom"], atol=5.0, err_msg=name)  # within a 5 mm slice


@pytest.mark.slow
def test_an_all_zero_map_says_why_in_cam_and_predict(run, tmp_path, capsys, caplog):
    """A model that sees no positive evidence gives all-zero Grad-CAM maps: both commands
    say why and what to check, instead of a bare 'all-zero map' (cam) or nothing (predict)."""
    import shutil

    from volttl.cli import main

    flat = tmp_path / "flat"
    shutil.copytree(run, flat)
    ckpt = torch.load(flat / "best.pt", weights_only=False)
    ckpt["model_state"]["fc.weight"] = -ckpt["model_state"]["fc.weight"].abs()  # nothing raises the logit
    ckpt["state_sha256"] = state_digest(ckpt["model_state"])
    torch.save(ckpt, flat / "best.pt")
    capsys.readouterr()
    out = str(tmp_path / "c")
    assert main(["cam", "--run", str(flat), "--study", "synth001", "--out", out, "--quiet"]) == 0
    assert "all-zero map: no window's positive logit rose" in capsys.readouterr().out
    source = json.loads((tmp_path / "c" / "synth001_cam.json").read_text())["source"]
    with caplog.at_level("WARNING", logger="volttl.predict.step"):
        assert main(["predict", "--run", str(flat), source, "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "all-zero map: no window's positive logit rose" in caplog.text


def test_preview_of_an_all_zero_map_is_drawn_through_the_centre(tmp_path, monkeypatch):
    """An all-zero map has its argmax at voxel (0, 0, 0): the planes go through the volume's
    centre instead, and the title says the map is empty."""
    import matplotlib.axes

    from volttl.explain.preview import write_preview

    ct = np.full((10, 20, 30), -800.0)
    drawn, titles = [], []
    real = matplotlib.axes.Axes.imshow

    def recording_imshow(self, data, *a, **k):
        drawn.append(np.asarray(data))
        return real(self, data, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    import matplotlib.figure

    real_title = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, *a, **k: titles.append(t) or real_title(self, t, *a, **k))
    ct[5, 10, 15] = 400  # a marker at the centre
    write_preview(ct, np.zeros_like(ct), (0, 0, 0), (1.0, 1.0, 2.0), tmp_path / "p.png", "s: p(PE) = 0.5")
    assert (tmp_path / "p.png").stat().st_size > 1000 and titles == ["s: p(PE) = 0.5 (all-zero map)"]
    grey = drawn[::2]  # axial, coronal and sagittal CT planes, each through the centre's marker
    assert [g.shape for g in grey] == [(20, 30), (10, 30), (10, 20)] and all((g == 400).any() for g in grey)
