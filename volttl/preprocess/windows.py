"""The window index: which slice windows a study offers and which are positive.

PENet's rule: evaluation windows are consecutive and non-overlapping,
``ceil(num_slices / window)`` per study, the last padded with air; a window is
positive when the study is positive and at least ``min_pe_slices`` of its slices show PE.
A positive study without slice labels (PENet's validation and test positives) has
windows of unknown label (:data:`UNKNOWN`): it is scored at study level only, and its
windows never count as negatives.
"""

from __future__ import annotations

import math

import numpy as np

UNKNOWN = -1  # the label of a window of a positive study that has no pe_slices
WINDOW_DTYPE = np.dtype([("study", np.int32), ("start", np.int32), ("pe_slices", np.int16),
                         ("label", np.int8)])


def indexed_window_starts(num_slices: int, window: int, stride: int) -> np.ndarray:
    """First slices of windows covering the study; with stride == window, PENet's windows."""
    if stride >= window:
        count = max(1, math.ceil(num_slices / window))
        return np.arange(count, dtype=np.int32) * window
    last = max(0, num_slices - window)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return np.asarray(starts, dtype=np.int32)


def pe_flags_on_stored_grid(pe_original: list[int], original_slices: int,
                            stored_to_original_k: np.ndarray) -> np.ndarray:
    """Boolean per stored slice: its nearest original slice shows PE."""
    flags = np.zeros(original_slices, dtype=bool)
    pe = [p for p in pe_original if 0 <= p < original_slices]
    flags[pe] = True
    nearest = np.clip(np.rint(stored_to_original_k).astype(int), 0, original_slices - 1)
    return flags[nearest]


def study_windows(study_index: int, pe_flags: np.ndarray, label: int, window: int, stride: int,
                  min_pe_slices: int) -> np.ndarray:
    """The study's windows as records ``(study, start, pe_slices, label)``; ``label`` is
    :data:`UNKNOWN` throughout a positive study that has no PE slices."""
    starts = indexed_window_starts(len(pe_flags), window, stride)
    csum = np.concatenate([[0], np.cumsum(pe_flags)])
    ends = np.minimum(starts + window, len(pe_flags))
    counts = csum[ends] - csum[starts]
    out = np.zeros(len(starts), dtype=WINDOW_DTYPE)
    out["study"] = study_index
    out["start"] = starts
    out["pe_slices"] = counts
    out["label"] = (label == 1) & (counts >= min_pe_slices)
    if label == 1 and not pe_flags.any():
        out["label"] = UNKNOWN
    return out
