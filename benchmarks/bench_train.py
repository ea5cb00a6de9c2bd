"""Training throughput of ResNeXt3D-101 (windows/s, achieved TFLOP/s against the card's
peak) and whether the data loader keeps up with it. Ratios are taken within one run.

Default: FTL, TTL@layer1 and TTL@layer3 at batch 8 of 24 x 192 x 192 in the numerics
`volttl train` uses by default (runtime.precision etc.), then the loader in parts: one worker
reading int16 windows (all a worker does now), one worker doing what workers did before
(read, crop, MONAI flip and rotation, normalise, per window), the batched augmentation on
the device, and the DataLoader with --workers. Loader target: at least 2x the fastest
training rate on the device it feeds. Targets on an H100: FTL >= 250 windows/s,
TTL@layer1 >= 600, TTL@layer3 >= 1.3x FTL.

--matrix  FTL (and the TTLs at the best setting) over precision x memory format, then
          cudnn.benchmark, torch.compile and batch size at the best precision/format.
--profile the top CUDA kernels of five FTL steps at the defaults (torch.profiler), and
          the share of time in convolutions, normalisation and elementwise kernels.
--stem    the 1-channel 7x7x7 stem convolution alone (forward + weight gradient) in each
          precision and memory format, and in two other forms of the same sums: zero-padded
          to 8 input channels, and its 7 depth taps as channels of a 1x7x7 convolution.

    python benchmarks/bench_train.py [--device cpu|cuda] [--matrix] [--profile] [--stem]
        [--steps N] [--workers N] [--store S.h5] [--window D H W] [--json OUT.jsonl]

Without --store a small synthetic cohort is generated and preprocessed at the default
settings (1.25 mm slices, 208 x 208) in a temporary folder. --no-loader skips the loader.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from volttl.analysis.complexity import count_macs, device_name
from volttl.config import config_from_dict
from volttl.inference import model_from_config
from volttl.numerics import Numerics
from volttl.train.losses import make_loss

# dense tensor-core peaks in TFLOP/s from the vendors' data sheets, by precision; the
# first name fragment that occurs in torch.cuda.get_device_name wins
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
VARIANTS = {"FTL": ("ftl", "layer4"), "TTL@layer1": ("ttl", "layer1"), "TTL@layer3": ("ttl", "layer3")}


@dataclass(frozen=True)
class Setting:
    """One point of the matrix: the numerics of a step, torch.compile, the batch size."""

    numerics: Numerics = Numerics()
    compile: bool = False
    batch: int = 8

    def label(self) -> str:
        n = self.numerics
        return (f"{n.precision}, {'channels_last' if n.channels_last else 'NCDHW'}, "
                f"cudnn.benchmark {'on' if n.cudnn_benchmark else 'off'}"
                f"{', compiled' if self.compile else ''}, batch {self.batch}")


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for key, p in PEAK_TFLOPS if key in name), None)


def build(variant: str) -> torch.nn.Module:
    strategy, cut = VARIANTS[variant]
    cfg = config_from_dict({"model": {"name": "resnext3d_101"},
                            "transfer": {"strategy": strategy, "cut": cut}})
    return model_from_config(cfg).model


def train_rate(variant: str, setting: Setting, device: torch.device, window: tuple, steps: int,
               warmup: int) -> dict:
    """Windows/s of SGD steps on random windows (the model does not care what they show),
    as `volttl train` steps: autocast per the precision, focal loss, a GradScaler for fp16."""
    n = setting.numerics
    n.configure(device)
    model = build(variant).to(device, memory_format=n.memory_format).train()
    macs = count_macs(model, (1, 1, *window))
    forward = torch.compile(model) if setting.compile else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = n.grad_scaler(device)
    loss_fn = make_loss("focal", 2.0)
    x = n.prepare(torch.randn(setting.batch, 1, *window, device=device))
    y = (torch.arange(setting.batch, device=device) % 2).float()

    def step() -> None:
        with n.autocast(device):
            logits = forward(x)[:, 0]
        scaler.scale(loss_fn(logits.float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    t_compile = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    t_compile = time.perf_counter() - t_compile
    syncs = count_syncs(step, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    rate = steps * setting.batch / (time.perf_counter() - t0)
    # the usual estimate: backward costs twice the forward (input and weight gradients)
    tflops = rate * macs * 2 * 3 / 1e12
    peak = peak_tflops(device, n.precision)
    row = {"variant": variant, **asdict(n), "compile": setting.compile, "batch": setting.batch,
           "windows_per_s": round(rate, 2), "gmacs_per_window": round(macs / 1e9, 2),
           "tflops": round(tflops, 2), "peak_tflops": peak,
           "of_peak": round(tflops / peak, 4) if peak else None, "warmup_s": round(t_compile, 1),
           "syncs_per_step": syncs}
    if device.type == "cuda":
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def count_syncs(fn, device: torch.device) -> int | None:
    """How often ``fn`` makes the host wait for the GPU (torch's sync debug mode); None on
    a CPU. A training step should make none: the host then runs ahead, queueing work."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_row(row: dict, out) -> None:
    peak = f" = {100 * row['of_peak']:.1f}% of {row['peak_tflops']:.0f}" if row["of_peak"] else ""
    memory = f", {row['max_memory_gib']} GiB" if "max_memory_gib" in row else ""
    setting = Setting(Numerics(row["precision"], row["channels_last"], row["cudnn_benchmark"]),
                      row["compile"], row["batch"])
    syncs = "" if row["syncs_per_step"] is None else f", {row['syncs_per_step']} host syncs per step"
    print(f"train {row['variant']} [{setting.label()}]: {row['windows_per_s']:.1f} windows/s, "
          f"{row['tflops']:.1f} TFLOP/s{peak}{memory}{syncs} (warm-up {row['warmup_s']} s)", flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")
        out.flush()


def matrix(device: torch.device, window: tuple, steps: int, warmup: int, out) -> list[dict]:
    """Precision x memory format for FTL; then, at FTL's best of those, cudnn.benchmark
    off, torch.compile, batch 16 and 32; the TTLs at the best setting found."""
    rows = []

    def run(variant: str, setting: Setting) -> dict:
        try:
            row = train_rate(variant, setting, device, window, steps, warmup)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # report and go on
            print(f"train {variant} [{setting.label()}]: failed ({str(exc).splitlines()[0][:160]})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"windows_per_s": 0.0}
        _print_row(row, out)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    grid = [Setting(Numerics(p, cl)) for p in ("tf32", "bf16", "fp16", "fp32") for cl in (True, False)]
    rates = {setting: run("FTL", setting)["windows_per_s"] for setting in grid}
    best = max(rates, key=rates.get)
    print(f"best precision / memory format for FTL: {best.label()}")
    run("FTL", replace(best, numerics=replace(best.numerics, cudnn_benchmark=False)))
    compiled = replace(best, compile=True)
    if run("FTL", compiled)["windows_per_s"] > rates[best]:
        best = compiled
    for batch in (16, 32):
        run("FTL", replace(best, batch=batch))
    for variant in ("TTL@layer1", "TTL@layer3"):
        run(variant, best)
        if best != Setting():
            run(variant, Setting())
    return rows


def profile(device: torch.device, window: tuple, setting: Setting, top: int = 15) -> None:
    """Where five FTL steps spend their device time, by kernel."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    n = setting.numerics
    n.configure(device)
    model = build("FTL").to(device, memory_format=n.memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = n.prepare(torch.randn(setting.batch, 1, *window, device=device))
    y = (torch.arange(setting.batch, device=device) % 2).float()
    loss_fn = make_loss("focal", 2.0)

    def step() -> None:
        with n.autocast(device):
            logits = model(x)[:, 0]
        loss_fn(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    with torch_profile(activities=[activity]) as prof:
        for _ in range(5):
            step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    print(f"profile, FTL [{setting.label()}]: {total / 5 / 1e3:.1f} ms of {device.type} time per step")
    groups = {"convolution": ("conv", "xmma", "gemm", "sgemm", "cudnn::", "implicit"),
              "normalisation": ("bn_", "batch_norm", "reduce_kernel", "welford"),
              "elementwise": ("elementwise", "vectorized", "unrolled")}
    shares = dict.fromkeys(groups, 0.0)
    for e in events:
        name = e.key.lower()
        for group, keys in groups.items():
            if any(k in name for k in keys):
                shares[group] += getattr(e, attr)
                break
    print("  " + ", ".join(f"{g} {100 * v / total:.0f}%" for g, v in shares.items())
          + f", other {100 * (total - sum(shares.values())) / total:.0f}%")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        t = getattr(e, attr)
        print(f"  {100 * t / total:5.1f}%  {t / 5 / 1e3:7.2f} ms/step  {e.count // 5:4d} calls/step  "
              f"{e.key[:110]}")


def _stem_direct(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x, w, stride=(1, 2, 2), padding=3)


def _stem_padded(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Input and weight zero-padded from 1 to 8 channels (tensor-core friendly widths)."""
    return F.conv3d(F.pad(x, (0, 0, 0, 0, 0, 0, 0, 7)), F.pad(w, (0, 0, 0, 0, 0, 0, 0, 7)),
                    stride=(1, 2, 2), padding=3)


def _stem_depth_taps(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 7 depth taps as 7 input channels (+1 zero channel) of a 1x7x7 convolution: the
    same sums, in a shape with 8 input channels and no depth window."""
    d = x.shape[2]
    xp = F.pad(x, (0, 0, 0, 0, 3, 3))
    taps = torch.cat([xp[:, :, t: t + d] for t in range(7)] + [torch.zeros_like(x)], dim=1)
    w8 = F.pad(w.reshape(w.shape[0], 7, 1, 7, 7), (0, 0, 0, 0, 0, 0, 0, 1))
    return F.conv3d(taps, w8, stride=(1, 2, 2), padding=(0, 3, 3))


STEM_FORMS = {"direct, 1 input channel": _stem_direct, "zero-padded to 8 channels": _stem_padded,
              "depth taps as 8 channels, 1x7x7": _stem_depth_taps}


def stem(device: torch.device, window: tuple, batch: int, steps: int) -> None:
    """The stem convolution (1 -> 64 channels, 7x7x7, stride 1x2x2) alone, forward and
    weight gradient as in training (the input needs no gradient), in each precision and
    layout and in three forms that compute the same sums (checked here first)."""
    x = torch.randn(batch, 1, *window, device=device)
    w = torch.randn(64, 1, 7, 7, 7, device=device) * 0.05
    with torch.no_grad():
        ref = _stem_direct(x.double(), w.double())
        for name, form in STEM_FORMS.items():
            err = (form(x.double(), w.double()) - ref).abs().max().item()
            assert err < 1e-9, f"stem form '{name}' differs from the direct convolution by {err}"
    for precision in ("tf32", "bf16", "fp16"):
        for channels_last in (True, False):
            n = Numerics(precision, channels_last)
            n.configure(device)
            layout = "channels_last" if channels_last else "NCDHW"
            for name, form in STEM_FORMS.items():
                weight = w.clone().requires_grad_(True)
                xs = n.prepare(x)

                def step(form=form, weight=weight, xs=xs, n=n) -> None:
                    with n.autocast(device):
                        out = form(xs, weight)
                    out = out.contiguous(memory_format=n.memory_format)
                    out.float().mean().backward()

                for _ in range(3):
                    step()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                ms = (time.perf_counter() - t0) / steps * 1e3
                print(f"stem [{precision}, {layout}, {name}]: {ms:.2f} ms per batch of {batch}", flush=True)


def make_store(folder: Path) -> Path:
    from volttl.preprocess.step import preprocess_step
    from volttl.synth.cohort import synth_cohort

    manifest = synth_cohort(folder / "synth", studies=6, seed=0, matrix=256, progress=False)
    store = folder / "bench.h5"
    cfg = config_from_dict({"data": {"manifest": str(manifest), "store": str(store)},
                            "preprocess": {"window": 24, "train_stride": 12}})
    if preprocess_step(cfg, progress=False).failed:
        raise SystemExit("preprocessing the benchmark cohort failed")
    return store


def _per_window_before(train, index: int) -> torch.Tensor:
    """What a loader worker did per window before augmentation moved to the device."""
    from monai.transforms import Flip, Rotate

    from volttl.data.intensity import AIR_HU

    hu, _, _, params = train[index]
    y0, x0, flip, angle = params.tolist()
    x = hu.float()[..., int(y0): int(y0) + train.crop, int(x0): int(x0) + train.crop]
    if flip:
        x = torch.as_tensor(Flip(spatial_axis=2)(x))
    x = torch.as_tensor(Rotate(angle=(angle, 0.0, 0.0), padding_mode="zeros")(x - AIR_HU)) + AIR_HU
    return torch.as_tensor(train.spec.scale(x.numpy()), dtype=torch.float32)


def _rate(fn, count: int) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def loader_rates(store: Path, workers: int, batch: int, batches: int, device: torch.device) -> dict:
    """Windows/s of: one worker reading (now), one worker reading and augmenting per window
    (before), the batched augmentation on ``device``, and the DataLoader with ``workers``."""
    from volttl.train.loop import datasets

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
        _sync(device)

    augment()  # warm-up
    rates[f"batched augmentation on {device.type}"] = _rate(augment, n)
    if device.type == "cuda":  # from pinned memory, as the DataLoader hands batches over
        pinned = hu.pin_memory(), params.pin_memory()
        syncs = count_syncs(lambda: train.model_input(*pinned, device), device)
        print(f"batched augmentation: {syncs} host syncs per batch")
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


def report_loader(args, device: torch.device, fastest: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp))
        parts = loader_rates(store, args.workers, args.batch, 20, device)
    for name, rate in parts.items():
        print(f"{name}: {rate:.1f} windows/s")
    before = parts["read + augment per window (1 worker, before)"]
    print(f"per worker: {parts['read (1 worker, now)'] / before:.1f}x the windows/s of before")
    load = parts[f"DataLoader, {args.workers} workers (reading)"]
    device_aug = parts[f"batched augmentation on {device.type}"]
    # on a CPU the augmentation takes the same cores as training; on a GPU it overlaps
    fed = 1 / (1 / load + 1 / device_aug) if device.type == "cpu" else min(load, device_aug)
    print(f"loader, {args.workers} workers, with the augmentation on {device.type}: {fed:.1f} windows/s = "
          f"{fed / fastest:.1f}x the fastest training rate on this device (target >= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 2 on CPU)")
    ap.add_argument("--workers", type=int, default=2, help="loader processes (runtime.workers)")
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--window", type=int, nargs=3, default=(24, 192, 192))
    ap.add_argument("--matrix", action="store_true", help="precision, format, cudnn, compile, batch")
    ap.add_argument("--profile", action="store_true", help="top kernels of five FTL steps")
    ap.add_argument("--stem", action="store_true", help="the stem convolution alone")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader measurements")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per training measurement")
    args = ap.parse_args()
    logging.getLogger("volttl.transfer").setLevel(logging.ERROR)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps, warmup = args.steps or (20 if gpu else 2), 5 if gpu else 1
    window = tuple(args.window)
    print(f"device: {device_name(device)}; torch {torch.__version__}; batch {args.batch} x 1 x "
          f"{' x '.join(map(str, window))}; {steps} timed steps after {warmup} warm-up steps")
    out = args.json.open("a") if args.json else None
    if args.stem:
        stem(device, window, args.batch, steps)
    if args.profile:
        profile(device, window, Setting(batch=args.batch))
    if args.matrix:
        rows = matrix(device, window, steps, warmup, out)
    else:
        rows = [train_rate(v, Setting(batch=args.batch), device, window, steps, warmup) for v in VARIANTS]
        for row in rows:
            _print_row(row, out)
    by_variant = {}
    for row in rows:
        by_variant[row["variant"]] = max(by_variant.get(row["variant"], 0), row["windows_per_s"])
    if {"FTL", "TTL@layer3"} <= by_variant.keys():
        print(f"TTL@layer3 / FTL (best of each): {by_variant['TTL@layer3'] / by_variant['FTL']:.2f}x; "
              f"TTL@layer1 / FTL: {by_variant.get('TTL@layer1', 0) / by_variant['FTL']:.2f}x")
    if not args.no_loader and rows:
        report_loader(args, device, max(by_variant.values()))


if __name__ == "__main__":
    main()
