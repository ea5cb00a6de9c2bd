"""How an overlay is shown, in one place: the PNG previews and the 3D Slicer scene use
the same CT display range, colour table, opacity and threshold, so the picture in a report is
what the scene opens to."""

from __future__ import annotations

CT_LEVEL, CT_WIDTH = 100.0, 700.0  # HU: CT-angiography display level and width (arteries, clots)
CT_DISPLAY_RANGE = (CT_LEVEL - CT_WIDTH / 2, CT_LEVEL + CT_WIDTH / 2)
COLOUR_TABLE = "inferno"  # perceptually uniform, readable in greyscale print
CAM_OPACITY = 0.5
CAM_THRESHOLD = 0.1  # map values below this are not drawn (the near-zero haze of every window)


def colour_table(entries: int = 256) -> list[tuple[int, int, int]]:
    """The colour table as 8-bit RGB, from matplotlib's definition."""
    from matplotlib import colormaps

    cmap = colormaps[COLOUR_TABLE].resampled(entries)
    return [tuple(int(round(255 * c)) for c in cmap(i)[:3]) for i in range(entries)]
