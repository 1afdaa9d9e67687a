"""Writing files so that a crash, a kill or a full disk never leaves a half-written file under a final name.

:class:`AtomicFile` writes to ``<name>.d2b-<random>.tmp`` in the same directory, then on close
flushes, ``fsync``\\ s, renames onto the final name (``os.replace``, atomic on POSIX) and syncs
the directory. The file is created with mode ``0o666`` minus the process umask, like every
other output. On any error the temporary is removed and the final name keeps its old content.

:class:`AtomicPathManager` wraps an iopath ``PathManager`` so that ``open(path, "w"/"wb")`` of a
local path returns an :class:`AtomicFile`; everything else (reads, remote paths, ``ls``,
``rm``, ...) goes to the wrapped manager. The checkpointer installs it as its ``path_manager``,
so fvcore's own ``Checkpointer.save`` and ``tag_last_checkpoint`` run unchanged and write
atomically; a non-local ``OUTPUT_DIR`` keeps working through the original manager.

:func:`remove_stale_temporaries` deletes temporaries left by killed runs (only names of this
package's pattern). A write that fails with ``ENOSPC`` is remembered on the path manager
(:attr:`AtomicPathManager.last_enospc`), because ``torch.save`` buries the ``OSError`` under
its own ``RuntimeError``.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with AtomicFile(os.path.join(d, "tag"), "w") as f:
    ...     _ = f.write("model_final.pth")
    >>> sorted(os.listdir(d)), open(os.path.join(d, "tag")).read()
    (['tag'], 'model_final.pth')
"""
import contextlib
import errno
import io
import logging
import os
import re
import secrets
import signal
from typing import List, Optional

__all__ = ["AtomicFile", "AtomicPathManager", "remove_stale_temporaries", "TEMP_PATTERN"]

logger = logging.getLogger("d2_backbones")

# <final name>.d2b-<8 hex>.tmp ; and the pattern of d2_backbones 0.1 (tempfile.mkstemp: <name>.<8 chars>.tmp)
TEMP_PATTERN = re.compile(r"^(?P<final>.+)\.d2b-[0-9a-f]{8}\.tmp$")
_OLD_TEMP_PATTERN = re.compile(r"^(?P<final>(?:model_\w+\.pth|last_checkpoint))\.[A-Za-z0-9_]{8}\.tmp$")

# Test-only fault injection: "<basename>" -> the process SIGKILLs itself halfway through writing that file.
_KILL_ENV = "D2B_TEST_SIGKILL_WRITING"


class AtomicFile(io.RawIOBase):
    """A write-only file that appears under ``path`` only when closed without error (see the module doc).

    ``mode`` is ``"w"`` (text, utf-8) or ``"wb"``. ``on_enospc(path)`` is called when the disk is full.
    """

    def __init__(self, path: str, mode: str = "wb", on_enospc=None):
        super().__init__()
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes only ('w' or 'wb'), not {mode!r}")
        self.path = path
        self.text = mode == "w"
        self._on_enospc = on_enospc
        directory = os.path.dirname(os.path.abspath(path))
        self.tmp = os.path.join(directory, f"{os.path.basename(path)}.d2b-{secrets.token_hex(4)}.tmp")
        self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._written = 0
        self._kill_at = os.environ.get(_KILL_ENV) == os.path.basename(path)

    def writable(self) -> bool:
        return True

    def _fail(self, e: OSError):
        if e.errno == errno.ENOSPC and self._on_enospc is not None:
            self._on_enospc(self.path)
        raise e

    def write(self, data) -> int:
        if self._fd is None:
            raise ValueError("write to a closed AtomicFile")
        buf = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if self._kill_at and self._written > 0:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a partial temporary on disk
        view = memoryview(buf)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self._fail(e)
        self._written += len(buf)
        return len(buf)

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
            os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.discard()
            self._fail(e)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        super().close()

    def discard(self) -> None:
        """Drop the temporary; the final name is untouched."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.remove(self.tmp)
        super().close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False

    def __del__(self):  # an AtomicFile that is never closed never replaces the final file
        if getattr(self, "_fd", None) is not None:
            self.discard()


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicPathManager:
    """Delegates to an iopath ``PathManager``; ``open`` for writing a local path gives an :class:`AtomicFile`."""

    def __init__(self, path_manager):
        self._pm = path_manager
        self.last_enospc: Optional[str] = None

    def _local(self, path: str) -> bool:
        return "://" not in str(path)

    def open(self, path: str, mode: str = "r", **kwargs):
        if mode in ("w", "wb") and self._local(path):
            return AtomicFile(path, mode, on_enospc=self._record_enospc)
        return self._pm.open(path, mode, **kwargs)

    def _record_enospc(self, path: str) -> None:
        self.last_enospc = path

    def __getattr__(self, name):
        return getattr(self._pm, name)


def remove_stale_temporaries(directory: str, log: Optional[logging.Logger] = None) -> List[str]:
    """Delete this package's temporaries (``*.d2b-XXXXXXXX.tmp``) in ``directory``; log one line if any.

    Only call it when no other process writes checkpoints into ``directory`` (train_net calls it
    once at start, on the main process).
    """
    if not os.path.isdir(directory):
        return []
    removed, size = [], 0
    for name in sorted(os.listdir(directory)):
        if TEMP_PATTERN.match(name) or _OLD_TEMP_PATTERN.match(name):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                size += os.path.getsize(path)
                os.remove(path)
                removed.append(name)
    if removed:
        (log or logger).info(f"Removed {len(removed)} temporary file(s) left by an interrupted run in {directory} "
                             f"({size / 2 ** 20:.1f} MB): {', '.join(removed)}")
    return removed
