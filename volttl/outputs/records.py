"""JSON records volttl writes and reads back later, each carrying its own checksum.

A record that changed after volttl wrote it (a hand edit, a damaged disk, a copy cut
short) is refused by name instead of being acted on: an operating point, a finished
search trial or a pipeline's record decides what later commands do. The checksum is the
SHA-256 of the record's canonical JSON without the ``sha256`` key; records written
before checksums existed (no key) are taken as they are. Writes go to a temporary file
that replaces the record in one step, so a kill never leaves half a record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from volttl.errors import VolttlError

CHECKSUM_KEY = "sha256"


class RecordError(VolttlError):
    """A record volttl wrote that cannot be read back as written."""


def record_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def write_text_atomically(path: str | Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file beside it, renamed into place: a kill
    or a full disk never leaves the file cut short, and no temporary file stays."""
    path = Path(path)
    # a name of this writer's own: two processes writing one file never share a temporary
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_record(path: str | Path, record: dict) -> dict:
    """``record`` with its checksum, written atomically to ``path``; returns what was written."""
    stamped = {**{k: v for k, v in record.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: record_digest(record)}
    write_text_atomically(path, json.dumps(stamped, indent=2))
    return stamped


def read_record(path: str | Path, repair: str) -> dict:
    """The record at ``path``, its checksum verified; ``repair`` says what to do when it
    is damaged (it ends the one-line error)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        kind = exc.__class__.__name__
        raise RecordError(f"{path}: damaged: not readable JSON ({kind}); {repair}") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: damaged: expected a JSON object; {repair}")
    expected = record.get(CHECKSUM_KEY)
    if expected is not None and expected != record_digest(record):
        raise RecordError(f"{path}: damaged: its content does not match the checksum written with it "
                          f"(the file changed after volttl wrote it); {repair}")
    return record


@contextmanager
def writing_alone(folder: str | Path, lock_name: str, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock file while ``what`` writes there: a second writer started
    meanwhile is refused in one line rather than replacing this one's results."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / lock_name).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise VolttlError(f"{folder}: another {what} is writing into this folder now; wait for it to "
                          "finish, or give another output folder") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
