"""Shared fixtures: a small synthetic cohort, and the optional ../shared folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from volttl.config import config_from_dict
from volttl.synth.cohort import synth_cohort

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Six synthetic studies (DICOM and NIfTI, one rotated grid, one scout); the manifest."""
    out = tmp_path_factory.mktemp("cohort")
    return synth_cohort(out, studies=6, seed=3, matrix=96, progress=False)


def small_config(manifest: Path, store: Path, **preprocess):
    settings = {"slice_thickness": 2.0, "size": 48, "window": 8, "train_stride": 4,
                "min_pe_slices": 2, "workers": 1, **preprocess}
    return config_from_dict({"data": {"manifest": str(manifest), "store": str(store)},
                             "preprocess": settings})


def train_tiny_run(manifest: Path, folder: Path, cut: str = "stem") -> tuple[Path, Path]:
    """Through the CLI: preprocess ``manifest`` into ``folder`` and train a ResNeXt3D-50
    TTL model cut at ``cut`` for one epoch; returns the config file and the run dir."""
    from volttl.cli import main
    from volttl.config import config_to_yaml

    cfg = small_config(manifest, folder / "s.h5")
    cfg.data.crop = 32
    cfg.train.epochs, cfg.train.batch_size, cfg.runtime.workers, cfg.eval.bootstrap = 1, 4, 0, 0
    cfg.model.name, cfg.transfer.strategy, cfg.transfer.cut = "resnext3d_50", "ttl", cut
    path = folder / "t.yaml"
    path.write_text(config_to_yaml(cfg))
    assert main(["preprocess", "--config", str(path), "--quiet"]) == 0
    run = folder / "run"
    assert main(["train", "--config", str(path), "--run-dir", str(run), "--quiet"]) == 0
    return path, run
