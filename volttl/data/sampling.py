"""PENet's PE-centred sampling: with probability ``prob`` a training window is replaced by
one centred on a random positive study's PE slices, jittered by up to ``jitter`` slices.

It chooses *which* window is read; the transforms then decide how it is augmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PECentredSampler:
    prob: float = 0.3
    jitter: int = 12

    def draw(self, rng: np.random.Generator, study: int, start: int, window: int,
             positives: list[int], pe_slices: dict[int, np.ndarray], num_slices: dict[int, int]
             ) -> tuple[int, int]:
        """The ``(study, start)`` to read instead of the indexed one (often the same)."""
        if not positives or rng.random() >= self.prob:
            return study, start
        study = int(rng.choice(positives))
        pe = pe_slices[study]
        centre = (int(pe.min()) + int(pe.max())) // 2 + int(rng.integers(-self.jitter, self.jitter + 1))
        return study, int(np.clip(centre - window // 2, 0, max(0, num_slices[study] - 1)))
