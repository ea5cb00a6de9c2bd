"""Where search trials run: here one after another, one subprocess per local GPU, or as
tasks on a Ray cluster. Every backend runs the same :func:`volttl.search.trials.run_trial`
on plain (config, folder) pairs; each trial writes only its own folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from queue import Queue

from volttl.errors import VolttlError
from volttl.outputs.folders import TrialDir
from volttl.search.trials import read_trial, run_trial


def run_sequential(jobs: list[tuple[dict, str]], progress: bool = True) -> list[dict]:
    results = []
    for i, (cfg, folder) in enumerate(jobs, start=1):
        if progress:
            print(f"trial {i}/{len(jobs)}: {Path(folder).name}", flush=True)
        results.append(run_trial(cfg, folder, progress=progress))
    return results


def _visible_gpus(limit: int) -> list[str]:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("search.backend: gpus needs CUDA GPUs, and none is visible")
    return [str(i) for i in range(count if limit <= 0 else min(limit, count))]


def run_on_gpus(jobs: list[tuple[dict, str]], gpus: int = 0, progress: bool = True) -> list[dict]:
    """Each trial in its own process pinned to one GPU (CUDA_VISIBLE_DEVICES), as many at
    once as there are GPUs."""
    free: Queue[str] = Queue()
    for gpu in _visible_gpus(gpus):
        free.put(gpu)
    errors: list[str] = []

    def one(cfg: dict, folder: str) -> None:
        gpu = free.get()
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=folder,
                                             encoding="utf-8") as fh:
                json.dump(cfg, fh)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            if progress:
                print(f"GPU {gpu}: {Path(folder).name}", flush=True)
            with open(TrialDir(folder).log, "a", encoding="utf-8") as log:
                done = subprocess.run([sys.executable, "-m", "volttl.search.trials", fh.name, folder],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
            os.unlink(fh.name)
            if done.returncode != 0:
                errors.append(f"{folder}: trial failed (exit {done.returncode}), see trial.log there")
        finally:
            free.put(gpu)

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return [read_trial(TrialDir(folder).result) for _, folder in jobs]


def run_on_ray(jobs: list[tuple[dict, str]], address: str = "", gpus_per_trial: float = 1.0,
               progress: bool = True) -> list[dict]:
    """Each trial a Ray task (GPUs requested only where the cluster has them). The trial
    folders must be on storage every node sees."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("search.backend: ray needs Ray (pip install 'volttl[ray]')") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=progress)
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_trial if has_gpus else 0)(run_trial)
        return ray.get([task.remote(cfg, folder) for cfg, folder in jobs])
    finally:
        if started:
            ray.shutdown()


def run_jobs(jobs: list[tuple[dict, str]], backend: str, gpus: int = 0, ray_address: str = "",
             ray_gpus_per_trial: float = 1.0, progress: bool = True) -> list[dict]:
    if backend == "sequential":
        return run_sequential(jobs, progress)
    if backend == "gpus":
        return run_on_gpus(jobs, gpus, progress)
    if backend == "ray":
        return run_on_ray(jobs, ray_address, ray_gpus_per_trial, progress)
    raise VolttlError(f"search.backend '{backend}' is not one of sequential, gpus, ray")
