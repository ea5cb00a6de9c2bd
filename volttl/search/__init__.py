"""The TTL paper's two-stage cut-point search and its results table (`volttl search`)."""

import warnings

from volttl.search.stages import search_step
from volttl.search.trials import Trial, run_trial

__all__ = ["Trial", "run_trial", "search_step"]


def __getattr__(name: str):
    if name == "search_run":  # the step's old name
        warnings.warn("volttl.search.search_run is renamed search_step", DeprecationWarning, stacklevel=2)
        return search_step
    raise AttributeError(f"module 'volttl.search' has no attribute {name!r}")
