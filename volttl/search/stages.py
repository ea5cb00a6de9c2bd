"""`volttl search`: the TTL paper's hierarchical cut-point search (section 3.2) and its
results table (Table 2).

Stage 1 trains each configured strategy at every block cut and keeps the one with the
best validation study AUROC (mean over repeats). Stage 2 trains the layer cuts within
``search.radius`` blocks (bottlenecks) of that winner, and the best of the winner and
those is the two-stage result. FTL of the configured backbone and FTL of PENet are the
baselines. The table reports each on the test split, mean +- std over the repeats, with
the architecture's P(M), MACs(G) and T(ms) at ``profile.input_size``: "-1" rows are
the block search alone, "-2" rows the two stages.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from volttl.analysis.complexity import convention, profiled_input
from volttl.config import Config
from volttl.errors import VolttlError
from volttl.models import display_name, get_backbone_spec
from volttl.outputs import SearchDir
from volttl.search.backends import run_jobs
from volttl.search.trials import Trial, trial_job

log = logging.getLogger("volttl.search")


def _score(result: dict) -> float:
    value = result["val_study_auroc"]["mean"]
    return -math.inf if value is None or math.isnan(value) else value


def stage1_cuts(model: str, configured: list[str]) -> list[str]:
    spec = get_backbone_spec(model)
    names = [c.name for c in spec.cut_points() if c.level == "block"]
    for name in configured:
        spec.cut_point(name)  # a clear error for a cut the backbone does not have
    return list(configured) or names


def stage2_cuts(model: str, winner: str, radius: int, trained: list[str] = ()) -> list[str]:
    """Layer cuts within ``radius`` units (blocks) of the stage-1 winner, in network order,
    leaving out those equal to a cut already trained (``layer1.2`` is ``layer1``)."""
    spec = get_backbone_spec(model)
    keep = spec.cut_point(winner).keep
    seen = {spec.cut_point(name).keep for name in [winner, *trained]}
    return [c.name for c in spec.cut_points()
            if c.level == "layer" and abs(c.keep - keep) <= radius and c.keep not in seen]


def _run(cfg: Config, trials: list[Trial], out: Path, progress: bool) -> dict[Trial, dict]:
    jobs = [trial_job(cfg, t, out) for t in trials]
    s = cfg.search
    results = run_jobs(jobs, s.backend, s.gpus, s.ray_address, s.ray_gpus_per_trial, progress)
    return dict(zip(trials, results, strict=True))


def _row(label_model: str, strategy: str, r: dict) -> dict:
    a, p = r["test_study_auroc"], r["test_study_auprc"]
    return {"model": label_model, "strategy": strategy, "cut": r["cut"] or "-",
            "auroc_mean": a["mean"], "auroc_std": a["std"], "auprc_mean": p["mean"], "auprc_std": p["std"],
            "val_auroc_mean": r["val_study_auroc"]["mean"], "params_m": r["params_m"],
            "macs_g": r["macs_g"], "latency_ms": r["latency_ms"], "repeats": len(r["seeds"]),
            "dir": r["dir"]}


def search_step(cfg: Config, progress: bool = True) -> list[dict]:
    """`volttl search` and a pipeline's ``search`` step: run (or resume) the whole search;
    writes search_table.{md,csv,json} and trials.csv."""
    s, model = cfg.search, cfg.model.name
    unknown = [x for x in s.strategies if x not in ("tf", "lwft", "ttl")]
    if unknown:
        raise VolttlError(f"search.strategies: {', '.join(unknown)} (use tf, lwft, ttl)")
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baselines = []
    for b in s.baselines:
        if b == "ftl":
            baselines.append(Trial(model, "ftl", "", "baseline"))
        elif b == "penet":
            if not s.penet_pretrained:
                log.warning("search.penet_pretrained is empty: the PENet baseline starts from scratch")
            baselines.append(Trial("penet", "ftl", "", "baseline"))
        else:
            raise VolttlError(f"search.baselines: '{b}' is not one of ftl, penet")
    blocks = stage1_cuts(model, s.block_cuts)
    first = [Trial(model, st, c, "1") for st in s.strategies for c in blocks]
    done = _run(cfg, baselines + first, out, progress)
    second: list[Trial] = []
    winners = {}
    for st in s.strategies:
        winners[st] = max((t for t in first if t.strategy == st), key=lambda t: _score(done[t]))
        second += [Trial(model, st, c, "2") for c in stage2_cuts(model, winners[st].cut, s.radius, blocks)]
    done.update(_run(cfg, second, out, progress))

    rows = [_row(display_name(t.model), "FTL", done[t]) for t in baselines]
    for st in s.strategies:
        w1 = winners[st]
        rows.append(_row(display_name(model), f"{st.upper()}-1", done[w1]))
        candidates = [w1] + [t for t in second if t.strategy == st]
        w2 = max(candidates, key=lambda t: _score(done[t]))
        rows.append(_row(display_name(model), f"{st.upper()}-2", done[w2]))
    _write_table(rows, out, cfg)
    with SearchDir(out).trials_csv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "stage", "model", "strategy", "cut", "val_auroc_mean", "test_auroc_mean",
                    "test_auroc_std", "params_m", "macs_g", "latency_ms"])
        for t, r in done.items():
            w.writerow([t.name, t.stage, t.model, t.strategy, t.cut or "-",
                        f"{r['val_study_auroc']['mean']:.4f}", f"{r['test_study_auroc']['mean']:.4f}",
                        f"{r['test_study_auroc']['std']:.4f}", f"{r['params_m']:.3f}", f"{r['macs_g']:.3f}",
                        f"{r['latency_ms']:.2f}"])
    return rows


def _write_table(rows: list[dict], out: Path, cfg: Config) -> None:
    split = cfg.search.test_split
    n = max(r["repeats"] for r in rows)
    lines = [f"Study-level {split} AUROC and AUPRC, mean +- std over {n} repeat(s); P(M), MACs(G) and "
             f"T(ms) at input (C x D x H x W) {profiled_input(cfg)}, batch 1, on {cfg.profile.device}; "
             f"{convention(cfg)}. "
             "-1: block search only; -2: block then layer search.", "",
             "| model | strategy | cut | AUROC | AUPRC | P(M) | MACs(G) | T(ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['strategy']} | {r['cut']} | {r['auroc_mean']:.3f} +- "
                     f"{r['auroc_std']:.3f} | {r['auprc_mean']:.3f} +- {r['auprc_std']:.3f} | "
                     f"{r['params_m']:.1f} | {r['macs_g']:.2f} | {r['latency_ms']:.1f} |")
    folder = SearchDir(out)
    folder.table_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder.table_json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with folder.table_csv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
