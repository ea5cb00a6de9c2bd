"""Training throughput (windows/s) of ResNeXt3D-101 under FTL and TTL cut after layer3, at
batch 8 of 24 x 192 x 192 windows, and the data loader's windows/s with the configured
workers on a real store. The loader target: at least 2x the training windows/s of the
device it feeds. CPU in float32; CUDA in bf16 autocast with channels_last_3d, as
`volttl train` runs. Ratios are taken within one run.

The loader is reported in parts: one worker reading int16 windows (all a worker does
now), one worker doing what workers did before (read, crop, MONAI flip and rotation,
normalise, per window), the batched augmentation on the device, and the DataLoader with
the configured workers.

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps N] [--workers N] [--store S.h5]

Without --store a small synthetic cohort is generated and preprocessed at the default
settings (1.25 mm slices, 208 x 208) in a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from volttl.analysis.complexity import device_name
from volttl.config import config_from_dict
from volttl.runs import model_from_config
from volttl.train.loop import datasets
from volttl.train.losses import make_loss

VARIANTS = [("ftl", "layer4"), ("ttl", "layer3")]


def train_windows_per_s(strategy: str, cut: str, device: torch.device, batch: int, window: tuple,
                        steps: int, warmup: int) -> float:
    """SGD steps on random windows (the model does not care what they show)."""
    cfg = config_from_dict({"model": {"name": "resnext3d_101"},
                            "transfer": {"strategy": strategy, "cut": cut}})
    model = model_from_config(cfg).model.to(device).train()
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                momentum=0.9)
    loss_fn = make_loss("focal", 2.0)
    x = torch.randn(batch, 1, *window, device=device)
    if amp:
        x = x.to(memory_format=torch.channels_last_3d)
    y = (torch.arange(batch, device=device) % 2).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)[:, 0]
        loss_fn(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if amp:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if amp:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def make_store(folder: Path) -> Path:
    from volttl.preprocess.run import preprocess
    from volttl.synth import synth_cohort

    manifest = synth_cohort(folder / "synth", studies=6, seed=0, matrix=256, progress=False)
    store = folder / "bench.h5"
    cfg = config_from_dict({"data": {"manifest": str(manifest), "store": str(store)},
                            "preprocess": {"window": 24, "train_stride": 12}})
    if preprocess(cfg, progress=False).failed:
        raise SystemExit("preprocessing the benchmark cohort failed")
    return store


def _per_window_before(train, index: int) -> torch.Tensor:
    """What a loader worker did per window before augmentation moved to the device."""
    from monai.transforms import Flip, Rotate

    from volttl.data.intensity import AIR_HU, normalise

    hu, _, _, params = train[index]
    y0, x0, flip, angle = params.tolist()
    x = hu.float()[..., int(y0): int(y0) + train.crop, int(x0): int(x0) + train.crop]
    if flip:
        x = torch.as_tensor(Flip(spatial_axis=2)(x))
    x = torch.as_tensor(Rotate(angle=(angle, 0.0, 0.0), padding_mode="zeros")(x - AIR_HU)) + AIR_HU
    return torch.as_tensor(normalise(x.numpy(), train.hu_clip, train.shift), dtype=torch.float32)


def _rate(fn, count: int) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def loader_rates(store: Path, workers: int, batch: int, batches: int, device: torch.device) -> dict:
    """Windows/s of: one worker reading (now), one worker reading and augmenting per window
    (before), the batched augmentation on ``device``, and the DataLoader with ``workers``."""
    cfg = config_from_dict({"data": {"store": str(store), "crop": 192}})
    train, _ = datasets(cfg, seed=0)
    n = batch * batches
    order = torch.randint(0, len(train), (n,), generator=torch.Generator().manual_seed(0)).tolist()
    train[order[0]]  # store opened
    rates = {"read (1 worker, now)": _rate(lambda: [train[i] for i in order], n),
             "read + augment per window (1 worker, before)":
                 _rate(lambda: [_per_window_before(train, i) for i in order[: 2 * batch]], 2 * batch)}
    items = [train[i] for i in order[:batch]]
    hu = torch.stack([it[0] for it in items])
    params = torch.stack([it[3] for it in items])

    def augment() -> None:
        for _ in range(batches):
            train.model_input(hu, params, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    augment()  # warm-up
    rates[f"batched augmentation on {device.type}"] = _rate(augment, n)
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=batch * (batches + 2))
    loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started, first batch out

    def drain() -> None:
        for _ in it:
            pass

    rates[f"DataLoader, {workers} workers (reading)"] = _rate(drain, batch * (batches + 1))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 2 on CPU)")
    ap.add_argument("--workers", type=int, default=2, help="loader processes (train.workers)")
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--window", type=int, nargs=3, default=(24, 192, 192))
    args = ap.parse_args()
    logging.getLogger("volttl.transfer").setLevel(logging.ERROR)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (20 if gpu else 2)
    print(f"device: {device_name(device)}; {'bf16 autocast, channels_last_3d' if gpu else 'float32'};"
          f" batch {args.batch} x 1 x {' x '.join(map(str, args.window))}; {steps} timed steps")
    rates = {}
    for strategy, cut in VARIANTS:
        name = "FTL" if strategy == "ftl" else f"TTL@{cut}"
        rates[name] = train_windows_per_s(strategy, cut, device, args.batch, tuple(args.window), steps,
                                          warmup=3 if gpu else 1)
        print(f"train {name}: {rates[name]:.2f} windows/s", flush=True)
    print(f"TTL@layer3 / FTL: {rates['TTL@layer3'] / rates['FTL']:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp))
        parts = loader_rates(store, args.workers, args.batch, 20, device)
    for name, rate in parts.items():
        print(f"{name}: {rate:.1f} windows/s")
    before = parts["read + augment per window (1 worker, before)"]
    print(f"per worker: {parts['read (1 worker, now)'] / before:.1f}x the windows/s of before")
    fastest = max(rates.values())
    load = parts[f"DataLoader, {args.workers} workers (reading)"]
    device_aug = parts[f"batched augmentation on {device.type}"]
    fed = 1 / (1 / load + 1 / device_aug) if device.type == "cpu" else min(load, device_aug)
    print(f"loader, {args.workers} workers, with the augmentation on {device.type}: {fed:.1f} windows/s = "
          f"{fed / fastest:.1f}x the fastest training rate on this device (target >= 2x)")


if __name__ == "__main__":
    main()
