"""The svcca step (`volttl svcca --run RUN`): where does feature reuse stop? (TTL paper, section 3.3 and
Appendix C.1.)

At every cut point the trained model still has, SVCCA between the features of the
model before finetuning (the pretrained weights, or the run's own initialisation when
it had none: rebuilt from the run's config and seed exactly as training built it) and
after finetuning (the run's ``best.pt``), on validation windows (the "before" model's
BatchNorm statistics re-estimated on those windows when its weights are pretrained,
unless ``transfer.frozen_bn: eval``); beside it, SVCCA
between two independent random feature sets with the same points and the same kept
dimensions. The suggested cut is the first cut point whose coefficient distribution
overlaps the random one by at least ``threshold`` (see :mod:`volttl.analysis.svcca`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volttl.analysis.svcca import feature_points, overlap, random_baseline, suggest_cut, svcca
from volttl.data import WindowDataset
from volttl.errors import VolttlError
from volttl.inference import load_run, model_from_config
from volttl.models import get_backbone_spec
from volttl.models.surgery import freeze_upto, recalibrate_frozen_norms
from volttl.numerics import resolve_device
from volttl.outputs.folders import RunDir, SvccaDir
from volttl.outputs.provenance import file_stamp, forget_inputs, made_from, record_inputs
from volttl.progress import progress_bar

log = logging.getLogger("volttl.analysis")


def _model_before(run_dir: Path) -> torch.nn.Module:
    cfg = RunDir(run_dir).read_config()
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise FileNotFoundError(f"{cfg.model.pretrained}: the run's pretrained checkpoint is not there")
    torch.manual_seed(cfg.train.seed)  # as training does before building the model
    return model_from_config(cfg).model


def collect_features(models: list[torch.nn.Module], ds: WindowDataset, keeps: list[int], windows: int,
                     max_points: int, batch_size: int = 4, seed: int = 0, progress: bool = True,
                     device: torch.device | None = None) -> list[dict[int, np.ndarray]]:
    """``(points, channels)`` features at each unit count in ``keeps`` for each model (on
    ``device``, default the CPU), at the same randomly chosen positions of ``windows``
    evenly spread windows."""
    picks = np.unique(np.linspace(0, len(ds) - 1, min(windows, len(ds))).astype(int))
    per_window = max(1, max_points // len(picks))
    rng = np.random.default_rng(seed)
    out: list[dict[int, list[np.ndarray]]] = [{k: [] for k in keeps} for _ in models]
    for m in models:
        m.eval()
    for b in progress_bar(range(0, len(picks), batch_size), desc="svcca features", unit="batch",
                  disable=not progress):
        x = torch.stack([ds[int(i)][0] for i in picks[b: b + batch_size]]).to(device or "cpu")
        with torch.no_grad():
            outputs = [m.unit_outputs(x) for m in models]
        for k in keeps:
            fmap = outputs[0][k - 1]
            positions = int(np.prod(fmap.shape[2:]))
            choice = np.concatenate([
                i * positions + rng.choice(positions, min(per_window, positions), replace=False)
                for i in range(len(x))])
            for store, outs in zip(out, outputs, strict=True):
                store[k].append(feature_points(outs[k - 1].float().cpu().numpy(), choice))
    return [{k: np.concatenate(v) for k, v in d.items()} for d in out]


@dataclass
class SvccaOutcome:
    """What the svcca step did: the run measured, its ``svcca.json`` record, and whether
    an earlier record made from the same inputs was kept."""

    run: Path
    out: Path
    record: dict
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {SvccaDir(self.out).record.name} exists"
        return f"suggested cut {self.record['suggested_cut']}"


def svcca_step(run_dir: str | Path, out: str | Path | None = None, split: str = "val", windows: int = 64,
               max_points: int = 8192, level: str = "block", threshold: float = 0.5, keep: float = 0.99,
               cuts: list[str] | None = None, progress: bool = True, seed: int | None = None,
               reuse: bool = False, device: str | None = None) -> SvccaOutcome:
    """`volttl svcca` and a pipeline's ``svcca`` step: ``svcca.json`` and ``svcca.png`` for
    one run, in ``out`` (default ``<run>/svcca``). ``seed`` picks a repeat group's run (a
    group without one is refused naming its seeds); with ``reuse`` (pipelines) a record made
    from the same inputs (the run, its best.pt, these options) is kept as it is. ``device``:
    where the two models run (default: the run's ``runtime.device``, auto: a GPU if there is
    one)."""
    run = RunDir(run_dir).one_run(seed)
    folder = SvccaDir(Path(out) if out else run.path / "svcca")
    inputs = {"run": str(run.path), "checkpoint": file_stamp(run.best), "split": split, "windows": windows,
              "max_points": max_points, "level": level, "threshold": threshold, "keep": keep,
              "cuts": list(cuts) if cuts else None}
    if reuse and made_from(folder.record, inputs):
        record = json.loads(folder.record.read_text(encoding="utf-8"))
        return SvccaOutcome(run.path, folder.path, record, skipped=True)
    forget_inputs(folder.record)
    where = resolve_device(device or run.read_config().runtime.device)
    record = measure_reuse(run.path, folder.path, split, windows, max_points, level, threshold, keep, cuts,
                           progress, where)
    record_inputs(folder.record, inputs)
    return SvccaOutcome(run.path, folder.path, record)


def measure_reuse(run_dir: Path, out: Path, split: str, windows: int, max_points: int, level: str,
                  threshold: float, keep: float, cuts: list[str] | None, progress: bool,
                  device: torch.device | None = None) -> dict:
    """SVCCA before vs after finetuning at the chosen cut points of a run; writes
    ``svcca.json`` and ``svcca.png`` to ``out`` and returns the JSON record."""
    run_dir = Path(run_dir)
    if level not in ("block", "layer", "all"):
        raise VolttlError(f"level '{level}' is not one of block, layer, all")
    device = device or torch.device("cpu")
    cfg, after = load_run(run_dir)
    before, after = _model_before(run_dir).to(device), after.to(device)
    spec = get_backbone_spec(cfg.model.name)
    wanted = [spec.cut_point(name) for name in cuts] if cuts else [
        c for c in spec.cut_points() if level == "all" or c.level == level]
    cuts = [c for c in wanted if c.keep <= len(after.units)]
    if not cuts:
        raise VolttlError(f"{run_dir}: the trained model keeps none of the requested cut points")
    ds = WindowDataset.from_config(cfg, split, train=False)
    if cfg.model.pretrained and cfg.transfer.frozen_bn != "eval":
        # pretrained BatchNorm statistics come from the source data (video frames): on CT
        # they would squash every window to the same features, so the "before" model's
        # statistics are re-estimated on the windows compared, as transfer.frozen_bn says
        freeze_upto(before, len(before.units), "recalibrate")
        picks = np.unique(np.linspace(0, len(ds) - 1, min(windows, len(ds))).astype(int))
        recalibrate_frozen_norms(before, (torch.stack([ds[int(i)][0] for i in picks[b: b + 8]]).to(device)
                                          for b in range(0, len(picks), 8)))
    keeps = sorted({c.keep for c in cuts})
    feats_before, feats_after = collect_features([before, after], ds, keeps, windows, max_points,
                                                 progress=progress, device=device)
    rows = []
    for i, cut in enumerate(cuts):
        x, y = feats_before[cut.keep], feats_after[cut.keep]
        coeffs, dims = svcca(x, y, keep, return_dims=True)
        base = random_baseline(len(x), dims, keep=1.0, seed=i)
        if len(x) < 10 * max(dims):
            log.warning("%s: %d points for %d dimensions; CCA coefficients drift towards 1 when points "
                        "do not far outnumber dimensions (more --windows or --max-points)",
                        cut.name, len(x), max(dims))
        rows.append({"cut": cut.name, "level": cut.level, "channels": cut.channels, "points": len(x),
                     "kept_dims": list(dims), "mean": float(coeffs.mean()) if len(coeffs) else float("nan"),
                     "random_mean": float(base.mean()) if len(base) else float("nan"),
                     "overlap": overlap(coeffs, base),
                     "coefficients": [round(float(v), 5) for v in coeffs],
                     "random": [round(float(v), 5) for v in base]})
    suggested = suggest_cut([r["cut"] for r in rows], [r["overlap"] for r in rows], threshold)
    record = {"run": str(run_dir), "split": split, "windows": min(windows, len(ds)), "keep_variance": keep,
              "overlap_measure": "overlapping coefficient of the two histograms on [0, 1], 20 bins",
              "threshold": threshold, "suggested_cut": suggested, "cuts": rows}
    out.mkdir(parents=True, exist_ok=True)
    SvccaDir(out).record.write_text(json.dumps(record, indent=2), encoding="utf-8")
    _plot(rows, suggested, SvccaDir(out).plot, f"{cfg.model.name} {cfg.transfer.strategy.upper()}: "
          "before vs after finetuning, and random features")
    return record


def _plot(rows: list[dict], suggested: str | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4))
    pos = np.arange(len(rows))
    learned = ax.boxplot([r["coefficients"] or [np.nan] for r in rows], positions=pos - 0.18, widths=0.3,
                         patch_artist=True, showfliers=False)
    random = ax.boxplot([r["random"] or [np.nan] for r in rows], positions=pos + 0.18, widths=0.3,
                        patch_artist=True, showfliers=False)
    for box in learned["boxes"]:
        box.set_facecolor("tab:blue")
    for box in random["boxes"]:
        box.set_facecolor("lightgrey")
    ax.set_xticks(pos, [r["cut"] for r in rows], rotation=45, ha="right")
    for i, r in enumerate(rows):
        if r["cut"] == suggested:
            ax.axvspan(i - 0.45, i + 0.45, color="tab:green", alpha=0.15)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("SVCCA coefficient")
    ax.set_title(title, fontsize=9)
    ax.legend([learned["boxes"][0], random["boxes"][0]], ["before vs after", "random baseline"],
              loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
