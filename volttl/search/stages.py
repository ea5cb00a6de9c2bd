"""The TTL paper's hierarchical cut-point search (section 3.2): which cuts each stage
trains and the score that picks a stage's winner. The step that trains them and writes the
results table (Table 2) is :mod:`volttl.search.step`.

Stage 1 trains each configured strategy at every block cut and keeps the one with the
best validation study AUROC (mean over repeats). Stage 2 trains the layer cuts within
``search.radius`` blocks (bottlenecks) of that winner, and the best of the winner and
those is the two-stage result. FTL of the configured backbone and FTL of PENet are the
baselines. The table reports each on the test split, mean +- std over the repeats, with
the architecture's P(M), MACs(G) and T(ms) at ``profile.input_size``: "-1" rows are
the block search alone, "-2" rows the two stages.
"""

from __future__ import annotations

import math

from volttl.models import get_backbone_spec


def selection_score(result: dict) -> float:
    """A trial's mean validation study AUROC (minus infinity when there is none)."""
    value = result["val_study_auroc"]["mean"]
    return -math.inf if value is None or math.isnan(value) else value


def stage1_cuts(model: str, configured: list[str]) -> list[str]:
    spec = get_backbone_spec(model)
    names = [c.name for c in spec.cut_points() if c.level == "block"]
    for name in configured:
        spec.cut_point(name)  # a clear error for a cut the backbone does not have
    return list(configured) or names


def stage2_cuts(model: str, winner: str, radius: int, trained: list[str] = ()) -> list[str]:
    """Layer cuts within ``radius`` units (blocks) of the stage-1 winner, in network order,
    leaving out those equal to a cut already trained (``layer1.2`` is ``layer1``)."""
    spec = get_backbone_spec(model)
    keep = spec.cut_point(winner).keep
    seen = {spec.cut_point(name).keep for name in [winner, *trained]}
    return [c.name for c in spec.cut_points()
            if c.level == "layer" and abs(c.keep - keep) <= radius and c.keep not in seen]
