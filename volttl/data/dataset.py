"""A torch Dataset of slice windows read from the HDF5 store, PENet's way.

Training: random crop, horizontal flip (p=0.5), in-plane rotation in [-15, 15] degrees
(fill -1000 HU), and with probability 0.3 the window is replaced by one centred on a
random positive study's PE slices (jitter +-12 slices). Evaluation: the store's
non-overlapping windows, centre crop. Intensities: clip HU to ``hu_clip``, scale to
[0, 1], subtract ``intensity_shift``.

Every random draw comes from a generator keyed on (seed, epoch, index), so a window's
augmentation does not depend on the number of loader workers, and a resumed run sees
exactly what an uninterrupted one would. The HDF5 file is opened lazily in each worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
import torch
from monai.transforms import Flip, Rotate

from volttl.preprocess.store import open_store

AIR_HU = -1000.0


@dataclass(frozen=True)
class Augment:
    pe_prob: float = 0.3
    pe_jitter: int = 12
    flip_prob: float = 0.5
    max_rotation_deg: float = 15.0


def normalise(hu: np.ndarray, hu_clip: tuple[float, float], shift: float) -> np.ndarray:
    """PENet: clip, scale to [0, 1], subtract the dataset mean."""
    lo, hi = hu_clip
    return (np.clip(hu, lo, hi) - lo) / (hi - lo) - shift


class WindowDataset(torch.utils.data.Dataset):
    """Windows of one split; items are ``(window (1, D, crop, crop), label, study index)``."""

    def __init__(self, store: str, split: str, train: bool, crop: int,
                 hu_clip: tuple[float, float] = (-100.0, 900.0), intensity_shift: float = 0.15897,
                 augment: Augment | None = None, seed: int = 0):
        self.store, self.split, self.train, self.crop = store, split, train, crop
        self.hu_clip, self.shift, self.seed, self.epoch = hu_clip, intensity_shift, seed, 0
        self.augment = (augment or Augment()) if train else None
        with open_store(store) as f:
            self.window = int(f.attrs["window"])
            self.min_pe = int(f.attrs["min_pe_slices"])
            self.study_ids = [s.decode() for s in f["index/study_ids"][...]]
            splits = [s.decode() for s in f["index/splits"][...]]
            self.study_labels = np.asarray(f["index/labels"][...], dtype=np.int64)
            table = f["index/windows_train" if train else "index/windows_eval"][...]
            self.windows = table[np.isin(table["study"], [i for i, s in enumerate(splits)
                                                          if s == split])]
            self.pe_slices = {i: np.asarray(f[f"studies/{sid}"].attrs["pe_slices"], dtype=np.int64)
                              for i, sid in enumerate(self.study_ids) if splits[i] == split}
            self.num_slices = {i: f[f"studies/{sid}/hu"].shape[0] for i, sid in enumerate(self.study_ids)
                               if splits[i] == split}
        if len(self.windows) == 0:
            raise ValueError(f"{store}: no {split} windows in the store")
        self.positive_studies = [i for i, p in self.pe_slices.items()
                                 if self.study_labels[i] == 1 and len(p)]
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def labels(self) -> np.ndarray:
        return self.windows["label"].astype(np.int64)

    def studies(self) -> np.ndarray:
        return self.windows["study"].astype(np.int64)

    def _h5(self) -> h5py.File:
        if self._file is None:  # one handle per worker process, opened after the fork
            self._file = h5py.File(self.store, "r")
        return self._file

    def read_window(self, study: int, start: int) -> np.ndarray:
        """HU ``(window, size, size)`` from ``start``, padded with air beyond the study."""
        hu = self._h5()[f"studies/{self.study_ids[study]}/hu"]
        n = hu.shape[0]
        lo, hi = max(start, 0), min(start + self.window, n)
        out = np.full((self.window, *hu.shape[1:]), AIR_HU, dtype=np.float32)
        if hi > lo:
            out[lo - start: hi - start] = hu[lo:hi]
        return out

    def window_label(self, study: int, start: int) -> int:
        pe = self.pe_slices[study]
        count = int(((pe >= start) & (pe < start + self.window)).sum())
        return int(self.study_labels[study] == 1 and count >= self.min_pe)

    def __getitem__(self, index: int):
        rec = self.windows[index]
        study, start = int(rec["study"]), int(rec["start"])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        aug = self.augment
        if aug is not None and self.positive_studies and rng.random() < aug.pe_prob:
            study = int(rng.choice(self.positive_studies))
            pe = self.pe_slices[study]
            centre = (int(pe.min()) + int(pe.max())) // 2 + int(rng.integers(-aug.pe_jitter,
                                                                             aug.pe_jitter + 1))
            start = int(np.clip(centre - self.window // 2, 0, max(0, self.num_slices[study] - 1)))
        label = self.window_label(study, start) if aug is not None else int(rec["label"])
        hu = self.read_window(study, start)
        size = hu.shape[1]
        if aug is not None:
            y0, x0 = (int(v) for v in rng.integers(0, size - self.crop + 1, size=2))
        else:
            y0 = x0 = (size - self.crop) // 2
        hu = hu[:, y0: y0 + self.crop, x0: x0 + self.crop]
        x = torch.from_numpy(np.ascontiguousarray(hu))[None]  # (1, D, H, W)
        if aug is not None:
            if rng.random() < aug.flip_prob:
                x = Flip(spatial_axis=2)(x)
            angle = np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
            # rotation in the (H, W) plane; zero padding on HU + 1000 fills with air
            x = Rotate(angle=(angle, 0.0, 0.0), padding_mode="zeros")(x - AIR_HU) + AIR_HU
            x = torch.as_tensor(x)
        x = torch.as_tensor(normalise(x.numpy(), self.hu_clip, self.shift), dtype=torch.float32)
        return x, torch.tensor(float(label)), study
