"""Manifests: the per-study label table, and importers for public datasets."""

from volttl.manifests.importers import FORMATS, import_manifest, split_counts
from volttl.manifests.schema import ManifestError, StudyRow, read_manifest, write_manifest

__all__ = ["FORMATS", "ManifestError", "StudyRow", "import_manifest", "read_manifest", "split_counts",
           "write_manifest"]
