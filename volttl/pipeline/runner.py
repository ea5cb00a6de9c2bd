"""`volttl pipeline FILE.yaml`: a whole study (data, search, analysis, report) as data.

A pipeline file names a base config, overrides for it, a work folder and the steps::

    workdir: ../pipeline_runs/demo_table   # relative to this file
    config: ../configs/demo.yaml           # relative to this file
    set:                                   # --set style overrides; relative paths in
      - data.store=store/demo.h5           # them resolve against workdir
    steps:
      - synth: {studies: 160, matrix: 96}
      - preprocess: {}
      - search: {}
      - svcca: {windows: 64}
      - cam: {row: TTL-2}
      - report: {}

Steps run in order, and each is skipped when its outputs are already there (synth: the
manifest; manifest: the manifest; preprocess: finished studies, by the store itself;
search: finished trials; svcca: svcca.json; cam: cam_summary.json); `report` is always
rewritten. So a killed pipeline is rerun with the same command.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from volttl.config import PATH_KEYS, Config, apply_overrides, config_from_dict
from volttl.errors import VolttlError

log = logging.getLogger("volttl.pipeline")
STEPS = ("synth", "manifest", "preprocess", "search", "svcca", "cam", "report")


class PipelineError(VolttlError):
    """A pipeline file problem; the message names the file."""


def load_pipeline(path: str | Path) -> tuple[dict, Path, Config]:
    """The pipeline spec, its work folder and its resolved config."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PipelineError(f"{path}: pipeline file not found")
    spec = yaml.safe_load(path.read_text()) or {}
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
    raw = yaml.safe_load(config_path.read_text()) or {}
    overrides = list(spec.get("set") or [])
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw, config_path.parent)
    # paths the pipeline sets are relative to its work folder
    for item in overrides:
        dotted, _, text = item.partition("=")
        section, _, key = dotted.partition(".")
        value = str(yaml.safe_load(text) or "")
        if (section, key) in PATH_KEYS and value and not Path(value).expanduser().is_absolute():
            setattr(getattr(cfg, section), key, str(work / value))
    return spec, work, cfg


def _table_run(cfg: Config, label: str) -> tuple[dict, Path]:
    """The search table's row ``label`` (e.g. "TTL-2") and its first seed's run dir."""
    table = Path(cfg.search.out_dir) / "search_table.json"
    if not table.is_file():
        raise PipelineError(f"{table}: no search table yet (a search step must come first)")
    for row in json.loads(table.read_text()):
        if row["strategy"] == label:
            return row, Path(row["dir"]) / f"seed{cfg.train.seed}"
    raise PipelineError(f"{table}: no '{label}' row")


def run_pipeline(path: str | Path, progress: bool = True) -> Path:
    """Run every step; returns the report's path."""
    spec, work, cfg = load_pipeline(path)
    work.mkdir(parents=True, exist_ok=True)
    (work / "pipeline_config.yaml").write_text(yaml.safe_dump(
        {"pipeline": str(Path(path).resolve()), **spec}, sort_keys=False))
    report: dict = {"name": spec.get("name", Path(path).stem), "steps": []}
    t_start = time.perf_counter()
    for step in spec["steps"]:
        (name, args), = step.items()
        args = args or {}
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        outcome = _STEP_FUNCS[name](cfg, work, args, progress, report)
        report["steps"].append({"step": name, "outcome": outcome,
                                "seconds": round(time.perf_counter() - t0, 1)})
        print(f"   {outcome}", flush=True)
    report["minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return work / "report.md"


def _synth(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.synth import synth_cohort

    manifest = Path(cfg.data.manifest)
    if manifest.is_file():
        return f"skipped: {manifest} exists"
    synth_cohort(manifest.parent, studies=int(args.get("studies", 40)), seed=int(args.get("seed", 0)),
                 matrix=int(args.get("matrix", 160)), progress=progress,
                 workers=int(args.get("workers", cfg.preprocess.workers)))
    return f"wrote {args.get('studies', 40)} synthetic studies"


def _manifest(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.manifests import write_manifest

    manifest = Path(cfg.data.manifest)
    if manifest.is_file():
        return f"skipped: {manifest} exists"
    kind = args.get("format", "penet")
    if kind == "penet":
        from volttl.manifests.penet import load_series_list, penet_filter, penet_rows

        rows = penet_rows(penet_filter(load_series_list(args["series_list"])), args["hdf5"])
    elif kind == "rsna":
        from volttl.manifests.rsna import rsna_rows

        rows = rsna_rows(args["root"], args.get("csv"))
    else:
        raise PipelineError(f"manifest step: format '{kind}' is not one of penet, rsna")
    write_manifest(rows, manifest)
    return f"wrote {len(rows)} studies to {manifest}"


def _preprocess(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.preprocess.run import preprocess

    summary = preprocess(cfg, progress=progress)
    if summary.failed:
        raise PipelineError(f"preprocess: {summary.line()}")
    return summary.line()


def _search(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.search import search_run

    rows = search_run(cfg, progress=progress)
    report["table"] = (Path(cfg.search.out_dir) / "search_table.md").read_text()
    report["table_rows"] = rows
    return f"{len(rows)} table rows in {cfg.search.out_dir}/search_table.md"


def _done(output: Path):
    """A step's earlier JSON output and the 'skipped' outcome, or (None, "") to run it."""
    if output.is_file():
        return json.loads(output.read_text()), f"skipped: {output.name} exists"
    return None, ""


def _svcca(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.analysis.svcca_run import svcca_run

    _, run = _table_run(cfg, args.get("row", "FTL"))
    out = work / "svcca"
    rec, outcome = _done(out / "svcca.json")
    if rec is None:
        rec = svcca_run(run, out, windows=int(args.get("windows", 64)),
                        max_points=int(args.get("max_points", 8192)), cuts=args.get("cuts"),
                        progress=progress)
        outcome = f"suggested cut {rec['suggested_cut']}"
    keys = ("cut", "mean", "random_mean", "overlap")
    report["svcca"] = {"run": str(run), "suggested_cut": rec["suggested_cut"],
                       "cuts": [{k: r[k] for k in keys} for r in rec["cuts"]]}
    return outcome


def _cam(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    from volttl.explain.localisation import localisation
    from volttl.explain.run import cam_run

    label = args.get("row", "TTL-2")
    row, run = _table_run(cfg, label)
    out = work / "cam"
    records, outcome = _done(out / "cam_summary.json")
    if records is None:
        records = cam_run(run, out, split=args.get("split", "test"), progress=progress)
        outcome = f"{len(records)} overlays of {label} ({row['cut']}) in {out}"
    report["cam"] = {"row": label, "run": str(run), "overlays": len(records)}
    try:
        found = localisation(out, cfg.data.manifest, records)
        if found.studies:
            report["cam"]["localisation"] = found.line()
    except (FileNotFoundError, ValueError) as exc:  # no lesion masks: real data
        log.info("no localisation figures: %s", exc)
    return outcome


def _report(cfg: Config, work: Path, args: dict, progress: bool, report: dict) -> str:
    lines = [f"# {report['name']}", ""]
    if "table" in report:
        lines += ["## Results", "", report["table"].strip(), ""]
    if "svcca" in report:
        s = report["svcca"]
        lines += ["## SVCCA: feature reuse per cut point", "",
                  f"Run: `{s['run']}`. Suggested cut (first overlap with the random baseline): "
                  f"**{s['suggested_cut'] or 'none'}**.", "",
                  "| cut | mean SVCCA | random | overlap |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['cut']} | {c['mean']:.3f} | {c['random_mean']:.3f} | {c['overlap']:.2f} |"
                  for c in s["cuts"]]
        lines.append("")
    if "cam" in report:
        c = report["cam"]
        lines += ["## Grad-CAM", "", f"{c['overlays']} overlays of the {c['row']} model (`{c['run']}`) in "
                  f"`{work / 'cam'}`."]
        if "localisation" in c:
            lines.append(c["localisation"] + ".")
        lines.append("")
    steps = report["steps"]
    lines += ["## Steps", "", "| step | outcome | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['outcome']} | {s['seconds']} |" for s in steps]
    (work / "report.md").write_text("\n".join(lines) + "\n")
    return f"wrote {work / 'report.md'}"


_STEP_FUNCS = {"synth": _synth, "manifest": _manifest, "preprocess": _preprocess, "search": _search,
               "svcca": _svcca, "cam": _cam, "report": _report}
