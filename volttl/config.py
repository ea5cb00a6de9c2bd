"""Typed configuration: YAML in, validated dataclasses out.

Every section is a dataclass, so the schema is the code. Unknown keys and wrong types
are rejected with a message that names the key (and the right spelling for a
near-miss); ``--set section.key=value`` overrides any key before validation.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from volttl.errors import VolttlError

log = logging.getLogger("volttl.config")


class ConfigError(VolttlError):
    """A config problem, phrased for the user in one line."""


_SHOW = reprlib.Repr()  # attributes set one by one: Python < 3.12 takes no arguments
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict = 2, 4, 4, 4
_SHOW.maxstring, _SHOW.maxother = 60, 60


def show(value: Any) -> str:
    """A value for a message, bounded in size whatever the value (a message never prints
    an unbounded structure: a 401-byte YAML alias bomb expands to gigabytes)."""
    return _SHOW.repr(value)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a config has no use for ``*name`` references,
    and they let a few hundred bytes stand for an exponentially large value."""

    def compose_node(self, parent, index):  # noqa: D102
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in volttl configs")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """Parse config YAML: the safe loader, no aliases, nesting bounded (one-line errors)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


@dataclass
class DataConfig:
    """Where the studies and the store live, and how windows are fed to the model."""

    manifest: str = ""  # the manifest CSV (volttl manifest writes one)
    store: str = ""  # the HDF5 store preprocess writes and training reads (a folder beside it)
    crop: int = 192  # in-plane crop fed to the model: random in training, centred otherwise
    hu_clip: tuple[float, float] = (-100.0, 900.0)  # HU clipped to this range, then scaled to [0, 1]
    intensity_shift: float = 0.15897  # subtracted after scaling (PENet's mean)
    # slices: window labels from the manifest's pe_slices (PENet, RSNA); study: the study
    # label only, learnt from bags of a study's windows (most hospital cohorts)
    labels: Literal["slices", "study"] = "slices"
    bag_windows: int = 4  # study labels: windows drawn per study per bag
    bag_pool: Literal["max", "lse"] = "lse"  # study labels: window logits -> the study logit
    # lse: r in (1/r) log mean exp(r * window logits); near 0 the mean, large the max
    bag_sharpness: float = 1.0
    # study labels: train from bags first (the run's bags/ folder), take each training
    # positive's highest-scoring window (and any other scored above every negative study's
    # best) as its PE slices, then train the run's model from those as from slice labels.
    # Twice the training time; maps that find the embolus
    pseudo_slices: bool = False
    # 0: every training study. N: a fixed subset of N training studies at the split's share
    # of positives, the same for every run and seed, and nested (the first 10 are among the
    # first 20): learning curves over the number of training studies
    train_studies: int = 0


@dataclass
class PreprocessConfig:
    """How studies become the HDF5 store (PENet's defaults)."""

    slice_thickness: float = 1.25  # stored slice spacing in mm (thinner sources are averaged)
    size: int = 208  # stored in-plane size in pixels (area resize of the whole field of view)
    window: int = 24  # slices per window: what the model sees at once
    train_stride: int = 24  # slices between indexed training windows (evaluation windows never overlap)
    min_pe_slices: int = 4  # a window is positive with at least this many PE slices
    workers: int = 2  # studies preprocessed in parallel processes
    # PENet's handling of the outliers of its own dataset, for reproducing it: a study shorter
    # than one window is stored as it is and padded with air when read (PENet pads); pe_slices
    # past the study's last slice are dropped (PENet uses the part inside). Off: both refused.
    # Every study it touched is listed in preprocess's summary and in the study's record.
    penet_rules: bool = False


@dataclass
class ModelConfig:
    """Backbone, weights and input stem."""

    name: str = "resnext3d_101"  # a registered backbone: resnext3d_50, resnext3d_101, resnext3d_152, penet
    pretrained: str = ""  # checkpoint to start from (3D-ResNets, PENet or volttl format); "" = from scratch
    num_outputs: int = 1  # logits of the new head (1: PE present)
    # sum: the RGB stem kernels summed into one channel (the same output as repeating the CT,
    # a third of the stem's MACs); repeat: the CT copied into three channels (PENet)
    stem: Literal["sum", "repeat"] = "sum"
    # the scale the stem is fed: ct = CT scaled as the data pipeline gives it (PENet's
    # intensity scaling; what PENet's and the TTL paper's code feed pretrained weights);
    # source = the CT input mapped onto the scale the backbone's published weights were
    # trained on (ResNeXt3D: 0..255 minus the ActivityNet channel means), for eval-mode frozen BN
    input_scale: Literal["ct", "source"] = "ct"
    # the source preset: the input scaling model.pretrained was trained on, for input_scale
    # source: auto = known from the file (Hara's 2018 3D-ResNets layout: hara2018), else
    # refused; hara2018 = 0..255 minus the ActivityNet means; kinetics2020 = 0..1, Kinetics
    # means and stds (the 2020 3D-ResNets code); custom = source_scale, source_mean and
    # source_std below (3 each)
    source_preset: Literal["auto", "hara2018", "kinetics2020", "custom"] = "auto"
    source_scale: float = 255.0  # source_preset custom: the CT input in [0, 1] times this
    source_mean: list[float] = field(default_factory=list)  # source_preset custom: R, G, B means
    source_std: list[float] = field(default_factory=list)  # source_preset custom: R, G, B stds


@dataclass
class HeadConfig:
    """The new classifier head after the kept (or rebuilt) backbone."""

    pool: Literal["avg", "max", "flatten"] = "avg"  # global pooling of the last features, or none
    norm: bool = False  # a BatchNorm1d before the linear layer (scale 1/sqrt(features) at start)
    dropout: float = 0.0  # dropout before the linear layer


@dataclass
class TransferConfig:
    """Transfer-learning strategy and its cut point."""

    # ftl: finetune everything; tf: keep up to the cut, rebuild the rest at `width` from
    # scratch; lwft: freeze up to the cut, finetune the rest; ttl: keep up to the cut, drop the rest
    strategy: Literal["ftl", "tf", "lwft", "ttl"] = "ttl"
    cut: str = "layer3"  # a cut point the backbone declares (`volttl cuts --model NAME`)
    init: Literal["kaiming", "meanvar", "random"] = "kaiming"  # weights not loaded from the file
    width: float = 0.5  # tf: width of the rebuilt top (1.0 = Transfusion's weight transfusion)
    head: HeadConfig = field(default_factory=HeadConfig)
    # LWFT's frozen BatchNorm layers: train (batch statistics; the usual finetuning
    # practice), eval (the pretrained running statistics), or recalibrate (running
    # statistics re-estimated on training windows before finetuning, then fixed)
    frozen_bn: Literal["train", "eval", "recalibrate"] = "train"
    recalibrate_windows: int = 256  # frozen_bn recalibrate: training windows it re-estimates on


@dataclass
class TrainConfig:
    """`volttl train`: SGD over two parameter groups, the schedule, and how a step computes."""

    epochs: int = 30
    batch_size: int = 8  # the global batch, split evenly across torchrun's processes
    grad_accum: int = 1  # micro-batches per optimiser step
    lr_pretrained: float = 0.01  # parameters loaded from model.pretrained
    lr_new: float = 0.1  # every other parameter (all of them from scratch)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: int = 0  # schedule cosine: linear warm-up epochs
    # cosine: linear warm-up over warmup_epochs, then cosine to 0 at the last epoch (per
    # optimiser step). penet: PENet's released schedule, counted in training examples:
    # linear warm-up over warmup_examples (pretrained weights start theirs only after
    # pretrained_delay_examples), then cosine to 0 at cosine_examples, 0 after it.
    schedule: Literal["cosine", "penet"] = "cosine"
    warmup_examples: int = 10_000  # schedule penet
    pretrained_delay_examples: int = 10_000  # schedule penet
    cosine_examples: int = 600_000  # schedule penet
    dampening: float = 0.0  # SGD dampening (PENet: 0.9, about a 10x smaller effective step)
    clip_grad_norm: float = 0.0  # 0 = no clipping; else the max total gradient norm per step
    loss: Literal["focal", "bce"] = "focal"  # binary focal loss (PENet) or cross-entropy
    focal_gamma: float = 2.0
    seed: int = 0  # every random draw is keyed on it (and the epoch): a resumed run ends the same
    repeats: int = 1  # train seeds seed .. seed + repeats - 1 into one group, reported as mean +- std
    out_dir: str = "runs"  # where run folders are made when --run-dir is not given


@dataclass
class RuntimeConfig:
    """Where and how the work computes, not what it computes: every key here may change
    when a run is resumed or reused (the older spelling ``train.<key>`` is read as
    ``runtime.<key>``)."""

    device: str = "auto"  # auto (cuda when there is one), cpu, cuda or cuda:N
    workers: int = 2  # training and evaluation loader processes (at most the available cores)
    # how a step computes (volttl/numerics.py): tf32 | fp32 | bf16 | fp16. tf32 and
    # channels_last were the fastest on an H100 (torch 2.11, measured before the current
    # training loop; FTL 149 windows/s against 121-124 for
    # bf16 + channels_last and 136 for bf16 NCDHW); bf16 halves activation memory
    precision: Literal["tf32", "fp32", "bf16", "fp16"] = "tf32"
    channels_last: bool = True  # channels_last_3d memory format for model and batches
    cudnn_benchmark: bool = True  # let cuDNN time its algorithms for the fixed window shape
    compile: bool = False  # torch.compile the training forward (minutes of compiling first)


RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


@dataclass
class AugmentConfig:
    """Training augmentation: each window's parameters drawn in the loader (keyed on the
    seed, epoch and window), then applied to the whole batch on the training device."""

    # in order; crop (random in-plane, to data.crop) first. flip: left-right; rotation:
    # in-plane, whole degrees in +-max_rotation_deg (PENet's three)
    transforms: tuple[Literal["crop", "flip", "rotation"], ...] = ("crop", "flip", "rotation")
    flip_prob: float = 0.5
    max_rotation_deg: float = 15.0
    # slice labels: a training window is centred on a positive study's PE slices with
    # probability pe_prob (PENet), then shifted by up to pe_jitter slices (empty: half a window)
    pe_prob: float = 0.3
    pe_jitter: int | None = None


@dataclass
class EvalConfig:
    """`volttl evaluate`: study scores, intervals, the operating point and calibration."""

    aggregate: Literal["max", "mean"] = "max"  # window probabilities -> the study's (PENet: max)
    bootstrap: int = 1000  # resamples for the AUROC and AUPRC intervals (0 = none)
    # the operating point `volttl evaluate` chooses on the validation studies: the highest
    # threshold that reaches `target` sensitivity (PE is a finding not to miss), the lowest
    # that keeps `target` specificity, or Youden's J (target unused)
    operating_point: Literal["sensitivity", "youden", "specificity"] = "sensitivity"
    target: float = 0.9
    # temperature: one temperature fitted on the validation studies rescales every study
    # probability the run reports (monotone: rankings and AUROC stay); none: as the model gives
    calibration: Literal["none", "temperature"] = "none"
    calibration_bins: int = 10  # equal-width bins of the reliability diagram and ECE


@dataclass
class ProfileConfig:
    """What `volttl profile` measures."""

    strategies: list[str] = field(default_factory=lambda: ["ftl", "tf", "lwft", "ttl"])
    cuts: list[str] = field(default_factory=lambda: ["layer3"])
    # the profiled input (slices, rows, cols), with 3 channels under count_stem rgb. The TTL
    # paper's cost columns reproduce at 32 x 208 x 208 (configs/pe.yaml), not at the 24 x 192
    # x 192 windows volttl trains on
    input_size: tuple[int, int, int] = (24, 192, 192)
    repeats: int = 20  # timed forward passes (the median is reported)
    warmup: int = 3  # untimed passes first
    device: str = "cpu"
    out_dir: str = "profile"
    # P(M) and MACs: rgb counts the 3-channel Kinetics stem, as the TTL paper's table does;
    # model counts the model as trained (1-channel stem under `model.stem: sum`)
    count_stem: Literal["rgb", "model"] = "rgb"
    # how MACs(G) are counted: ptflops = the rule of ptflops' module hooks, the counter the TTL
    # paper cites (convolutions and linear layers, norms at 2 operations an element,
    # activations and pooling at 1; the paper's FTL 66.3 G and TF@layer3 64.9 G at
    # 3 x 32 x 208 x 208); conv = convolutions and linear layers only
    macs_rule: Literal["ptflops", "conv"] = "ptflops"


@dataclass
class CamConfig:
    """How `volttl cam` computes and writes Grad-CAM overlays."""

    method: Literal["gradcam", "hirescam", "gradcam++", "layercam"] = "gradcam"
    target_layer: str = ""  # module path; "" = the last unit before the head
    # 0 = the scoring windows: one pass scores and maps them (seams between windows can show in
    # coronal views); a quarter window (6 at 24 slices) slides extra windows: no seams, ~4x the time
    stride: int = 0
    stitch: Literal["mean", "max"] = "mean"  # how overlapping windows' maps combine
    blend: Literal["gaussian", "constant"] = "gaussian"  # weights along a window's slices (MONAI)
    batch_size: int = 4  # windows per Grad-CAM (and predict) batch
    # the CT as NIfTI beside the overlay: auto = when the source is not NIfTI (DICOM, NRRD,
    # HDF5), always = for every source kind, never (true/false of older configs: auto/never)
    write_ct: Literal["auto", "always", "never"] | bool = "auto"
    dtype: Literal["uint8", "float32"] = "uint8"  # uint8 with scl_slope 1/255, or float32
    preview: bool = True  # a PNG through the map's peak
    # DICOM sources: also a Parametric Map, a Secondary Capture and a Structured Report, which
    # carry the patient and study identifiers the standard requires (filed with the study)
    dicom: bool = False
    # the Parametric Map's pixels: none, or rle (RLE Lossless: about 4x smaller on a real CT,
    # about 16 ms a slice more on 2 CPU cores; every DICOM viewer reads it)
    dicom_compression: Literal["none", "rle"] = "none"


@dataclass
class SearchConfig:
    """`volttl search`: the two-stage cut-point search (TTL paper, section 3.2)."""

    strategies: list[str] = field(default_factory=lambda: ["tf", "lwft", "ttl"])  # searched strategies
    block_cuts: list[str] = field(default_factory=list)  # [] = every block cut of the backbone
    radius: int = 3  # stage 2: layer cuts within this many blocks of the stage-1 winner
    baselines: list[str] = field(default_factory=lambda: ["ftl", "penet"])  # rows trained once, uncut
    penet_pretrained: str = ""  # PENet's Kinetics checkpoint for the PENet baseline
    backend: Literal["sequential", "gpus", "ray"] = "sequential"
    gpus: int = 0  # gpus backend: how many local GPUs (0 = all visible)
    ray_address: str = ""  # ray backend: "" starts a local Ray; "auto" or host:port joins a cluster
    ray_gpus_per_trial: float = 1.0
    out_dir: str = "search"
    test_split: Literal["val", "test"] = "test"  # the split the table reports (cuts are chosen on val)


@dataclass
class PretrainConfig:
    """`volttl pretrain`: a synthetic source task (not PE) for a demo that really transfers."""

    out: str = ""  # the checkpoint to write, in the 3D-ResNets layout
    depth: str = ""  # empty: every block trained, as a Kinetics file is; a block cut: up to it
                     # (deeper blocks keep their initialisation)
    input_size: tuple[int, int, int] = (16, 48, 48)  # the source task's input (slices, rows, cols)
    windows: int = 1024  # source windows per epoch
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.02
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


# Keys holding file paths, resolved against the config file's folder.
PATH_KEYS = {("data", "manifest"), ("data", "store"), ("model", "pretrained"),
             ("train", "out_dir"), ("profile", "out_dir"), ("search", "out_dir"),
             ("search", "penet_pretrained"), ("pretrain", "out")}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {show(value)}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {show(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {show(value)} has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {show(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected nothing (empty), got {show(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


# keys renamed so that a word means one thing: (section, old) -> new; configs, run folders
# and --set with the old name are still read, with one deprecation message a key
RENAMED_KEYS = {("pretrain", "window"): "input_size", ("model", "source_norm"): "source_preset"}
_said_renamed: set[tuple[str, str]] = set()


def _renamed(section: str, key: str) -> str:
    """``key``'s present name in ``section``, saying once when it is an old one."""
    new = RENAMED_KEYS.get((section, key))
    if new is None:
        return key
    if (section, key) not in _said_renamed:
        _said_renamed.add((section, key))
        log.warning(
            "%s.%s is deprecated: it is now %s.%s (read as that; rename it in your config)",
            section, key, section, new)
    return new


def _rename_old_keys(raw: dict) -> dict:
    """``raw`` with every old key of :data:`RENAMED_KEYS` under its new name; both given is refused."""
    out = dict(raw)
    for section, old in RENAMED_KEYS:
        node = out.get(section)
        if isinstance(node, dict) and old in node:
            new = _renamed(section, old)
            if new in node:
                raise ConfigError(f"{section}.{old} and {section}.{new} are both given: {old} is the old "
                                  f"name of {new}; keep {new}")
            out[section] = {(new if k == old else k): v for k, v in node.items()}
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {show(text)}: expected section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if len(keys) == 2:
        keys[1] = _renamed(keys[0], keys[1])
    try:
        return keys, load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"--set {show(text)}: the value is not valid YAML ({first})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides to the raw mapping (values parsed as YAML scalars)."""
    raw = _rename_old_keys(raw) if overrides else raw  # an old key in the file, the new one in --set
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {show(text)}: '{k}' is not a section")
        node[keys[-1]] = value
    return raw


def _resolve_paths(cfg: Config, base: Path) -> None:
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(obj, key, str((base / value).resolve()))
        elif value:
            setattr(obj, key, str(Path(value).expanduser()))


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_ranges(cfg: Config) -> None:
    """Values the types allow but the work cannot use, each named in one line: sizes,
    strides, counts and rates that must be positive, an increasing HU clip range, finite
    numbers, a device name torch knows. (``data.crop`` against the stored size is checked
    where a store is opened for training.)"""
    problems: list[str] = []

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            problems.append(f"{key} must be {rule} (got {show(value)})")

    def positive(section: str, *keys: str) -> None:
        for key in keys:
            v = getattr(getattr(cfg, section), key)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{section}.{key}", "> 0", v)

    def non_negative(section: str, *keys: str) -> None:
        for key in keys:
            v = getattr(getattr(cfg, section), key)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"{section}.{key}", ">= 0", v)

    positive("data", "crop", "bag_windows", "bag_sharpness")
    non_negative("data", "train_studies")
    positive("preprocess", "slice_thickness", "size", "window", "train_stride", "min_pe_slices")
    non_negative("preprocess", "workers")
    positive("model", "num_outputs")
    positive("transfer", "width", "recalibrate_windows")
    positive("train", "epochs", "batch_size", "grad_accum", "lr_new", "repeats")
    non_negative("runtime", "workers")
    non_negative("train", "lr_pretrained", "momentum", "weight_decay", "warmup_epochs",
                 "clip_grad_norm", "focal_gamma", "dampening", "warmup_examples",
                 "pretrained_delay_examples")
    positive("train", "cosine_examples")
    need(cfg.train.dampening < 1, "train.dampening", "< 1", cfg.train.dampening)
    a = cfg.augment
    need(bool(a.transforms) and a.transforms[0] == "crop" and len(set(a.transforms)) == len(a.transforms),
         "augment.transforms", "crop first, each transform once", list(a.transforms))
    need(not cfg.data.pseudo_slices or cfg.data.labels == "study", "data.pseudo_slices",
         "false unless data.labels is study", cfg.data.pseudo_slices)
    need(0 <= a.flip_prob <= 1, "augment.flip_prob", "in [0, 1]", a.flip_prob)
    need(0 <= a.pe_prob <= 1, "augment.pe_prob", "in [0, 1]", a.pe_prob)
    non_negative("augment", "max_rotation_deg")
    if a.pe_jitter is not None:
        non_negative("augment", "pe_jitter")
    non_negative("eval", "bootstrap")
    positive("eval", "calibration_bins")
    need(0 < cfg.eval.target <= 1, "eval.target", "in (0, 1]", cfg.eval.target)
    non_negative("cam", "stride")
    positive("cam", "batch_size")
    positive("profile", "repeats")
    positive("pretrain", "windows", "epochs", "batch_size", "lr")
    non_negative("profile", "warmup")
    d = cfg.data
    lo, hi = d.hu_clip
    need(math.isfinite(lo) and math.isfinite(hi) and lo < hi, "data.hu_clip", "[low, high] with low < high",
         list(d.hu_clip))
    need(math.isfinite(d.intensity_shift), "data.intensity_shift", "finite", d.intensity_shift)
    m = cfg.model
    if m.source_preset == "custom":
        scale = m.source_scale
        need(math.isfinite(scale) and scale > 0, "model.source_scale", "> 0", scale)
        need(len(m.source_mean) == 3 and all(math.isfinite(v) for v in m.source_mean), "model.source_mean",
             "3 finite numbers (R, G, B)", m.source_mean)
        need(len(m.source_std) == 3 and all(math.isfinite(v) and v > 0 for v in m.source_std),
             "model.source_std", "3 positive numbers (R, G, B)", m.source_std)
    need(0 <= cfg.transfer.head.dropout < 1, "transfer.head.dropout", "in [0, 1)", cfg.transfer.head.dropout)
    need(cfg.train.momentum < 1, "train.momentum", "< 1", cfg.train.momentum)
    need(cfg.train.warmup_epochs <= cfg.train.epochs, "train.warmup_epochs",
         f"<= train.epochs ({cfg.train.epochs})", cfg.train.warmup_epochs)
    need(all(v > 0 for v in cfg.profile.input_size), "profile.input_size", "positive sizes",
         list(cfg.profile.input_size))
    for section in ("runtime", "profile"):
        device = getattr(cfg, section).device
        need(bool(_DEVICE.match(device)), f"{section}.device", "auto, cpu, cuda or cuda:N", device)
    if problems:
        raise ConfigError("; ".join(problems))


def _move_runtime_keys(raw: dict) -> dict:
    """The runtime keys under their older spelling ``train.<key>`` (run folders, configs and
    ``--set`` from before the runtime section) moved to ``runtime.<key>``; given under
    ``train`` (a ``--set`` on a saved config), they win."""
    train = raw.get("train")
    if not isinstance(train, dict) or not any(k in train for k in RUNTIME_KEYS):
        return raw
    runtime = raw.get("runtime") if isinstance(raw.get("runtime"), dict) else {}
    moved = {k: v for k, v in train.items() if k in RUNTIME_KEYS}
    return {**raw, "train": {k: v for k, v in train.items() if k not in RUNTIME_KEYS},
            "runtime": {**runtime, **moved}}


def config_from_dict(raw: dict | None, base: Path | None = None) -> Config:
    """Validate a raw mapping into a Config; paths resolved against ``base``."""
    cfg = _build(Config, _move_runtime_keys(_rename_old_keys(raw or {})), "")
    if isinstance(cfg.cam.write_ct, bool):  # configs and run folders written before "always"
        cfg.cam.write_ct = "auto" if cfg.cam.write_ct else "never"
    check_ranges(cfg)
    if base is not None:
        _resolve_paths(cfg, base)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return config_from_dict(raw, path.parent.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain mapping (tuples as lists) for YAML/JSON records of the resolved config."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# what `--set` may change when a trained run (or package) is read: how and where it computes,
# what it writes, and which store it reads; never what the model sees or how it decides
READING_KEYS = ("runtime.", "cam.", "profile.", "data.store", "data.manifest", "eval.bootstrap",
                "eval.calibration_bins")
# evaluate also chooses the operating point and calibration anew on the validation split
RECHOOSING_KEYS = ("eval.operating_point", "eval.target", "eval.calibration")


def check_reading_overrides(overrides: list[str] | None, where: str, rechoose: bool = False) -> None:
    """Refuse, in one line, a ``--set`` that would change a trained model's input or decision
    (data, preprocess, model, transfer or train settings, ``eval.aggregate``): the model and
    its operating point were made under the stored ones."""
    allowed = READING_KEYS + (RECHOOSING_KEYS if rechoose else ())
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            names = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise ConfigError(f"--set {key}: {where} was trained and calibrated with its own {key}, which "
                              f"sets the model's input or decision; only {names} may change here")


def with_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """``cfg`` with ``--set`` style ``overrides`` applied (``cfg`` itself when there are none)."""
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides)) if overrides else cfg
