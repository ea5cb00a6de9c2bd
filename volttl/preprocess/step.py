"""`volttl preprocess`: every study of the manifest into the store, in parallel.

A failing study is reported with its reason and does not stop the others; studies
already stored with the same settings, from a source unchanged since (the sizes and
modification times of its files), are skipped; the index is rewritten after each
finished study so that a kill loses nothing that was finished. One study's work is in
:mod:`volttl.preprocess.prepare`, the worker processes in :mod:`volttl.preprocess.workers`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from volttl.config import Config, config_to_yaml
from volttl.errors import VolttlError
from volttl.io.addresses import source_file
from volttl.manifests.schema import ManifestError, read_manifest
from volttl.preprocess.prepare import source_stamp, study_settings
from volttl.preprocess.store import (
    Store,
    StudyRecord,
    describe_same_scans,
    read_record,
    remove_stale_temps,
    same_scans,
    write_index,
)
from volttl.preprocess.workers import run_isolated, run_one
from volttl.progress import progress_bar

log = logging.getLogger("volttl.preprocess")


@dataclass
class PreprocessSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    adjusted: dict[str, str] = field(default_factory=dict)  # by preprocess.penet_rules
    left_index: list[str] = field(default_factory=list)  # indexed before, not in the manifest now

    def line(self) -> str:
        return (f"{len(self.done)} preprocessed, {len(self.skipped)} already stored, "
                f"{len(self.failed)} failed")

    def adjusted_line(self) -> str:
        """One line naming every study that PENet's rules changed, and how ("" if none)."""
        if not self.adjusted:
            return ""
        what = "; ".join(f"{sid}: {how}" for sid, how in sorted(self.adjusted.items()))
        return f"{len(self.adjusted)} study(ies) stored by PENet's rules (preprocess.penet_rules): {what}"


class ThrottledIndex:
    """Rewrites the index after a finished study, but no more often than every second and
    not before twenty times its own cost has passed (so it takes at most 5% of the time):
    the index grows with the store, so rewriting it after every study would make the
    per-study cost grow with the store. A kill between rewrites loses no study: its file is
    in place, and the next run finds it by its file and indexes it without recomputing."""

    def __init__(self, rewrite, min_interval_s: float = 1.0) -> None:
        self.rewrite, self.min_interval_s = rewrite, min_interval_s
        self.last_cost, self.last_end = 0.0, -math.inf

    def write(self) -> None:
        t0 = time.perf_counter()
        self.rewrite()
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - t0

    def study_finished(self) -> None:
        if time.perf_counter() - self.last_end >= max(self.min_interval_s, 20 * self.last_cost):
            self.write()


def _first(ids: list[str], n: int = 20) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _studies_leaving(store: str, manifest_ids: set[str]) -> list[str]:
    """Studies the store's index lists that the manifest no longer has: a rerun rewrites
    the index from the manifest, so they leave it (said, never silently)."""
    if not Path(store).is_file():
        return []
    try:
        with Store(store) as s:
            return [sid for sid in s.study_ids if sid not in manifest_ids]
    except VolttlError:  # not a volttl store (yet): nothing indexed to lose
        return []


def _fault_point(where: str, finished: int) -> None:
    """Crash tests: ``VOLTTL_FAULT_KILL=<where>:<n>`` kills this process with SIGKILL at
    ``where`` once ``n`` studies have finished; ``VOLTTL_FAULT_INTERRUPT=<where>:<n>``
    sends SIGINT to its whole process group there, as a terminal's Ctrl-C does, with
    workers still running. A test then stops it at a known point, whatever the timing."""
    if os.environ.get("VOLTTL_FAULT_KILL") == f"{where}:{finished}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VOLTTL_FAULT_INTERRUPT") == f"{where}:{finished}":
        os.killpg(os.getpgrp(), signal.SIGINT)


def preprocess_step(cfg: Config, progress: bool = True) -> PreprocessSummary:
    """Preprocess every study of ``cfg.data.manifest`` into ``cfg.data.store``: the step
    `volttl preprocess` and a pipeline's ``preprocess`` step both run."""
    for key, what in (("manifest", "the manifest CSV to read"), ("store", "the HDF5 store to write")):
        if not getattr(cfg.data, key):
            raise ManifestError(f"data.{key} is not set: give {what} in the config or with --set")
    p = cfg.preprocess
    rows = read_manifest(cfg.data.manifest, check_paths=False)  # a missing study fails alone
    # window labels are learnt from the training positives' slices only; validation and test
    # positives without slices are scored at study level (their windows' labels are unknown)
    unlabelled = [r.study_id for r in rows if r.label == 1 and not r.pe_slices and r.split == "train"]
    if unlabelled and cfg.data.labels == "slices":
        raise ManifestError(f"{cfg.data.manifest}: {len(unlabelled)} training positive study(ies) "
                            f"without pe_slices ({_first(unlabelled)}); with data.labels: slices every "
                            "window of them would be labelled negative. Give their pe_slices, or set "
                            "data.labels: study to learn from study labels alone")
    study_level = [r for r in rows if r.label == 1 and not r.pe_slices and r.split != "train"]
    if study_level:
        log.info("%d validation/test positive study(ies) without pe_slices: scored at study level; "
                 "window-level metrics leave them out", len(study_level))
    store = cfg.data.store
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(store):
        log.info("removed %s, left by a killed run", stale.name)
    summary = PreprocessSummary()
    summary.left_index = _studies_leaving(store, {r.study_id for r in rows})
    if summary.left_index:
        log.warning("%d study(ies) in %s are not in the manifest and leave its index (their files stay): %s",
                    len(summary.left_index), store, _first(summary.left_index))
    records: dict[str, StudyRecord] = {}
    todo = []
    for row in rows:
        if not Path(source_file(row.path)).exists():  # named before any work, the rest go on
            summary.failed[row.study_id] = f"{row.path}: no such file or folder"
            continue
        settings = study_settings(row, p.slice_thickness, p.size, p.penet_rules)
        stamp = source_stamp(row.path)
        rec = read_record(store, row.study_id)
        changed = rec is not None and rec.source_stamp not in ("", stamp)  # "": stored before stamps
        if changed:
            log.info("%s: %s changed since it was stored; preprocessing it again", row.study_id, row.path)
        if rec is not None and rec.settings == settings and not changed:
            records[row.study_id] = rec
            summary.skipped.append(row.study_id)
            if rec.adjusted:
                summary.adjusted[row.study_id] = rec.adjusted
        else:
            todo.append((row, store, p.slice_thickness, p.size, p.window, settings, stamp, p.penet_rules))
    config_yaml = config_to_yaml(cfg)

    def reindex() -> None:
        done = [records[r.study_id] for r in rows if r.study_id in records]
        write_index(store, done, p.window, p.train_stride, p.min_pe_slices, config_yaml)

    index = ThrottledIndex(reindex)
    index.write()
    bar = progress_bar(total=len(todo), desc="preprocess", unit="study", disable=not progress)

    def finish(sid: str, rec: StudyRecord | None, err: str | None, warnings: list[str]) -> None:
        for w in warnings:
            summary.warnings.append(f"{sid}: {w}")
        if rec is not None:
            records[sid] = rec
            summary.done.append(sid)
            if rec.adjusted:
                summary.adjusted[sid] = rec.adjusted
            _fault_point("before-index", len(summary.done))
            index.study_finished()
            _fault_point("after-index", len(summary.done))
        else:
            summary.failed[sid] = err or "unknown error"
        bar.update(1)

    if p.workers <= 1 or len(todo) <= 1:
        for args in todo:
            finish(*run_one(args))
    else:
        run_isolated(todo, p.workers, finish)
    index.write()
    bar.close()
    _check_same_scans(store, [records[r.study_id] for r in rows if r.study_id in records])
    return summary


def _check_same_scans(store: str, records: list[StudyRecord]) -> None:
    """One scan stored under two ids: across splits the evaluation would test on training
    data (refused, everything stored is kept); within one split it counts twice (said)."""
    groups = same_scans([r.content_hash for r in records])
    across, within = describe_same_scans(groups, [r.study_id for r in records], [r.split for r in records])
    if within:
        log.warning("%s: %d scan(s) stored under more than one id within a split (they count twice): %s",
                    store, len(within), _first(within))
    if across:
        raise ManifestError(f"{store}: {len(across)} scan(s) stored under ids in different splits, so the "
                            f"evaluation would see training data: {_first(across)}; keep one id per scan in "
                            "the manifest")
