"""`volttl pipeline FILE.yaml`: a whole study (data, search, analysis, report) as data.

A pipeline file names a base config, overrides for it, a work folder and the steps::

    workdir: ../pipeline_runs/demo_table   # relative to this file
    config: ../volttl/resources/demo.yaml  # relative to this file
    set:                                   # --set style overrides; relative paths in
      - data.store=store/demo.h5           # them resolve against workdir
    steps:
      - synth: {studies: 160, matrix: 96}
      - preprocess: {}
      - search: {}
      - svcca: {windows: 64}
      - cam: {row: TTL-2}
      - report: {}

Steps run in order, and each is skipped when its outputs are already there and were made
from the same inputs (synth, manifest: the manifest, made with the same step options;
pretrain: the checkpoint, made with the same pretrain settings; preprocess: finished
studies, by the store itself; train: finished epochs, resumed, with the run's own
training settings and data; search: finished trials, likewise; svcca, cam: svcca.json and
cam_summary.json, made with the same options from the same checkpoint, and for cam the same
operating point); `evaluate` and
`report` are always rewritten. So a killed pipeline is rerun with the same command. An
output made from other inputs is made again (svcca, cam) or, where later steps were
built on it (synth, manifest, pretrain) or it is a run, stops the pipeline with one line.
``train: {run: runs/x}`` trains one run (``train.repeats`` seeds) in the work folder;
`evaluate`, `svcca` and `cam` then use it unless they name a search-table ``row``; `svcca`
and `cam` take the ``train.seed`` run of a repeat group. Each step is the function the
command of the same name runs (``*_step``); this module only chooses their inputs.
`volttl demo` is the packaged pipeline ``resources/demo_pipeline.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from volttl.config import PATH_KEYS, Config, apply_overrides, config_from_dict, config_to_dict, load_yaml
from volttl.errors import VolttlError
from volttl.outputs.folders import CamDir, CompareDir, PipelineDir, SearchDir
from volttl.outputs.provenance import MadeFromOtherInputs

log = logging.getLogger("volttl.pipeline")
STEPS = ("synth", "manifest", "preprocess", "pretrain", "train", "evaluate", "search", "compare", "svcca",
         "cam", "report")


class PipelineError(VolttlError):
    """A pipeline file problem; the message names the file."""


def _read_yaml(path: Path, what: str):
    """A YAML file through the safe loader; a syntax error or a ``!!python`` tag is one line."""
    try:
        return load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PipelineError(f"{path}: not a valid {what} ({first})") from None


def load_pipeline(path: str | Path) -> tuple[dict, Path, Config]:
    """The pipeline spec, its work folder and its resolved config."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PipelineError(f"{path}: pipeline file not found")
    spec = _read_yaml(path, "pipeline file")
    if not isinstance(spec, dict):
        raise PipelineError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - {"name", "workdir", "config", "set", "steps"}
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("workdir", "config", "steps"):
        if key not in spec:
            raise PipelineError(f"{path}: missing '{key}'")
    work = (path.parent / spec["workdir"]).resolve()
    config_path = (path.parent / spec["config"]).resolve()
    if not config_path.is_file():
        raise PipelineError(f"{path}: config {config_path} not found")
    for step in spec["steps"]:
        name = next(iter(step)) if isinstance(step, dict) and len(step) == 1 else None
        if name not in STEPS:
            raise PipelineError(f"{path}: step {step!r} is not one of {', '.join(STEPS)}")
    raw = _read_yaml(config_path, "config")
    overrides = list(spec.get("set") or [])
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw, config_path.parent)
    # paths the pipeline sets are relative to its work folder
    for item in overrides:
        dotted, _, text = item.partition("=")
        section, _, key = dotted.partition(".")
        value = str(load_yaml(text) or "")
        if (section, key) in PATH_KEYS and value and not Path(value).expanduser().is_absolute():
            setattr(getattr(cfg, section), key, str(work / value))
    return spec, work, cfg


def _step_run(cfg: Config, work: Path, args: dict, report: dict, default_row: str) -> tuple[str, Path]:
    """The run a step works on, and how to name it: ``run`` (relative to the work folder),
    a search-table ``row``, the run of an earlier ``train`` step, or ``default_row``."""
    if "run" in args:
        return str(args["run"]), work / str(args["run"])
    if "row" not in args and "run" in report:
        return report["run"]["name"], Path(report["run"]["dir"])
    label = args.get("row", default_row)
    row, run = _table_run(cfg, label)
    return f"{label} ({row['cut'] or 'full'})", run


def _table_run(cfg: Config, label: str) -> tuple[dict, Path]:
    """The search table's row ``label`` (e.g. "TTL-2") and its first seed's run dir."""
    table = SearchDir(cfg.search.out_dir).table_json
    if not table.is_file():
        raise PipelineError(f"{table}: no search table yet (a search step must come first)")
    for row in json.loads(table.read_text(encoding="utf-8")):
        if row["strategy"] == label:
            return row, Path(row["dir"]) / f"seed{cfg.train.seed}"
    raise PipelineError(f"{table}: no '{label}' row")


def run_pipeline(path: str | Path, progress: bool = True) -> Path | None:
    """Run every step; returns the path of the report it wrote (None without a report step)."""
    spec, work, cfg = load_pipeline(path)
    work.mkdir(parents=True, exist_ok=True)
    PipelineDir(work).resolved_config.write_text(yaml.safe_dump(
        {"pipeline": str(Path(path).resolve()), **spec}, sort_keys=False), encoding="utf-8")
    report: dict = {"name": spec.get("name", Path(path).stem), "steps": []}
    t_start = time.perf_counter()
    for step in spec["steps"]:
        (name, args), = step.items()
        args = args or {}
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            outcome = _STEP_FUNCS[name](cfg, work, args, progress, report)
        except MadeFromOtherInputs as exc:  # a pipeline's own stop, as every pipeline problem is
            raise PipelineError(str(exc)) from None
        report["steps"].append({"step": name, "outcome": outcome,
                                "seconds": round(time.perf_counter() - t0, 1)})
        print(f"   {outcome}", flush=True)
    report["minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    PipelineDir(work).report_json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    # report.md only when this pipeline has a report step: one left by an earlier pipeline
    # in the same work folder would be stale
    return PipelineDir(work).report_md if any("report" in step for step in spec["steps"]) else None


def _synth(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.synth.step import synth_step

    manifest = Path(cfg.data.manifest)
    return synth_step(manifest.parent, int(args.get("studies", 40)), int(args.get("seed", 0)),
                      int(args.get("matrix", 160)), int(args.get("workers", cfg.preprocess.workers)),
                      progress=progress, reuse=True).summary()


def _manifest(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """``manifest: {format: penet|rsna|csv, ...}`` with `volttl manifest`'s options as keys."""
    from volttl.manifests.step import manifest_step

    options = dict(args)
    fmt = options.pop("format", "penet")
    # recorded as the pipeline file gives them, as before, so a workdir made earlier is kept
    return manifest_step(cfg.data.manifest, fmt, options, reuse=True, recorded=dict(args)).summary()


def _preprocess(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.preprocess.step import preprocess_step

    summary = preprocess_step(cfg, progress=progress)
    if summary.failed:
        raise PipelineError(f"preprocess: {summary.line()}")
    return summary.line() + (f"; {summary.adjusted_line()}" if summary.adjusted else "")


def _pretrain(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """The synthetic source-task checkpoint at ``pretrain.out`` (kept when made with the
    same settings)."""
    from volttl.pretrain.step import pretrain_step

    outcome = pretrain_step(cfg, progress=progress, reuse=True)
    if outcome.result is not None:
        report["pretrain"] = outcome.result
    return outcome.summary()


def _train(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """Train one run (all ``train.repeats`` seeds), resuming whatever a kill interrupted."""
    from volttl.outputs.folders import RunDir
    from volttl.train.step import train_step

    name = str(args.get("run", "runs/run"))
    run = RunDir(work / name)
    report["run"] = {"name": name, "dir": str(run.path)}
    if cfg.train.repeats > 1:
        report["run"]["first_seed"] = str(run.seed(cfg.train.seed).path)
    outcome = train_step(cfg, run.path, resume=run.path.is_dir(), progress=progress, reuse_finished=True)
    return outcome.summary() if outcome.skipped else f"{name}: {outcome.summary()}"


def _evaluate(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """Metrics of the run on ``split`` (default test), rewritten every time."""
    from volttl.evaluate.step import evaluate_step
    from volttl.outputs.folders import RunDir

    name, path = _step_run(cfg, work, args, report, "FTL")
    split = args.get("split", "test")
    run = RunDir(path)
    metrics = evaluate_step(path, split)
    table = run.metrics_md(split).read_text(encoding="utf-8").strip()
    report["evaluate"] = {"run": name, "split": split, "table": table,
                          "study_auroc": metrics["study_auroc"], "studies": metrics.get("studies")}
    if "operating_point" in metrics:  # a single run (a repeat group reports per seed in its table)
        report["evaluate"]["operating_point"] = metrics["operating_point"]
        report["evaluate"]["ece"] = metrics["calibration"].get("ece")
    auroc = metrics["study_auroc"]
    auroc = auroc["mean"] if isinstance(auroc, dict) else auroc  # a repeat group: the mean over seeds
    return f"{name} on {split}: study AUROC {auroc:.3f} (the whole table is in the report)"


def _search(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.search.step import search_step

    rows = search_step(cfg, progress=progress)
    report["table"] = SearchDir(cfg.search.out_dir).table_md.read_text(encoding="utf-8")
    report["table_rows"] = rows
    return f"{len(rows)} table rows in {SearchDir(cfg.search.out_dir).table_md}"


def _compare(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """``compare: {rows: [scratch, ftl, ttl@layer2], train_studies: [10, 20], curve_rows: [...]}``:
    the transfer comparison into ``<workdir>/<out>`` (default compare)."""
    from volttl.analysis.compare import compare_step

    if not args.get("rows"):
        raise PipelineError("compare: give its rows, e.g. rows: [scratch, ftl, ttl@layer2]")
    outcome = compare_step(cfg, list(args["rows"]), work / str(args.get("out", "compare")),
                           curve_rows=args.get("curve_rows"), train_studies=args.get("train_studies"),
                           resamples=int(args.get("resamples", 2000)), progress=progress)
    report["compare"] = {"table": CompareDir(outcome.folder).table_md.read_text(encoding="utf-8"),
                         "rows": outcome.table, "curve": outcome.curve,
                         "curve_png": str(CompareDir(outcome.folder).curve_png) if outcome.curve else None}
    return outcome.summary()


def _svcca(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """SVCCA of the run (``train.seed``'s of a repeat group) into ``<workdir>/svcca``."""
    from volttl.analysis.step import svcca_step

    _, run = _step_run(cfg, work, args, report, "FTL")
    outcome = svcca_step(run, work / "svcca", windows=int(args.get("windows", 64)),
                         max_points=int(args.get("max_points", 8192)), level=args.get("level", "block"),
                         cuts=args.get("cuts"), progress=progress, seed=cfg.train.seed, reuse=True,
                         device=cfg.runtime.device)
    rec, keys = outcome.record, ("cut", "mean", "random_mean", "overlap")
    report["svcca"] = {"run": str(outcome.run), "suggested_cut": rec["suggested_cut"],
                       "cuts": [{k: r[k] for k in keys} for r in rec["cuts"]]}
    return outcome.summary()


def _cam(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    """Overlays of the run (``train.seed``'s of a repeat group) with the pipeline's cam
    settings, not those the run was trained with."""
    from volttl.explain.step import cam_step

    name, run = _step_run(cfg, work, args, report, "TTL-2")
    out = work / str(args.get("out", "cam"))
    overrides = [f"cam.{k}={json.dumps(v)}" for k, v in config_to_dict(cfg)["cam"].items()]
    result = cam_step(run, out, split=args.get("split", "test"), overrides=overrides, progress=progress,
                      seed=cfg.train.seed, reuse=True)
    records = result.records
    outcome = result.summary() if result.skipped else f"{len(records)} overlays of {name} in {out}"
    report["cam"] = {"row": name, "run": str(result.run), "out": str(out), "overlays": len(records)}
    found = CamDir(out).localisation  # written by cam when the manifest has lesion masks
    if found.is_file():
        report["cam"]["localisation"] = json.loads(found.read_text(encoding="utf-8"))["summary"]
        outcome += f"\n   {report['cam']['localisation']}"
    return outcome


def _report(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.pipeline.report import report_step

    return f"wrote {report_step(work, report)}"


_STEP_FUNCS = {"synth": _synth, "manifest": _manifest, "preprocess": _preprocess, "pretrain": _pretrain,
               "train": _train, "evaluate": _evaluate, "search": _search, "compare": _compare,
               "svcca": _svcca, "cam": _cam, "report": _report}
