"""Loading the weights of checkpoints that pickle more than tensors, without running them.

PENet's Kinetics-600 file was saved by PyTorch 0.4-era code: beside ``model_state`` it
may pickle scheduler objects (``functools.partial``), numpy scalars and optimiser state.
``torch.load(weights_only=True)`` refuses such files outright. This module gives
``torch.load`` a pickle module whose unpickler resolves only the globals that rebuild
tensors and plain containers; every other global becomes :class:`Inert`, a class that
records its arguments and does nothing, so nothing in the file is ever called. A file
that names a global of a module that runs code (``os.system``, ``builtins.eval``,
``subprocess`` ...) is refused outright: it loads nothing. Old (non-zip) and zip files
both go through it.
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from pathlib import Path

import torch

# The globals a weights file needs: tensor and parameter rebuilding, plain containers.
ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
# Modules whose globals can run commands or code: a file naming one is refused whole.
DANGEROUS = ("os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy",
             "shutil", "socket", "pickle", "marshal", "types", "code", "codeop", "ctypes", "multiprocessing",
             "pty", "commands", "webbrowser", "platform", "pdb", "io", "tempfile", "pathlib", "operator",
             "functools.reduce", "torch.hub", "torch.serialization", "torch._C", "numpy.testing")


class DangerousPickleError(pickle.UnpicklingError):
    """The pickle names a global that could run code."""


class Inert:
    """Stands in for any object the file pickles that is not a tensor or a container:
    it keeps the name and arguments and is never called."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {type(self).__qualname__}>"


def _inert_class(module: str, name: str) -> type:
    return type(f"{module}.{name}", (Inert,), {"__module__": "volttl.models.legacy_pickle"})


def _dangerous(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    return any(module == d or module.startswith(d + ".") or full == d for d in DANGEROUS)


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors and containers as they are; any other object inert; code never."""

    replaced: list[str]

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if _dangerous(module, name):
            raise DangerousPickleError(f"{module}.{name}")
        self.replaced.append(f"{module}.{name}")
        return _inert_class(module, name)


def restricted_pickle_module(replaced: list[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module that ``torch.load`` can use."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.replaced = replaced

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs):
        return load(io.BytesIO(data), **kwargs)

    module = types.ModuleType("volttl_restricted_pickle")
    module.Unpickler, module.load, module.loads = Unpickler, load, loads
    module.__name__ = "volttl_restricted_pickle"
    return module


def load_weights_only(path: str | Path) -> tuple[object, list[str]]:
    """The file's object with tensors rebuilt and every other global inert, and the names
    of the globals that were made inert. Raises :class:`DangerousPickleError` for a file
    that names a global able to run code."""
    replaced: list[str] = []
    obj = torch.load(path, map_location="cpu", weights_only=False,
                     pickle_module=restricted_pickle_module(replaced))
    return obj, sorted(set(replaced))
