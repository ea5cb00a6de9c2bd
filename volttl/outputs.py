"""The output folders other than a run folder (:class:`volttl.runs.RunDir`): the file
names of `cam`, `predict`, `search`, `svcca` and a pipeline's work folder, each owned here
so that the module that writes a file and the modules that read it name it once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))


class CamDir(_Folder):
    """`volttl cam --out` (and the overlays `volttl predict` writes beside its table)."""

    @property
    def summary(self) -> Path:
        return self.path / "cam_summary.json"

    @property
    def localisation(self) -> Path:
        """Where the maps' peaks fall against lesion masks (when the manifest has them)."""
        return self.path / "localisation.json"

    @staticmethod
    def cam_name(study_id: str) -> str:
        return f"{study_id}_cam.nii.gz"

    @staticmethod
    def ct_name(study_id: str) -> str:
        return f"{study_id}_ct.nii.gz"

    @staticmethod
    def preview_name(study_id: str) -> str:
        return f"{study_id}_cam.png"

    def cam(self, study_id: str) -> Path:
        return self.path / self.cam_name(study_id)

    def ct(self, study_id: str) -> Path:
        return self.path / self.ct_name(study_id)

    def preview(self, study_id: str) -> Path:
        return self.path / self.preview_name(study_id)

    def record(self, study_id: str) -> Path:
        return self.path / f"{study_id}_cam.json"

    def scene(self, study_id: str) -> Path:
        """The 3D Slicer scene that opens the overlay over its CT."""
        return self.path / f"{study_id}_scene.mrml"

    def parametric_map(self, study_id: str) -> Path:
        """The map as a DICOM Parametric Map (``--dicom``)."""
        return self.path / f"{study_id}_cam_pm.dcm"

    def secondary_capture(self, study_id: str) -> Path:
        """The preview as a DICOM Secondary Capture (``--dicom``)."""
        return self.path / f"{study_id}_cam_sc.dcm"

    def report(self, study_id: str) -> Path:
        """The study's result as a DICOM Structured Report (``--dicom``)."""
        return self.path / f"{study_id}_sr.dcm"

    def peak(self, study_id: str) -> Path:
        """The map's peak as a 3D Slicer Markups point."""
        return self.path / f"{study_id}_peak.mrk.json"


class PredictDir(CamDir):
    """`volttl predict --out`: the predictions table, and the overlays of :class:`CamDir`."""

    @property
    def lock(self) -> Path:
        return self.path / ".volttl-predict.lock"

    @property
    def csv(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def json(self) -> Path:
        return self.path / "predictions.json"


class SearchDir(_Folder):
    """`volttl search`: ``search.out_dir``."""

    @property
    def table_md(self) -> Path:
        return self.path / "search_table.md"

    @property
    def table_csv(self) -> Path:
        return self.path / "search_table.csv"

    @property
    def table_json(self) -> Path:
        return self.path / "search_table.json"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"


class CompareDir(_Folder):
    """A pipeline's ``compare`` step: the transfer comparison's table and learning curve."""

    @property
    def table_md(self) -> Path:
        return self.path / "compare_table.md"

    @property
    def table_json(self) -> Path:
        return self.path / "compare_table.json"

    @property
    def curve_png(self) -> Path:
        return self.path / "learning_curve.png"

    @property
    def curve_json(self) -> Path:
        return self.path / "learning_curve.json"


class SvccaDir(_Folder):
    """`volttl svcca --out` (default ``<run>/svcca``)."""

    @property
    def record(self) -> Path:
        return self.path / "svcca.json"

    @property
    def plot(self) -> Path:
        return self.path / "svcca.png"


class SynthDir(_Folder):
    """`volttl synth --out`: the synthetic cohort, its manifest, and the record that says
    the cohort is synthetic (so that a run trained on it says so wherever it is used)."""

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.csv"

    @property
    def cohort(self) -> Path:
        return self.path / "cohort.json"

    @classmethod
    def of_manifest(cls, manifest: str | Path) -> dict | None:
        """What made the synthetic cohort whose manifest is ``manifest``; None for any other
        manifest (one not written by `volttl synth`)."""
        folder = cls(Path(manifest).parent)
        if Path(manifest).name != folder.manifest.name or not folder.cohort.is_file():
            return None
        import json

        from volttl.errors import VolttlError

        try:
            return json.loads(folder.cohort.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise VolttlError(f"{folder.cohort}: unreadable ({exc.msg}); delete it, or write the cohort "
                              "again with volttl synth") from None


class PipelineDir(_Folder):
    """A pipeline's ``workdir`` (and `volttl demo`'s work folder)."""

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def resolved_config(self) -> Path:
        return self.path / "pipeline_config.yaml"

    @property
    def demo_config(self) -> Path:
        return self.path / "demo.yaml"

    @property
    def demo_pipeline(self) -> Path:
        return self.path / "demo_pipeline.yaml"
