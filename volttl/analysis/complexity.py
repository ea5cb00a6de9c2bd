"""Parameters, multiply-accumulates and latency of a model, as the TTL paper tabulates.

MACs count convolutions and linear layers only (groups honoured), which is what the
paper's figures count; norms, activations and pooling are left out.
Latency is the median of timed forward passes at batch 1 after warm-up, on a named device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Conv + linear multiply-accumulates of one forward pass at ``input_shape`` (N, C, D, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv3d, _inp, out) -> None:
        nonlocal total
        kernel = m.weight.shape[2] * m.weight.shape[3] * m.weight.shape[4]
        total += out.numel() * (m.in_channels // m.groups) * kernel

    def linear_hook(m: nn.Linear, inp, _out) -> None:
        nonlocal total
        total += inp[0].numel() // m.in_features * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
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

    from volttl.runs import model_from_config

    p = cfg.profile
    shape = (1, 1 if cfg.model.stem == "sum" else 3, *p.input_size)
    device = torch.device(p.device)
    model = model_from_config(cfg, weights=False, window=tuple(p.input_size)).model.to(device)
    counted, counted_shape = model, shape
    if p.count_stem == "rgb" and shape[1] != 3:  # the paper's convention: the 3-channel stem
        rgb = copy.deepcopy(cfg)
        rgb.model.stem = "repeat"
        counted = model_from_config(rgb, weights=False, window=tuple(p.input_size)).model.to(device)
        counted_shape = (1, 3, *p.input_size)
    return {"params_m": count_parameters(counted) / 1e6, "macs_g": count_macs(counted, counted_shape) / 1e9,
            "latency_ms": measure_latency(model, shape, device, repeats=p.repeats, warmup=p.warmup),
            "device": device_name(device), "input": list(shape[1:]), "count_stem": p.count_stem}


def profiled_input(cfg) -> str:
    """The profiled input as ``C x D x H x W`` for the cost columns (3 channels when the
    3-channel stem is counted)."""
    channels = 3 if cfg.profile.count_stem == "rgb" or cfg.model.stem == "repeat" else 1
    return " x ".join(str(v) for v in (channels, *cfg.profile.input_size))


def convention(cfg) -> str:
    """How the cost columns are counted, for table headers."""
    stem = "3-channel (RGB) stem, as the TTL paper counts" if cfg.profile.count_stem == "rgb" else \
        f"the model as trained (stem: {cfg.model.stem})"
    return (f"P(M) and MACs(G) (convolutions and linear layers) with the {stem}; T(ms) of the model as "
            f"trained (stem: {cfg.model.stem})")


def profile_variants(cfg) -> str:
    """`volttl profile`: P(M), MACs(G) and T(ms) for FTL and each configured strategy and
    cut, at the configured window; writes markdown and CSV to ``profile.out_dir``."""
    import copy
    import csv
    from pathlib import Path

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
    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text(table + "\n", encoding="utf-8")
    with (out / "profile.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "strategy", "cut", "params_m", "macs_g", "latency_ms", "device", "input"])
        for r in rows:
            w.writerow([r.model, r.strategy, r.cut, f"{r.params_m:.4f}", f"{r.macs_g:.4f}",
                        f"{r.latency_ms:.3f}", r.device, window])
    return table
