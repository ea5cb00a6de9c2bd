"""Grad-CAM for every window of a study, stitched into one map on the stored grid.

pytorch-grad-cam (1.5.3 and later) computes 3-D Grad-CAM for the positive logit
(``BinaryClassifierOutputTarget(1)``) at a target layer: by default the last unit of the
trained model, whatever its strategy and cut. Its own output rescales every map to
[0, 1], which makes a window with faint evidence look as hot as one with strong
evidence; so the maps are taken before that rescaling (ReLU of the channel-weighted
activations, interpolated linearly between the feature cells' true centres on the
window), which keeps them comparable across the windows of a study. Each map is also
weighted by its window's predicted probability.

At the default target the layer is followed only by global average pooling, an
optional BatchNorm and the linear head, so the gradient of the logit at every position
of channel ``c`` is the same number: the head's weight for ``c`` (times the BatchNorm's
scale) over the number of positions. The map then needs no backward pass: the scoring
forward pass keeps the target's activations, and the library's own CAM rule runs on them
and on that gradient (:class:`WindowGradCAM`, equal to pytorch-grad-cam's map; see
tests/test_cam.py). Any other target (an earlier block, a max-pooled head) takes the
backward pass from the target layer.

By default (``cam.stride`` 0) the maps come from the windows the study is scored on
(PENet's consecutive, non-overlapping windows), so predict with a map costs about what
predict without one does (benchmarks/bench_cam.py). Each slice is then seen by one window,
and the seams between windows can show in coronal and sagittal views; ``cam.stride`` a
quarter window slides extra windows from half a window before the study, so every slice
lies near the centre of some window, and blends overlaps with MONAI's Gaussian importance
map along the slice axis (as in MONAI's sliding-window inference): the first and last
slices of a window, where convolution padding distorts the map, count least; it costs
about four scoring passes. Windows see the same centre crop as in evaluation (the rest of
the plane stays 0) and are batched; overlaps are averaged (or maxed), and the stitched
map is scaled so its peak is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from volttl.data.input_spec import InputSpec
from volttl.errors import VolttlError
from volttl.inference import evaluation_starts, window_batch
from volttl.models.base import Backbone3D
from volttl.numerics import DEFAULT_NUMERICS, Numerics


def default_target_layer(model: Backbone3D) -> str:
    """The last unit before the head: its block, or the stem's last module."""
    unit = model.units[-1]
    return unit.paths[0] if len(model.units) > 1 else unit.paths[-1]


def seamless_stride(window: int) -> int:
    """A quarter window: the ``cam.stride`` for a map without seams. At half a window the
    stitched map's slice profile dips every stride (each slice is seen from only two
    offsets in its windows), which shows as bands in coronal and sagittal views; at a
    quarter the share of the profile's spectrum at that period falls under 0.02 on a real
    CT (see tests/test_cam.py)."""
    return max(1, window // 4)


def cam_window_starts(num_slices: int, window: int, stride: int) -> list[int]:
    """Where the map's windows start: the scoring windows for ``stride`` 0 (the default:
    one pass scores and maps them), else :func:`sliding_window_starts`."""
    if stride == 0:
        return evaluation_starts(num_slices, window)
    return sliding_window_starts(num_slices, window, stride)


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


def head_gradient(model: Backbone3D, target_layer: str) -> torch.Tensor | None:
    """The gradient of the positive logit with respect to each channel of ``target_layer``'s
    output at one position, times the number of positions, ``(C,)``: the same at every
    position when the layer feeds global average pooling, an optional BatchNorm (evaluation
    mode: a fixed scale per channel) and the linear head. None for any other target or
    head (an earlier block, max pooling, a flattened map): those need the backward pass."""
    average = isinstance(model.head_pool, torch.nn.AdaptiveAvgPool3d)
    if target_layer != default_target_layer(model) or not average:
        return None
    head = model.get_submodule(model.head_path)
    if not isinstance(head, torch.nn.Linear) or not isinstance(model.head_dropout, (torch.nn.Identity,
                                                                                    torch.nn.Dropout)):
        return None
    weight = head.weight.detach()[0].float()
    norm = model.head_norm
    if isinstance(norm, torch.nn.BatchNorm1d):
        if norm.running_var is None or norm.training:
            return None
        weight = weight * norm.weight.detach().float() / torch.sqrt(norm.running_var.float() + norm.eps)
    elif not isinstance(norm, torch.nn.Identity):
        return None
    return weight


class WindowGradCAM:
    """Grad-CAM of a trained model's positive logit at one layer, for batches of windows;
    each call also gives the windows' probabilities, so one pass scores and maps them.

    At the default target (:func:`head_gradient`) the map comes from the forward pass alone:
    the target's activations are kept as the model scores the windows, and the gradient is
    the head's weights spread over the positions. Elsewhere only the gradient at the target
    layer is needed, so the backward pass starts and stops there: the layer's output is
    detached into a new leaf that the rest of the network runs on, and no parameter asks
    for a gradient. Either way the library's CAM rule (``method``) turns activations and
    gradients into the map.
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
        weight = head_gradient(self.model, self.target_layer)
        self._head_gradient = None if weight is None else weight.to(self.device)
        self._capturing = False
        self._captured: list[torch.Tensor] = []
        layer.register_forward_hook(self._capture)

    @property
    def from_scoring_pass(self) -> bool:
        """True when the map needs no backward pass (the default target)."""
        return self._head_gradient is not None

    def _capture(self, module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        """During :meth:`__call__`: the target layer's output, kept as it is (scoring pass)
        or as a new leaf the layers above run on (the start of the backward pass);
        otherwise (inference) nothing changes."""
        if not self._capturing:
            return None
        if self.from_scoring_pass:
            self._captured.append(output.detach())
            return None
        leaf = output.detach().requires_grad_(True)
        self._captured.append(leaf)
        return leaf.clone()  # a layer above may work in place (an inplace ReLU); a leaf may not be

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x``, the target's output captured on the way."""
        self._captured.clear()
        self._capturing = True
        try:
            if self.from_scoring_pass:
                with torch.no_grad(), self.numerics.autocast(self.device):
                    return self.model(x)
            asked = [p for p in self.model.parameters() if p.requires_grad]
            for p in asked:  # for this pass only: the backward pass starts at the target layer
                p.requires_grad_(False)
            try:
                with torch.enable_grad(), self.numerics.autocast(self.device):
                    return self.model(x)
            finally:
                for p in asked:
                    p.requires_grad_(True)
        finally:
            self._capturing = False

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``(N, D, H, W)`` (>= 0, not rescaled per window) and probabilities ``(N,)``
        for windows ``(N, 1, D, H, W)``: :meth:`cell_maps` on the window's voxels, without
        the library's end-to-end zoom (see :func:`upsample_to_window`)."""
        cells, probs = self.cell_maps(x)
        return upsample_to_window(cells, tuple(x.shape[2:]), self.stride).numpy(), probs

    def cell_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The map on the target layer's cells ``(N, d, h, w)`` and the probabilities: the
        library's CAM rule on the target layer's activations and the gradients of the
        positive logits, ReLU'd but without its per-map [0, 1] rescaling. The windows run in
        the run's precision and memory format (``numerics``), as scoring runs them."""
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

        x = self.numerics.prepare(x.to(self.device))
        targets = [BinaryClassifierOutputTarget(1)] * len(x)
        outputs = self._forward(x)
        if not self._captured:
            block = default_target_layer(self.model)
            raise VolttlError(f"cam.target_layer '{self.target_layer}' is not called by the model's "
                              f"forward pass (name one of its blocks, e.g. '{block}')")
        acts = self._captured[0].detach().float()
        if self.from_scoring_pass:
            positions = acts[0, 0].numel()
            grads = (self._head_gradient / positions).view(1, -1, *([1] * (acts.dim() - 2))).expand_as(acts)
        else:
            score = sum(t(o) for t, o in zip(targets, outputs.float(), strict=True))
            (grads,) = torch.autograd.grad(score, self._captured[0])
        self._captured.clear()
        acts_np = acts.cpu().numpy()
        grads_np = np.ascontiguousarray(grads.float().cpu().numpy())
        raw = self._cam.get_cam_image(x, self._cam.target_layers[0], targets, acts_np, grads_np, False)
        raw = torch.from_numpy(np.maximum(raw, 0).astype(np.float32))
        return raw, torch.sigmoid(outputs.detach().float()[:, 0]).cpu().numpy()


def stitch_study(hu: np.ndarray, cam: WindowGradCAM, spec: InputSpec, stride: int = 0,
                 batch_size: int = 4, how: str = "mean", blend: str = "gaussian",
                 on_batch: Callable[[int], None] | None = None) -> StudyCAM:
    """Grad-CAM of every window of the stored HU volume ``(slices, size, size)`` at
    ``stride`` (0: the scoring windows, whose probabilities then come with the map);
    ``on_batch(n)`` after each batch of ``n`` windows (progress)."""
    if how not in ("mean", "max"):
        raise VolttlError(f"cam.stitch '{how}' is not one of mean, max")
    window, crop = spec.window, spec.crop
    weights = blend_weights(window, blend)[:, None, None]
    n, size = hu.shape[0], hu.shape[1]
    y0 = spec.crop_start(size)
    starts = cam_window_starts(n, window, stride)
    pad = window  # the accumulators reach a window beyond both ends of the study
    total = np.zeros((n + 2 * pad, crop, crop), dtype=np.float32)
    weight_sum = np.zeros((n + 2 * pad, 1, 1), dtype=np.float32)
    probs = []
    for b in range(0, len(starts), batch_size):
        chunk = starts[b: b + batch_size]
        maps, p = cam(torch.from_numpy(window_batch(hu, chunk, spec)))
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
