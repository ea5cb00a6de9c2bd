"""`volttl export --run RUN --out MODEL`: a model package that runs without its run folder.

The package is what `volttl predict --model MODEL` needs and nothing else, so a trained
model can be handed on without the store, the training data or the run's history::

    config.yaml            the run's config: preprocessing, intensity mapping, model, aggregation
    best.pt                the weights (volttl's format: tensors only, with their SHA-256)
    operating_point.json   the threshold and calibration chosen on validation, when the run has them
    model.pt2              the network as torch.export saves it (any batch size), for other tools
    model.torchscript.pt   the network traced to TorchScript, for libtorch and older runtimes
    model_card.md, .json   what the model is, what it was trained and tested on, its limits
    package.json           the format, and the SHA-256 of every file above

`predict --model` verifies every checksum, then reads the config as YAML and the weights
with ``torch.load(weights_only=True)``: like a checkpoint, the package never runs code
(the two network files are for other tools; volttl does not load them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch

from volttl.data.input_spec import InputSpec
from volttl.errors import VolttlError
from volttl.evaluate.step import fmt_rate
from volttl.outputs.folders import (
    BEST,
    CARD_JSON,
    CARD_MD,
    CONFIG,
    EXPORTED,
    OPERATING_POINT,
    PACKAGE,
    TORCHSCRIPT,
    TRAINING_DATA,
    RunDir,
)
from volttl.outputs.provenance import install_record
from volttl.outputs.records import CHECKSUM_KEY, read_record, write_record

log = logging.getLogger("volttl.export.package")

FORMAT = "volttl-model-package"
VERSION = 1  # the package layout this volttl writes and reads
PACKAGE_KEYS = {"format", "version", "exported_from", "files", CHECKSUM_KEY}
SPLITS = ("train", "val", "test")


class PackageError(VolttlError):
    """A model package that is incomplete, damaged or not a package."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_package(path: str | Path) -> Path:
    """``path`` if it is a complete, unchanged model package (one-line error otherwise)."""
    path = Path(path)
    manifest = path / PACKAGE
    if not manifest.is_file():
        raise PackageError(f"{path}: not a model package (no {PACKAGE}; `volttl export` writes one)")
    record = read_record(manifest, "export the run again")
    if record.get("format") != FORMAT:
        raise PackageError(f"{manifest}: not a volttl model package (format {record.get('format')!r})")
    if record.get("version") != VERSION or set(record) - PACKAGE_KEYS:
        extra = sorted(set(record) - PACKAGE_KEYS)
        what = f"version {record.get('version')!r}" + (f", unknown keys {', '.join(extra)}" if extra else "")
        raise PackageError(f"{manifest}: a package of another layout ({what}); this volttl reads version "
                           f"{VERSION}: export the run again, or use the volttl that wrote it")
    files = record.get("files")
    if not isinstance(files, dict):
        raise PackageError(f"{manifest}: damaged: no list of files; export the run again")
    # every file the package is read from is listed, so none is taken unverified
    read = {CONFIG, BEST, TRAINING_DATA} | {n for n in (OPERATING_POINT,) if (path / n).exists()}
    unlisted = sorted(read - set(files))
    if unlisted:
        raise PackageError(f"{manifest}: {', '.join(unlisted)} not among the package's checked files; "
                           "export the run again")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise PackageError(f"{file}: missing from the package; export the run again")
        if _sha256(file) != expected:
            raise PackageError(f"{file}: damaged: it changed after the package was exported (checksum "
                               "differs); export the run again")
    return path


def _export_network(model: torch.nn.Module, shape: tuple[int, ...], folder: Path) -> list[str]:
    """The network for tools outside volttl: ``model.pt2`` (``torch.export``, batch size
    free) and ``model.torchscript.pt`` (a TorchScript trace, which libtorch and older
    runtimes load; torch 2.14 marks tracing deprecated). Each is checked against the
    model before it is kept."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        expected = model(x)
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        traced = torch.jit.trace(model, x, check_trace=False)
        for name, got in ((EXPORTED, exported.module()(x)), (TORCHSCRIPT, traced(x))):
            if not torch.allclose(expected, got, atol=1e-5, rtol=1e-5):
                raise PackageError(f"{folder / name}: the exported network differs from the model (max "
                                   f"{float((expected - got).abs().max()):.2g}); not exported")
    torch.export.save(exported, str(folder / EXPORTED))
    traced.save(str(folder / TORCHSCRIPT))
    return [EXPORTED, TORCHSCRIPT]


def _metrics(run: RunDir) -> dict:
    out = {}
    for split in SPLITS:
        path = run.metrics_json(split)
        if path.is_file():
            m = json.loads(path.read_text(encoding="utf-8"))
            point = m.get("operating_point", {})
            out[split] = {k: m.get(k) for k in ("studies", "study_auroc", "study_auroc_ci", "study_auprc",
                                                 "study_auprc_ci", "window_auroc", "warnings")}
            out[split].update({k: point.get(k) for k in ("threshold", "sensitivity", "sensitivity_ci",
                                                         "specificity", "specificity_ci", "ppv", "npv")})
            out[split]["ece"] = m.get("calibration", {}).get("ece")
    return out


def _training_data(recorded: dict, cfg) -> dict:
    """Counts per split (and positives and source kinds when the store is still there);
    ``recorded``: the run's training record."""
    out = {"store": recorded.get("store"), "label_mode": cfg.data.labels,
           "synthetic_cohort": recorded.get("synthetic_cohort"),
           "studies": {k: recorded[k] for k in ("train", "val") if k in recorded}}
    try:
        from volttl.preprocess.store import Store

        with Store(cfg.data.store) as store:
            for split in SPLITS:
                idx = store.studies_in(split)
                out["studies"][split] = len(idx)
                out.setdefault("positives", {})[split] = int(sum(store.labels[i] for i in idx))
                kinds = [store.meta(store.study_ids[i]).source_kind for i in idx]
                out.setdefault("sources", {})[split] = {k: kinds.count(k) for k in sorted(set(kinds))}
    except (VolttlError, OSError) as exc:
        reason = str(exc).splitlines()[0][:120]
        out["note"] = f"the store was not readable at export ({reason}): counts as recorded"
    return out


def model_card(run: RunDir, cfg, ckpt: dict, decision) -> dict:
    """What the model is, what it was trained and tested on, and its limits."""
    t, pre, spec = cfg.transfer, cfg.preprocess, InputSpec.of(cfg)
    pretrained = cfg.model.pretrained
    weights_from = {"path": pretrained or None}
    if pretrained and Path(pretrained).is_file():
        weights_from["sha256"] = _sha256(Path(pretrained))
    recorded = (json.loads(run.training_data.read_text(encoding="utf-8")) if run.training_data.is_file()
                else {})
    limits = [
        "Research use only; not a medical device and not validated for clinical decisions.",
        "Performance outside the population, scanners and protocols of the training data is unknown.",
        "The operating point was chosen on the validation studies listed here; its sensitivity and "
        "specificity on other data differ (see the intervals).",
        "Grad-CAM maps show where the model's evidence lies, not where an embolus is; they are not "
        "segmentations.",
    ]
    if cfg.data.labels == "study" and cfg.data.pseudo_slices:
        limits.append("Trained from study-level labels through pseudo slice labels (each training positive's "
                      "highest-scoring window of a first model): its maps localised on the synthetic demo "
                      "cohort, not yet on real CT.")
    elif cfg.data.labels == "study":
        limits.append("Trained from study-level labels: its Grad-CAM maps were not found to localise emboli.")
    if not pretrained:
        limits.append("Trained from scratch (no pretrained weights).")
    if recorded.get("synthetic_cohort"):
        limits.insert(0, "Trained on volttl's synthetic cohort (`volttl synth`), not on patients' CT: a "
                      "demonstration of the pipeline, whose outputs on real scans mean nothing.")
    return {
        "model": {"backbone": cfg.model.name, "strategy": t.strategy,
                  "cut": t.cut if t.strategy != "ftl" else None,
                  "head": {"pool": t.head.pool, "norm": t.head.norm},
                  "stem": cfg.model.stem, "input_scale": cfg.model.input_scale, "parameters": None},
        "input": {"window_slices": spec.window, "slice_thickness_mm": pre.slice_thickness,
                  "stored_size": pre.size, "crop": spec.crop, "hu_clip": list(spec.hu_clip),
                  "intensity_shift": spec.intensity_shift, "aggregate": cfg.eval.aggregate},
        "weights": {"pretrained_from": weights_from, "best_epoch": int(ckpt.get("epoch", -1)) + 1,
                    "sha256": ckpt.get("state_sha256"), "run": run.path.name},
        "training_data": _training_data(recorded, cfg),
        "metrics": _metrics(run),
        "operating_point": None if decision is None else decision.to_dict(),
        "intended_use": "Ranking CT pulmonary angiography studies by the probability of pulmonary embolism, "
                        "with Grad-CAM overlays to review, for research.",
        "limitations": limits,
        "install": {"trained_with": recorded.get("install"), "exported_with": install_record()},
    }


def _point_text(op: dict | None) -> str:
    if not op or op.get("threshold") is None:
        return "None: the run had no operating point at export."
    rule = op["rule"] if op["rule"] == "youden" else f"{op['rule']} {op['target']:g}"
    chosen = f"chosen on {op['validation_studies']} {op['chosen_on']} studies"
    text = f"Threshold {op['threshold']:.4f} ({rule}, {chosen})"
    if op.get("temperature"):
        text += f"; probabilities calibrated with temperature {op['temperature']:.3f}"
    return text + "."


def _install_text(install: dict | None) -> str:
    if not install:
        return ""
    cuda = f" (CUDA {install['cuda']})" if install.get("cuda") else ""
    return (f"volttl {install['volttl']}, Python {install['python']}, torch {install['torch']}{cuda}, "
            f"{install['platform']}")


def card_markdown(card: dict) -> str:
    m, i, w, d = card["model"], card["input"], card["weights"], card["training_data"]
    name = f"{m['backbone']} {m['strategy'].upper()}" + (f" cut after {m['cut']}" if m["cut"] else "")
    lines = [f"# Model card: {name}", "", f"**Intended use.** {card['intended_use']}", "", "## Model", "",
             f"- {name}; head {m['head']['pool']}-pooled; stem {m['stem']}; "
             f"{m['parameters']:,} parameters",
             f"- input: {i['window_slices']} slices of {i['slice_thickness_mm']} mm, stored at "
             f"{i['stored_size']} px and centre-cropped to {i['crop']}; HU clipped to {i['hu_clip']}, scaled "
             f"to [0, 1], minus {i['intensity_shift']}; study probability = {i['aggregate']} over its "
             "windows",
             f"- weights: epoch {w['best_epoch']} of run `{w['run']}` (SHA-256 {w['sha256']}); started from "
             f"{w['pretrained_from']['path'] or 'scratch'}", "", "## Training data", ""]
    studies = d.get("studies", {})
    for split in SPLITS:
        if split in studies:
            pos = d.get("positives", {}).get(split)
            src = d.get("sources", {}).get(split)
            line = f"- {split}: {studies[split]} studies" + (f", {pos} positive" if pos is not None else "")
            lines.append(line + (f" ({', '.join(f'{n} {k}' for k, n in src.items())})" if src else ""))
    lines.append(f"- labels: {d['label_mode']}")
    lines += [f"- {d['note']}"] if "note" in d else []
    lines += ["", "## Metrics", ""]
    if card["metrics"]:
        lines += ["| split | studies | study AUROC (95% CI) | sensitivity (95% CI) | specificity (95% CI) "
                  "| ECE |", "| --- | --- | --- | --- | --- | --- |"]
        for split, s in card["metrics"].items():
            ece = "n/a" if s.get("ece") is None else f"{s['ece']:.3f}"
            lines.append(f"| {split} | {s['studies']} | {fmt_rate(s, 'study_auroc')} | "
                         f"{fmt_rate(s, 'sensitivity')} | {fmt_rate(s, 'specificity')} | {ece} |")
    else:
        lines.append("Not evaluated before export (`volttl evaluate` writes the metrics).")
    lines += ["", "## Operating point", "", _point_text(card["operating_point"]), "", "## Limitations", ""]
    lines += [f"- {text}" for text in card["limitations"]]
    inst = card["install"]
    trained = _install_text(inst["trained_with"]) or "not recorded (a run from before installs were recorded)"
    lines += ["", "## Install", "", f"- trained with: {trained}",
              f"- exported with: {_install_text(inst['exported_with'])}"]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, out: str | Path, seed: int | None = None) -> Path:
    """Write the model package of a trained (and ideally evaluated) run to ``out``
    (``seed``: which run of a repeat group)."""
    from volttl.inference import TrainedRun
    from volttl.models.checkpoints import read_checkpoint

    run = RunDir(run_dir).one_run(seed)  # a repeat group without a seed is refused naming its seeds
    trained = TrainedRun.open(run.path)  # the config and weights verified, as predict reads them
    trained.note_missing_decision(log)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"{out}: exists and is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    _, _, ckpt = read_checkpoint(run.best)
    shutil.copyfile(run.config, out / CONFIG)
    shutil.copyfile(run.best, out / BEST)
    files = [CONFIG, BEST]
    # what the run learnt from (predict --model says when it was synthetic); a run from before
    # the record was kept says so, and the file is there either way, listed and checked
    if run.training_data.is_file():
        shutil.copyfile(run.training_data, out / TRAINING_DATA)
    else:
        (out / TRAINING_DATA).write_text(json.dumps({"note": "the run kept no record of its training data"}),
                                         encoding="utf-8")
    files.append(TRAINING_DATA)
    if trained.decision is not None:
        write_record(out / OPERATING_POINT, trained.decision.to_dict())
        files.append(OPERATING_POINT)
    files += _export_network(trained.model, (2, 1, *trained.input.shape), out)
    raw_cfg = RunDir(run.path).read_config()  # with model.pretrained as trained (load_run clears it)
    card = model_card(run, raw_cfg, ckpt, trained.decision)
    card["model"]["parameters"] = sum(p.numel() for p in trained.model.parameters())
    (out / CARD_JSON).write_text(json.dumps(card, indent=2), encoding="utf-8")
    (out / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    files += [CARD_JSON, CARD_MD]
    write_record(out / PACKAGE, {"format": FORMAT, "version": VERSION, "exported_from": run.path.name,
                                 "files": {name: _sha256(out / name) for name in files}})
    return out
