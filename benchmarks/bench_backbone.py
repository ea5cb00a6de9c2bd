"""Forward latency of ResNeXt3D-101: full (FTL) vs truncated after each stage (TTL), and
`stem: sum` vs `stem: repeat`, at 1 x 24 x 192 x 192. CPU in float32; CUDA in bf16 with
channels_last_3d when a GPU is present. Ratios are taken within one run.

    python benchmarks/bench_backbone.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import logging

import torch

from volttl.analysis.complexity import count_macs, device_name, measure_latency
from volttl.transfer import build_transfer_model

VARIANTS = [("ftl", ""), ("ttl", "layer1"), ("ttl", "layer2"), ("ttl", "layer3"), ("ttl", "layer4")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--window", type=int, nargs=3, default=(24, 192, 192))
    args = ap.parse_args()
    logging.getLogger("volttl.transfer").setLevel(logging.ERROR)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (30 if gpu else 3)
    dtype = torch.bfloat16 if gpu else None
    if gpu:
        torch.backends.cudnn.benchmark = True
    print(f"device: {device_name(device)}; {'bf16 autocast, channels_last_3d' if gpu else 'float32'};"
          f" input 1x{'x'.join(map(str, args.window))}; median of {repeats}")
    print("| variant | stem | GMACs | T(ms) | T / T(FTL) | sum / repeat |")
    print("| --- | --- | --- | --- | --- | --- |")
    full: dict[str, float] = {}
    for strategy, cut in VARIANTS:
        times = {}
        for stem in ("repeat", "sum"):
            model = build_transfer_model("resnext3d_101", strategy, cut or "stem", stem=stem).model
            channels = 1
            macs = count_macs(model, (1, 3 if stem == "repeat" else 1, *args.window)) / 1e9
            model = model.to(device)
            if gpu:
                model = model.to(memory_format=torch.channels_last_3d)
            times[stem] = measure_latency(model, (1, channels, *args.window), device, repeats=repeats,
                                          warmup=3 if gpu else 1, dtype=dtype)
            if strategy == "ftl":
                full[stem] = times[stem]
            name = "FTL" if strategy == "ftl" else f"TTL@{cut}"
            ratio = f"{times['sum'] / times['repeat']:.2f}" if stem == "sum" else ""
            print(f"| {name} | {stem} | {macs:.2f} | {times[stem]:.1f} | "
                  f"{times[stem] / full[stem]:.2f} | {ratio} |", flush=True)
            del model
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
