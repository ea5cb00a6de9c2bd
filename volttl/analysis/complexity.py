"""Parameters, multiply-accumulates and latency of a model, as the TTL paper tabulates.

MACs are counted under one of two named rules (``profile.macs_rule``):

- ``ptflops`` (default): the rule of ptflops' module hooks, the counter the TTL paper cites
  for its MACs column: convolutions and linear layers (groups and biases honoured), a
  normalisation layer at 2 operations an input element (1 without affine parameters),
  an activation at 1 an output element, a pooling layer at 1 an input element. At
  3 x 32 x 208 x 208 this gives the paper's FTL 66.3 G and TF@layer3 64.9 G.
- ``conv``: convolutions and linear layers only, the arithmetic that dominates run time
  (used for TFLOP/s in the benchmarks).

Latency is the median of timed forward passes at batch 1 after warm-up, on a named device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from volttl.outputs.folders import ProfileDir


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MACS_RULES = ("ptflops", "conv")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)
_POOLS = (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
          nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _conv_macs(m: nn.Conv3d, out: torch.Tensor) -> int:
    kernel = m.weight.shape[2] * m.weight.shape[3] * m.weight.shape[4]
    bias = m.out_channels if m.bias is not None else 0
    per_position = (m.in_channels // m.groups) * kernel * m.out_channels + bias
    return out.numel() // m.out_channels * per_position


def _linear_macs(m: nn.Linear, inp: torch.Tensor) -> int:
    rows = inp.numel() // m.in_features
    return rows * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))


def _norm_ops(m: nn.Module, inp: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return inp.numel() * (2 if affine else 1)


def count_macs(model: nn.Module, input_shape: tuple[int, ...], rule: str = "conv") -> int:
    """Multiply-accumulates of one forward pass at ``input_shape`` (N, C, D, H, W) under
    ``rule``: ``conv`` (convolutions and linear layers) or ``ptflops`` (those plus norms,
    activations and pooling as ptflops' module hooks count them); see the module docstring."""
    if rule not in MACS_RULES:
        raise ValueError(f"MACs rule '{rule}' is not one of {', '.join(MACS_RULES)}")
    total = 0

    def hook(m: nn.Module, inp, out) -> None:
        nonlocal total
        if isinstance(m, nn.Conv3d):
            total += _conv_macs(m, out)
        elif isinstance(m, nn.Linear):
            total += _linear_macs(m, inp[0])
        elif rule == "ptflops" and isinstance(m, _NORMS):
            total += _norm_ops(m, inp[0])
        elif rule == "ptflops" and isinstance(m, _ACTIVATIONS):
            total += out.numel()
        elif rule == "ptflops" and isinstance(m, _POOLS):
            total += inp[0].numel()

    counted = (nn.Conv3d, nn.Linear, *_NORMS, *_ACTIVATIONS, *_POOLS)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                    repeats: int = 20, warmup: int = 3, dtype: torch.dtype | None = None) -> float:
    """Median forward time in milliseconds; ``dtype`` (e.g. bfloat16) runs under autocast."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.zeros(input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        for i in range(warmup + repeats):
            sync()
            t = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@dataclass
class ComplexityRow:
    model: str
    strategy: str
    cut: str
    params_m: float
    macs_g: float
    latency_ms: float
    device: str

    def markdown(self) -> str:
        return (f"| {self.model} | {self.strategy} | {self.cut} | {self.params_m:.2f} | "
                f"{self.macs_g:.2f} | {self.latency_ms:.1f} |")


def profile_config(cfg) -> dict:
    """P(M), MACs(G) and T(ms) of the model ``cfg`` describes, at ``profile.input_size`` on
    ``profile.device``; the architecture comes from the same builder training uses."""
    import copy

    from volttl.inference import model_from_config

    p = cfg.profile
    shape = (1, 1 if cfg.model.stem == "sum" else 3, *p.input_size)
    device = torch.device(p.device)
    model = model_from_config(cfg, weights=False, input_size=tuple(p.input_size)).model.to(device)
    counted, counted_shape = model, shape
    if p.count_stem == "rgb" and shape[1] != 3:  # the paper's convention: the 3-channel stem
        rgb = copy.deepcopy(cfg)
        rgb.model.stem = "repeat"
        counted = model_from_config(rgb, weights=False, input_size=tuple(p.input_size)).model.to(device)
        counted_shape = (1, 3, *p.input_size)
    return {"params_m": count_parameters(counted) / 1e6,
            "macs_g": count_macs(counted, counted_shape, p.macs_rule) / 1e9,
            "latency_ms": measure_latency(model, shape, device, repeats=p.repeats, warmup=p.warmup),
            "device": device_name(device), "input": list(shape[1:]), "count_stem": p.count_stem,
            "macs_rule": p.macs_rule}


def profiled_input(cfg) -> str:
    """The profiled input as ``C x D x H x W`` for the cost columns (3 channels when the
    3-channel stem is counted)."""
    channels = 3 if cfg.profile.count_stem == "rgb" or cfg.model.stem == "repeat" else 1
    return " x ".join(str(v) for v in (channels, *cfg.profile.input_size))


def convention(cfg) -> str:
    """How the cost columns are counted, for table headers."""
    stem = "3-channel (RGB) stem, as the TTL paper counts" if cfg.profile.count_stem == "rgb" else \
        f"the model as trained (stem: {cfg.model.stem})"
    counted = ("ptflops' module rule: convolutions, linear layers, norms at 2 operations an element, "
               "activations and pooling at 1" if cfg.profile.macs_rule == "ptflops"
               else "convolutions and linear layers only")
    return (f"P(M) and MACs(G) ({counted}) with the {stem}; T(ms) of the model as "
            f"trained (stem: {cfg.model.stem})")


def profile_variants(cfg) -> str:
    """`volttl profile`: P(M), MACs(G) and T(ms) for FTL and each configured strategy and
    cut, at the configured window; writes markdown and CSV to ``profile.out_dir``."""
    import copy
    import csv

    p = cfg.profile
    variants = [("ftl", "")] + [(s, c) for s in p.strategies if s != "ftl" for c in p.cuts]
    rows = []
    for strategy, cut in variants:
        one = copy.deepcopy(cfg)
        one.transfer.strategy, one.transfer.cut = strategy, cut or one.transfer.cut
        r = profile_config(one)
        rows.append(ComplexityRow(cfg.model.name, strategy.upper(), cut or "-", r["params_m"], r["macs_g"],
                                  r["latency_ms"], r["device"]))
    header = ("| model | strategy | cut | P(M) | MACs(G) | T(ms) |\n"
              "| --- | --- | --- | --- | --- | --- |")
    window = "x".join(str(v) for v in r["input"])
    table = "\n".join([f"Input (C x D x H x W) {profiled_input(cfg)}, batch 1, on {rows[0].device}. "
                       f"{convention(cfg)}.", "", header,
                       *(r.markdown() for r in rows)])
    out = ProfileDir(p.out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    out.table_md.write_text(table + "\n", encoding="utf-8")
    with out.table_csv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "strategy", "cut", "params_m", "macs_g", "latency_ms", "device", "input"])
        for r in rows:
            w.writerow([r.model, r.strategy, r.cut, f"{r.params_m:.4f}", f"{r.macs_g:.4f}",
                        f"{r.latency_ms:.3f}", r.device, window])
    return table
