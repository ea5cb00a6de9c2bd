"""The four transfer-learning strategies of the TTL paper, for any declared cut point.

- FTL: the whole pretrained network, a new head; everything trains.
- TTL(cut): the network up to the cut, then a new head (pooled, or flattened).
- TF(cut): pretrained up to the cut; every later block rebuilt at ``width`` (default half;
  cardinality kept, the first rebuilt block projects from full width) and trained from
  scratch. At width 1.0 this is Transfusion's "weight transfusion".
- LWFT(cut): the whole network; everything up to the cut frozen (no gradients), the rest
  finetuned. The frozen norm layers run as ``frozen_bn`` says: ``train`` (default, the
  usual finetuning practice), ``eval`` (pretrained statistics) or ``recalibrate``.

Weights that are not loaded are initialised ``kaiming`` (default), ``meanvar``
(Transfusion: i.i.d. normal with the mean and variance of the pretrained layer of the
same name), or ``random`` (no pretrained weights anywhere: the from-scratch baseline).
The new linear head itself always starts at normal(0, 0.01) weights and zero bias.
Only the backbone's declared units, cut points and block builder are used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from volttl.errors import VolttlError
from volttl.models import get_backbone_spec
from volttl.models.base import Backbone3D, SourcePreset
from volttl.models.checkpoints import load_pretrained, read_checkpoint
from volttl.models.source_presets import NAMES, known_for_file
from volttl.models.surgery import freeze_upto, rebuild_after, replace_head, truncate

log = logging.getLogger("volttl.transfer")
STRATEGIES = ("ftl", "tf", "lwft", "ttl")
INITS = ("kaiming", "meanvar", "random")


@dataclass
class TransferSetup:
    """The model to train, and which of its parameters are pretrained, new or frozen."""

    model: Backbone3D
    strategy: str
    cut: str
    pretrained: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def param_groups(self, lr_pretrained: float, lr_new: float) -> list[dict]:
        """SGD parameter groups: pretrained weights at ``lr_pretrained``, new at ``lr_new``;
        frozen weights in no group."""
        params = dict(self.model.named_parameters())
        groups = [{"name": "pretrained", "params": [params[n] for n in self.pretrained],
                   "lr": lr_pretrained},
                  {"name": "new", "params": [params[n] for n in self.new], "lr": lr_new}]
        return [g for g in groups if g["params"]]


def kaiming_init(modules: list[nn.Module]) -> None:
    """He-normal convolutions and linears (norm layers keep their block's own init)."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                mode = "fan_out" if isinstance(m, nn.Conv3d) else "fan_in"
                nn.init.kaiming_normal_(m.weight, mode=mode)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def meanvar_init(model: nn.Module, prefixes: list[str], reference: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> list[str]:
    """Draw every parameter under ``prefixes`` from N(mean, var) of the pretrained tensor of
    the same name (Transfusion); returns the names it initialised."""
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(name.startswith(pre + ".") for pre in prefixes):
                continue
            ref = reference.get(name)
            if ref is None or ref.numel() < 2:
                continue
            ref = ref.float()
            draw = torch.randn(p.shape, generator=generator) * ref.std() + ref.mean()
            p.copy_(draw.to(p.dtype))
            done.append(name)
    return done


def init_head(head: nn.Linear) -> None:
    """Small normal weights (std 0.01) and zero bias: every study starts near the same
    output, so early steps are not spent undoing large random logits (He-normal on a
    head over max-pooled or wide features gives logits of +-10 and more)."""
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)


def apply_strategy(model: Backbone3D, strategy: str, cut: str, num_outputs: int = 1,
                   width: float = 0.5, init: str = "kaiming", pool: str = "avg",
                   dropout: float = 0.0, input_size: tuple[int, int, int] | None = None,
                   head_norm: bool = False, pretrained_state: dict[str, torch.Tensor] | None = None,
                   frozen_bn: str = "train", loaded: set[str] | None = None) -> TransferSetup:
    """Turn a (pretrained) full backbone into the model a strategy trains.

    A parameter is "pretrained" (``train.lr_pretrained``, and PENet's schedule delays its
    warm-up) only if its value was loaded from a file: ``loaded`` names those (by default
    the keys of ``pretrained_state``; none when nothing was loaded). Everything else,
    a from-scratch backbone included, is "new"."""
    if strategy not in STRATEGIES:
        raise VolttlError(f"transfer.strategy '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if init not in INITS:
        raise VolttlError(f"transfer.init '{init}' is not one of {', '.join(INITS)}")
    if init == "meanvar" and pretrained_state is None:
        raise VolttlError("transfer.init: meanvar needs pretrained weights (model.pretrained)")
    keep = type(model).cut_point(cut).keep if strategy != "ftl" else len(model.units)
    new_prefixes: list[str] = []
    if strategy == "ttl":
        truncate(model, keep)
    elif strategy == "tf":
        new_prefixes = rebuild_after(model, keep, width)
        kaiming_init([model.get_submodule(p) for p in new_prefixes])
    head = replace_head(model, num_outputs, pool=pool, dropout=dropout, input_size=input_size, norm=head_norm)
    init_head(head)
    model.init_head_bias(head)
    new_prefixes += [model.head_path] + (["head_norm"] if head_norm else [])
    if init == "meanvar":
        meanvar_init(model, new_prefixes, pretrained_state or {})
    if strategy == "lwft":
        freeze_upto(model, keep, frozen_bn)
    frozen = {id(p) for p in model.frozen_parameters()}
    if loaded is None:
        loaded = set(pretrained_state or {})
    setup = TransferSetup(model, strategy, cut if strategy != "ftl" else "")
    for name, p in model.named_parameters():
        if id(p) in frozen:
            setup.frozen.append(name)
        elif (init == "random" or name not in loaded
              or any(name.startswith(pre + ".") for pre in new_prefixes)):
            setup.new.append(name)
        else:
            setup.pretrained.append(name)
    return setup


def check_input_scale(spec: type[Backbone3D], input_scale: str, pretrained: str | None,
                      frozen_bn: str) -> None:
    """Refuse a source scale with nothing to map to; warn where eval-mode frozen
    statistics of video weights would meet CT-scale windows (they squash every window to
    nearly the same features)."""
    if input_scale not in ("ct", "source"):
        raise VolttlError(f"model.input_scale '{input_scale}' is not one of ct, source")
    source = spec.published_preset
    if input_scale == "source" and pretrained == "":
        raise VolttlError("model.input_scale: source maps CT onto the pretrained weights' input "
                          "scale, but no model.pretrained is given")
    if input_scale == "ct" and source is not None and pretrained and frozen_bn == "eval":
        log.warning("transfer.frozen_bn is eval with %s weights trained on %g-scale input while "
                    "model.input_scale is ct: the frozen statistics will squash CT windows; "
                    "use input_scale source, frozen_bn train or recalibrate", spec.display_name,
                    source.scale)


def build_transfer_model(model_name: str, strategy: str, cut: str, *, num_outputs: int = 1,
                         stem: str = "sum", pretrained: str = "", init: str = "kaiming",
                         width: float = 0.5, pool: str = "avg", dropout: float = 0.0,
                         input_size: tuple[int, int, int] | None = None,
                         head_norm: bool = False, weights: bool = True,
                         frozen_bn: str = "train", input_scale: str = "ct",
                         intensity_shift: float | None = None,
                         source_preset: SourcePreset | None = None) -> TransferSetup:
    """Build the backbone, load its weights (unless ``init: random``), apply the strategy.

    ``weights=False`` builds the architecture alone, quietly: nothing is loaded and
    ``meanvar`` falls back to the backbone's own initialisation, for callers that load
    trained weights next or only count parameters.

    ``input_scale: source`` maps the CT input (``u - intensity_shift``, which it needs) onto the input
    scaling the pretrained file was trained on (its source preset): ``source_preset`` when declared, else
    the one the file's layout identifies (:func:`volttl.models.source_presets.known_for_file`);
    a file that identifies none is refused. Built without weights, the backbone's declared
    :attr:`Backbone3D.published_preset` stands in (a run's checkpoint carries the mapping)."""
    spec = get_backbone_spec(model_name)
    if strategy != "ftl":
        spec.cut_point(cut)  # fail early, listing the valid cuts
    model = spec(num_outputs=num_outputs, in_channels=1 if stem == "sum" else 3)
    check_input_scale(spec, input_scale, pretrained if weights and init != "random" else None,
                      frozen_bn if strategy == "lwft" else "train")
    checkpoint = None
    if input_scale == "source":
        source = source_preset
        if source is None and weights and init != "random":
            checkpoint = read_checkpoint(pretrained)
            source = known_for_file(checkpoint[1], checkpoint[2])
            if source is None:
                raise VolttlError(f"{pretrained}: model.input_scale is source, but the input scaling "
                                  "these weights were trained on is not known from the file; declare it "
                                  f"with model.source_preset ({', '.join(n for n in NAMES if n != 'auto')}: "
                                  "model.source_scale, source_mean, source_std)")
        if intensity_shift is None:
            raise ValueError("input_scale source needs the intensity_shift the CT input is shifted by")
        model.map_input_to_source(intensity_shift, source)
    reference, loaded = None, set()
    if not weights:
        init = "kaiming" if init == "meanvar" else init
    elif init == "random":  # the backbone's own initialisation, nothing loaded
        if pretrained:
            log.warning("transfer.init is random: model.pretrained (%s) is not loaded", pretrained)
    elif pretrained:
        loaded = set(load_pretrained(model, pretrained, checkpoint=checkpoint).loaded)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        log.warning("no model.pretrained given: the backbone starts from its own initialisation")
    return apply_strategy(model, strategy, cut, num_outputs, width, init, pool, dropout, input_size,
                          head_norm, reference, frozen_bn, loaded)
