"""May this run be continued, reused or read with this config? The rules that compare a
run folder with a config: which keys define the model, which define its training, which
may change on resume, and the store's preprocessing a run records. They answer with
:func:`volttl.outputs.provenance.differences`, as every other "made from these inputs?" check.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import yaml

from volttl.config import Config, ConfigError, config_from_dict, config_to_dict
from volttl.outputs.folders import LAST, RunDir, RunError
from volttl.outputs.provenance import differences
from volttl.preprocess.store import Store

log = logging.getLogger("volttl.outputs.resume")


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
