"""`volttl train`: one run from a config to a run dir, resumable after a kill.

SGD (momentum, weight decay) over two parameter groups (pretrained at ``lr_pretrained``,
new at ``lr_new``), linear warm-up then cosine annealing per optimiser step, focal loss
or BCE, gradient accumulation, optional gradient-norm clipping; the precision, memory
format and cuDNN settings of ``runtime.precision`` etc. (:mod:`volttl.numerics`),
optionally ``torch.compile``. The progress bar reads the loss back from the device only
every few steps, so the host never waits on the device in between. After every epoch:
validation study-level AUROC, ``last.pt`` (always) and ``best.pt`` (when the AUROC
improves), a line in ``metrics.jsonl``, TensorBoard scalars when available.

With ``data.labels: study`` each batch holds whole bags (``data.bag_windows`` windows of
one study) and the loss sees one logit per study, the bag's window logits pooled
(``data.bag_pool``: max or log-mean-exp), against the study label.

Resuming restores model, optimiser, schedule and the epoch counter; every random draw
is keyed on (seed, epoch), so a resumed run ends with the same weights as an
uninterrupted one.

Under ``torchrun`` each process trains a DistributedDataParallel replica on its shard of
the windows. ``train.batch_size`` is the global batch, split evenly across the processes
(refused when it does not divide), so one config takes the same optimiser steps, with the
same examples per step and the same schedule, on one process or N; validation is sharded
too and gathered, so every rank sees the same metrics; only rank 0 writes the run dir.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volttl.config import Config, config_to_dict, config_to_yaml
from volttl.data import WindowDataset
from volttl.data.sampling import StudyBagSampler, pool_bags
from volttl.errors import VolttlError
from volttl.inference import device_probabilities, model_from_config, require_finite
from volttl.models.checkpoints import read_checkpoint, save_checkpoint
from volttl.models.surgery import recalibrate_frozen_norms
from volttl.numerics import DEFAULT_NUMERICS, Numerics
from volttl.outputs.folders import RunDir, SynthDir
from volttl.outputs.provenance import install_record
from volttl.outputs.resume import check_resumable, resumable_changes, with_store_preprocessing
from volttl.preprocess.store import Store, describe_same_scans
from volttl.progress import progress_bar
from volttl.train.distributed import DistContext, init_distributed
from volttl.train.losses import make_loss
from volttl.train.metrics import summarise
from volttl.train.schedule import lr_factors, schedule_end_epoch

log = logging.getLogger("volttl.train")

PROGRESS_EVERY = 20  # steps between progress-bar updates (each reads the loss back: a sync)


def per_process_batch(cfg: Config, world: int, bags: bool | None = None) -> int:
    """The windows each of ``world`` processes takes per micro-batch: ``train.batch_size``
    is the global batch (PENet's batch of 8 is the total over its GPUs). ``bags``: whether
    batches are whole bags (by default, with study labels)."""
    total = cfg.train.batch_size
    if total % world:
        raise VolttlError(f"train.batch_size {total} does not divide over {world} processes: give a "
                          f"multiple of {world} (it is the global batch, split across the processes)")
    per = total // world
    if bags is None:
        bags = cfg.data.labels == "study"
    if bags:  # whole bags only: (per // bag) studies of bag windows each
        bag = cfg.data.bag_windows
        if per < bag:
            raise VolttlError(f"train.batch_size {total} over {world} process(es) gives {per} window(s) "
                              f"each, less than one bag of data.bag_windows {bag}")
        per = per // bag * bag
    return per


def datasets(cfg: Config, seed: int, pe_slices: dict | None = None
             ) -> tuple[WindowDataset, WindowDataset]:
    """The augmented training windows (with ``pe_slices``: pseudo slice labels) and the
    validation windows of the config's store."""
    return (WindowDataset.from_config(cfg, "train", train=True, seed=seed, pe_slices=pe_slices),
            WindowDataset.from_config(cfg, "val", train=False))


def check_training_data(cfg: Config) -> None:
    """A training split without a positive study (or without a negative one) has nothing to
    learn, and one scan under ids in two splits leaks training data into evaluation: both
    refused. A validation split of one class cannot choose a model: said, since best.pt is
    then the last epoch's weights."""
    with Store(cfg.data.store) as store:
        across, _ = describe_same_scans(store.same_scans(), store.study_ids, store.splits)
    if across:
        raise VolttlError(f"{cfg.data.store}: {len(across)} scan(s) stored under ids in different splits, so "
                          f"evaluation would see training data: {'; '.join(across[:5])}; keep one id per "
                          "scan in the manifest and preprocess again")
    train = WindowDataset.from_config(cfg, "train", train=True)  # data.train_studies applied
    members = np.unique(train.windows["study"])
    positives = int(sum(train.study_labels[i] == 1 for i in members))
    if positives == 0 or positives == len(members):
        kind = "positive" if positives == 0 else "negative"
        raise VolttlError(f"{cfg.data.store}: the training split's {len(members)} studies hold no "
                          f"{kind} study: there is nothing to learn (check the manifest's label and "
                          "split columns)")
    val = WindowDataset.from_config(cfg, "val")
    labels = {int(val.study_labels[i]) for i in np.unique(val.windows["study"])}
    if len(labels) < 2:
        log.warning("%s: the validation split holds only %s studies: its AUROC is undefined, so no "
                    "epoch can be chosen and best.pt will be the last epoch's weights", cfg.data.store,
                    "positive" if labels == {1} else "negative")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def usable_workers(requested: int) -> int:
    """``runtime.workers``, at most the cores this process may use; said once (torch would
    warn twice per loader, every epoch)."""
    cores = available_cores()
    if requested > cores:
        log.warning("runtime.workers %d is more than the %d core(s) available: using %d loader workers",
                    requested, cores, cores)
        return cores
    return requested


def _loader(ds, batch_size: int, order, workers: int, device: torch.device, drop_last: bool = False):
    """Windows in ``order`` (indices or a sampler), or whole batches when ``order`` is a
    batch sampler (``batch_size`` 0: study bags)."""
    workers = usable_workers(workers)
    if not batch_size:
        return torch.utils.data.DataLoader(ds, batch_sampler=order, num_workers=workers,
                                           pin_memory=device.type == "cuda")
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers,
                                       drop_last=drop_last,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def _recalibration_batches(ds: WindowDataset, windows: int, batch_size: int, workers: int,
                           device: torch.device, numerics: Numerics):
    """Up to ``windows`` augmented training windows, spread over the split, for
    re-estimating frozen BatchNorm statistics (keyed on an epoch of their own, so
    training's draws are untouched)."""
    ds.set_epoch(10**6)
    order = np.unique(np.linspace(0, len(ds) - 1, min(windows, len(ds))).astype(int)).tolist()
    for hu, _, _, params in _loader(ds, batch_size, order, workers, device):
        yield numerics.prepare(ds.model_input(hu, params, device))
    ds.set_epoch(0)


@torch.no_grad()
def predict(model: torch.nn.Module, ds: WindowDataset, device: torch.device, batch_size: int,
            workers: int = 0, dist: DistContext | None = None, numerics: Numerics = DEFAULT_NUMERICS,
            progress: bool = False, desc: str = "predict") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window probabilities, window labels and window studies, in dataset order (each
    rank of a distributed run predicts every world-th window; all get the whole)."""
    dist = dist or DistContext(device=device)
    model.eval()
    probs, labels, studies = [], [], []
    order = list(range(dist.rank, len(ds), dist.world))
    batches = _loader(ds, batch_size, order, workers, device)
    for x, y, s in progress_bar(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        probs.append(device_probabilities(model, x, device, numerics))
        labels.append(y.numpy())
        studies.append(s.numpy())
    probs = [torch.cat(probs).cpu().numpy()] if probs else []  # one read-back for the split
    parts = [np.concatenate(v) if v else np.zeros(0) for v in (probs, labels, studies)]
    if not dist.active:
        return parts[0], parts[1], parts[2]
    shards = dist.gather((order, *parts))
    out = [np.zeros(len(ds), dtype=p.dtype) for p in parts]
    for idx, *values in shards:
        for o, v in zip(out, values, strict=True):
            o[idx] = v
    return out[0], out[1], out[2].astype(np.int64)


def _summary_writer(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(str(run.tensorboard))


def train_model(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
                stop_after_epoch: int | None = None, pe_slices: dict | None = None
                ) -> tuple[dict, torch.nn.Module]:
    """One training round into ``run_dir``: the best validation metrics and the trained model
    (this process's replica); :func:`volttl.train.step.train_run` chooses the rounds.
    ``pe_slices``: pseudo slice labels of the training positives (study id -> ranges of
    first and last stored slice), given by :mod:`volttl.train.pseudo` for ``data.pseudo_slices``."""
    run_dir = Path(run_dir)
    if cfg.data.pseudo_slices and pe_slices is None:
        raise ValueError("data.pseudo_slices trains two rounds: call volttl.train.step.train_run")
    cfg = with_store_preprocessing(cfg)
    check_training_data(cfg)
    tc, rt = cfg.train, cfg.runtime
    if RunDir(run_dir).last.exists() and not resume:
        raise VolttlError(f"{run_dir}: a run is already there (use --resume, or another run dir)")
    if resume:
        check_resumable(run_dir, cfg)
    dist = init_distributed(rt.device)
    root, handler = logging.getLogger("volttl"), None
    level = root.level
    if dist.is_main:  # everything volttl logs during the run also goes to <run>/train.log
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(RunDir(run_dir).log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    try:
        return _train(cfg, run_dir, resume, progress and dist.is_main, stop_after_epoch, dist, pe_slices)
    except torch.OutOfMemoryError:
        resume_hint = ("" if rt.precision == "bf16" else
                       "; or --resume it with runtime.precision=bf16 (half the activation memory)")
        raise VolttlError(f"{run_dir}: out of {dist.device} memory at train.batch_size {tc.batch_size} in "
                          f"{rt.precision}: start a new run with a smaller train.batch_size "
                          f"(train.grad_accum keeps the effective batch){resume_hint}") from None
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
            root.setLevel(level)
        dist.close()


@dataclass
class Round:
    """Everything one training round works with, built once from the config: the model in
    the run's numerics, its optimiser and schedule, the datasets and the training order."""

    cfg: Config
    dist: DistContext
    numerics: Numerics
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: object
    train_ds: WindowDataset
    val_ds: WindowDataset
    sampler: object
    bags: bool  # study labels: batches of whole bags, one pooled logit per study
    batch: int  # windows per micro-batch on this process
    drop_last: bool
    examples_per_step: int


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, stop_after_epoch: int | None,
           dist: DistContext, pe_slices: dict | None = None) -> tuple[dict, torch.nn.Module]:
    """One round, phase by phase: the folder, the round's pieces, where it starts, each
    epoch (train, then validate and save), the best checkpoint."""
    run = RunDir(run_dir)
    if dist.is_main:
        _prepare_folder(cfg, run, resume)
    r = _build_round(cfg, dist, pe_slices)
    start_epoch, best = _resume_or_start(r, run, resume)
    replica = _replica(r)
    writer = _summary_writer(run) if dist.is_main else None
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loss, seen, elapsed = _train_epoch(r, replica, epoch, progress)
        best = _validate_and_save(r, run, epoch, train_loss, seen / elapsed, best, writer)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if writer is not None:
        writer.close()
    if dist.is_main and not run.best.exists():  # validation AUROC undefined throughout
        save_checkpoint(run.best, r.model, config=config_to_dict(cfg), epoch=cfg.train.epochs - 1)
    return best, r.model


def _prepare_folder(cfg: Config, run: RunDir, resume: bool) -> None:
    """The run folder with its config and, for a new run, a record of what it learns from
    (checked on resume, shown in the model card)."""
    run.path.mkdir(parents=True, exist_ok=True)
    if resume and run.config.is_file():  # what may change on resume is logged when it does
        for key, (before, now) in resumable_changes(run.read_config(), cfg).items():
            log.info("resumed with %s %r (was %r)", key, now, before)
    run.config.write_text(config_to_yaml(cfg), encoding="utf-8")
    if not (resume and run.last.exists()):
        with Store(cfg.data.store) as store:
            record = {**store.training_data(), "install": install_record()}
            cohort = SynthDir.of_manifest(cfg.data.manifest)
            if cohort is not None:  # said by predict and the model card
                record["synthetic_cohort"] = cohort
            run.training_data.write_text(json.dumps(record, indent=1), encoding="utf-8")


def _build_round(cfg: Config, dist: DistContext, pe_slices: dict | None) -> Round:
    """The model, optimiser, schedule, loss, datasets and training order of a round."""
    tc, device = cfg.train, dist.device
    torch.manual_seed(tc.seed)
    setup = model_from_config(cfg)
    numerics = Numerics.of(cfg.runtime)
    numerics.configure(device)
    model = setup.model.to(device, memory_format=numerics.memory_format)
    optimizer = torch.optim.SGD(setup.param_groups(tc.lr_pretrained, tc.lr_new), lr=tc.lr_new,
                                momentum=tc.momentum, weight_decay=tc.weight_decay, dampening=tc.dampening)
    train_ds, val_ds = datasets(cfg, tc.seed, pe_slices)
    bags = cfg.data.labels == "study" and pe_slices is None
    batch = per_process_batch(cfg, dist.world, bags)
    if bags:  # study labels: each batch is whole bags of windows, one study logit per bag
        sampler = StudyBagSampler(train_ds.studies(), cfg.data.bag_windows,
                                  batch // cfg.data.bag_windows, tc.seed, dist.rank, dist.world)
        drop_last, batches = False, len(sampler)
    else:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank,
                                                      shuffle=True, seed=tc.seed)
        # a last batch of one window cannot train BatchNorm (one value per channel): dropped
        drop_last = len(sampler) % batch == 1 and len(sampler) > 1
        batches = len(sampler) // batch if drop_last else math.ceil(len(sampler) / batch)
    steps_per_epoch = math.ceil(batches / tc.grad_accum)
    examples_per_step = batch * tc.grad_accum * dist.world
    log.info("process %d of %d: %d windows per micro-batch (train.batch_size %d over %d process(es)), "
             "%d optimiser steps per epoch", dist.rank, dist.world, batch, tc.batch_size, dist.world,
             steps_per_epoch)
    groups = [g["name"] for g in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(cfg, groups, steps_per_epoch,
                                                                        examples_per_step))
    _say_epochs_past_schedule(cfg, schedule_end_epoch(cfg, groups, steps_per_epoch, examples_per_step))
    return Round(cfg, dist, numerics, model, optimizer, schedule, numerics.grad_scaler(device),
                 make_loss(tc.loss, tc.focal_gamma), train_ds, val_ds, sampler, bags, batch, drop_last,
                 examples_per_step)


def _resume_or_start(r: Round, run: RunDir, resume: bool) -> tuple[int, dict]:
    """The first epoch to train and the best so far: from ``last.pt`` when resuming (model,
    optimiser, schedule, grad scaler), else 0, after recalibrating frozen norms if asked."""
    if resume and run.last.exists():
        _, _, ckpt = read_checkpoint(run.last)
        r.model.load_state_dict(ckpt["model_state"])
        r.optimizer.load_state_dict(ckpt["optimizer"])
        r.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("grad_scaler") and r.scaler.is_enabled():  # empty unless the run was fp16
            r.scaler.load_state_dict(ckpt["grad_scaler"])
        log.info("resuming %s after epoch %d", run.path, int(ckpt["epoch"]))
        return int(ckpt["epoch"]) + 1, dict(ckpt["best"])
    model, rt = r.model, r.cfg.runtime
    if model.frozen_units and model.frozen_norm == "recalibrate":
        seen = recalibrate_frozen_norms(model, _recalibration_batches(
            r.train_ds, r.cfg.transfer.recalibrate_windows, r.batch, rt.workers, r.dist.device, r.numerics))
        log.info("recalibrated the frozen BatchNorm statistics on %d training windows", seen)
    return 0, {"study_auroc": -math.inf}


def _replica(r: Round) -> torch.nn.Module:
    """The module that trains: compiled first, then wrapped (DDP's gradient hooks stay
    outside the compiled graph); it shares the model's parameters, and checkpoints save the
    model itself."""
    replica = torch.compile(r.model) if r.cfg.runtime.compile else r.model
    if r.dist.active:
        device = r.dist.device
        replica = torch.nn.parallel.DistributedDataParallel(
            replica, device_ids=[device.index] if device.type == "cuda" else None)
    return replica


def _train_epoch(r: Round, replica: torch.nn.Module, epoch: int, progress: bool) -> tuple[float, int, float]:
    """One epoch of optimiser steps: the mean training loss, the windows seen (all ranks)
    and the seconds it took."""
    cfg, dist, tc, device = r.cfg, r.dist, r.cfg.train, r.dist.device
    r.train_ds.set_epoch(epoch)
    r.sampler.set_epoch(epoch)
    torch.manual_seed(tc.seed * 100_003 + epoch * dist.world + dist.rank)  # dropout, drop-path
    replica.train()
    r.optimizer.zero_grad(set_to_none=True)
    seen, t0, losses = 0, time.perf_counter(), []  # losses stay on the device
    loader = _loader(r.train_ds, 0 if r.bags else r.batch, r.sampler, cfg.runtime.workers, device,
                     r.drop_last)
    bar = progress_bar(loader, disable=not progress, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       unit="batch")
    for step, (hu, y, _, params) in enumerate(bar):
        # workers only read int16 windows; the batch is augmented here, on the device
        x = r.numerics.prepare(r.train_ds.model_input(hu, params, device))
        y = y.to(device, non_blocking=True)
        stepping = (step + 1) % tc.grad_accum == 0 or step + 1 == len(bar)
        # gradients are averaged across ranks only on the micro-batch that steps
        with replica.no_sync() if dist.active and not stepping else nullcontext():
            with r.numerics.autocast(device):
                logits = replica(x)[:, 0]
            if r.bags:  # the loss sees one pooled logit per study, against the study label
                k = cfg.data.bag_windows
                logits = pool_bags(logits.float(), k, cfg.data.bag_pool, cfg.data.bag_sharpness)
                y = y.view(-1, k)[:, 0]
            loss = r.loss_fn(logits.float(), y) / tc.grad_accum
            r.scaler.scale(loss).backward()
        if stepping:
            if tc.clip_grad_norm > 0:
                r.scaler.unscale_(r.optimizer)  # the norm is the true gradient's (fp16)
                torch.nn.utils.clip_grad_norm_(r.model.parameters(), tc.clip_grad_norm)
            r.scaler.step(r.optimizer)  # skipped when fp16 gradients overflowed
            r.scaler.update()
            r.optimizer.zero_grad(set_to_none=True)
            r.schedule.step()
        seen += len(x) * dist.world
        losses.append(loss.detach() * tc.grad_accum)
        if progress and (step % PROGRESS_EVERY == PROGRESS_EVERY - 1 or step + 1 == len(bar)):
            bar.set_postfix(loss=f"{torch.stack(losses[-PROGRESS_EVERY:]).mean().item():.4f}",
                            lr=f"{r.optimizer.param_groups[-1]['lr']:.2e}",
                            win_s=f"{seen / (time.perf_counter() - t0):.1f}")
    train_loss = torch.stack(losses).double().mean().item()  # waits for the epoch's last step
    return train_loss, seen, time.perf_counter() - t0


def _validate_and_save(r: Round, run: RunDir, epoch: int, train_loss: float, windows_per_s: float,
                       best: dict, writer) -> dict:
    """Validation study AUROC after an epoch, the epoch's record and checkpoints (rank 0);
    returns the best so far."""
    cfg, dist = r.cfg, r.dist
    dist.sync_buffers(r.model)
    probs, labels, studies = predict(r.model, r.val_ds, dist.device, r.batch, cfg.runtime.workers, dist,
                                     r.numerics)
    require_finite(probs, f"{run.path}: epoch {epoch + 1}, validation (training diverged: a lower "
                          "learning rate, or train.clip_grad_norm, may hold it)")
    val = summarise(labels, probs, studies, r.val_ds.study_labels, cfg.eval.aggregate)
    record = {"epoch": epoch, "train_loss": dist.mean(train_loss),
              "lr": [g["lr"] for g in r.optimizer.param_groups],
              "optimizer_steps": int(r.schedule.last_epoch), "examples_per_step": r.examples_per_step,
              "windows_per_s": windows_per_s, **{f"val_{k}": v for k, v in val.items()}}
    improved = not math.isnan(val["study_auroc"]) and val["study_auroc"] > best["study_auroc"]
    if improved:
        best = {"epoch": epoch, **val}
    if dist.is_main:
        _write_epoch(run, cfg, r.model, r.optimizer, r.schedule, r.scaler, epoch, best, record, improved,
                     writer)
    dist.barrier()  # no rank runs ahead of the checkpoint it might resume from
    log.info("epoch %d: loss %.4f, val study AUROC %.3f%s", epoch + 1, record["train_loss"],
             val["study_auroc"], " (best)" if improved else "")
    return best


def _say_epochs_past_schedule(cfg: Config, end_epoch: int | None) -> None:
    """Epochs that fall wholly past the schedule's end train at learning rate 0: said at start."""
    if end_epoch is not None and cfg.train.epochs > end_epoch:
        log.warning("train.schedule penet reaches learning rate 0 during epoch %d (train.cosine_examples "
                    "%d): epochs %d-%d of train.epochs %d will not change the weights; set train.epochs "
                    "to %d to stop there", end_epoch, cfg.train.cosine_examples, end_epoch + 1,
                    cfg.train.epochs, cfg.train.epochs, end_epoch)


def _write_epoch(run: RunDir, cfg: Config, model, optimizer, schedule, scaler, epoch: int, best: dict,
                 record: dict, improved: bool, writer) -> None:
    """Checkpoints (atomic), a metrics.jsonl line and TensorBoard scalars for one epoch."""
    if improved:
        save_checkpoint(run.best, model, config=config_to_dict(cfg), epoch=epoch)
    save_checkpoint(run.last, model, config=config_to_dict(cfg), epoch=epoch,
                    optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), best=best,
                    grad_scaler=scaler.state_dict())
    with run.metrics.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is not None:
        for key in ("train_loss", "val_study_auroc", "val_study_auprc", "val_window_auroc"):
            if isinstance(record.get(key), float) and not math.isnan(record[key]):
                writer.add_scalar(key, record[key], epoch)
        writer.flush()
