"""Deprecated: the cam step's old module, kept so that scripts importing it still run.
Use :func:`volttl.explain.cam_step.cam_step`."""

from __future__ import annotations

import warnings
from pathlib import Path

from volttl.explain.cam_step import (  # noqa: F401  (the old names, re-exported)
    EMPTY_MAP,
    cam_step,
    cam_study,
    overlay_on_original,
    select_studies,
    windows_per_study,
)

warnings.warn("volttl.explain.run is renamed: use cam_step from volttl.explain.cam_step",
              DeprecationWarning, stacklevel=2)


def cam_run(run_dir: str | Path, out: str | Path, studies: list[str] | None = None, split: str = "test",
            overrides: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Deprecated: :func:`volttl.explain.cam_step.cam_step`'s records."""
    return cam_step(run_dir, out, studies, split, overrides, progress).records
