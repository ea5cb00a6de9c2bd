"""`volttl export --format monai-bundle`: the model package as a MONAI bundle, so the tools
that take MONAI's format (``python -m monai.bundle``, the MONAI Model Zoo, MONAI Label and
MONAI Deploy) run the exported model::

    configs/metadata.json    MONAI's metadata: the network's input and output, the operating
                             point, the intended use, the versions it needs
    configs/inference.json   `python -m monai.bundle run` scores ``input`` (a NIfTI file, a
                             DICOM series folder, or a folder of them) into ``output_dir``
    models/package/          the volttl model package (`volttl export`), checksummed
    docs/README.md           the model card, and how to run the bundle

The bundle imports volttl for the study's preparation and windows (resampling to the
stored grid, the windows, the aggregate), so its probabilities are the ones
`volttl predict` gives; ``network_def`` is the network alone, for
``python -m monai.bundle verify_net_in_out``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from volttl.errors import VolttlError
from volttl.export.package import PackageError, export_run
from volttl.outputs.folders import BundleDir, PackageDir, RunDir

BUNDLE_VERSION = "0.1.0"


def network(package: str | Path) -> torch.nn.Module:
    """The package's network with its weights, in evaluation mode on the CPU: ``(N, 1, D,
    crop, crop)`` intensity-scaled windows -> ``(N, 1)`` logits (the bundle's ``network_def``)."""
    from volttl.export.package import verify_package
    from volttl.inference import TrainedRun

    verify_package(package)
    return TrainedRun.open(package, ["runtime.device=cpu", "runtime.channels_last=false"]).model


def predict(package: str | Path, input: str | Path, output_dir: str | Path, cam: bool = False,
            device: str = "cpu") -> list[dict]:
    """`volttl predict --model` of the bundle's package on ``input``: predictions.csv and
    .json (and the Grad-CAM overlays with ``cam``) in ``output_dir``; the bundle's ``run``.
    A study that could not be read stops the run, naming it."""
    from volttl.predict.step import predict_step

    if isinstance(cam, str):  # from the command line (`--cam true`): a string, whose bool() is always True
        if cam.lower() not in ("true", "false", "1", "0"):
            raise VolttlError(f"--cam {cam!r}: give true or false")
        cam = cam.lower() in ("true", "1")
    if not str(input):
        raise VolttlError("no input: run the bundle with --input PATH (a NIfTI file, a DICOM series folder, "
                          "or a folder of them)")
    records, failed = predict_step(package, [input], output_dir, package=True, cam=bool(cam),
                                   overrides=[f"runtime.device={device}"], progress=False)
    if failed:
        sid, reason = next(iter(failed.items()))
        raise VolttlError(f"{input}: {len(failed)} stud{'y' if len(failed) == 1 else 'ies'} not scored "
                          f"({sid}: {reason})")
    for record in records:
        print(f"{record['study_id']}: p(PE) = {record['probability']:.6f}")
    return records


def _inference_config() -> dict:
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "package": f"$@bundle_root + '/{BundleDir.PACKAGE}'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "input": "",
        "output_dir": "$@bundle_root + '/eval'",
        "cam": False,
        "network_def": {"_target_": "volttl.export.bundle.network", "package": "@package"},
        "run": [{"_target_": "volttl.export.bundle.predict", "package": "@package", "input": "@input",
                 "output_dir": "@output_dir", "cam": "@cam", "device": "@device"}],
    }


def _metadata(card: dict, cfg) -> dict:
    import monai

    from volttl import __version__

    i = card["input"]
    lo, hi = i["hu_clip"]
    shift = i["intensity_shift"]
    point = card["operating_point"]
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported by volttl " + __version__},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"volttl": __version__},
        "name": f"volttl {card['model']['backbone']} {card['model']['strategy'].upper()}",
        "task": "Pulmonary embolism classification of CT pulmonary angiography studies",
        "description": card["intended_use"],
        "intended_use": card["intended_use"],
        "limitations": card["limitations"],
        "authors": "volttl export",
        "copyright": f"see {BundleDir.README}",
        "data_type": "dicom or nifti",
        "image_classes": "one channel: CT in Hounsfield units, resampled by volttl",
        "label_classes": "0: no pulmonary embolism, 1: pulmonary embolism",
        "pred_classes": "the probability of pulmonary embolism of a study (the "
                        f"{i['aggregate']} over its windows), and a call at the operating point",
        "operating_point": point,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": [i["window_slices"], i["crop"], i["crop"]], "dtype": "float32",
                "value_range": [-shift, 1.0 - shift], "is_patch_data": True,
                "channel_def": {"0": f"{i['window_slices']} slices of {i['slice_thickness_mm']} mm, "
                                     f"stored at {i['stored_size']} px and centre-cropped to {i['crop']}; "
                                     f"HU clipped to [{lo}, {hi}], scaled to [0, 1], minus {shift}"}}},
            "outputs": {"pred": {
                "type": "logits", "format": "classification", "num_channels": 1, "spatial_shape": [1],
                "dtype": "float32", "value_range": [], "is_onehot": False,
                "channel_def": {"0": "logit of pulmonary embolism in the window (sigmoid: probability)"}}},
        },
        "volttl": {"window_slices": cfg.preprocess.window, "aggregate": cfg.eval.aggregate},
    }


def _readme(card_md: str) -> str:
    return card_md + """
## Running the bundle

Needs volttl installed (the version in `configs/metadata.json`, installed from its source as
its README says), which brings MONAI, nibabel, pydicom and SimpleITK.

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --input STUDY --output_dir OUT

`STUDY` is a NIfTI file, a DICOM series folder, or a folder of them; `OUT` gets
predictions.csv and predictions.json as `volttl predict` writes them (add `--cam true` for
the Grad-CAM overlays). The network alone (`network_def`: intensity-scaled windows to logits) is
checked with

    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
        --config_file configs/inference.json
"""


def export_bundle(run_dir: str | Path, out: str | Path, seed: int | None = None) -> Path:
    """Write the run's model package as a MONAI bundle to the new folder ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"{out}: exists and is not empty; export into a new folder")
    made = not out.exists()
    bundle = BundleDir(out)
    package = PackageDir(export_run(run_dir, bundle.package, seed=seed))
    files = (bundle.metadata, bundle.inference, bundle.readme)
    try:
        card = json.loads(package.card_json.read_text(encoding="utf-8"))
        cfg = RunDir(package.path).read_config()
        texts = (json.dumps(_metadata(card, cfg), indent=2), json.dumps(_inference_config(), indent=2),
                 _readme(package.card_md.read_text(encoding="utf-8")))
        for path, text in zip(files, texts, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + ("\n" if not text.endswith("\n") else ""), encoding="utf-8")
    except BaseException:  # no half-written bundle left behind
        shutil.rmtree(out if made else out / BundleDir.PACKAGE.split("/")[0], ignore_errors=True)
        for path in files:
            path.unlink(missing_ok=True)
        raise
    return out
