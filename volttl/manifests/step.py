"""The manifest step, as `volttl manifest` and a pipeline's ``manifest`` step both run it:
a dataset's labels imported (:func:`volttl.manifests.import_manifest`) and written as a
manifest CSV, with the options it was made from recorded beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from volttl.manifests.importers import import_manifest, split_counts
from volttl.manifests.schema import write_manifest
from volttl.outputs.provenance import keep_if_made_from, record_inputs


@dataclass
class ManifestOutcome:
    """What the manifest step did: the manifest, its studies per split, or that an existing
    one made from the same options was kept."""

    manifest: Path
    counts: str = ""
    studies: int = 0
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.manifest} exists"
        return f"wrote {self.studies} studies to {self.manifest}: {self.counts}"


def manifest_step(out: str | Path, fmt: str, options: dict, reuse: bool = False,
                  recorded: dict | None = None) -> ManifestOutcome:
    """Import ``fmt`` with ``options`` (the keyword arguments of
    :func:`~volttl.manifests.import_manifest`) into the manifest ``out``. With ``reuse``
    (pipelines) a manifest made from the same options is kept, and one made from others
    stops (the store was built from it). ``recorded``: what to record as its inputs (by
    default the format and options)."""
    out = Path(out)
    inputs = recorded if recorded is not None else {"format": fmt, **options}
    if reuse and keep_if_made_from(out, inputs, "manifest"):
        return ManifestOutcome(out, skipped=True)
    rows = import_manifest(fmt, **options)
    write_manifest(rows, out)
    record_inputs(out, inputs)
    return ManifestOutcome(out, split_counts(rows), len(rows))
