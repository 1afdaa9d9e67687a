"""Reading checkpoint files so that nothing a file contains can run code.

Every path of the package that opens a weights file goes through :func:`load_file`:

* ``.pth`` / ``.pt`` / ``.pyth`` / anything that is not a ``.pkl``: ``torch.load(...,
  weights_only=True)``. PyTorch's own restricted unpickler allows tensors, numpy arrays and
  plain containers; a file that wants any other global is refused before any of it runs.
* ``.pkl`` (detectron2 / Detectron / Caffe2 model-zoo files, e.g. the MSRA ImageNet weights
  ``R-50.pkl``: ``{"blobs": {name: ndarray}, ...}`` or ``{"model": {...}, "__author__": ...}``):
  :class:`RestrictedUnpickler`, which resolves only numpy's array/dtype/scalar reconstructors and
  builtin containers. detectron2's own loader reads these with plain ``pickle``, which runs any
  ``__reduce__`` a file carries; this package never hands a user file to it. A ``.pkl`` that is in
  fact a ``torch.save`` zip archive is read as a ``.pth``.

* ``.safetensors`` (timm's and Hugging Face's hub files): ``safetensors.torch.load_file``; the format
  holds tensors and a JSON header, nothing that runs.

A refused file raises :class:`UnsafeCheckpointError` naming the file and the refused global;
an unreadable one (truncated, not a checkpoint) raises :class:`CheckpointReadError`. A path that
is not a regular file (a directory, a named pipe, a device such as ``/dev/zero``, a socket, a
dangling symlink) is refused by :func:`check_file_kind` from its ``os.stat`` alone, before it is
opened, so a FIFO never blocks the reader.

Example::

    >>> import numpy as np, pickle, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "R-tiny.pkl")
    >>> with open(path, "wb") as f:
    ...     pickle.dump({"blobs": {"conv1_w": np.ones((4, 3, 7, 7), np.float32)}}, f, protocol=2)
    >>> load_file(path)["blobs"]["conv1_w"].shape
    (4, 3, 7, 7)
"""
import codecs
import io
import os
import pickle
import stat
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointReadError", "UnsafeCheckpointError", "RestrictedUnpickler", "load_file", "check_file_kind",
           "ALLOWED_GLOBALS"]


class CheckpointReadError(ValueError):
    """A weights file that cannot be read: missing, truncated, not a checkpoint."""


class UnsafeCheckpointError(CheckpointReadError):
    """A weights file whose pickle asks for a global outside the allow-list (it could run code)."""


def _numpy_multiarray(name: str):
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core to numpy._core
    return getattr(core.multiarray, name)


def _numpy_numeric(name: str):
    core = getattr(np, "_core", None) or np.core
    return getattr(core.numeric, name)


# (module, name) -> object. numpy arrays pickle as _reconstruct(ndarray, shape, dtype) + __setstate__
# (protocol <= 4) or _frombuffer(buffer, dtype, shape, order) (protocol 5, Python 3.14's default);
# numpy scalars as scalar(dtype, bytes); Python 3 pickles of bytes at protocol 2 use _codecs.encode.
_NUMPY_CORE = ("numpy.core", "numpy._core")
ALLOWED_GLOBALS = {
    **{(f"{core}.multiarray", "_reconstruct"): _numpy_multiarray("_reconstruct") for core in _NUMPY_CORE},
    **{(f"{core}.multiarray", "scalar"): _numpy_multiarray("scalar") for core in _NUMPY_CORE},
    **{(f"{core}.numeric", "_frombuffer"): _numpy_numeric("_frombuffer") for core in _NUMPY_CORE},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,
}
# What torch's weights_only unpickler may additionally resolve: numpy arrays inside a .pth.
_TORCH_SAFE_NUMPY = [_numpy_multiarray("_reconstruct"), _numpy_multiarray("scalar"), np.ndarray, np.dtype] + sorted(
    {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                 np.uint8, np.bool_)}, key=lambda c: c.__name__)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` (numpy arrays, dtypes, scalars,
    ``OrderedDict``); every other global - ``os.system``, ``builtins.eval``, ``subprocess.*``,
    ``torch.*`` - raises :class:`UnsafeCheckpointError` before anything is called."""

    def __init__(self, file, *, source: str = "<stream>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refused - the pickle asks for the global '{module}.{name}', which is not a numpy "
                f"array, dtype or plain container, and could run code. Nothing from the file was executed. A "
                f"detectron2/Detectron .pkl holds only numpy arrays; if you trust this file, load it in a separate "
                f"trusted environment and re-save its tensors with torch.save(state_dict).")
        return obj

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source}: refused - the pickle uses persistent ids ({pid!r}), which a "
                                    f"plain .pkl of numpy arrays never does.")


def _first_line(e: BaseException) -> str:
    """The informative line of an error: torch's weights_only refusal names the global on a line of its own."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.split(":")[0]]
    return (named or lines or [type(e).__name__])[0 if named else -1]


def _torch_load(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(_TORCH_SAFE_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused - its pickle wants to import or call something other than tensors, numpy arrays and "
            f"plain containers, which could execute code. Nothing from it was run. Details: {_first_line(e)}. If you "
            f"trust the file, re-save its state_dict as plain tensors in a trusted environment.") from None
    except Exception as e:  # zip errors, truncated streams, not a torch file at all
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): "
                                  f"{type(e).__name__}: {_first_line(e)}") from None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_file_kind(path: str) -> None:
    """Raise :class:`CheckpointReadError` unless ``path`` is a regular file (or a symlink to one).

    Decided from ``os.stat`` only: nothing is opened, so a named pipe cannot block. The message says
    what the path is (a directory lists the weights files in it)."""
    link = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no such file{' - a symlink whose target does not exist' if link else ''}"
                                  f"{link}.") from None
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot be read ({e.strerror}){link}.") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    hint = "give the path of a weights file (.pth / .pkl)"
    if stat.S_ISDIR(st.st_mode):
        try:
            found = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pkl", ".pt")))
        except OSError:
            found = []
        hint += (f" - this directory holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}" if found else
                 " - this directory holds none")
    raise CheckpointReadError(f"{path}{link} is {kind}, not a weights file; it was not opened. Fix: {hint}.")


def _safetensors_load(path: str) -> Any:
    try:
        from safetensors.torch import load_file as read_safetensors
    except ImportError:
        raise CheckpointReadError(f"{path}: reading .safetensors files needs the safetensors package. Fix: pip "
                                  f"install safetensors.") from None
    try:
        return read_safetensors(path, device="cpu")
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointReadError(f"{path}: not a readable .safetensors file (truncated or corrupted?): "
                                  f"{type(e).__name__}: {_first_line(e)}") from None


def load_file(path: str) -> Any:
    """Read a local weights file without running code from it (see the module docstring)."""
    check_file_kind(path)  # before anything opens it: a FIFO would block
    if path.endswith(".safetensors"):
        return _safetensors_load(path)
    if not path.endswith(".pkl") or zipfile.is_zipfile(path):
        return _torch_load(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=path, encoding="latin1").load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise CheckpointReadError(f"{path}: not a readable .pkl checkpoint (truncated or corrupted?): "
                                  f"{type(e).__name__}: {_first_line(e)}") from None
