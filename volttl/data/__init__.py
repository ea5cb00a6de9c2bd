"""Torch datasets over the HDF5 store, their transforms and intensity scaling.

``WindowDataset`` is imported on first use, so that modules needing only the intensity
scaling (Grad-CAM, prediction) do not pull in the dataset and its transforms."""

from __future__ import annotations

__all__ = ["WindowDataset"]


def __getattr__(name: str):
    if name in __all__:
        from volttl.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'volttl.data' has no attribute '{name}'")
