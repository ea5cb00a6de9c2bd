"""`volttl cam` and `volttl predict` time for one 300-slice study at the default settings
(1.25 mm slices, 208 x 208, 24-slice windows cropped to 192, stride 6), ResNeXt3D-101 TTL cut after
layer3, split into Grad-CAM (batched windows) and the rest (mapping back to the original
grid, writing NIfTI, CT and preview). The model is untrained: its weights do not change
the cost. CPU in float32, or CUDA when present.

    python benchmarks/bench_cam.py [--device cpu|cuda] [--batch N] [--matrix PX]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from volttl.analysis.complexity import device_name
from volttl.config import config_from_dict, config_to_dict
from volttl.explain import gradcam, run
from volttl.io.geometry import Geometry
from volttl.io.nifti import write_nifti
from volttl.manifests import StudyRow, write_manifest
from volttl.models.checkpoints import save_checkpoint
from volttl.predict import predict_run
from volttl.preprocess.run import preprocess
from volttl.runs import model_from_config
from volttl.synth import render_study


def make_study(folder: Path, matrix: int, slices: int) -> Path:
    geo = Geometry(shape=(slices, matrix, matrix), spacing=(350.0 / matrix, 350.0 / matrix, 1.25),
                   origin=(-175.0, -175.0, -300.0),
                   direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    hu, _ = render_study(geo, np.random.default_rng(0), positive=True)
    write_nifti(hu, geo, folder / "study.nii.gz")
    manifest = folder / "manifest.csv"
    write_manifest([StudyRow("bench", str(folder / "study.nii.gz"), 0, "test", [])], manifest)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4, help="windows per Grad-CAM batch (cam.batch_size)")
    ap.add_argument("--matrix", type=int, default=512, help="in-plane pixels of the study")
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    logging.getLogger("volttl.transfer").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_study(tmp, args.matrix, args.slices)
        cfg = config_from_dict({"data": {"manifest": str(manifest), "store": str(tmp / "s.h5")},
                                "train": {"device": args.device},
                                "cam": {"batch_size": args.batch}})
        if preprocess(cfg, progress=False).failed:
            raise SystemExit("preprocessing the benchmark study failed")
        run_dir = tmp / "run"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        model = model_from_config(cfg).model
        save_checkpoint(run_dir / "best.pt", model, config=config_to_dict(cfg), epoch=0)

        spent = {"gradcam": 0.0, "windows": 0}
        original_call = gradcam.WindowGradCAM.__call__

        def timed(self, x):
            t = time.perf_counter()
            out = original_call(self, x)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            spent["gradcam"] += time.perf_counter() - t
            spent["windows"] += len(x)
            return out

        gradcam.WindowGradCAM.__call__ = timed
        import pytorch_grad_cam  # noqa: F401  (a one-time import of ~4 s here, not a per-study cost)

        t0 = time.perf_counter()
        run.cam_run(run_dir, tmp / "cam", progress=False)
        total = time.perf_counter() - t0
        cam_grad, windows = spent["gradcam"], spent["windows"]
        spent.update(gradcam=0.0, windows=0)
        t0 = time.perf_counter()
        predict_run(run_dir, [tmp / "study.nii.gz"], tmp / "predict", progress=False)
        predict_total = time.perf_counter() - t0
    print(f"device: {device_name(torch.device(args.device))}; {args.slices} slices of "
          f"{args.matrix} x {args.matrix}; {windows} windows of 24 x 192 x 192, batch {args.batch}")
    print(f"cam per study: {total:.1f} s; Grad-CAM {cam_grad:.1f} s "
          f"({cam_grad / max(windows, 1):.2f} s/window), the rest "
          f"(mapping back, NIfTI, CT, preview) {total - cam_grad:.1f} s (target <= 3 s on 2 cores)")
    print(f"predict of the same study (read, prepare in memory, score, cam): {predict_total:.1f} s = "
          f"{predict_total / spent['gradcam']:.2f}x its Grad-CAM time {spent['gradcam']:.1f} s "
          "(target <= 1.5x)")


if __name__ == "__main__":
    main()
