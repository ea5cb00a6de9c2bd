"""Deprecated: the svcca step's old module, kept so that scripts importing it still run.
Use :func:`volttl.analysis.svcca_step.svcca_step`."""

from __future__ import annotations

import warnings
from pathlib import Path

from volttl.analysis.svcca_step import collect_features, svcca_step  # noqa: F401  (the old names)

warnings.warn("volttl.analysis.svcca_run is renamed: use svcca_step from volttl.analysis.svcca_step",
              DeprecationWarning, stacklevel=2)


def svcca_run(run_dir: str | Path, out: str | Path | None = None, split: str = "val", windows: int = 64,
              max_points: int = 8192, level: str = "block", threshold: float = 0.5, keep: float = 0.99,
              cuts: list[str] | None = None, progress: bool = True) -> dict:
    """Deprecated: :func:`volttl.analysis.svcca_step.svcca_step`'s record."""
    return svcca_step(run_dir, out, split, windows, max_points, level, threshold, keep, cuts, progress).record
