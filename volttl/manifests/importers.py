"""One entry point for every manifest source, shared by `volttl manifest` and the
pipeline's ``manifest`` step, so both accept the same formats and options."""

from __future__ import annotations

from pathlib import Path

from volttl.manifests.schema import ManifestError, StudyRow, read_manifest

FORMATS = ("penet", "rsna", "csv")


def import_manifest(fmt: str, *, series_list: str | Path | None = None, hdf5: str | Path | None = None,
                    all_types: bool = False, root: str | Path | None = None,
                    csv: str | Path | None = None, val: float = 0.15, test: float = 0.15,
                    seed: int = 0, input: str | Path | None = None) -> list[StudyRow]:
    """The rows of a manifest built from ``fmt``:

    - ``penet``: PENet's ``series_list`` pickle and ``hdf5`` (subsegmental positives
      dropped unless ``all_types``);
    - ``rsna``: the RSNA STR PE ``root`` and its ``csv`` (default ``root/train.csv``),
      split by hashing each study into ``val`` and ``test`` fractions with ``seed``;
    - ``csv``: a generic manifest ``input``, checked.
    """

    def need(value, name: str):
        if value in (None, ""):
            raise ManifestError(f"manifest format '{fmt}' needs '{name}'")
        return value

    if fmt == "penet":
        from volttl.manifests.penet import load_series_list, penet_filter, penet_rows

        series = load_series_list(need(series_list, "series_list"))
        return penet_rows(series if all_types else penet_filter(series), need(hdf5, "hdf5"))
    if fmt == "rsna":
        from volttl.manifests.rsna import rsna_rows

        return rsna_rows(need(root, "root"), csv, val=val, test=test, seed=seed)
    if fmt == "csv":
        return read_manifest(need(input, "input"))
    raise ManifestError(f"manifest format '{fmt}' is not one of {', '.join(FORMATS)}")


def split_counts(rows: list[StudyRow]) -> str:
    """``train N (P positive), val ..., test ...``."""
    parts = []
    for split in ("train", "val", "test"):
        n = sum(r.split == split for r in rows)
        pos = sum(r.split == split and r.label == 1 for r in rows)
        parts.append(f"{split} {n} ({pos} positive)")
    return ", ".join(parts)
