"""The Stanford CTPA dataset as PENet ships it: ``series_list.pkl`` + ``data.hdf5``.

The pickle holds ``ct.CTPE`` objects. It is read with a restricted unpickler that maps
that one class to a plain stand-in and refuses every other global, so the file can
never run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from volttl.manifests.schema import ManifestError, StudyRow

ALLOWED_CLASSES = {("ct.ct_pe", "CTPE"), ("ct", "CTPE"), ("ct_pe", "CTPE")}
DEFAULT_TYPES = ("central", "segmental")


@dataclass
class CTPE:
    """Stand-in for PENet's ``ct.CTPE``: only the attributes, no behaviour."""

    study_num: int = -1
    slice_thickness: float = 1.25
    is_positive: int = 0
    num_slices: int = 0
    pe_idxs: list = field(default_factory=list)
    phase: str = ""
    type: str = ""
    extra: dict = field(default_factory=dict)

    def __setstate__(self, state: dict) -> None:
        known = {k: state.pop(k) for k in list(state) if k in self.__dataclass_fields__}
        self.__init__(**known)
        self.extra = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_CLASSES:
            return CTPE
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_series_list(path: str | Path) -> list[CTPE]:
    """Read PENet's ``series_list.pkl`` safely."""
    path = Path(path)
    try:
        data = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise ManifestError(f"{path}: file not found") from None
    except Exception as exc:
        raise ManifestError(f"{path}: not a PENet series list ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(s, CTPE) for s in data):
        raise ManifestError(f"{path}: expected a list of CTPE records")
    return data


def penet_filter(series: list[CTPE], types: tuple[str, ...] = DEFAULT_TYPES) -> list[CTPE]:
    """PENet's default: every negative; positives only of the given types."""
    return [s for s in series if not s.is_positive or s.type in types]


def penet_rows(series: list[CTPE], hdf5: str | Path) -> list[StudyRow]:
    """Manifest rows pointing at ``hdf5#<study_num>``."""
    rows = []
    for s in series:
        if s.phase not in ("train", "val", "test"):
            raise ManifestError(f"study {s.study_num}: unknown phase {s.phase!r}")
        rows.append(StudyRow(
            study_id=str(s.study_num), path=f"{Path(hdf5).resolve()}#{s.study_num}",
            label=int(bool(s.is_positive)), split=s.phase,
            pe_slices=sorted(set(int(i) for i in s.pe_idxs)),
            extras={"slice_thickness": str(s.slice_thickness), "type": s.type or "",
                    "num_slices": str(s.num_slices)},
        ))
    return rows
