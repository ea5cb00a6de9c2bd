"""A PNG preview of a CAM over its CT: axial, coronal and sagittal slices through the peak.

Drawn on the stored grid, which is always in the LPS voxel order, so the voxel-index
views are in the radiological convention (patient's right
on the viewer's left, anterior up, superior up), with the pixel aspect taken from the
spacing. CT in grey and the CAM in colour as :mod:`volttl.explain.display` sets them (the
3D Slicer scene uses the same), with orientation letters and a colour bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volttl.explain.display import CAM_OPACITY, CAM_THRESHOLD, COLOUR_TABLE, CT_DISPLAY_RANGE

# letters at the (left, right, top, bottom) edges of each view, for the LPS voxel order
EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def write_preview(ct: np.ndarray, cam: np.ndarray, peak_kji: tuple[int, int, int],
                  spacing: tuple[float, float, float], path: str | Path, title: str) -> None:
    """Three planes through the map's peak (through the volume's centre when the map is
    all zero, so no plane is drawn at the volume's edge), with orientation letters and a
    colour bar for the CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if float(cam.max()) <= 0:
        peak_kji = tuple(int(n) // 2 for n in cam.shape)
        title = f"{title} (all-zero map)"
    k, j, i = peak_kji
    sx, sy, sz = spacing
    views = [("axial", ct[k], cam[k], sy / sx, "upper"),
             ("coronal", ct[:, j, :], cam[:, j, :], sz / sx, "lower"),
             ("sagittal", ct[:, :, i], cam[:, :, i], sz / sy, "lower")]
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.4))
    heat_image = None
    for ax, (name, grey, heat, aspect, origin) in zip(axes, views, strict=True):
        ax.imshow(grey, cmap="gray", vmin=CT_DISPLAY_RANGE[0], vmax=CT_DISPLAY_RANGE[1], aspect=aspect,
                  origin=origin, interpolation="nearest")
        heat_image = ax.imshow(np.ma.masked_less(heat, CAM_THRESHOLD), cmap=COLOUR_TABLE, vmin=0, vmax=1,
                               alpha=CAM_OPACITY,
                               aspect=aspect, origin=origin, interpolation="nearest")
        left, right, top, bottom = EDGES[name]
        style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    bar = fig.colorbar(heat_image, cax=fig.add_axes((0.94, 0.15, 0.015, 0.7)))
    bar.set_label("Grad-CAM")
    fig.savefig(path, dpi=80)
    plt.close(fig)
