"""The TTL paper's two-stage cut-point search and its results table (`volttl search`)."""

from volttl.search.step import search_step
from volttl.search.trials import Trial, run_trial

__all__ = ["Trial", "run_trial", "search_step"]

