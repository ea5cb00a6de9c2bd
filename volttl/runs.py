"""The run folder: what `volttl train` writes, how a run is named, rebuilt and placed.

A run folder holds::

    config.yaml      the resolved config the run was trained with
    last.pt          model, optimiser, schedule and epoch after the latest epoch (resume)
    best.pt          the model at the best validation study AUROC
    metrics.jsonl    one line per finished epoch
    train.log        everything volttl logged during training
    tensorboard/     scalars for TensorBoard
    metrics_<split>.json|.md, predictions_<split>.csv, curves_<split>.png,
    reliability_<split>.png                                          (evaluate)
    operating_point.json   the calibration and threshold chosen on validation (evaluate)

A repeat group (``train.repeats > 1``) is a folder of such runs, ``seed<S>/``, with
``repeats.json``. Every module that reads or writes these files takes the names from
here, and every module that needs a model for a config calls :func:`model_from_config`.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from volttl.config import Config, ConfigError, config_from_dict, config_to_dict, load_yaml
from volttl.errors import VolttlError
from volttl.models import input_norms
from volttl.models.base import Backbone3D
from volttl.models.checkpoints import read_checkpoint
from volttl.provenance import differences
from volttl.transfer import TransferSetup, build_transfer_model

log = logging.getLogger("volttl.runs")

CONFIG = "config.yaml"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
TENSORBOARD = "tensorboard"
REPEATS = "repeats.json"
TRAINING_DATA = "training_data.json"
OPERATING_POINT = "operating_point.json"


class RunError(VolttlError):
    """A run folder that is missing, incomplete or does not match the command."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def repeats(self) -> Path:
        return self.path / REPEATS

    @property
    def training_data(self) -> Path:
        """What the run was trained on: :meth:`volttl.preprocess.store.Store.training_data`."""
        return self.path / TRAINING_DATA

    @property
    def operating_point(self) -> Path:
        """The run's :class:`volttl.decision.Decision`, chosen on validation by evaluate."""
        return self.path / OPERATING_POINT

    def seed(self, seed: int) -> RunDir:
        """One seed's run inside a repeat group."""
        return RunDir(self.path / f"seed{seed}")

    def metrics_json(self, split: str) -> Path:
        return self.path / f"metrics_{split}.json"

    def metrics_md(self, split: str) -> Path:
        return self.path / f"metrics_{split}.md"

    def predictions_csv(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def curves_png(self, split: str) -> Path:
        return self.path / f"curves_{split}.png"

    def reliability_png(self, split: str) -> Path:
        return self.path / f"reliability_{split}.png"

    def is_repeat_group(self) -> bool:
        return self.repeats.is_file()

    def finished_epochs(self) -> int:
        return len(self.metrics.read_text(encoding="utf-8").splitlines()) if self.metrics.is_file() else 0

    def seed_runs(self) -> list[str]:
        """The seed folders of a repeat group that hold a run (none for a single run)."""
        if self.config.is_file():
            return []
        return sorted((p.name for p in self.path.glob("seed*") if (p / CONFIG).is_file()),
                      key=lambda name: int(name[4:]) if name[4:].isdigit() else -1)

    def one_run(self, seed: int | None = None) -> RunDir:
        """The run a one-model step (cam, svcca, predict, export) works on: this run, or
        seed ``seed``'s run of a repeat group. A group without a seed, or without that
        seed, is refused naming its seeds, so no step picks one behind the user's back."""
        seeds = self.seed_runs()
        if not seeds:
            return self
        if seed is None:
            raise RunError(f"{self.path}: a repeat group of {len(seeds)} runs ({', '.join(seeds)}), "
                           f"not one run: give one seed's folder, e.g. {self.path / seeds[0]}, or --seed "
                           f"{seeds[0][4:]}")
        if f"seed{seed}" not in seeds:
            raise RunError(f"{self.path}: a repeat group without a seed {seed} run "
                           f"(it has {', '.join(seeds)})")
        return self.seed(seed)

    def read_config(self) -> Config:
        """The config the run was trained with."""
        if not self.path.exists():
            raise RunError(f"{self.path}: no such run folder")
        if not self.config.is_file():
            self.one_run()  # a repeat group: cam, predict, export take one model
            raise RunError(f"{self.path}: not a run dir (no {CONFIG})")
        try:
            raw = load_yaml(self.config.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ConfigError(f"the top level must be a mapping of sections, not a {type(raw).__name__}")
            return config_from_dict(raw)
        except (ConfigError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise RunError(f"{self.config}: unreadable run config ({first})") from None


def model_keys(cfg: Config) -> dict:
    """The config keys that define the model's architecture and weights layout: a resumed
    run must have the same, or its checkpoint cannot fit."""
    d = config_to_dict(cfg)
    keys = {f"model.{k}": v for k, v in d["model"].items() if k != "pretrained"}
    keys.update({f"transfer.{k}": v for k, v in d["transfer"].items() if k != "head"})
    keys.update({f"transfer.head.{k}": v for k, v in d["transfer"]["head"].items()})
    keys.update({"preprocess.window": d["preprocess"]["window"], "data.crop": d["data"]["crop"]})
    return keys


# train.* keys that a resumed run may change beside the runtime section: where run
# folders go and how many seeds a group trains
RESUMABLE_TRAIN_KEYS = ("out_dir", "repeats")


def training_keys(cfg: Config) -> dict:
    """The config keys beside the model's that decide a run's weights and its best epoch:
    the window feed (``data.*`` but its paths), the optimisation (``train.*`` but
    :data:`RESUMABLE_TRAIN_KEYS`), the augmentation and the validation aggregate that picks
    ``best.pt``. The ``runtime`` section (device, workers, precision...) is not among them."""
    d = config_to_dict(cfg)
    keys = {f"data.{k}": v for k, v in d["data"].items() if k not in ("manifest", "store")}
    keys.update({f"train.{k}": v for k, v in d["train"].items() if k not in RESUMABLE_TRAIN_KEYS})
    keys.update({f"augment.{k}": v for k, v in d["augment"].items()})
    keys["eval.aggregate"] = d["eval"]["aggregate"]
    return keys


def resumable_changes(before: Config, now: Config) -> dict[str, tuple]:
    """``key: (before, now)`` for every key that may change on resume and did: the runtime
    section and :data:`RESUMABLE_TRAIN_KEYS`."""
    old, new = config_to_dict(before), config_to_dict(now)
    pairs = {f"runtime.{k}": (old["runtime"].get(k), v) for k, v in new["runtime"].items()}
    pairs.update({f"train.{k}": (old["train"].get(k), new["train"][k]) for k in RESUMABLE_TRAIN_KEYS})
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


STORE_KEYS = ("slice_thickness", "size", "window", "train_stride", "min_pe_slices", "penet_rules")


def with_store_preprocessing(cfg: Config, warn: bool = True) -> Config:
    """The config with the preprocess settings the store was made with: a run learns from
    the store as it is, and its ``config.yaml`` must say so, since ``predict`` prepares new
    scans and every scorer cuts windows by it. A config that differs (another store given
    with ``--set``, an edited key) is corrected with a warning naming the keys."""
    from volttl.preprocess.store import Store

    with Store(cfg.data.store) as store:
        made = (yaml.safe_load(store.config_yaml) or {}).get("preprocess", {})
    out = copy.deepcopy(cfg)
    for key in STORE_KEYS:
        if key in made and made[key] != getattr(cfg.preprocess, key):
            say = log.warning if warn else log.debug
            say("%s was made with preprocess.%s %r, not %r: the run records and uses the store's",
                cfg.data.store, key, made[key], getattr(cfg.preprocess, key))
            setattr(out.preprocess, key, made[key])
    return out


def check_resumable(run_dir: str | Path, cfg: Config) -> None:
    """Before a run is continued or its finished result reused (``--resume``, pipelines,
    search trials): the run must exist, and its model-defining and training keys must equal
    the new config's, else a one-line error lists the keys that differ."""
    run = RunDir(run_dir)
    if not run.last.is_file():
        raise RunError(f"{run.path}: nothing to resume (no {LAST}); drop --resume to start a new run")
    cfg = with_store_preprocessing(cfg, warn=False)  # the run recorded its store's settings
    saved = run.read_config()
    differ = differences(model_keys(saved), model_keys(cfg))
    if differ:
        raise RunError(f"{run.path}: --resume with a different model ({'; '.join(differ)}); "
                       "the run is left as it was")
    differ = differences(training_keys(saved), training_keys(cfg))
    if differ:
        raise RunError(f"{run.path}: the run there was trained with other settings ({'; '.join(differ)}); "
                       "continuing or reusing it would match neither config: keep the run's own settings "
                       f"(only the runtime section and train.{', train.'.join(RESUMABLE_TRAIN_KEYS)} may "
                       "change) or use another run "
                       "dir; the run is left as it was")
    if run.training_data.is_file():  # runs from before this record was kept are not checked
        from volttl.preprocess.store import Store

        before = json.loads(run.training_data.read_text(encoding="utf-8"))
        with Store(cfg.data.store) as store:
            now = store.training_data()
        differ = differences(before, now)
        if any(d.startswith("fingerprint ") for d in differ):
            counts = [d for d in differ if not d.startswith("fingerprint ")] or ["the same study counts"]
            raise RunError(f"{run.path}: the store's training or validation data changed since the run "
                           f"was trained ({'; '.join(counts)}; its studies, volumes, labels or windows "
                           "differ); continuing or reusing it would pass it off as trained on the new data: "
                           "use another run dir; the run is left as it was")


def install_record() -> dict:
    """The software a run was trained (or a model exported) with."""
    import platform

    from volttl import __version__

    return {"volttl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}


def default_run_dir(cfg: Config) -> Path:
    """``train.out_dir/<model>_<strategy>[_<cut>]_seed<S>[-<S+N-1>]``."""
    t = cfg.transfer
    cut = f"_{t.cut}" if t.strategy != "ftl" else ""
    first, n = cfg.train.seed, cfg.train.repeats
    seeds = f"{first}" if n == 1 else f"{first}-{first + n - 1}"
    return Path(cfg.train.out_dir) / f"{cfg.model.name}_{t.strategy}{cut}_seed{seeds}"


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a device that
    is not there is a one-line error rather than a failure deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"runtime.device '{name}' is not a device (use auto, cpu, cuda or cuda:N)"
                          ) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device '{name}': no CUDA GPU is available on this machine "
                              "(use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def model_from_config(cfg: Config, weights: bool = True,
                      window: tuple[int, int, int] | None = None) -> TransferSetup:
    """The model a config describes, with its parameter groups. ``weights=True`` loads
    ``model.pretrained`` and initialises new parts as training does; ``weights=False``
    builds the architecture only, quietly (for evaluation, cam, profiling, search).
    ``window`` (D, H, W) sizes a flattened head; by default the training window."""
    t = cfg.transfer
    window = window or (cfg.preprocess.window, cfg.data.crop, cfg.data.crop)
    window = window if t.head.pool == "flatten" else None
    return build_transfer_model(cfg.model.name, t.strategy, t.cut, num_outputs=cfg.model.num_outputs,
                                stem=cfg.model.stem, pretrained=cfg.model.pretrained if weights else "",
                                init=t.init, width=t.width, pool=t.head.pool, dropout=t.head.dropout,
                                window=window, head_norm=t.head.norm, weights=weights,
                                frozen_bn=t.frozen_bn, input_scale=cfg.model.input_scale,
                                intensity_shift=cfg.data.intensity_shift,
                                source_norm=input_norms.declared(cfg.model))


def check_config_against_checkpoint(path: Path, cfg: Config, saved: dict | None) -> None:
    """A run's ``config.yaml`` against the config its checkpoint was written with: a key
    that defines the model, its training or its preprocessing edited by hand is refused by
    name (the weights were not made with it); any other difference (device, workers,
    precision, cam, paths, ...) is accepted and logged."""
    if not isinstance(saved, dict):  # checkpoints written without their config
        return
    try:
        before = config_from_dict(saved)
    except ConfigError as exc:  # written by an older volttl whose keys no longer validate
        log.info("%s: the checkpoint's own config is not readable by this version (%s); config.yaml "
                 "is not checked against it", path, str(exc)[:120])
        return
    d_now, d_before = config_to_dict(cfg), config_to_dict(before)
    fixed = {**model_keys(before), **training_keys(before),
             **{f"preprocess.{k}": v for k, v in d_before["preprocess"].items() if k != "workers"}}
    now = {**model_keys(cfg), **training_keys(cfg),
           **{f"preprocess.{k}": v for k, v in d_now["preprocess"].items() if k != "workers"}}
    differ = differences(fixed, now)
    if differ:
        shown = "; ".join(differ[:5]) + (f"; ... {len(differ) - 5} more" if len(differ) > 5 else "")
        raise RunError(f"{path}: edited after training ({shown}); the weights were made with the "
                       "checkpoint's values: restore them, or train a new run with the new ones")
    for section in ("train", "runtime", "eval", "cam", "data", "profile", "search"):
        for key, value in d_now[section].items():
            if d_before[section].get(key) != value:
                log.info("%s: %s.%s %r (the run trained with %r)", path, section, key, value,
                         d_before[section].get(key))


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
