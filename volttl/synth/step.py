"""The synth step: `volttl synth` and a pipeline's ``synth`` step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from volttl.outputs.folders import SynthDir
from volttl.outputs.provenance import keep_if_made_from, record_inputs
from volttl.synth.cohort import synth_cohort


@dataclass
class SynthOutcome:
    """What the synth step did: the cohort's manifest, or that one made with the same
    options was kept."""

    manifest: Path
    studies: int
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.manifest} exists"
        return f"wrote {self.studies} synthetic studies"


def synth_step(out: str | Path, studies: int = 40, seed: int = 0, matrix: int = 160, workers: int = 1,
               progress: bool = True, reuse: bool = False) -> SynthOutcome:
    """`volttl synth` and a pipeline's ``synth`` step: the cohort under ``out``, with the
    options it was made from recorded beside its manifest. With ``reuse`` (pipelines) a
    cohort made with the same options is kept, and one made with others stops (the store
    was built from it)."""
    manifest = SynthDir(out).manifest
    inputs = {"studies": int(studies), "seed": int(seed), "matrix": int(matrix)}
    if reuse and keep_if_made_from(manifest, inputs, "synth"):
        return SynthOutcome(manifest, studies, skipped=True)
    synth_cohort(out, studies, seed, matrix, progress=progress, workers=workers)
    record_inputs(manifest, inputs)
    return SynthOutcome(manifest, studies)

