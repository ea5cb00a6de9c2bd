"""A PNG preview of a CAM over its CT: axial, coronal and sagittal slices through the peak.

Drawn on the stored grid, which is always in the LPS voxel order, so the voxel-index
views are in the radiological convention (patient's right
on the viewer's left, anterior up, superior up), with the pixel aspect taken from the
spacing. CT in grey at a CTPA window (level 100, width 700 HU), CAM in colour where it
exceeds 0.1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_WINDOW = (-250.0, 450.0)


def write_preview(ct: np.ndarray, cam: np.ndarray, peak_kji: tuple[int, int, int],
                  spacing: tuple[float, float, float], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, j, i = peak_kji
    sx, sy, sz = spacing
    views = [("axial", ct[k], cam[k], sy / sx, "upper"),
             ("coronal", ct[:, j, :], cam[:, j, :], sz / sx, "lower"),
             ("sagittal", ct[:, :, i], cam[:, :, i], sz / sy, "lower")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, grey, heat, aspect, origin) in zip(axes, views, strict=True):
        ax.imshow(grey, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect,
                  origin=origin, interpolation="nearest")
        ax.imshow(np.ma.masked_less(heat, 0.1), cmap="jet", vmin=0, vmax=1, alpha=0.45,
                  aspect=aspect, origin=origin, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
