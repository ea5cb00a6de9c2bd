"""A torch Dataset of slice windows read from the HDF5 store, PENet's way.

Training: PE-centred sampling (:mod:`volttl.data.sampling`), then the config's
``augment.transforms`` (by default PENet's random crop, horizontal flip (p=0.5) and
in-plane rotation in [-15, 15] degrees with air fill; :mod:`volttl.data.transforms`). A
training item is the raw int16 window (whole stored slices) and its drawn parameters;
:meth:`WindowDataset.model_input` augments and intensity-scales the whole batch on the
training device, so loader workers only read.
Evaluation: the store's non-overlapping windows, centre crop, intensity-scaled in the worker.
What the model takes (window, crop, intensity scaling): :class:`volttl.data.input_spec.InputSpec`.

Every random draw comes from a generator keyed on (seed, epoch, index), so a window's
augmentation does not depend on the number of loader workers, and a resumed run sees
exactly what an uninterrupted one would. The store is opened lazily in each worker.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from volttl.config import AugmentConfig
from volttl.data.input_spec import InputSpec
from volttl.data.sampling import PECentredSampler
from volttl.data.transforms import Compose, augment_batch, training_transform
from volttl.errors import VolttlError
from volttl.inference import cut_window, model_window
from volttl.preprocess.store import Store


def study_subset(members: list[int], labels, count: int, where: str) -> list[int]:
    """``count`` of ``members`` at their share of positives, fixed whatever the run's seed:
    positives and negatives each in one seeded order, the first of each taken, so a smaller
    subset lies inside a larger one (``data.train_studies``)."""
    if count > len(members):
        raise VolttlError(f"{where}: data.train_studies {count} is more than the {len(members)} "
                          "studies there")
    order = np.random.default_rng(0)
    positives = [i for i in members if labels[i] == 1]
    negatives = [i for i in members if labels[i] != 1]
    take_pos = min(len(positives), max(1, round(count * len(positives) / len(members))))
    take_neg = count - take_pos
    if take_neg > len(negatives) or (count >= 2 and take_neg < 1):
        raise VolttlError(f"{where}: data.train_studies {count} cannot hold both classes "
                          f"({len(positives)} positive, {len(negatives)} negative studies there)")
    chosen = [positives[i] for i in order.permutation(len(positives))[:take_pos]]
    chosen += [negatives[i] for i in order.permutation(len(negatives))[:take_neg]]
    return sorted(chosen)


class WindowDataset(torch.utils.data.Dataset):
    """Windows of one split. Evaluation items are ``(window (1, D, crop, crop), label,
    study index)``, intensity-scaled; training items are ``(int16 HU (1, D, size, size), label,
    study index, encoded augmentation parameters (transform.width,))`` for :meth:`model_input`."""

    def __init__(self, store: str, split: str, train: bool, spec: InputSpec,
                 augment: AugmentConfig | None = None, seed: int = 0, study_labels: bool = False,
                 pe_slices: dict[str, list[tuple[int, int]]] | None = None, train_studies: int = 0):
        crop = spec.crop
        self.store, self.split, self.train, self.crop, self.spec = store, split, train, crop, spec
        self.seed, self.epoch = seed, 0
        self.study_labels_only = study_labels  # items carry their study's label (bags)
        aug = (augment or AugmentConfig()) if train else None
        self.sampler: PECentredSampler | None = None  # set once the window is known
        # training draws its augmentation here; evaluation windows are centre-cropped by
        # the inference path (volttl.inference.model_window)
        self.transform: Compose | None = (training_transform(crop, tuple(aug.transforms), aug.flip_prob,
                                                             aug.max_rotation_deg) if aug else None)
        with Store(store) as s:
            self.window = s.window
            if spec.window != s.window:
                raise VolttlError(f"{store}: stored with {s.window}-slice windows, but the model's input is "
                                  f"{spec.window} slices (preprocess.window); use the store's value")
            self.min_pe = s.min_pe_slices
            self.study_ids = s.study_ids
            self.study_labels = s.labels
            self.windows = s.windows(split, train)
            members = s.studies_in(split)
            if train and train_studies:
                members = study_subset(members, s.labels, train_studies, f"{store} ({split})")
                self.windows = self.windows[np.isin(self.windows["study"], members)]
            self.pe_slices = {i: s.meta(self.study_ids[i]).pe_slices for i in members}
            for sid, ranges in (pe_slices or {}).items():  # pseudo slice labels (stored slices)
                self.pe_slices[self.study_ids.index(sid)] = np.concatenate(
                    [np.arange(first, last + 1) for first, last in ranges])
            self.num_slices = {i: s.hu(self.study_ids[i]).shape[0] for i in members}
            self.size = s.hu(self.study_ids[members[0]]).shape[1] if members else crop
        if aug and not study_labels:  # needs slice labels; with study labels the bags choose windows
            jitter = self.window // 2 if aug.pe_jitter is None else aug.pe_jitter
            self.sampler = PECentredSampler(aug.pe_prob, jitter)
        if len(self.windows) == 0:
            raise VolttlError(f"{store}: no {split} windows in the store")
        if crop > self.size:
            raise VolttlError(f"data.crop {crop} is larger than the stored {self.size} x {self.size} slices "
                              f"of {store} (preprocess.size)")
        self.positive_studies = [i for i, p in self.pe_slices.items()
                                 if self.study_labels[i] == 1 and len(p)]
        self._store: Store | None = None

    @classmethod
    def from_config(cls, cfg, split: str, train: bool = False, seed: int = 0,
                    pe_slices: dict[str, list[tuple[int, int]]] | None = None) -> WindowDataset:
        """The split's windows as the config's ``data`` section describes them; with
        ``pe_slices`` (study id -> ranges of first and last stored slice) those studies' PE slices
        are these, and training samples windows as with slice labels."""
        d = cfg.data
        with Store(d.store) as s:  # the windows are the store's (training records its settings)
            spec = dataclasses.replace(InputSpec.of(cfg), window=s.window)
        return cls(d.store, split, train, spec, cfg.augment,
                   seed=seed, study_labels=train and d.labels == "study" and pe_slices is None,
                   pe_slices=pe_slices, train_studies=d.train_studies if train else 0)

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def labels(self) -> np.ndarray:
        return self.windows["label"].astype(np.int64)

    def studies(self) -> np.ndarray:
        return self.windows["study"].astype(np.int64)

    def _open(self) -> Store:
        if self._store is None:  # one handle per worker process, opened after the fork
            self._store = Store(self.store)
        return self._store

    def read_window(self, study: int, start: int, dtype=np.float32) -> np.ndarray:
        """HU ``(window, size, size)`` from ``start``, padded with air beyond the study."""
        store, sid = self._open(), self.study_ids[study]
        hu = store.hu(sid)
        return cut_window(hu, start, self.window, lambda lo, hi: store.read_slices(sid, lo, hi, hu), dtype)

    def window_label(self, study: int, start: int) -> int:
        pe = self.pe_slices[study]
        count = int(((pe >= start) & (pe < start + self.window)).sum())
        return int(self.study_labels[study] == 1 and count >= self.min_pe)

    def __getitem__(self, index: int):
        rec = self.windows[index]
        study, start = int(rec["study"]), int(rec["start"])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.study_labels_only:
            label = int(self.study_labels[study])
        elif self.sampler is not None:
            study, start = self.sampler.draw(rng, study, start, self.window, self.positive_studies,
                                             self.pe_slices, self.num_slices)
            label = self.window_label(study, start)
        else:
            label = int(rec["label"])
        if self.train:  # the batch is augmented on the training device (model_input)
            hu = torch.from_numpy(self.read_window(study, start, np.int16))[None]
            drawn = self.transform.sample(rng, tuple(hu.shape))
            params = torch.tensor(self.transform.encode(drawn), dtype=torch.float32)
            return hu, torch.tensor(float(label)), study, params
        x = model_window(self.read_window(study, start), self.spec)
        return torch.from_numpy(x), torch.tensor(float(label)), study  # (1, D, crop, crop)

    def model_input(self, hu: torch.Tensor, params: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of training items as the model takes it: the int16 windows moved to
        ``device`` (half the bytes of float32), augmented there as one batch (cropped,
        flipped and rotated by default), intensity-scaled, in channels_last_3d."""
        x = augment_batch(hu.to(device, non_blocking=True), params, self.transform)
        x = self.spec.scale(x)
        return x.contiguous(memory_format=torch.channels_last_3d)
