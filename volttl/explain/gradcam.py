"""Grad-CAM for every window of a study, stitched into one map on the stored grid.

pytorch-grad-cam (1.5.3 and later) computes 3-D Grad-CAM for the positive logit
(``BinaryClassifierOutputTarget(1)``) at a target layer: by default the last unit of the
trained model, whatever its strategy and cut. It rescales each window's map to [0, 1],
so before stitching each map is weighted by the window's predicted probability: a
window the model calls negative then adds little, however its map is shaped. Windows
slide along the slices at ``stride`` (half a window by default), see the same centre
crop as in evaluation (the rest of the plane stays 0), are batched, and overlaps are
averaged (or maxed). The stitched map is scaled so its peak is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from volttl.data.dataset import AIR_HU, normalise
from volttl.models.base import Backbone3D


def default_target_layer(model: Backbone3D) -> str:
    """The last unit before the head: its block, or the stem's last module."""
    unit = model.units[-1]
    return unit.paths[0] if len(model.units) > 1 else unit.paths[-1]


def window_starts(num_slices: int, window: int, stride: int) -> list[int]:
    """0, stride, 2 stride, ... while the window starts inside the study (the last ones
    padded with air, as evaluation windows are)."""
    return list(range(0, max(num_slices, 1), stride))


@dataclass
class StudyCAM:
    stored_map: np.ndarray  # (slices, size, size) float32 in [0, 1]
    starts: list[int]
    window_probs: np.ndarray


class WindowGradCAM:
    """Grad-CAM of a trained model's positive logit at one layer, for batches of windows."""

    def __init__(self, model: Backbone3D, target_layer: str = "", device: torch.device | None = None,
                 method: str = "gradcam"):
        import pytorch_grad_cam as pgc

        methods = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
                   "layercam": pgc.LayerCAM}
        if method not in methods:
            raise ValueError(f"cam.method '{method}' is not one of {', '.join(methods)}")

        self.device = device or torch.device("cpu")
        self.model = model.to(self.device, memory_format=torch.channels_last_3d).eval()
        for p in self.model.parameters():  # gradients must reach the target layer (LWFT freezes)
            p.requires_grad_(True)
        self.target_layer = target_layer or default_target_layer(model)
        try:
            layer = self.model.get_submodule(self.target_layer)
        except AttributeError:
            raise ValueError(f"cam.target_layer '{self.target_layer}' is not a module of the model") from None
        self.method = method
        self._cam = methods[method](model=self.model, target_layers=[layer])

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``(N, D, H, W)`` in [0, 1] and probabilities ``(N,)`` for windows ``(N, 1, D, H, W)``."""
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

        maps = self._cam(input_tensor=x.to(self.device).to(memory_format=torch.channels_last_3d),
                         targets=[BinaryClassifierOutputTarget(1)] * len(x))
        probs = torch.sigmoid(self._cam.outputs.detach().float()[:, 0]).cpu().numpy()
        return np.asarray(maps, dtype=np.float32), probs


def stitch_study(hu: np.ndarray, cam: WindowGradCAM, window: int, crop: int, stride: int = 0,
                 batch_size: int = 4, how: str = "mean", hu_clip: tuple[float, float] = (-100.0, 900.0),
                 intensity_shift: float = 0.15897) -> StudyCAM:
    """Grad-CAM of every window of the stored HU volume ``(slices, size, size)``."""
    if how not in ("mean", "max"):
        raise ValueError(f"cam.stitch '{how}' is not one of mean, max")
    n, size = hu.shape[0], hu.shape[1]
    stride = stride or max(1, window // 2)
    y0 = (size - crop) // 2
    starts = window_starts(n, window, stride)
    total = np.zeros((n + window, crop, crop), dtype=np.float32)
    count = np.zeros((n + window, 1, 1), dtype=np.float32)
    probs = []
    for b in range(0, len(starts), batch_size):
        chunk = starts[b: b + batch_size]
        x = np.full((len(chunk), 1, window, crop, crop), AIR_HU, dtype=np.float32)
        for i, s in enumerate(chunk):
            part = hu[s: s + window, y0: y0 + crop, y0: y0 + crop]
            x[i, 0, : len(part)] = part
        maps, p = cam(torch.from_numpy(normalise(x, hu_clip, intensity_shift)))
        probs.append(p)
        for s, m, prob in zip(chunk, maps, p, strict=True):
            weighted = m * prob
            if how == "mean":
                total[s: s + window] += weighted
            else:
                np.maximum(total[s: s + window], weighted, out=total[s: s + window])
            count[s: s + window] += 1
    core = total[:n] / np.maximum(count[:n], 1) if how == "mean" else total[:n]
    peak = float(core.max())
    stored = np.zeros((n, size, size), dtype=np.float32)
    stored[:, y0: y0 + crop, y0: y0 + crop] = core / peak if peak > 0 else core
    return StudyCAM(stored, starts, np.concatenate(probs) if probs else np.zeros(0))
