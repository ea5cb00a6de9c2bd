"""Which training windows are read: PENet's PE-centred sampling (slice labels) and
bags of windows per study (study labels). The transforms then decide how a window is
augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def last_window_start(num_slices: int, window: int) -> int:
    """The start of a study's last evaluation window (``ceil(slices / window)`` windows,
    the last padded with air)."""
    return max(0, (math.ceil(num_slices / window) - 1) * window)


@dataclass(frozen=True)
class PECentredSampler:
    """PENet's training draw (``ct_pe_dataset_3d.py``): with probability ``prob`` the window
    is centred on the PE slices of the indexed study when it is positive, else of a random
    positive study; then every training window, drawn or indexed, is shifted by up to
    ``jitter`` slices (PENet: half a window), so windows do not sit on the same slice grid
    every epoch. The shifted start is kept within the starts evaluation scores, from 0 to
    the last evaluation window's (:func:`last_window_start`). PENet clamps to ``slices -
    window`` instead, so its training never sees the air-padded last window that its
    evaluation scores; with studies of a few windows that made max-aggregated study scores
    collapse (the demo's validation AUROC fell from 0.98 to 0.55), and on PENet's data the
    two bounds differ by less than one window at the end of each study."""

    prob: float = 0.3
    jitter: int = 12

    def draw(self, rng: np.random.Generator, study: int, start: int, window: int,
             positives: list[int], pe_slices: dict[int, np.ndarray], num_slices: dict[int, int]
             ) -> tuple[int, int]:
        """The ``(study, start)`` to read instead of the indexed one."""
        if positives and rng.random() < self.prob:
            if study not in positives:
                study = int(rng.choice(positives))
            pe = pe_slices[study]
            start = max(0, (int(pe.min()) + int(pe.max())) // 2 - window // 2)
        if self.jitter:
            start += int(rng.integers(-self.jitter, self.jitter + 1))
        return study, int(min(max(start, 0), last_window_start(num_slices[study], window)))


def pool_bags(logits: torch.Tensor, bag: int, how: str, sharpness: float = 1.0) -> torch.Tensor:
    """Window logits ``(studies * bag,)`` -> one logit per study: the max, or the
    log-mean-exp ``(1/r) log mean exp(r * logits)`` with sharpness ``r`` (``lse``: a smooth
    maximum, the mean as ``r`` falls to 0 and the max as it grows, so every window of a
    bag gets some gradient, most of it the windows that score highest)."""
    per_study = logits.view(-1, bag)
    if how == "max":
        return per_study.max(dim=1).values
    if how == "lse":
        return (torch.logsumexp(sharpness * per_study, dim=1) - math.log(bag)) / sharpness
    raise ValueError(f"data.bag_pool '{how}' is not one of max, lse")


class StudyBagSampler(torch.utils.data.Sampler):
    """Batches of ``studies_per_batch`` studies x ``bag`` windows each, for learning from
    study labels alone. Each epoch shuffles the studies (keyed on seed and epoch) and draws
    each study's windows without replacement, or with it when the study has fewer than
    ``bag``. Under DDP each rank takes every ``world``-th study."""

    def __init__(self, window_studies: np.ndarray, bag: int, studies_per_batch: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.bag, self.per_batch, self.seed = bag, max(1, studies_per_batch), seed
        self.rank, self.world, self.epoch = rank, world, 0
        studies = np.asarray(window_studies)
        self.members = {int(s): np.flatnonzero(studies == s) for s in np.unique(studies)}
        self.studies = sorted(self.members)
        self.per_rank = math.ceil(len(self.studies) / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.per_batch)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        order = rng.permutation(len(self.studies))
        order = np.resize(order, self.per_rank * self.world)[self.rank::self.world]  # pad by wrapping
        bags = []
        for i in order:
            windows = self.members[self.studies[int(i)]]
            bags.append(rng.choice(windows, self.bag, replace=len(windows) < self.bag).tolist())
        for b in range(0, len(bags), self.per_batch):
            yield [w for bag in bags[b: b + self.per_batch] for w in bag]
