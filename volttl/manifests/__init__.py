"""Manifests: the per-study label table, and importers for public datasets."""

from volttl.manifests.schema import ManifestError, StudyRow, read_manifest, write_manifest

__all__ = ["ManifestError", "StudyRow", "read_manifest", "write_manifest"]
