"""Command line: parse, load the config, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from volttl.errors import VolttlError
from volttl.outputs.folders import CamDir, PipelineDir, PredictDir, SearchDir, SvccaDir


class CommandError(VolttlError):
    """A failure of a command's own arguments, reported in one line."""


_COMMANDS: dict[str, tuple] = {}
# the order `volttl --help` lists the commands in
COMMAND_ORDER = ("synth", "preprocess", "manifest", "demo", "cuts", "profile", "train", "evaluate", "cam",
                 "pretrain", "predict", "export", "search", "pipeline", "svcca")


def _command(name: str, help: str, **kwargs):  # noqa: A002  (argparse's own keyword)
    """Register the decorated function as the declaration of command ``name``'s arguments."""
    def register(declare):
        _COMMANDS[name] = (declare, {"help": help, **kwargs})
        return declare
    return register


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEVICE",
                   help="where the model runs: auto, cpu, cuda or cuda:N (default: the config's "
                   "runtime.device, auto); the same as --set runtime.device=DEVICE")


def _with_config(p: argparse.ArgumentParser, runs_a_model: bool = True) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key; repeatable")
    if runs_a_model:
        _device(p)


def _dicom_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dicom", action="store_true",
                   help="for DICOM sources, also write a Parametric Map of the Grad-CAM, a Secondary "
                   "Capture of the preview and a Structured Report (probability, call, model, best "
                   "window) for PACS. They are filed with the patient's study, so they carry the patient "
                   "and study identifiers the DICOM standard requires (name, ID, birth date, sex, study "
                   "UID, date, time, ID, accession number, referring physician) and nothing else; every "
                   "other output stays free of them")


def _seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, metavar="S",
                   help="when --run is a repeat group (train.repeats > 1), the seed whose run to use "
                   "(its seed<S>/ folder)")


def _run_overrides(p: argparse.ArgumentParser, example: str) -> None:
    """``--set`` on a command that reads a run, ``--device`` and ``--quiet``."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override a key of the run's config, e.g. {example}; repeatable")
    _device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_synth(args: argparse.Namespace) -> int:
    from volttl.synth.step import synth_step

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"{args.out}: --out must be a folder, and this is a file")
    outcome = synth_step(args.out, studies=args.studies, seed=args.seed, matrix=args.matrix,
                         workers=args.workers)
    print(f"{outcome.summary()}; manifest: {outcome.manifest}")
    return 0


@_command("synth", help="write a synthetic CTPA cohort (DICOM + NIfTI + manifest)")
def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--studies", type=int, default=40, help="number of studies (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--matrix", type=int, default=160, help="in-plane pixels (default 160)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.set_defaults(func=cmd_synth)


def _load(args: argparse.Namespace):
    from volttl.config import load_config

    return load_config(args.config, args.set)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from volttl.preprocess.step import preprocess_step

    cfg = _load(args)
    if args.workers is not None:
        cfg.preprocess.workers = args.workers
    summary = preprocess_step(cfg, progress=not args.quiet)
    for line in summary.warnings:
        print(f"volttl preprocess: warning: {line}", file=sys.stderr)
    for sid, reason in summary.failed.items():
        print(f"volttl preprocess: failed {sid}: {reason}", file=sys.stderr)
    if summary.adjusted:
        print(f"volttl preprocess: {summary.adjusted_line()}", file=sys.stderr)
    print(f"{summary.line()}; store: {cfg.data.store}")
    return 1 if summary.failed else 0


@_command("preprocess", help="manifest -> HDF5 store")
def _preprocess_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p, runs_a_model=False)
    p.add_argument("--workers", type=int, help="parallel processes (overrides preprocess.workers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_preprocess)


def cmd_manifest(args: argparse.Namespace) -> int:
    from volttl.manifests.step import manifest_step

    options = {k: v for k, v in vars(args).items()
               if k in ("series_list", "hdf5", "all_types", "root", "csv", "val", "test", "seed", "input")}
    print(manifest_step(args.out, args.format, options).summary())
    return 0


@_command("manifest", help="import a dataset's labels as a manifest CSV")
def _manifest_arguments(p: argparse.ArgumentParser) -> None:
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = fmt.add_parser("penet", help="Stanford CTPA (PENet): series_list.pkl + data.hdf5")
    q.add_argument("--series-list", required=True, help="PENet's series_list.pkl")
    q.add_argument("--hdf5", required=True, help="PENet's data.hdf5")
    q.add_argument("--all-types", action="store_true",
                   help="keep subsegmental positives (PENet's default drops them)")
    q.add_argument("--out", required=True, help="manifest CSV to write")
    q = fmt.add_parser("rsna", help="RSNA STR PE: <root>/train/<study>/<series>/*.dcm + train.csv")
    q.add_argument("--root", required=True, help="dataset root (holds train/)")
    q.add_argument("--csv", help="train.csv (default <root>/train.csv)")
    q.add_argument("--val", type=float, default=0.15, help="validation fraction")
    q.add_argument("--test", type=float, default=0.15, help="test fraction")
    q.add_argument("--seed", type=int, default=0, help="split seed")
    q.add_argument("--out", required=True, help="manifest CSV to write")
    q = fmt.add_parser("csv", help="validate a generic manifest CSV and write it with absolute paths")
    q.add_argument("input", help="manifest CSV to check")
    q.add_argument("--out", required=True, help="manifest CSV to write")
    p.set_defaults(func=cmd_manifest)


def _resource(name: str) -> str:
    return resources.files("volttl").joinpath(f"resources/{name}").read_text(encoding="utf-8")


def demo_config_text() -> str:
    return _resource(PipelineDir(".").demo_config.name)


def _call(record: dict) -> str:
    """The call at the run's operating point, when it has one."""
    if record.get("predicted_label") is None:
        return ""
    call = "positive" if record["predicted_label"] else "negative"
    return f", {call} at threshold {record['threshold']:.3f}"


def cmd_demo(args: argparse.Namespace) -> int:
    """The packaged demo pipeline, written into the work folder and run there."""
    import yaml

    from volttl.config import apply_overrides
    from volttl.pipeline import run_pipeline

    apply_overrides({}, args.set)  # a malformed --set fails here, before any work
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = PipelineDir(work)
    folder.demo_config.write_text(demo_config_text(), encoding="utf-8")
    spec = yaml.safe_load(_resource(folder.demo_pipeline.name))
    spec["set"] = list(args.set)
    synth = next(step["synth"] for step in spec["steps"] if "synth" in step)
    synth.update(studies=args.studies, matrix=args.matrix, seed=args.seed)
    pipeline = folder.demo_pipeline
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    t0 = time.perf_counter()
    run_pipeline(pipeline, progress=not args.quiet)
    report = json.loads(folder.report_json.read_text(encoding="utf-8"))
    ev, cam = report["evaluate"], report["cam"]
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min: test study AUROC "
          f"{ev['study_auroc']:.3f} over {ev['studies']} studies; run dir {report['run']['dir']}; "
          f"open {CamDir(cam['out']).cam('<study>')} over the CT in 3D Slicer; report {folder.report_md}")
    point = ev.get("operating_point", {})
    if point.get("threshold") is not None:
        from volttl.evaluate.step import fmt_rate

        print(f"at the threshold {point['threshold']:.4f} chosen on val ({point['rule']} "
              f"{point['target']:g}): test sensitivity {fmt_rate(point, 'sensitivity')}, specificity "
              f"{fmt_rate(point, 'specificity')} (95% CIs); test ECE {ev['ece']:.3f}")
    return 0


@_command("demo", help="synth -> preprocess -> train -> evaluate -> cam on a synthetic cohort")
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo_work", help="folder for everything (default demo_work)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the demo config; repeatable")
    p.add_argument("--studies", type=int, default=200, help="synthetic studies (default 200)")
    p.add_argument("--matrix", type=int, default=96, help="their in-plane pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_cuts(args: argparse.Namespace) -> int:
    from volttl.models import get_backbone_spec

    spec = get_backbone_spec(args.model)
    print(f"{'cut point':<28} {'level':<6} {'channels':>8} {'stride (d,h,w)':>16}")
    for cut in spec.cut_points():
        print(f"{cut.name:<28} {cut.level:<6} {cut.channels:>8} {str(cut.stride):>16}")
    return 0


@_command("cuts", help="list a backbone's declared cut points")
def _cuts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a registered backbone: resnext3d_50, resnext3d_101, resnext3d_152, penet, or one "
                   "you registered (an unknown name is answered with the list)")
    p.set_defaults(func=cmd_cuts)


def cmd_profile(args: argparse.Namespace) -> int:
    from volttl.analysis.complexity import profile_variants

    cfg = _load(args)
    table = profile_variants(cfg)
    print(table)
    return 0


@_command("profile", help="parameters, MACs and latency per strategy and cut")
def _profile_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.set_defaults(func=cmd_profile)


def cmd_train(args: argparse.Namespace) -> int:
    from volttl.outputs.folders import default_run_dir
    from volttl.train.step import train_step

    cfg = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    outcome = train_step(cfg, run_dir, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        where = f"runs: {run_dir}/seed*" if cfg.train.repeats > 1 else f"run: {run_dir}"
        print(f"{where}; {outcome.summary()}")
    return 0


@_command("train", help="finetune a model -> run dir")
def _train_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--run-dir", help="run folder (default train.out_dir/<model>_<strategy>_<cut>_seed<S>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir after a kill, with its own training settings "
                        "(runtime.device, workers, precision, channels_last, cudnn_benchmark, compile "
                        "may change)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from volttl.evaluate.step import evaluate_step
    from volttl.outputs.folders import RunDir

    run = RunDir(args.run)
    chosen = {"operating_point": args.operating_point, "target": args.target, "calibration": args.calibration}
    overrides = list(getattr(args, "set", None) or []) + [f"eval.{k}={v}" for k, v in chosen.items()
                                                           if v is not None]
    metrics = evaluate_step(run.path, args.split, overrides, progress=not args.quiet)
    print(run.metrics_md(args.split).read_text(encoding="utf-8").strip())
    if not run.is_repeat_group() and metrics["studies"]:
        split = args.split
        names = [f.name for f in (run.metrics_json(split), run.metrics_md(split), run.predictions_csv(split),
                                  run.curves_png(split), run.reliability_png(split))]
        print(f"written: {', '.join(names)} and {run.operating_point.name} in {args.run}")
    return 0


@_command("evaluate", help="metrics, operating point, calibration and plots for a run",
          description="Study- and window-level AUROC/AUPRC with bootstrap CIs, and "
          "sensitivity, specificity, PPV and NPV at the run's operating point. The "
          "operating point (eval.operating_point, eval.target) and, with "
          "eval.calibration: temperature, the calibration are chosen on the val split "
          "and stored in the run (operating_point.json), where predict and cam use them.")
def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run dir written by `volttl train`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--operating-point", choices=["sensitivity", "youden", "specificity"],
                   help="how the threshold is chosen on val (default: the run's eval.operating_point)")
    p.add_argument("--target", type=float, metavar="RATE",
                   help="the sensitivity or specificity it must reach on val (default: eval.target)")
    p.add_argument("--calibration", choices=["none", "temperature"],
                   help="temperature: fit one temperature on val and report calibrated probabilities "
                        "here and in predict and cam (default: the run's eval.calibration)")
    _device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def cmd_cam(args: argparse.Namespace) -> int:
    from volttl.explain.step import EMPTY_MAP, cam_step

    overrides = [*args.set, *(["cam.dicom=true"] if args.dicom else [])]
    outcome = cam_step(args.run, args.out, args.study or None, args.split, overrides, progress=not args.quiet,
                       seed=args.seed)
    records = outcome.records
    for r in records:
        peak = r["peak_ras_mm"]
        where = f"peak at RAS ({', '.join(f'{v:.1f}' for v in peak)}) mm" if peak else EMPTY_MAP
        print(f"{r['study_id']}: p(PE) {r['probability']:.3f}{_call(r)}, {where}")
    found = CamDir(args.out).localisation
    if found.is_file():
        print(json.loads(found.read_text(encoding="utf-8"))["summary"])
    print(f"{len(records)} overlays in {args.out} "
          f"(open {CamDir.cam_name('<study>')} over the CT in 3D Slicer)")
    return 0


@_command("cam", help="3D Grad-CAM overlays as NIfTI on the original CT grid",
          description="Grad-CAM of a run's best model over each study's windows, "
          "written as <study>_cam.nii.gz on the original CT grid (plus the CT as "
          "NIfTI for DICOM sources, a PNG preview and a JSON with the peak).")
def _cam_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run dir written by `volttl train`")
    _seed(p)
    p.add_argument("--study", action="append", default=[], metavar="ID",
                   help="study id; repeatable (default: every study of --split)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="folder for the overlays")
    _run_overrides(p, "cam.stride=4")
    _dicom_flag(p)
    p.set_defaults(func=cmd_cam)


def cmd_predict(args: argparse.Namespace) -> int:
    from volttl.predict.step import predict_step

    records, failed = predict_step(args.run or args.model, args.paths, args.out, package=bool(args.model),
                                   cam=not args.no_cam, dicom=args.dicom, overrides=args.set,
                                   progress=not args.quiet, seed=args.seed)
    for r in records:
        slices = r["best_window_source_slices"]
        where = (f"source slices {slices[0]}-{slices[1]}" if slices else
                 "stored slices {}-{}".format(*r["best_window_stored_slices"]))
        centre = ", ".join(f"{v:g}" for v in r["best_window_centre_ras_mm"])
        print(f"{r['study_id']}: p(PE) {r['probability']:.3f}{_call(r)} (best window: {where}, centre RAS "
              f"{centre} mm)")
    for sid, reason in failed.items():
        print(f"volttl predict: failed {sid}: {reason}", file=sys.stderr)
    print(f"{len(records)} studies scored, {len(failed)} failed; {PredictDir(args.out).csv}"
          + ("" if args.no_cam else " and overlays"))
    return 1 if failed else 0


@_command("predict", help="score new scans with a run (no manifest or store) + overlays",
          description="Each study (a DICOM series folder, a NIfTI or NRRD file, or every "
          "such study inside a folder) is preprocessed in memory with the run's settings and "
          "scored as `volttl evaluate` scores a stored study. Writes predictions.csv and "
          "predictions.json, and the Grad-CAM overlays of `volttl cam` unless --no-cam. A "
          "failing study is named and the others complete (exit 1 if any failed).")
def _predict_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run dir written by `volttl train`")
    source.add_argument("--model", help="model package written by `volttl export` (no run folder needed)")
    _seed(p)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="DICOM folder, NIfTI/NRRD file, or a folder of them")
    p.add_argument("--out", required=True, help="folder for predictions and overlays")
    p.add_argument("--no-cam", action="store_true", help="scores only, no Grad-CAM overlays")
    _dicom_flag(p)
    _run_overrides(p, "runtime.device=cpu")
    p.set_defaults(func=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    from volttl.export.package import export_run
    from volttl.outputs.folders import BundleDir, PackageDir

    if args.format == "monai-bundle":
        from volttl.export.bundle import export_bundle

        out = BundleDir(export_bundle(args.run, args.out, seed=args.seed))
        print(f"MONAI bundle: {out.path} (model card: {out.readme}); run it with `python -m monai.bundle run "
              f"--config_file {out.inference} --bundle_root {out.path} --input PATH --output_dir DIR`")
        return 0
    out = export_run(args.run, args.out, seed=args.seed)
    print(f"model package: {out} (model card: {PackageDir(out).card_md}); "
          f"run it with `volttl predict --model {out} PATH... --out DIR`")
    return 0


@_command("export", help="a model package that runs without its run folder",
          description="Writes the run's config, weights (tensors only, checksummed), operating "
          "point and calibration, a TorchScript trace for other tools, a model card "
          "(model_card.md and .json: training data, metrics with CIs, limits, install) and "
          "package.json with every file's SHA-256. `volttl predict --model DIR` runs from it "
          "alone and gives the probabilities `--run` gives. With --format monai-bundle the "
          "package goes inside a MONAI bundle (configs/metadata.json, configs/inference.json, "
          "docs/README.md) that `python -m monai.bundle run` executes.")
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True,
                   help="run dir written by `volttl train` (evaluated first, for metrics and a threshold)")
    _seed(p)
    p.add_argument("--out", required=True, help="a new folder for the package")
    p.add_argument("--format", choices=("package", "monai-bundle"), default="package",
                   help="volttl's model package (default), or the same inside a MONAI bundle")
    p.set_defaults(func=cmd_export)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from volttl.pretrain.step import pretrain_step

    result = pretrain_step(_load(args), progress=not args.quiet).result
    print(f"source task ({', '.join(result['classes'])}): training accuracy {result['accuracy']:.3f} in the "
          f"last epoch, units trained through {result['trained_through']}; checkpoint {result['checkpoint']}")
    return 0


@_command("pretrain", help="train a backbone on a synthetic source task (not PE), saved as a "
          "3D-ResNets checkpoint", description="Trains model.name on synthetic 3D windows "
          "(which shape: a ball, a tube, a plate or none, bright or dark inside contrast, in lung "
          "or tissue crossed by vessels), every block or up to pretrain.depth, and "
          "writes pretrain.out in the published 3D-ResNets layout, for model.pretrained: a "
          "source task for demonstrating transfer without Kinetics weights.")
def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pretrain)


def cmd_search(args: argparse.Namespace) -> int:
    from volttl.search.step import search_step

    cfg = _load(args)
    search_step(cfg, progress=not args.quiet)
    out = SearchDir(cfg.search.out_dir)
    print(out.table_md.read_text(encoding="utf-8").strip())
    print(f"table: {out.table_md} (.csv, .json); every trial: {out.trials_csv}")
    return 0


@_command("search", help="two-stage cut-point search and the Table-2 style results table",
          description="Stage 1: each search.strategies at every block cut; stage 2: the "
          "layer cuts within search.radius of each stage-1 winner (by validation study "
          "AUROC, mean over train.repeats); FTL and PENet baselines. Writes "
          "search_table.{md,csv,json} and trials.csv to search.out_dir; finished trials "
          "are skipped on a rerun, if trained with the same settings on the same training "
          "and validation data (else it stops with one line).")
def _search_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from volttl.pipeline import run_pipeline

    report = run_pipeline(args.file, progress=not args.quiet)
    if report is None:  # no report step: each step's outcome was printed as it finished
        print("no report step in the pipeline; the steps' outcomes are in "
              f"{PipelineDir('.').report_json.name} in its work folder")
        return 0
    print(report.read_text(encoding="utf-8").strip())
    print(f"report: {report}")
    return 0


@_command("pipeline", help="run a multi-step study from a YAML file (pipelines/)",
          description="Run the steps of a pipeline file (synth, manifest, preprocess, "
          "pretrain, train, evaluate, search, compare, svcca, cam, report) in order; steps whose "
          "outputs exist are skipped (evaluate and report are rewritten), so a killed "
          "pipeline is rerun with the same command.")
def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="pipeline YAML, e.g. pipelines/demo_table.yaml")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pipeline)


def cmd_svcca(args: argparse.Namespace) -> int:
    from volttl.analysis.step import svcca_step

    outcome = svcca_step(args.run, args.out, args.split, args.windows, args.max_points, args.level,
                         args.threshold, cuts=args.cut or None, progress=not args.quiet, seed=args.seed,
                         device=args.device)
    rec = outcome.record
    print(f"{'cut point':<26} {'mean SVCCA':>10} {'random':>8} {'overlap':>8}")
    for r in rec["cuts"]:
        print(f"{r['cut']:<26} {r['mean']:>10.3f} {r['random_mean']:>8.3f} {r['overlap']:>8.2f}")
    print(f"suggested cut: {rec['suggested_cut'] or 'none (reuse does not stop before the last cut)'}; "
          f"{SvccaDir(outcome.out).record}")
    return 0


@_command("svcca", help="SVCCA feature reuse per cut point, and the suggested cut",
          description="SVCCA between the features before and after finetuning at each "
          "cut point of a run (validation windows), against two random feature sets; "
          "writes svcca.json and svcca.png and suggests the cut where reuse stops "
          "(TTL paper, Appendix C.1).")
def _svcca_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run dir written by `volttl train` (FTL for the paper's use)")
    _seed(p)
    p.add_argument("--out", help="output folder (default RUN/svcca, or RUN/seed<S>/svcca with --seed)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--windows", type=int, default=64, help="windows to take features from (default 64)")
    p.add_argument("--max-points", type=int, default=8192, help="positions per cut point (default 8192)")
    p.add_argument("--level", default="block", choices=["block", "layer", "all"],
                   help="which cut points (default block)")
    p.add_argument("--cut", action="append", default=[], metavar="NAME",
                   help="only these cut points; repeatable (see `volttl cuts`)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="overlap with the random baseline that marks the cut (default 0.5)")
    p.add_argument("--device", metavar="DEVICE",
                   help="where the models run: auto, cpu, cuda or cuda:N (default: the run's runtime.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_svcca)


def _version() -> str:
    """The installed volttl's version, without importing torch (``--version`` stays fast)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("volttl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The command line. Nothing heavy is imported here (torch, the models): ``--help`` and
    ``--version`` answer at once, and each command imports what it needs when it runs. Each
    command declares its arguments beside its ``cmd_*`` function (``@_command``)."""
    parser = argparse.ArgumentParser(
        prog="volttl",
        epilog="A failure the user can fix is printed as one line on stderr (exit 1); add --debug "
        "for its traceback. Any other failure is a bug and prints its traceback.",
        description="3D CT classification by transfer learning: preprocess CTPA studies into an "
        "HDF5 store, finetune Kinetics-pretrained 3D backbones with FTL/TF/LWFT/TTL, "
        "explain with 3D Grad-CAM.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    parser.add_argument("--version", action="version", version=f"volttl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_ORDER:
        declare, kwargs = _COMMANDS[name]
        declare(sub.add_parser(name, **kwargs))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", None):  # --device is --set runtime.device (and the profiler's)
        args.set = [*getattr(args, "set", []), f"runtime.device={args.device}",
                    f"profile.device={args.device}"]
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name source instances
    if not args.debug:  # a decoder's own traceback would sit beside volttl's one-line error
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except (VolttlError, FileNotFoundError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"volttl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        # an output folder that cannot be written (read-only, or a file where a folder goes)
        if args.debug:
            traceback.print_exc()
        where = exc.filename or "an output file"
        print(f"volttl {args.command}: error: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"volttl {args.command}: interrupted", file=sys.stderr)
        return 130
