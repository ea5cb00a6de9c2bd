"""Grad-CAM for every window of a study, stitched into one map on the stored grid.

pytorch-grad-cam (1.5.3 and later) computes 3-D Grad-CAM for the positive logit
(``BinaryClassifierOutputTarget(1)``) at a target layer: by default the last unit of the
trained model, whatever its strategy and cut. Its own output rescales every map to
[0, 1], which makes a window with faint evidence look as hot as one with strong
evidence; so the maps are taken before that rescaling (ReLU of the channel-weighted
activations, interpolated linearly between the feature cells' true centres on the
window), which keeps them comparable across the windows of a study. Each map is also
weighted by its window's predicted probability.

Windows slide along the slices at ``stride`` (a quarter window by default) starting half a
window before the study, so every slice lies near the centre of some window, and
overlaps are blended with MONAI's Gaussian importance map along the slice axis (as in
MONAI's sliding-window inference): the first and last slices of a window, where
convolution padding distorts the map, count least. Windows see the same centre crop as
in evaluation (the rest of the plane stays 0) and are batched; overlaps are averaged
(or maxed), and the stitched map is scaled so its peak is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from volttl.errors import VolttlError
from volttl.inference import window_batch
from volttl.models.base import Backbone3D
from volttl.numerics import DEFAULT_NUMERICS, Numerics


def default_target_layer(model: Backbone3D) -> str:
    """The last unit before the head: its block, or the stem's last module."""
    unit = model.units[-1]
    return unit.paths[0] if len(model.units) > 1 else unit.paths[-1]


def default_stride(window: int) -> int:
    """A quarter window. At half a window the stitched map's slice profile dips every
    stride (each slice is seen from only two offsets in its windows), which shows as
    bands in coronal and sagittal views; at a quarter the share of the profile's spectrum
    at that period falls under 0.02 on a real CT (see tests/test_cam.py)."""
    return max(1, window // 4)


def feature_stride(model: Backbone3D, target_layer: str) -> tuple[int, int, int] | None:
    """The declared cumulative stride (D, H, W) of the unit that owns ``target_layer``."""
    for unit in model.units:
        if any(target_layer == p or target_layer.startswith(p + ".") for p in unit.paths):
            return unit.stride
    return None


def interpolation_matrix(n_out: int, n_cells: int, stride: float, offset: float) -> torch.Tensor:
    """``(n_out, n_cells)`` weights of linear interpolation between cell centres, where cell
    ``j`` is centred on input voxel ``stride * j + offset``; beyond the first and last
    centres the edge cell's value holds."""
    position = (torch.arange(n_out, dtype=torch.float64) - offset) / stride
    position = position.clamp(0, n_cells - 1)
    lo = position.floor().long().clamp(max=n_cells - 1)
    hi = (lo + 1).clamp(max=n_cells - 1)
    frac = position - lo
    m = torch.zeros(n_out, n_cells, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m.float()


def upsample_to_window(maps: torch.Tensor, size: tuple[int, int, int],
                       stride: tuple[int, int, int] | None) -> torch.Tensor:
    """Feature maps ``(N, d, h, w)`` onto the window's voxels ``(N, D, H, W)``. In a network
    whose convolutions and pools pad by half their kernel, feature cell ``j`` of a layer
    with cumulative stride ``s`` is centred on input voxel ``s * j`` (not ``s * j + (s-1)/2``,
    as resizing the map end to end would place it: half a stride towards the far end, 1.5
    pixels in-plane and half a slice behind the stem's pool). ``stride`` None (a layer
    that is no declared unit): the map spans the window end to end."""
    mats = []
    for axis, (n_out, n_cells) in enumerate(zip(size, maps.shape[1:], strict=True)):
        declared = stride[axis] if stride is not None else 0
        if declared and -(-n_out // declared) == n_cells:
            mats.append(interpolation_matrix(n_out, n_cells, declared, 0.0))
        else:
            step = n_out / n_cells
            mats.append(interpolation_matrix(n_out, n_cells, step, (step - 1) / 2))
    mz, my, mx = (m.to(maps.device) for m in mats)
    # one axis at a time: a single four-operand einsum is contracted left to right by torch
    # (without opt_einsum), through a (D, d, H, h, W, w) outer product of 1.5 GB at pe.yaml's
    # window, which took 0.9 s a batch; this way the largest intermediate is the output
    out = torch.einsum("xw,ndhw->ndhx", mx, maps)
    out = torch.einsum("yh,ndhx->ndyx", my, out)
    return torch.einsum("zd,ndyx->nzyx", mz, out)


def sliding_window_starts(num_slices: int, window: int, stride: int) -> list[int]:
    """Starts from half a window before the study, every ``stride`` slices, until a window
    is centred at or past the last slice (slices outside the study are air, as at the end
    of evaluation windows). With the default stride the evaluation windows are among them."""
    steps = -(-(max(num_slices, 1) - 1) // stride)  # ceil
    return [k * stride - window // 2 for k in range(steps + 1)]


def blend_weights(window: int, blend: str) -> np.ndarray:
    """Per-slice weights of a window's map when overlaps are blended: MONAI's importance map."""
    from monai.data.utils import compute_importance_map

    if blend not in ("gaussian", "constant"):
        raise VolttlError(f"cam.blend '{blend}' is not one of gaussian, constant")
    return compute_importance_map((window,), mode=blend).numpy().astype(np.float32)


@dataclass
class StudyCAM:
    stored_map: np.ndarray  # (slices, size, size) float32 in [0, 1]
    starts: list[int]
    window_probs: np.ndarray


class WindowGradCAM:
    """Grad-CAM of a trained model's positive logit at one layer, for batches of windows.

    Only the gradient at the target layer is needed, so the backward pass starts and stops
    there: the layer's output is detached into a new leaf that the rest of the network
    runs on, and no parameter asks for a gradient. The layers below the target then run
    as in inference (no graph kept), and the backward pass covers only the layers above
    it; at the default target (the last unit) that is the head alone, and a window costs
    about one forward pass instead of a forward and a full backward (see
    benchmarks/README.md). The gradient at the target is the same either way.
    """

    def __init__(self, model: Backbone3D, target_layer: str = "", device: torch.device | None = None,
                 method: str = "gradcam", numerics: Numerics = DEFAULT_NUMERICS):
        import pytorch_grad_cam as pgc

        methods = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
                   "layercam": pgc.LayerCAM}
        if method not in methods:
            raise VolttlError(f"cam.method '{method}' is not one of {', '.join(methods)}")

        self.device = device or torch.device("cpu")
        self.numerics = numerics
        self.model = model.to(self.device, memory_format=numerics.memory_format).eval()
        self.target_layer = target_layer or default_target_layer(model)
        try:
            layer = self.model.get_submodule(self.target_layer)
        except AttributeError:
            raise VolttlError(f"cam.target_layer '{self.target_layer}' is not a module of the model"
                              ) from None
        self.method = method
        self.stride = feature_stride(self.model, self.target_layer)
        self._cam = methods[method](model=self.model, target_layers=[layer])
        self._cam.activations_and_grads.release()  # the library's CAM rule only; the hooks are ours
        self._capturing = False
        self._captured: list[torch.Tensor] = []
        layer.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        """During :meth:`__call__`: the target layer's output as a new leaf the layers above
        run on (the start of the backward pass); otherwise (inference) nothing changes."""
        if not self._capturing:
            return None
        leaf = output.detach().requires_grad_(True)
        self._captured.append(leaf)
        return leaf.clone()  # a layer above may work in place (an inplace ReLU); a leaf may not be

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``(N, D, H, W)`` (>= 0, not rescaled per window) and probabilities ``(N,)``
        for windows ``(N, 1, D, H, W)``: the library's CAM rule on the target layer's
        activations and the gradients of the positive logits, without its per-map [0, 1]
        rescaling and its end-to-end zoom (see :func:`upsample_to_window`). The windows
        run in the run's precision and memory format (``numerics``)."""
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

        x = self.numerics.prepare(x.to(self.device))
        targets = [BinaryClassifierOutputTarget(1)] * len(x)
        self._captured.clear()
        asked = [p for p in self.model.parameters() if p.requires_grad]
        for p in asked:  # for this pass only: the backward pass starts at the target layer
            p.requires_grad_(False)
        self._capturing = True
        try:
            with torch.enable_grad(), self.numerics.autocast(self.device):
                outputs = self.model(x)
        finally:
            self._capturing = False
            for p in asked:
                p.requires_grad_(True)
        if not self._captured:
            block = default_target_layer(self.model)
            raise VolttlError(f"cam.target_layer '{self.target_layer}' is not called by the model's "
                              f"forward pass (name one of its blocks, e.g. '{block}')")
        leaf = self._captured[0]
        score = sum(t(o) for t, o in zip(targets, outputs.float(), strict=True))
        (grads,) = torch.autograd.grad(score, leaf)
        self._captured.clear()
        acts = leaf.detach().float().cpu().numpy()
        grads = grads.float().cpu().numpy()
        raw = self._cam.get_cam_image(x, self._cam.target_layers[0], targets, acts, grads, False)
        raw = torch.from_numpy(np.maximum(raw, 0).astype(np.float32))
        maps = upsample_to_window(raw, tuple(x.shape[2:]), self.stride)
        probs = torch.sigmoid(outputs.detach().float()[:, 0]).cpu().numpy()
        return maps.numpy(), probs


def stitch_study(hu: np.ndarray, cam: WindowGradCAM, window: int, crop: int, stride: int = 0,
                 batch_size: int = 4, how: str = "mean", hu_clip: tuple[float, float] = (-100.0, 900.0),
                 intensity_shift: float = 0.15897, blend: str = "gaussian",
                 on_batch: Callable[[int], None] | None = None) -> StudyCAM:
    """Grad-CAM of every window of the stored HU volume ``(slices, size, size)``;
    ``on_batch(n)`` after each batch of ``n`` windows (progress)."""
    if how not in ("mean", "max"):
        raise VolttlError(f"cam.stitch '{how}' is not one of mean, max")
    weights = blend_weights(window, blend)[:, None, None]
    n, size = hu.shape[0], hu.shape[1]
    stride = stride or default_stride(window)
    y0 = (size - crop) // 2
    starts = sliding_window_starts(n, window, stride)
    pad = window  # the accumulators reach a window beyond both ends of the study
    total = np.zeros((n + 2 * pad, crop, crop), dtype=np.float32)
    weight_sum = np.zeros((n + 2 * pad, 1, 1), dtype=np.float32)
    probs = []
    for b in range(0, len(starts), batch_size):
        chunk = starts[b: b + batch_size]
        maps, p = cam(torch.from_numpy(window_batch(hu, chunk, window, crop, hu_clip, intensity_shift)))
        probs.append(p)
        if on_batch is not None:
            on_batch(len(chunk))
        for s, m, prob in zip(chunk, maps, p, strict=True):
            span = slice(s + pad, s + pad + window)
            weighted = m * (prob * weights)
            if how == "mean":
                total[span] += weighted
                weight_sum[span] += weights
            else:
                np.maximum(total[span], weighted, out=total[span])
    core = total[pad: pad + n]
    if how == "mean":
        core = core / np.maximum(weight_sum[pad: pad + n], 1e-12)
    peak = float(core.max())
    stored = np.zeros((n, size, size), dtype=np.float32)
    stored[:, y0: y0 + crop, y0: y0 + crop] = core / peak if peak > 0 else core
    return StudyCAM(stored, starts, np.concatenate(probs) if probs else np.zeros(0))
