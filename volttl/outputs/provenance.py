"""'Was this made from these inputs?', answered one way for every step.

Each check keeps what an output was made from and compares it with what it would be made
from now: a training run its config keys (:func:`volttl.outputs.resume.check_resumable`), a stored
study its settings hash and source stamp (preprocess), a search trial its fingerprint,
a pipeline step's output a checksummed record of its inputs beside it. They share the
helpers here: one canonical hash (:func:`fingerprint`), one way of naming what changed
(:func:`differences`), and one inputs record (:func:`record_inputs`, :func:`made_from`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from volttl.errors import VolttlError
from volttl.outputs.folders import inputs_record
from volttl.outputs.records import CHECKSUM_KEY, read_record, write_record


def fingerprint(what: dict, length: int = 16) -> str:
    """A short SHA-256 of ``what`` as canonical JSON (sorted keys): equal inputs, equal hash."""
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:length]


def differences(before: dict, now: dict) -> list[str]:
    """``key before -> now`` for every key of ``now`` whose value is not ``before``'s."""
    return [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]


def record_inputs(output: Path, inputs: dict) -> None:
    """Keep ``inputs`` (checksummed) as what ``output`` was made from."""
    write_record(inputs_record(output), {"inputs": inputs})


def recorded_inputs(output: Path) -> dict | None:
    """The inputs ``output`` was made from (a damaged record is refused by name), or None
    when it does not say (made before outputs recorded their inputs, or by hand)."""
    path = inputs_record(output)
    if not path.is_file():
        return None
    record = read_record(path, f"delete it and {output.name} to make them again")
    return record["inputs"] if CHECKSUM_KEY in record else record  # older records: the inputs alone


def made_from(output: Path, inputs: dict) -> bool | None:
    """Whether ``output`` was made from ``inputs``: True, False, or None when it does not say."""
    before = recorded_inputs(output)
    return None if before is None else before == json.loads(json.dumps(inputs))


def forget_inputs(output: Path) -> None:
    """Drop ``output``'s inputs record before it is made again: a kill halfway then leaves
    an output that says nothing, not one that claims the old inputs."""
    inputs_record(output).unlink(missing_ok=True)


def file_stamp(path: Path) -> list[int] | None:
    """A large file's size and modification time (a checkpoint): None when it is absent."""
    if not Path(path).is_file():
        return None
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def content_stamp(path: Path) -> str | None:
    """A small file's content hash: the same however often it is rewritten with the same
    content (evaluate rewrites the operating point each time). None when it is absent."""
    if not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class MadeFromOtherInputs(VolttlError):
    """An output that later work builds on exists, made from other inputs."""


def keep_if_made_from(output: Path, inputs: dict, step: str) -> bool:
    """For an output that later work builds on (a manifest, a pretrained checkpoint), on a
    rerun: True to keep it when it exists and was made from ``inputs`` (or does not say),
    False when it is absent. Made from other inputs it stops with one line, since making it
    again would not remake what was built on the old one."""
    if not Path(output).is_file():
        return False
    if made_from(output, inputs) is False:
        differ = differences(recorded_inputs(output) or {}, inputs)
        raise MadeFromOtherInputs(
            f"{output}: made by the {step} step with other options ({'; '.join(differ)}); use another "
            "workdir, or empty this one (what later steps made came from the old one)")
    return True


def install_record() -> dict:
    """The software a run was trained (or a model exported) with."""
    import platform

    import torch

    from volttl import __version__

    return {"volttl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}
