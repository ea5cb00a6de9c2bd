"""Loading foreign and own checkpoints into a backbone, safely and loudly.

Accepted: the 3D-ResNets file (``{epoch, arch, state_dict, optimizer}``, ``module.``
keys), PENet's file (``model_state`` with ``module.`` keys; each backbone renames
its own legacy keys through ``checkpoint_key``), a bare state_dict, and volttl's own
checkpoints. First ``torch.load(weights_only=True)``; a file that also pickles other
objects (old PENet and
3D-ResNets files: schedulers, numpy scalars) goes through a restricted unpickler that
rebuilds tensors and leaves every other object inert (:mod:`volttl.models.legacy_pickle`).
Either way a checkpoint never runs code: one that names a global able to (``os.system``,
``builtins.eval``, ...) is refused.

A 1-channel CT meets a 3-channel Kinetics stem in one of two ways: ``stem: repeat``
copies the CT into the three channels (PENet's way); ``stem: sum`` (default) sums the
stem's RGB weight slices into one input channel, which gives exactly the same output at
a third of the stem's cost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from volttl.errors import VolttlError
from volttl.models.base import Backbone3D

log = logging.getLogger("volttl.checkpoints")
VOLTTL_FORMAT = "volttl-checkpoint"
INPUT_MAP_KEYS = ("input_gain", "input_offset", "input_channel_gain",  # `input_scale: source`
                  "stem_offset_kernel")


class CheckpointError(VolttlError):
    """A checkpoint that cannot be loaded into the model; the message names the file."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)
    source_format: str = ""


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    """The state_dict (prefixes normalised), the format's name, and the whole file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" not in text and "Weights only load failed" not in text:
            reason = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
            raise CheckpointError(f"{path}: not a loadable checkpoint ({reason})") from None
        obj = _load_legacy(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == VOLTTL_FORMAT:
        state, kind = obj["model_state"], "volttl"
        expected = obj.get("state_sha256")  # files written before checksums are taken as whole
        if expected is not None and state_digest(state) != expected:
            raise CheckpointError(f"{path}: damaged: its weights do not match the checksum written with "
                                  "them (the file changed after volttl wrote it); restore it from a copy, "
                                  "or train the run again (last.pt: --resume from an earlier copy)")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state, kind = obj["state_dict"], "3d-resnets"
    elif "model_state" in obj and isinstance(obj["model_state"], dict):
        state, kind = obj["model_state"], "penet"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, kind = obj, "state_dict"
    else:
        raise CheckpointError(f"{path}: no state_dict, model_state or tensors found")
    return {key.removeprefix("module."): value for key, value in state.items()}, kind, obj


def _load_legacy(path: Path) -> dict:
    """A file that pickles more than tensors (old PENet and 3D-ResNets files: schedulers,
    numpy scalars): its tensors through the restricted unpickler, every other object
    inert; a file naming a global that could run code is refused and loads nothing."""
    from volttl.models.legacy_pickle import DangerousPickleError, load_weights_only

    try:
        obj, inert = load_weights_only(path)
    except DangerousPickleError as exc:
        raise CheckpointError(f"{path}: refused: it pickles {exc}, which could run code; nothing was "
                              "loaded and nothing was run") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason})") from None
    if inert:
        log.info("%s: objects beside the weights kept inert, never called: %s", path, ", ".join(inert[:8]))
    return obj


def load_pretrained(model: Backbone3D, path: str | Path, keep_head: bool | None = None,
                    checkpoint: tuple[dict, str, dict] | None = None) -> LoadReport:
    """Load ``path`` into ``model``; fail by name on any missing or mismatched backbone
    weight. The source classifier is dropped unless the file is volttl's own.
    ``checkpoint``: :func:`read_checkpoint`'s answer for ``path`` when the caller has it."""
    state, kind, obj = checkpoint or read_checkpoint(path)
    state = dict(state)
    state = {type(model).checkpoint_key(k): v for k, v in state.items()}
    maps_input = hasattr(model, "input_gain")
    if maps_input and obj.get("input_scale") == "ct":
        raise CheckpointError(f"{path}: these weights were trained on CT windows (input_scale ct), "
                              "so model.input_scale: source would rescale their input; use ct")
    report = LoadReport(source_format=kind)
    keep_head = kind == "volttl" if keep_head is None else keep_head
    head_prefix = model.head_path + "."
    if not keep_head:
        report.dropped_head = [k for k in state if k.startswith(head_prefix)]
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    stem_key = model.stem_conv_path() + ".weight"
    target = model.state_dict()
    if stem_key in state and stem_key in target:
        w, want = state[stem_key], target[stem_key]
        if w.shape[1] == 3 and want.shape[1] == 1:
            model.set_stem_offset_kernel(w.float())  # `input_scale: source` with `stem: sum`
            ratio = model.stem_channel_weights().to(w.dtype).view(1, -1, 1, 1, 1)
            state[stem_key] = (w * ratio).sum(dim=1, keepdim=True)  # `stem: sum`
            if maps_input:
                state.setdefault("stem_offset_kernel", model.stem_offset_kernel.clone())
    own = {}
    for key, want in target.items():
        if key in INPUT_MAP_KEYS and key not in state:
            if key == "stem_offset_kernel":  # only the 3-channel weights carry it
                raise CheckpointError(f"{path}: model.input_scale: source with stem: sum needs the "
                                      "3-channel stem weights of the published file")
            continue  # set from the backbone's declared source scale
        if key.endswith("num_batches_tracked"):
            if key in state:
                own[key] = state[key]
            continue
        if not keep_head and key.startswith(head_prefix):
            continue
        if key not in state:
            report.missing.append(key)
        elif tuple(state[key].shape) != tuple(want.shape):
            report.mismatched.append(f"{key} {tuple(state[key].shape)} vs {tuple(want.shape)}")
        else:
            own[key] = state[key]
    report.unexpected = [k for k in state if k not in target]
    report.loaded = [k for k in own if not k.endswith("num_batches_tracked")]
    if report.missing or report.mismatched:
        problems = [f"missing {k}" for k in report.missing[:3]] + report.mismatched[:3]
        count = len(report.missing) + len(report.mismatched)
        raise CheckpointError(f"{path}: {count} backbone weight(s) missing or of the wrong shape "
                              f"for {type(model).__name__}: {'; '.join(problems)}")
    if report.unexpected:
        log.warning("%s: %d unexpected key(s) ignored: %s", path, len(report.unexpected),
                    ", ".join(report.unexpected[:5]))
    model.load_state_dict(own, strict=False)
    return report


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict's names, dtypes, shapes and bytes: written with each of
    volttl's checkpoints and checked when one is read, so a file whose bytes changed after
    it was written is refused by name instead of scoring studies with damaged weights."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            digest.update(f"{key}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, **extra) -> None:
    """volttl's own format, written atomically: a kill never leaves half a file. The
    weights' :func:`state_digest` goes with them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    payload = {"format": VOLTTL_FORMAT, "version": 1, "model_state": state,
               "state_sha256": state_digest(state), **extra}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as RuntimeError
        cause = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                 else "the write failed: a full disk or a file-size limit? torch says: "
                      + (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        raise CheckpointError(f"{path}: not written ({cause[:200]}); the previous {path.name}, if any, is "
                              "unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
