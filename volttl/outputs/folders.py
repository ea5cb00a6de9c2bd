"""Every output folder volttl writes, and the name of every file in it: the module that
writes a file and the modules that read it name it here, once. `docs/reference/layouts.md`
is generated from these classes' docstrings by :mod:`volttl.reference_pages`.

A run folder (:class:`RunDir`) holds::

    config.yaml      the resolved config the run was trained with
    last.pt          model, optimiser, schedule and epoch after the latest epoch (resume)
    best.pt          the model at the best validation study AUROC
    metrics.jsonl    one line per finished epoch
    train.log        everything volttl logged during training
    tensorboard/     scalars for TensorBoard
    training_data.json     what the run was trained on (the store's counts and fingerprint)
    metrics_<split>.json|.md, predictions_<split>.csv, curves_<split>.png,
    reliability_<split>.png                                          (evaluate)
    operating_point.json   the calibration and threshold chosen on validation (evaluate)
    bags/, pseudo_slices.json  the first round and its pseudo slices (data.pseudo_slices)

A repeat group (``train.repeats > 1``) is a folder of such runs, ``seed<S>/``, with
``repeats.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from volttl.config import Config, ConfigError, config_from_dict, load_yaml
from volttl.errors import VolttlError

CONFIG = "config.yaml"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
TENSORBOARD = "tensorboard"
REPEATS = "repeats.json"
TRAINING_DATA = "training_data.json"
OPERATING_POINT = "operating_point.json"
BAGS = "bags"
PSEUDO_SLICES = "pseudo_slices.json"


class RunError(VolttlError):
    """A run folder that is missing, incomplete or does not match the command."""


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))


class RunDir(_Folder):
    """A run folder (`volttl train`): the paths of every file a run holds."""

    @property
    def config(self) -> Path:
        """The resolved config the run was trained with."""
        return self.path / CONFIG

    @property
    def last(self) -> Path:
        """Model, optimiser, schedule and epoch after the latest epoch (what `--resume` continues)."""
        return self.path / LAST

    @property
    def best(self) -> Path:
        """The model at the best validation study AUROC, with the SHA-256 of its weights."""
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        """One line per finished epoch: training loss, validation figures, learning rates."""
        return self.path / METRICS

    @property
    def log(self) -> Path:
        """Everything volttl logged during training."""
        return self.path / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        """Scalars for TensorBoard."""
        return self.path / TENSORBOARD

    @property
    def repeats(self) -> Path:
        """A repeat group's seeds and their best validation figures (a group only)."""
        return self.path / REPEATS

    @property
    def training_data(self) -> Path:
        """What the run was trained on: the train and validation counts, a fingerprint of their
        studies, labels, windows and volumes, the install, and for a synthetic cohort what
        made it (so that predict and the model card say the model never saw a patient)."""
        return self.path / TRAINING_DATA

    @property
    def operating_point(self) -> Path:
        """The calibration and threshold evaluate chose on validation (checksummed)."""
        return self.path / OPERATING_POINT

    @property
    def bags(self) -> RunDir:
        """The first round's run (study labels, bags) of a run trained with pseudo slices."""
        return RunDir(self.path / BAGS)

    @property
    def pseudo_slices(self) -> Path:
        """The slices the first round's model saw as PE (checksummed record)."""
        return self.path / PSEUDO_SLICES

    def seed(self, seed: int) -> RunDir:
        """One seed's run inside a repeat group."""
        return RunDir(self.path / f"seed{seed}")

    def metrics_json(self, split: str) -> Path:
        """evaluate's figures on a split (a group's: mean, sd and each seed's)."""
        return self.path / f"metrics_{split}.json"

    def metrics_md(self, split: str) -> Path:
        """The same figures as a table."""
        return self.path / f"metrics_{split}.md"

    def predictions_csv(self, split: str) -> Path:
        """evaluate's per-study results on a split of the store, with their labels."""
        return self.path / f"predictions_{split}.csv"

    def curves_png(self, split: str) -> Path:
        """ROC and precision-recall curves on a split."""
        return self.path / f"curves_{split}.png"

    def reliability_png(self, split: str) -> Path:
        """The reliability diagram on a split, before and after calibration."""
        return self.path / f"reliability_{split}.png"

    def is_repeat_group(self) -> bool:
        return self.repeats.is_file()

    def finished_epochs(self) -> int:
        return len(self.metrics.read_text(encoding="utf-8").splitlines()) if self.metrics.is_file() else 0

    def seed_runs(self) -> list[str]:
        """The seed folders of a repeat group that hold a run (none for a single run)."""
        if self.config.is_file():
            return []
        return sorted((p.name for p in self.path.glob("seed*") if (p / CONFIG).is_file()),
                      key=lambda name: int(name[4:]) if name[4:].isdigit() else -1)

    def one_run(self, seed: int | None = None) -> RunDir:
        """The run a one-model step (cam, svcca, predict, export) works on: this run, or
        seed ``seed``'s run of a repeat group. A group without a seed, or without that
        seed, is refused naming its seeds, so no step picks one behind the user's back."""
        seeds = self.seed_runs()
        if not seeds:
            return self
        if seed is None:
            raise RunError(f"{self.path}: a repeat group of {len(seeds)} runs ({', '.join(seeds)}), "
                           f"not one run: give one seed's folder, e.g. {self.path / seeds[0]}, or --seed "
                           f"{seeds[0][4:]}")
        if f"seed{seed}" not in seeds:
            raise RunError(f"{self.path}: a repeat group without a seed {seed} run "
                           f"(it has {', '.join(seeds)})")
        return self.seed(seed)

    def read_config(self) -> Config:
        """The config the run was trained with."""
        if not self.path.exists():
            raise RunError(f"{self.path}: no such run folder")
        if not self.config.is_file():
            self.one_run()  # a repeat group: cam, predict, export take one model
            raise RunError(f"{self.path}: not a run dir (no {CONFIG})")
        try:
            raw = load_yaml(self.config.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ConfigError(f"the top level must be a mapping of sections, not a {type(raw).__name__}")
            return config_from_dict(raw)
        except (ConfigError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise RunError(f"{self.config}: unreadable run config ({first})") from None


def default_run_dir(cfg: Config) -> Path:
    """``train.out_dir/<model>_<strategy>[_<cut>]_seed<S>[-<S+N-1>]``."""
    t = cfg.transfer
    cut = f"_{t.cut}" if t.strategy != "ftl" else ""
    first, n = cfg.train.seed, cfg.train.repeats
    seeds = f"{first}" if n == 1 else f"{first}-{first + n - 1}"
    return Path(cfg.train.out_dir) / f"{cfg.model.name}_{t.strategy}{cut}_seed{seeds}"



class CamDir(_Folder):
    """`volttl cam --out`: each study's map on its CT grid, its views and its record (`volttl
    predict` writes the same beside its table, unless `--no-cam`)."""

    @property
    def summary(self) -> Path:
        """Every study's map: probability, peak and files."""
        return self.path / "cam_summary.json"

    @property
    def colour_table(self) -> Path:
        """The overlay's colour map (inferno) as a 3D Slicer colour table, which the scenes name."""
        return self.path / "volttl_inferno.ctbl"

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
        """The Grad-CAM map on the study's original CT grid (uint8, 0-255)."""
        return self.path / self.cam_name(study_id)

    def ct(self, study_id: str) -> Path:
        """The CT as NIfTI, for sources that are not NIfTI (the overlay's background)."""
        return self.path / self.ct_name(study_id)

    def preview(self, study_id: str) -> Path:
        """Three orthogonal slices through the map's peak, over the CT."""
        return self.path / self.preview_name(study_id)

    def record(self, study_id: str) -> Path:
        """The study's result (the per-study record) and the map's own fields: peak, target
        layer, method, stride, files."""
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
    """`volttl predict --out`: the predictions table, and the overlays of `volttl cam`."""

    @property
    def lock(self) -> Path:
        """Held while a predict writes here, so that a second one is refused."""
        return self.path / ".volttl-predict.lock"

    @property
    def csv(self) -> Path:
        """One row per scan (the per-study record, one value per cell), rewritten after every study."""
        return self.path / "predictions.csv"

    @property
    def json(self) -> Path:
        """The same records with their window lists, rewritten after every study."""
        return self.path / "predictions.json"


class SearchDir(_Folder):
    """`volttl search`: ``search.out_dir``."""

    @property
    def table_md(self) -> Path:
        """The search table: each trial's validation and test figures and costs."""
        return self.path / "search_table.md"

    @property
    def table_csv(self) -> Path:
        """The same rows, one value per cell."""
        return self.path / "search_table.csv"

    @property
    def table_json(self) -> Path:
        """The same rows, and which cut each stage chose."""
        return self.path / "search_table.json"

    @property
    def trials_csv(self) -> Path:
        """Every trial with its seeds' figures."""
        return self.path / "trials.csv"


class CompareDir(_Folder):
    """A pipeline's ``compare`` step: the transfer comparison's table and learning curve."""

    @property
    def table_md(self) -> Path:
        """Each row's test AUROC, paired differences against FTL and scratch, whether it
        learned, its costs."""
        return self.path / "compare_table.md"

    @property
    def table_json(self) -> Path:
        """The same, with every seed's figures."""
        return self.path / "compare_table.json"

    @property
    def curve_png(self) -> Path:
        """Test AUROC against the number of training studies (with ``train_studies``)."""
        return self.path / "learning_curve.png"

    @property
    def curve_json(self) -> Path:
        """The learning curve's figures."""
        return self.path / "learning_curve.json"


class SvccaDir(_Folder):
    """`volttl svcca --out`: where feature reuse stops (default ``<run>/svcca``)."""

    @property
    def record(self) -> Path:
        """SVCCA similarity of each cut's features before and after finetuning, with the random baseline."""
        return self.path / "svcca.json"

    @property
    def plot(self) -> Path:
        """The same as a plot."""
        return self.path / "svcca.png"


class SynthDir(_Folder):
    """`volttl synth --out`: the synthetic cohort, its manifest, and the record that says
    the cohort is synthetic (so that a run trained on it says so wherever it is used)."""

    @property
    def manifest(self) -> Path:
        """The cohort's manifest (studies, labels, splits, PE slices, lesion masks)."""
        return self.path / "manifest.csv"

    @property
    def cohort(self) -> Path:
        """What made the cohort (``synthetic: true``, its size and seed): a run trained on it
        says so wherever it is used."""
        return self.path / "cohort.json"

    def series(self, study_id: str) -> Path:
        """A study written as a DICOM series (one file per slice; the first study's folder
        also holds a localizer, ``scout.dcm``)."""
        return self.path / "studies" / study_id

    def nifti(self, study_id: str) -> Path:
        """A study written as NIfTI (the cohort alternates DICOM and NIfTI in pairs)."""
        return self.path / "studies" / f"{study_id}.nii.gz"

    def mask(self, study_id: str) -> Path:
        """The study's lesion mask on its grid (all zero for a negative)."""
        return self.path / "masks" / f"{study_id}_lesion.nii.gz"

    @staticmethod
    def scout(series: Path) -> Path:
        return series / "scout.dcm"

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
    """A pipeline's workdir (and `volttl demo`'s work folder): each step's outputs in its own
    folder, and the pipeline's records.

    Beside each output a later step reuses (and beside what `volttl cam`, `svcca` and
    `pretrain` write) a hidden, checksummed record of the inputs it was made from,
    ``.<name>.inputs.json``, lets a pipeline reuse it only while its inputs are the same."""

    @property
    def report_json(self) -> Path:
        """Every step's outputs and figures."""
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        """The same as a page (with a report step)."""
        return self.path / "report.md"

    @property
    def resolved_config(self) -> Path:
        """The pipeline's config after its ``set`` list."""
        return self.path / "pipeline_config.yaml"

    @property
    def demo_config(self) -> Path:
        """`volttl demo`'s config, written for the user to read and edit."""
        return self.path / "demo.yaml"

    @property
    def demo_pipeline(self) -> Path:
        """`volttl demo`'s pipeline."""
        return self.path / "demo_pipeline.yaml"


class StoreFiles(_Folder):
    """`volttl preprocess`: the HDF5 store ``data.store``: an index file whose studies are
    links to one file per study in the folder beside it, so that a killed preprocess keeps
    every finished study."""

    @property
    def studies(self) -> Path:
        """One HDF5 file per study (``<store>.d/``)."""
        return Path(f"{self.path}.d")

    def study(self, study_id: str) -> Path:
        """A study's stored volume, labels and windows."""
        return self.studies / f"{study_id}.h5"


class ProfileDir(_Folder):
    """`volttl profile`: ``profile.out_dir``."""

    @property
    def table_md(self) -> Path:
        """P(M), MACs(G) and T(ms) per strategy, under the named counting rule and input."""
        return self.path / "profile.md"

    @property
    def table_csv(self) -> Path:
        """The same rows, one value per cell."""
        return self.path / "profile.csv"


class TrialDir(_Folder):
    """One trial of `volttl search` (``search.out_dir/<model>_<strategy>_<cut>/``): a repeat
    group of runs, then its result."""

    @property
    def result(self) -> Path:
        """The finished trial's validation and test figures (checksummed; written last)."""
        return self.path / "trial.json"

    @property
    def log(self) -> Path:
        """The trial's output, when trials run as processes on several GPUs."""
        return self.path / "trial.log"


PACKAGE = "package.json"
TORCHSCRIPT = "model.torchscript.pt"
EXPORTED = "model.pt2"
CARD_MD, CARD_JSON = "model_card.md", "model_card.json"


class PackageDir(_Folder):
    """`volttl export --out`: a model package, read back by `predict --model`. Beside the
    files below it holds the run's ``config.yaml``, ``best.pt`` and
    ``operating_point.json``."""

    @property
    def manifest(self) -> Path:
        """The package format and version and every file's SHA-256 (checksummed)."""
        return self.path / PACKAGE

    @property
    def exported(self) -> Path:
        """The network as a ``torch.export`` program."""
        return self.path / EXPORTED

    @property
    def torchscript(self) -> Path:
        """The network traced to TorchScript."""
        return self.path / TORCHSCRIPT

    @property
    def card_md(self) -> Path:
        """The model card: data, figures on each split, intended use and limits."""
        return self.path / CARD_MD

    @property
    def card_json(self) -> Path:
        """The model card's figures, one value per key."""
        return self.path / CARD_JSON


class BundleDir(_Folder):
    """`volttl export --format monai-bundle --out`: a MONAI bundle around a model package."""

    PACKAGE = "models/package"
    METADATA, INFERENCE, README = "configs/metadata.json", "configs/inference.json", "docs/README.md"

    @property
    def package(self) -> Path:
        """The model package (`volttl export`'s folder) the bundle's network reads."""
        return self.path / self.PACKAGE

    @property
    def metadata(self) -> Path:
        """The bundle's metadata: version, inputs and outputs, the model card's figures."""
        return self.path / self.METADATA

    @property
    def inference(self) -> Path:
        """``python -m monai.bundle run`` over a folder of NIfTI volumes."""
        return self.path / self.INFERENCE

    @property
    def readme(self) -> Path:
        """The model card and how to run the bundle."""
        return self.path / self.README


class ReferenceDir(_Folder):
    """``docs/reference``: the pages generated from the code (``python -m
    volttl.reference_pages docs/reference``)."""

    @property
    def config(self) -> Path:
        """Every config key with its type, default and help."""
        return self.path / "config.md"

    @property
    def cli(self) -> Path:
        """Every command's ``--help``."""
        return self.path / "cli.md"

    @property
    def layouts(self) -> Path:
        """This page: every output folder and its files."""
        return self.path / "layouts.md"


def inputs_record(output: Path) -> Path:
    """Where the inputs ``output`` was made from are kept: a hidden file beside it."""
    return output.with_name(f".{output.name}.inputs.json")


# the folders docs/reference/layouts.md shows, in the order a user meets them
FOLDERS = (SynthDir, StoreFiles, RunDir, CamDir, PredictDir, PackageDir, BundleDir, SearchDir, TrialDir,
           CompareDir, SvccaDir, ProfileDir, PipelineDir, ReferenceDir)
