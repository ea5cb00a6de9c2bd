"""The pretrain step (`volttl pretrain`): a backbone trained on a synthetic source task that is not PE, saved
in Hara et al.'s published checkpoint layout, so the demo can show transfer learning
without Kinetics weights.

The source task: 3D windows of noisy lung or soft-tissue texture (HU), crossed by
contrast-filled tubes, holding one shape, a ball, a tube along a random direction or a
plate, bright or dark inside contrast, or nothing; the network names which shape (4
classes). It has to learn 3D edge, blob and tube detectors of both polarities, the low- and
mid-level features transfer learning is meant to reuse; no class is defined by emboli.
Windows are drawn on the fly from a generator keyed on (seed, epoch, index), intensity-scaled
as CT windows are.

The units up to ``pretrain.depth`` (a block cut point; empty, the default, trains
them all, as a Kinetics file is trained) are trained; deeper units keep their
initialisation. Each residual branch starts at zero scale, so the deep network trains
from scratch stably. The checkpoint is the whole network in the published layout
(``{epoch, arch, state_dict with module. keys, optimizer}``, a 4-way ``fc``), which
``model.pretrained`` loads like a Kinetics file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volttl.config import Config, config_to_dict
from volttl.errors import VolttlError
from volttl.models import get_backbone_spec
from volttl.outputs.provenance import forget_inputs, keep_if_made_from, record_inputs
from volttl.pretrain.source_task import CLASSES, SourceTask
from volttl.progress import progress_bar

log = logging.getLogger("volttl.pretrain.step")


def hara_layout(model: torch.nn.Module, epoch: int, arch: str) -> dict:
    """The published 3D-ResNets file: ``{epoch, arch, state_dict (module. keys), optimizer}``
    with no ``num_batches_tracked`` entries; ``input_scale: ct`` records that these weights
    saw CT windows, so loading them with ``model.input_scale: source`` is refused."""
    state = {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    return {"epoch": epoch, "arch": arch, "state_dict": state, "optimizer": {}, "input_scale": "ct"}


@dataclass
class PretrainOutcome:
    """What the pretrain step did: the checkpoint, and the last epoch's loss and accuracy
    (None when a checkpoint made with the same settings was kept)."""

    checkpoint: Path
    result: dict | None

    def summary(self) -> str:
        if self.result is None:
            return f"skipped: {self.checkpoint} exists"
        return f"source-task accuracy {self.result['accuracy']:.3f}; {self.checkpoint}"


def pretrain_inputs(cfg: Config) -> dict:
    """What a source-task checkpoint is made from: the pretrain section (but where it goes),
    the backbone and the intensity scaling."""
    d = config_to_dict(cfg)
    return {**{k: v for k, v in d["pretrain"].items() if k != "out"}, "model": d["model"]["name"],
            "hu_clip": d["data"]["hu_clip"], "intensity_shift": d["data"]["intensity_shift"]}


def pretrain_step(cfg: Config, progress: bool = True, reuse: bool = False) -> PretrainOutcome:
    """`volttl pretrain` and a pipeline's ``pretrain`` step: the source-task checkpoint at
    ``pretrain.out``. With ``reuse`` (pipelines) one made with the same settings is kept,
    and one made with others stops the pipeline (runs were trained on it)."""
    if not cfg.pretrain.out:
        raise VolttlError("pretrain.out is not set (the checkpoint to write)")
    out, inputs = Path(cfg.pretrain.out), pretrain_inputs(cfg)
    if reuse and keep_if_made_from(out, inputs, "pretrain"):
        return PretrainOutcome(out, None)
    forget_inputs(out)
    result = train_source_task(cfg, progress)
    record_inputs(out, inputs)
    return PretrainOutcome(out, result)


def train_source_task(cfg: Config, progress: bool = True) -> dict:
    """Train ``model.name`` on the source task and write ``pretrain.out``; returns the
    last epoch's training loss and accuracy."""
    p = cfg.pretrain
    spec = get_backbone_spec(cfg.model.name)
    depth = p.depth or [c.name for c in spec.cut_points() if c.level == "block"][-1]  # "": every block
    keep = spec.cut_point(depth).keep  # fail early, naming the valid cuts
    torch.manual_seed(p.seed)
    model = spec(num_outputs=len(CLASSES), in_channels=3)  # the published 3-channel stem
    for norm in model.residual_branch_norms():  # each block starts as the identity: a deep
        torch.nn.init.zeros_(norm.weight)          # network trains from scratch stably
    channels = spec.cut_point(depth).channels  # pooled features, then linear
    # a linear head from zero on the pooled features scaled by 4 / sqrt(channels): unscaled
    # (or batch-normalised), every step moved the logits by about lr x channels (2048 after
    # layer4) and the deep run diverged (loss 4, against ln 4 for a guess)
    scale = 4.0 / math.sqrt(channels)
    head = torch.nn.Linear(channels, len(CLASSES))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    params = [q for u in model.units[:keep] for path in u.paths
              for q in model.get_submodule(path).parameters()] + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=1e-4)
    data = SourceTask(cfg, p.windows, p.seed)
    steps = p.epochs * math.ceil(len(data) / p.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=steps, pct_start=0.1)
    result = {}
    for epoch in range(p.epochs):
        data.set_epoch(epoch)
        model.train()
        loader = torch.utils.data.DataLoader(data, batch_size=p.batch_size, shuffle=False,
                                             num_workers=cfg.runtime.workers)
        losses, correct, seen = [], 0, 0
        batches = progress_bar(loader, desc=f"pretrain {epoch + 1}/{p.epochs}", unit="batch",
                               disable=not progress)
        for x, y in batches:
            feats = model.forward_features(x, upto=keep)
            logits = head(torch.flatten(torch.nn.functional.adaptive_avg_pool3d(feats, 1), 1) * scale)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        result = {"epoch": epoch, "loss": float(np.mean(losses)), "accuracy": correct / seen}
        log.info("pretrain epoch %d: loss %.4f, accuracy %.3f", epoch + 1, result["loss"], result["accuracy"])
    out = Path(p.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    torch.save(hara_layout(model, p.epochs, cfg.model.name), tmp)
    os.replace(tmp, out)
    return {**result, "checkpoint": str(out), "trained_through": depth, "classes": list(CLASSES)}
