"""Model surgery: the operations the transfer strategies perform on a backbone, as
functions over a :class:`~volttl.models.base.Backbone3D` that declares its units and cut
points (as timm keeps ``_manipulate.py`` beside its models): truncation (TTL), rebuilding
the top at another width (TF), freezing the bottom (LWFT) and re-estimating its norm
layers' statistics, and a new head. The backbone keeps what it needs at run time: its
frozen units' norm mode (:meth:`Backbone3D.train`) and the input-scale mapping of its stem.
"""

from __future__ import annotations

import torch
from torch import nn

from volttl.errors import VolttlError
from volttl.models.base import Backbone3D, Unit


def set_module(model: Backbone3D, path: str, module: nn.Module | None) -> None:
    """Put ``module`` at ``path`` (None: remove what is there)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if module is None:
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            del parent[int(name)]  # callers delete from the end, so indices hold
        else:
            delattr(parent, name)
    elif isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def truncate(model: Backbone3D, keep: int) -> None:
    """Drop every unit after ``units[:keep]`` (TTL)."""
    for unit in reversed(model.units[keep:]):
        for path in unit.paths:
            set_module(model, path, None)
            _prune_empty_parents(model, path)
    model.units = model.units[:keep]


def _prune_empty_parents(model: Backbone3D, path: str) -> None:
    """Remove containers left empty by truncation (e.g. a whole dropped stage)."""
    parent = path.rpartition(".")[0]
    while parent:
        module = model.get_submodule(parent)
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module):
            return
        set_module(model, parent, None)
        parent = parent.rpartition(".")[0]


def rebuild_after(model: Backbone3D, keep: int, width: float) -> list[str]:
    """Replace every unit after ``units[:keep]`` by a fresh block at ``width`` (TF);
    returns the module paths of the new blocks."""
    channels = model.units[keep - 1].channels
    new_units, paths = list(model.units[:keep]), []
    for unit in model.units[keep:]:
        block, out = model.make_block(unit.name, channels, width)
        set_module(model, unit.paths[0], block)
        new_units.append(Unit(unit.name, unit.paths, out, unit.stride))
        paths.append(unit.paths[0])
        channels = out
    model.units = new_units
    return paths


def freeze_upto(model: Backbone3D, keep: int, norm: str = "train") -> None:
    """No gradients for ``units[:keep]`` (LWFT). Their norm layers run in ``norm`` mode:
    ``train`` (common finetuning practice: batch statistics, running statistics keep
    updating), ``eval`` (the pretrained running statistics, fixed), or ``recalibrate``
    (train mode until :func:`recalibrate_frozen_norms` re-estimates the running
    statistics on the new data, eval mode after)."""
    if norm not in ("train", "eval", "recalibrate"):
        raise ValueError(f"transfer.frozen_bn '{norm}' is not one of train, eval, recalibrate")
    model.frozen_units, model.frozen_norm = keep, norm
    for p in model.frozen_parameters():
        p.requires_grad_(False)
    model.train(model.training)


def frozen_norm_layers(model: Backbone3D) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for f in model.frozen_modules() for m in f.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_frozen_norms(model: Backbone3D, batches) -> int:
    """Re-estimate the running statistics of the frozen units' BatchNorm layers as the
    plain average over ``batches`` (window tensors), then keep them fixed (eval mode).
    Weights trained on video frames expect inputs on another scale than CT: their
    running statistics would squash every CT window to nearly the same features."""
    layers = frozen_norm_layers(model)
    saved = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    model.frozen_norm = "train"
    model.train(True)
    seen = 0
    for x in batches:
        model.forward_features(x)
        seen += len(x)
    for m, momentum in zip(layers, saved, strict=True):
        m.momentum = momentum
    model.frozen_norm = "eval"
    model.train(was_training)
    return seen


def replace_head(model: Backbone3D, num_outputs: int, pool: str = "avg", dropout: float = 0.0,
                 input_size: tuple[int, int, int] | None = None, norm: bool = False) -> nn.Linear:
    """A new linear head on the current last unit: global average pooling (the papers),
    global max pooling (a small lesion is not averaged away over the whole window), or
    the flattened map (``pool="flatten"``, which needs the input size ``(D, H, W)``).
    ``norm`` puts a BatchNorm1d before the linear layer: pooled ReLU features are large
    and all positive, which makes a single-logit head unstable at a backbone's
    learning rate when the backbone trains from scratch. Its scale starts at
    ``1 / sqrt(features)``: normalised to unit variance, ``C`` features would move the
    logit by about ``lr * C`` per SGD step, 8x more at layer4's 2048 than at layer1's 256
    (the deep rows of the transfer demo diverged, logits reaching +-50); scaled, a step
    moves it by about ``lr`` whatever the width."""
    channels = model.feature_channels()
    if pool == "avg":
        model.head_pool, in_features = nn.AdaptiveAvgPool3d(1), channels
    elif pool == "max":
        model.head_pool, in_features = nn.AdaptiveMaxPool3d(1), channels
    elif pool != "flatten":
        raise VolttlError(f"head.pool '{pool}' is not one of avg, max, flatten")
    else:
        if input_size is None:
            raise VolttlError("head.pool: flatten needs the input size")
        model.head_pool = nn.Identity()
        device = next(model.parameters()).device
        with torch.no_grad():
            probe = model.forward_features(torch.zeros(1, model.in_channels, *input_size, device=device))
        in_features = probe[0].numel()
    model.head_norm = nn.BatchNorm1d(in_features) if norm else nn.Identity()
    if norm:
        nn.init.constant_(model.head_norm.weight, in_features ** -0.5)
    model.head_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    head = nn.Linear(in_features, num_outputs)
    set_module(model, model.head_path, head)
    return head
