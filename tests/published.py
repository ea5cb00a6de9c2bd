"""Checkpoints in the exact published formats, built from the JSON shape manifests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
MANIFESTS = Path(__file__).resolve().parent / "data"


def shapes(name: str) -> dict[str, list[int]]:
    """Key -> shape, from ../shared/reference, or the copy committed under tests/data."""
    for folder in (REFERENCE, MANIFESTS):
        path = folder / name
        if path.is_file():
            return json.loads(path.read_text())["state_dict"]
    raise FileNotFoundError(name)


def random_state(name: str, seed: int = 0, rename: tuple[str, str] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes(name).items():
        t = torch.randn(shape, generator=g) * 0.05
        if key.endswith("running_var"):
            t = t.abs() + 0.5
        if rename:
            key = key.replace(*rename)
        out[key] = t
    return out


def resnext101_kinetics(path: Path, seed: int = 0) -> dict:
    """As resnext-101-kinetics.pth: {epoch, arch, state_dict (module. keys), optimizer}."""
    state = random_state("resnext101_kinetics400_state_dict_shapes.json", seed)
    torch.save({"epoch": 200, "arch": "resnext-101", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}}, path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def penet_kinetics(path: Path, seed: int = 0, old_names: bool = False, legacy: bool = False) -> dict:
    """As PENet's Kinetics-600 file: {model_state (module. keys), ckpt_info, model_name, ...}.
    ``legacy``: as a PyTorch 0.4-era training script saved it, in the old (non-zip) format
    with a ``functools.partial`` scheduler rule, numpy scalars and optimiser state beside
    the weights, which ``torch.load(weights_only=True)`` refuses."""
    import functools
    import math

    import numpy as np

    rename = (".penet_blocks.", ".xnet_blocks.") if old_names else None
    state = random_state("penet_kinetics600_state_dict_shapes.json", seed, rename)
    payload = {"model_state": state, "ckpt_info": {"epoch": 10, "best_val": 0.5},
               "model_name": "PENetClassifier",
               "model_args": {"model_depth": 50, "cardinality": 32, "num_channels": 3,
                              "num_classes": 600},
               "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}}
    if legacy:
        payload["ckpt_info"] = {"epoch": np.int64(10), "best_val": np.float64(0.5)}
        payload["lr_scheduler"] = {"lr_lambdas": [functools.partial(math.cos, 0.5)], "base_lrs": [0.1]}
        payload["optimizer"] = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                "param_groups": [{"lr": np.float32(0.01), "params": [0]}]}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return {k.removeprefix("module.").replace(".xnet_blocks.", ".penet_blocks."): v
            for k, v in state.items()}
