"""Study paths as manifests write them: a file or folder, or PENet's ``file.hdf5#dataset``.

One rule, used by the manifest reader, preprocess, the readers and cam: the ``#`` is an
address only after an HDF5 file name, so a real path with ``#`` in it (``CT Chest #2``)
stays a path.
"""

from __future__ import annotations

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def split_hdf5_address(path: str) -> tuple[str, str | None]:
    """PENet's ``file.hdf5#dataset`` address -> ``(file, dataset)``; any other path, a
    ``#`` in a folder or file name included (``CT Chest #2``), -> ``(path, None)``."""
    file, sep, name = str(path).rpartition("#")
    if sep and file.lower().endswith(HDF5_SUFFIXES) and "/" not in name:
        return file, name
    return str(path), None


def source_file(path: str) -> str:
    """The file or folder on disk a study path names (the HDF5 file of an address)."""
    return split_hdf5_address(path)[0]
