"""Peak memory of what each command does at configs/pe.yaml's settings, and what lowers it.

Each measurement runs in a fresh process and reports that process's peak resident set
size (``ru_maxrss``): a training step (forward, backward, SGD) of ResNeXt3D-101 TTL cut
after layer3 on a batch of 24 x 192 x 192 windows (pe.yaml's model and input, `stem:
repeat`), an inference batch (evaluate, predict: forward only), a Grad-CAM batch (cam,
predict: forward and backward at the target layer), each at the configured batch size and
at half of it; and reading one 512 x 512 x 300 study to the 208 x 208 store (preprocess,
predict). CPU, float32; on a GPU, peak device memory instead (``--device cuda``). The
model is untrained: its weights do not change the memory.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--batch 8] [--cam-batch 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
from pathlib import Path

CUT, MODEL = "layer3", "resnext3d_101"


def _config(batch: int):
    from volttl.config import config_from_dict

    return config_from_dict({"model": {"name": MODEL, "stem": "repeat"},
                             "transfer": {"strategy": "ttl", "cut": CUT},
                             "train": {"batch_size": batch}})


def _peak(device: str) -> float:
    """Peak memory in GB: device memory on CUDA, else this process's resident set."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _train_step(batch: int, device: str) -> float:
    import torch

    from volttl.inference import model_from_config

    cfg = _config(batch)
    model = model_from_config(cfg).model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 24, 192, 192, device=device)
    for _ in range(2):
        loss = model(x)[:, 0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _peak(device)


def _inference(batch: int, device: str) -> float:
    import torch

    from volttl.inference import model_from_config

    model = model_from_config(_config(batch)).model.to(device).eval()
    with torch.no_grad():
        model(torch.randn(batch, 1, 24, 192, 192, device=device))
    return _peak(device)


def _gradcam(batch: int, device: str) -> float:
    import torch

    from volttl.explain.gradcam import WindowGradCAM
    from volttl.inference import model_from_config

    model = model_from_config(_config(batch)).model.to(device).eval()
    cam = WindowGradCAM(model, "", torch.device(device), "gradcam")
    cam(torch.randn(batch, 1, 24, 192, 192))
    return _peak(device)


def write_study(folder: Path) -> Path:
    """A 512 x 512 x 300 synthetic CT as NIfTI. Made in a process of its own: a child
    starts with its parent's peak resident set (Linux keeps it across fork and exec), so
    the parent must stay small."""
    import numpy as np

    from volttl.io.geometry import Geometry
    from volttl.io.nifti import write_nifti
    from volttl.synth.cohort import render_study

    geo = Geometry(shape=(300, 512, 512), spacing=(0.7, 0.7, 1.25), origin=(-175.0, -175.0, -300.0),
                   direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    hu, _ = render_study(geo, np.random.default_rng(0), positive=True)
    path = folder / "study.nii.gz"
    write_nifti(hu, geo, path)
    return path


def _prepare_study(path: str, device: str) -> float:
    from volttl.manifests.schema import StudyRow
    from volttl.preprocess.prepare import prepare_study

    prepare_study(StudyRow("s", path, 0, "test", []), 1.25, 208, 24)
    return _peak("cpu")


def _run(job: str, arg, device: str, queue) -> None:
    queue.put({"train": _train_step, "inference": _inference, "gradcam": _gradcam,
               "prepare": _prepare_study}[job](arg, device))


def measure(job: str, arg, device: str) -> float:
    ctx = mp.get_context("spawn")  # a fresh process: its peak is this job's alone
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(job, arg, device, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="train.batch_size (pe.yaml: 8)")
    parser.add_argument("--cam-batch", type=int, default=4, help="cam.batch_size (default 4)")
    args = parser.parse_args()
    import torch

    from volttl.analysis.complexity import device_name

    print(f"peak memory (GB, {'device' if args.device.startswith('cuda') else 'resident'}), "
          f"{device_name(torch.device(args.device))}, {MODEL} TTL@{CUT}, windows 24 x 192 x 192")
    rows = [("train: one SGD step", "train", args.batch, "train.batch_size"),
            ("train: one SGD step", "train", args.batch // 2, "train.batch_size"),
            ("evaluate / validation: a forward batch", "inference", args.batch, "train.batch_size"),
            ("evaluate / validation: a forward batch", "inference", args.batch // 2, "train.batch_size"),
            ("cam / predict: a Grad-CAM batch", "gradcam", args.cam_batch, "cam.batch_size"),
            ("cam / predict: a Grad-CAM batch", "gradcam", max(1, args.cam_batch // 2), "cam.batch_size"),
            ("preprocess / predict: one 512 x 512 x 300 study", "prepare", 1,
             "preprocess.workers (one study per worker)")]
    print("| what | batch | peak GB | lowered by |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        maker = mp.get_context("spawn").Process(target=write_study, args=(Path(tmp),))
        maker.start()
        maker.join()
        study = str(Path(tmp) / "study.nii.gz")
        for what, job, batch, setting in rows:
            if job == "prepare" and args.device != "cpu":
                continue
            arg = study if job == "prepare" else batch
            print(f"| {what} | {batch} | {measure(job, arg, args.device):.2f} | {setting} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
