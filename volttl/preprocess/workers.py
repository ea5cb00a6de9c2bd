"""Preprocessing's worker processes: each study in its own process, so that a study that
kills its worker (out of memory, a crash in a native decoder) fails alone and is named."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing import connection as mp_connection

from volttl.io.studies import StudyReadError
from volttl.manifests.schema import StudyRow
from volttl.preprocess.prepare import prepare_study
from volttl.preprocess.store import StudyRecord, write_study

# Workers only decode, resize and write (numpy, pydicom, OpenCV, h5py; never torch), so
# forking is safe where the platform offers it, and saves each worker its imports.
POOL_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def process_study(row: StudyRow, store: str, thickness: float, size: int, window: int,
                  settings: str, stamp: str = "", penet_rules: bool = False
                  ) -> tuple[StudyRecord, list[str]]:
    """Prepare one study and write it to the store (in a worker process); returns its
    index record and warnings for the user. ``stamp``: :func:`source_stamp`, taken before
    reading, so a source changed while it was read is read again next time."""
    study = prepare_study(row, thickness, size, window, settings, penet_rules)
    study.meta.source_stamp = stamp
    digest = write_study(store, study.hu, study.meta, window)
    record = StudyRecord(row.study_id, row.split, row.label, study.pe_flags, settings, stamp,
                         study.adjusted, digest)
    return record, study.warnings


Outcome = tuple[str, StudyRecord | None, str | None, list[str]]


def run_one(args) -> Outcome:
    """One study, never raising: (id, record or None, error or None, warnings)."""
    row = args[0]
    try:
        rec, warnings = process_study(*args)
        return row.study_id, rec, None, warnings
    except StudyReadError as exc:
        return row.study_id, None, str(exc), []
    except MemoryError:
        return row.study_id, None, f"{row.path}: out of memory", []
    except Exception as exc:  # keep the other studies going; report this one
        return row.study_id, None, f"{row.path}: {type(exc).__name__}: {exc}", []


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies, so a
    killed `volttl preprocess` leaves no orphaned workers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(conn, args) -> None:
    _die_with_parent()
    # Ctrl-C goes to the whole process group: the main process stops the run with one line,
    # and its workers die with it (above); none prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker()
    if os.environ.get("VOLTTL_FAULT_KILL_WORKER") == args[0].study_id:  # crash tests: an OOM kill
        os.kill(os.getpid(), signal.SIGKILL)
    conn.send(run_one(args))
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (likely out of memory)" if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with code {exitcode} before reporting"


def run_isolated(jobs: list, workers: int, finish) -> None:
    """Each study in its own worker process, ``workers`` at a time. A worker that dies
    (out-of-memory kill, crash in a native library) fails only its own study, named with
    the cause; the other studies go on."""
    ctx = multiprocessing.get_context(POOL_START_METHOD)
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < workers:
            args = pending.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(send, args), daemon=True)
            proc.start()
            send.close()
            running[receive] = (proc, args)
        for receive in mp_connection.wait(list(running)):
            proc, args = running.pop(receive)
            try:
                outcome = receive.recv()
            except EOFError:  # the worker died without a word
                proc.join()
                row = args[0]
                outcome = (row.study_id, None, f"{row.path}: {_death(proc.exitcode)}", [])
            receive.close()
            proc.join()
            finish(*outcome)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one study per process: no oversubscription
    logging.getLogger().setLevel(logging.WARNING)
