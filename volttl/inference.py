"""The one inference path: a trained run opened once, scoring a study's windows.

nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder`` is the model: open the
run folder once (config, best weights, device, the run's numerics), then score studies
through it. Building the model a config describes (:func:`model_from_config`) and loading a
run's weights into it (:func:`load_run_weights`) live here too. Validation, ``evaluate``,
``predict`` and ``cam`` all build a study's windows
(:func:`cut_window`, :func:`model_window`), score them (:func:`device_probabilities`) and
aggregate the window probabilities into the study's (:func:`aggregate`) here, so every
output that reports a study's probability reports the same number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from volttl.config import Config, check_reading_overrides, with_overrides
from volttl.data.input_spec import InputSpec
from volttl.data.intensity import AIR_HU
from volttl.errors import VolttlError
from volttl.evaluate.decision import Decision, read_decision
from volttl.models import source_presets
from volttl.models.base import Backbone3D
from volttl.models.checkpoints import read_checkpoint
from volttl.numerics import DEFAULT_NUMERICS, Numerics, resolve_device
from volttl.outputs.folders import BEST, CONFIG, RunDir, RunError
from volttl.outputs.resume import check_config_against_checkpoint
from volttl.preprocess.windows import indexed_window_starts
from volttl.transfer import TransferSetup, build_transfer_model

if TYPE_CHECKING:
    from volttl.preprocess.store import StudyMeta

AGGREGATES = ("max", "mean")


def cut_window(volume, start: int, window: int, read: Callable | None = None,
               dtype=np.float32) -> np.ndarray:
    """Slices ``start .. start + window`` of ``volume`` (an array or an HDF5 dataset,
    ``(slices, rows, cols)``), air beyond either end of the study. ``read(lo, hi)``, when
    given, reads the slices (the store's reader names a damaged file)."""
    n = volume.shape[0]
    lo, hi = max(start, 0), min(start + window, n)
    out = np.full((window, *volume.shape[1:]), AIR_HU, dtype=dtype)
    if hi > lo:
        out[lo - start: hi - start] = read(lo, hi) if read is not None else volume[lo:hi]
    return out


def model_window(hu_window: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A window of HU ``(D, size, size)`` as the model takes it outside training: the
    centre crop, intensity-scaled, ``(1, D, crop, crop)`` float32."""
    y0, crop = spec.crop_start(hu_window.shape[-1]), spec.crop
    x = hu_window[:, y0: y0 + crop, y0: y0 + crop]
    return spec.scale(x).astype(np.float32)[None]


def window_batch(hu: np.ndarray, starts: list[int], spec: InputSpec) -> np.ndarray:
    """The windows of a study's stored HU ``hu`` at ``starts``, ``(N, 1, D, crop, crop)``."""
    return np.stack([model_window(cut_window(hu, s, spec.window), spec) for s in starts])


def evaluation_starts(num_slices: int, window: int) -> list[int]:
    """PENet's evaluation windows: consecutive, non-overlapping, the last padded with air."""
    return [int(s) for s in indexed_window_starts(num_slices, window, window)]


def aggregate(window_probs: np.ndarray, how: str) -> float:
    """A study's probability from its window probabilities: the maximum (PENet) or mean."""
    if how not in AGGREGATES:
        raise ValueError(f"eval.aggregate '{how}' is not one of {', '.join(AGGREGATES)}")
    probs = np.asarray(window_probs)
    return float(probs.max() if how == "max" else probs.mean())


def study_scores(window_probs: np.ndarray, window_studies: np.ndarray, how: str = "max"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per study (sorted by study index): :func:`aggregate` of its window probabilities."""
    studies = np.unique(window_studies)
    return studies, np.asarray([aggregate(window_probs[window_studies == s], how) for s in studies])


@torch.no_grad()
def device_probabilities(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                         numerics: Numerics = DEFAULT_NUMERICS) -> torch.Tensor:
    """The positive-class probability of each window ``(N, 1, D, H, W)`` in the run's
    precision and memory format (``Numerics.of(cfg.runtime)``), the logit cast to float32
    before the sigmoid; left on the device, so a loop over batches reads them back once."""
    x = numerics.prepare(x.to(device, non_blocking=True))
    with numerics.autocast(device):
        logits = model(x)[:, 0]
    return torch.sigmoid(logits.float())


class NonFiniteScore(VolttlError):
    """The model gave a probability that is not a number: nothing may be called, stored or drawn."""


def require_finite(probs: np.ndarray, where: str) -> np.ndarray:
    """``probs`` unchanged when every one is finite; else a one-line :class:`NonFiniteScore`
    naming ``where`` (a NaN compares false with every threshold, so it would read as negative)."""
    bad = int(np.size(probs) - np.isfinite(probs).sum())
    if bad:
        raise NonFiniteScore(f"{where}: the model gave {bad} of {np.size(probs)} window probabilities "
                             "that are not finite (NaN or inf): its weights or input are broken; nothing "
                             "was called")
    return probs


def window_probabilities(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                         numerics: Numerics = DEFAULT_NUMERICS) -> np.ndarray:
    """:func:`device_probabilities`, read back to the host."""
    return device_probabilities(model, x, device, numerics).cpu().numpy()


@dataclass
class StudyScore:
    """A study's evaluation windows, their probabilities, the run's aggregate (calibrated
    when the run is) and the call at the run's operating point (None without one)."""

    probability: float
    window_starts: list[int]
    window_probabilities: list[float]
    predicted_label: int | None = None
    threshold: float | None = None

    @property
    def best_window(self) -> int:
        """The stored slice where the highest-scoring window starts."""
        return self.window_starts[int(np.argmax(self.window_probabilities))]

    @property
    def best_window_probability(self) -> float:
        """The highest window probability (uncalibrated: the model's own)."""
        return float(np.max(self.window_probabilities))


class TrainedRun:
    """A trained run opened once: its config, its best model on the device in the run's
    numerics. :meth:`score_study` is how every command scores a study."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, path: Path,
                 weights_sha256: str | None = None) -> None:
        self.cfg, self.device, self.path = cfg, device, path
        self.weights_sha256 = weights_sha256
        # the calibration and operating point evaluate chose on validation for these weights
        self.decision: Decision | None = read_decision(RunDir(path).operating_point, weights_sha256)
        self.numerics = Numerics.of(cfg.runtime)  # the precision and memory format the run trained in
        self.numerics.configure(device)
        self.model = model.to(device, memory_format=self.numerics.memory_format).eval()
        self.input = InputSpec.of(cfg)  # what the model takes: window, crop, intensity scaling

    @classmethod
    def open(cls, run_dir: str | Path, overrides: list[str] | None = None,
             rechoose: bool = False) -> TrainedRun:
        """The run's config (with ``overrides``, which may change only how and where it
        computes and writes; with ``rechoose``, as evaluate, the operating point's settings
        too) and ``best.pt``, on the configured device."""
        check_reading_overrides(overrides, str(run_dir), rechoose)
        cfg, model, digest = load_run_weights(run_dir)
        cfg = with_overrides(cfg, overrides)
        return cls(cfg, model, resolve_device(cfg.runtime.device), Path(run_dir), digest)

    def note_missing_decision(self, log) -> None:
        """One warning when outputs will carry probabilities but no call."""
        if self.decision is None:
            log.warning("%s has no operating point for its best.pt yet: predicted_label and threshold stay "
                        "empty (run `volttl evaluate --run %s --split val` to choose one)",
                        self.path, self.path)

    @property
    def synthetic_cohort(self) -> dict | None:
        """What made the synthetic cohort the run learnt from (`volttl synth`), as its
        training record says; None for other data, and for runs from before it was recorded."""
        record = RunDir(self.path).training_data
        if not record.is_file():
            return None
        try:
            return json.loads(record.read_text(encoding="utf-8")).get("synthetic_cohort")
        except json.JSONDecodeError as exc:
            raise VolttlError(f"{record}: unreadable training record ({exc.msg})") from None

    def note_synthetic_training(self, log) -> None:
        """One warning when a model that never saw a patient's CT scores new scans."""
        cohort = self.synthetic_cohort
        if cohort:
            log.warning("%s learnt from volttl's synthetic cohort (volttl synth, %s studies), not from "
                        "patients' CT: its probabilities and maps on real scans say nothing about pulmonary "
                        "embolism",
                        self.path, cohort.get("studies", "?"))

    def calibrate(self, probs):
        """Study probabilities as the run reports them: tempered when the run is calibrated."""
        return probs if self.decision is None else self.decision.calibrate(probs)

    def score_windows(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities of model-ready windows ``(N, 1, D, crop, crop)``."""
        x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        return window_probabilities(self.model, x, self.device, self.numerics)

    def score_study(self, hu: np.ndarray, batch_size: int | None = None,
                    on_batch: Callable[[int], None] | None = None) -> StudyScore:
        """A study's stored HU ``(slices, size, size)``: its evaluation windows, their
        probabilities and the run's aggregate, as ``evaluate`` scores a stored study;
        ``on_batch(n)`` after each batch of ``n`` windows (progress)."""
        batch_size = batch_size or self.cfg.cam.batch_size
        starts = evaluation_starts(hu.shape[0], self.input.window)
        probs = []
        for b in range(0, len(starts), batch_size):
            chunk = starts[b: b + batch_size]
            probs.append(self.score_windows(window_batch(hu, chunk, self.input)))
            if on_batch is not None:
                on_batch(len(chunk))
        return self.study_score(starts, np.concatenate(probs))

    def study_score(self, starts: list[int], window_probs: np.ndarray) -> StudyScore:
        """The study's score from the probabilities of its evaluation windows at ``starts``
        (scored here, or by the pass that also drew the map): the run's aggregate,
        calibrated when the run is, and the call at its operating point."""
        p = require_finite(np.asarray(window_probs), str(self.path))
        probability = float(self.calibrate(aggregate(p, self.cfg.eval.aggregate)))
        decided = self.decision
        return StudyScore(probability, list(starts), [float(v) for v in p],
                          decided.label(probability) if decided else None,
                          decided.threshold if decided else None)


def window_location(meta: StudyMeta, start: int, spec: InputSpec, stored_slices: int) -> dict:
    """Where a scored window lies in the scan the user gave, not on the stored grid: its
    stored slices and its centre in RAS mm, both of the part inside the scan (the last
    window runs into air padding beyond it), the share of the window that is padding, and
    the source file's slices whose centres lie in its slab (numbered as the file numbers
    them, as pe_slices are; None when the file's third voxel axis is not head-foot, where
    no slice range describes a window)."""
    m, n = meta.stored_to_original, meta.original.shape[0]
    window = spec.window
    centre_in_plane = spec.crop_start(meta.size) + (spec.crop - 1) / 2  # the centre crop
    last = min(start + window, stored_slices) - 1  # the window's last slice inside the scan
    centre = meta.stored_affine_ras @ [centre_in_plane, centre_in_plane, (start + last) / 2, 1.0]
    source = None
    if m[2, 2] != 0 and not m[2, 0] and not m[2, 1]:
        # the source slices whose centres lie in the window's slab (half a stored slice
        # beyond its first and last centres), a centre on the edge counted in
        k = sorted(m[2, 2] * s + m[2, 3] for s in (start - 0.5, last + 0.5))
        lo, hi = max(0, math.ceil(k[0] - 1e-6)), min(n - 1, math.floor(k[1] + 1e-6))
        source = [lo, hi] if lo <= hi else None  # None: the window lies in the air padding
    return {"best_window_stored_slices": [start, last],
            "best_window_centre_ras_mm": [round(float(v), 2) for v in centre[:3]],
            "best_window_source_slices": source,
            "best_window_padding": round(1 - (last - start + 1) / window, 4)}


def model_from_config(cfg: Config, weights: bool = True,
                      input_size: tuple[int, int, int] | None = None) -> TransferSetup:
    """The model a config describes, with its parameter groups. ``weights=True`` loads
    ``model.pretrained`` and initialises new parts as training does; ``weights=False``
    builds the architecture only, quietly (for evaluation, cam, profiling, search).
    ``input_size`` (D, H, W) sizes a flattened head; by default the training input's."""
    t = cfg.transfer
    input_size = input_size or InputSpec.of(cfg).shape
    input_size = input_size if t.head.pool == "flatten" else None
    return build_transfer_model(cfg.model.name, t.strategy, t.cut, num_outputs=cfg.model.num_outputs,
                                stem=cfg.model.stem, pretrained=cfg.model.pretrained if weights else "",
                                init=t.init, width=t.width, pool=t.head.pool, dropout=t.head.dropout,
                                input_size=input_size, head_norm=t.head.norm, weights=weights,
                                frozen_bn=t.frozen_bn, input_scale=cfg.model.input_scale,
                                intensity_shift=InputSpec.of(cfg).intensity_shift,
                                source_preset=source_presets.declared(cfg.model))


def load_run(run_dir: str | Path, which: str = BEST) -> tuple[Config, Backbone3D]:
    """The run's config and its model with the chosen checkpoint's weights."""
    cfg, model, _ = load_run_weights(run_dir, which)
    return cfg, model


def load_run_weights(run_dir: str | Path, which: str = BEST) -> tuple[Config, Backbone3D, str | None]:
    """:func:`load_run`, and the checksum of the weights (None for files written before
    checksums), which names the exact model that outputs were chosen for."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    cfg.model.pretrained = ""  # the run's own weights replace the pretrained ones
    model = model_from_config(cfg, weights=False).model
    path = run.path / which
    if not path.is_file():
        raise RunError(f"{run.path}: no {which} (the run has not finished an epoch)")
    _, _, ckpt = read_checkpoint(path)
    check_config_against_checkpoint(run.config, cfg, ckpt.get("config"))
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise RunError(f"{path}: does not fit the model in {CONFIG} ({first})") from None
    return cfg, model, ckpt.get("state_sha256")
