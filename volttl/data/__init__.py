"""Torch datasets over the HDF5 window store."""

from volttl.data.dataset import Augment, WindowDataset

__all__ = ["Augment", "WindowDataset"]
