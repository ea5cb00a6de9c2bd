"""The search step (`volttl search`): the trials of both stages, then the results table."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from volttl.analysis.complexity import convention, profiled_input
from volttl.config import Config
from volttl.errors import VolttlError
from volttl.models import display_name
from volttl.outputs.folders import SearchDir
from volttl.search.backends import run_jobs
from volttl.search.stages import selection_score, stage1_cuts, stage2_cuts
from volttl.search.trials import Trial, trial_job

log = logging.getLogger("volttl.search")


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
        winners[st] = max((t for t in first if t.strategy == st), key=lambda t: selection_score(done[t]))
        second += [Trial(model, st, c, "2") for c in stage2_cuts(model, winners[st].cut, s.radius, blocks)]
    done.update(_run(cfg, second, out, progress))

    rows = [_row(display_name(t.model), "FTL", done[t]) for t in baselines]
    for st in s.strategies:
        w1 = winners[st]
        rows.append(_row(display_name(model), f"{st.upper()}-1", done[w1]))
        candidates = [w1] + [t for t in second if t.strategy == st]
        w2 = max(candidates, key=lambda t: selection_score(done[t]))
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
