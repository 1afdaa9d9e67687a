"""An output directory belongs to one run: a lock, no silent reuse, and a full disk that names its file.

Both trainers (``train_net``: ``OUTPUT_DIR``; ``lazy_train``: ``train.output_dir``) call
:func:`claim_output_dir` in their ``setup()``, before the model is built:

* **One run at a time.** The main process takes an exclusive ``fcntl.flock`` on
  ``<dir>/.d2b_run.lock`` and holds it for the life of the process; the file records the pid,
  host, command line and start time. A second trainer on the same directory stops with
  :class:`OutputDirInUseError` naming that process. The operating system drops the lock when
  the holder exits or is killed, so a killed run leaves no stale lock (the file stays, unlocked).
  ``--eval-only`` takes no lock (evaluating while another run trains is legitimate).
* **A fresh run does not reuse another run's files.** Without ``--resume``, a directory that
  holds a previous run (``last_checkpoint``, checkpoint files, ``metrics.json``) is refused with
  the three ways on: ``--resume``, another directory, or ``--overwrite``, which moves the previous
  run's files into ``<dir>/previous_run_<YYYYmmdd-HHMMSS>/`` (nothing is deleted).
* :func:`check_max_to_keep`: ``0`` and ``-1`` keep every periodic checkpoint, other negatives are
  refused.
* **A full disk names the file.** :func:`guard_writers` wraps detectron2's event writers
  (``metrics.json``, TensorBoard events) and :func:`no_space_left` any other write of a run, so
  that ``ENOSPC`` ends with the weights layer's :class:`~d2_backbones.weights.CheckpointWriteError`
  ``No space left on device while writing <file>; the last complete checkpoint is <file>``.

Example::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> claim = lock_output_dir(d)
    >>> lock_output_dir(d) == claim     # the same process may claim it again
    True
    >>> check_max_to_keep(-1, "SOLVER.MAX_TO_KEEP") is None   # keep all
    True
"""
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from typing import Dict, Iterator, List, Optional

from detectron2.utils.events import EventWriter

from .errors import ConfigError, is_int
from .weights.checkpointer import CheckpointWriteError, check_max_to_keep
from .weights.write import AtomicFile

__all__ = ["LOCK_NAME", "OutputDirInUseError", "lock_output_dir", "previous_run", "move_previous_run",
           "claim_output_dir", "Claim", "check_max_to_keep", "last_complete_checkpoint", "no_space_error",
           "no_space_left", "call_guarded", "guard_writers", "GuardedWriter", "keep_run_config"]

logger = logging.getLogger("d2_backbones")

LOCK_NAME = ".d2b_run.lock"
ELASTIC_RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # > 0: torchrun restarted the run after a failure
ELASTIC_LOCK_WAIT = 60.0  # seconds a restarted run waits for the stopped attempt's lock
PREVIOUS_PREFIX = "previous_run_"

# what a run writes into its directory (moved aside by --overwrite); the lock and earlier previous_run_* stay
_RUN_FILE = re.compile(r"^(last_checkpoint|metrics\.json|config(_eval)?\.yaml|log\.txt(\.rank\d+)?|curves\.png|"
                       r"predictions\.png|events\.out\.tfevents\..*|inference|model_.+\.pth|"
                       r".+\.d2b-[0-9a-f]{8}\.tmp)$")
_CHECKPOINT = re.compile(r"^model_.+\.pth$")  # the trainers' checkpoints (a user's own weights file is not one)

# realpath of a lock file -> the descriptor this process holds it with (kept open for the life of the process)
_HELD: Dict[str, int] = {}


class OutputDirInUseError(ConfigError):
    """Another live process holds the output directory's lock."""


# ---------------------------------------------------------------------------------------------- the lock
def _holder_info() -> Dict[str, object]:
    argv = [sys.executable] + list(sys.argv)
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(shlex.quote(a) for a in argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}, command line: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded its details yet"


def lock_output_dir(output_dir: str, key: str = "OUTPUT_DIR", wait: float = 0.0) -> Optional[str]:
    """Take the run lock of ``output_dir`` (created if missing) for the life of this process.

    Returns the lock file's path (``None`` for a non-local directory). Claiming a directory this
    process already holds is a no-op. Raises :class:`OutputDirInUseError` naming the holder, after
    trying for ``wait`` seconds (an elastic restart waits for the stopped attempt's process to end).
    """
    if not output_dir or "://" in str(output_dir):
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    real = os.path.realpath(path)
    if real in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            holder = os.read(fd, 1 << 16).decode("utf-8", "replace")
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            waited = f" (waited {wait:g} s for it to end)" if wait else ""
            raise OutputDirInUseError(
                f"{key} {output_dir} is in use by another run ({_describe_holder(holder)}){waited}. Two runs in one "
                f"directory overwrite each other's checkpoints, config.yaml and metrics.json. Fix: let that run finish "
                f"(or stop it), or choose another {key}; --eval-only needs no lock.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_info()).encode("utf-8"), 0)
    _HELD[real] = fd
    return path


def _close_in_forked_child() -> None:
    # a forked child (a data-loader worker) closes its copies, so that only the run itself keeps the lock alive
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


def _release(output_dir: str) -> None:
    """Drop this process's lock of ``output_dir`` (tests; a run keeps it until it exits)."""
    fd = _HELD.pop(os.path.realpath(os.path.join(output_dir, LOCK_NAME)), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- a previous run
def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The file name ``<output_dir>/last_checkpoint`` names, or ``None``."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def previous_run(output_dir: str) -> Optional[str]:
    """``"last_checkpoint -> model_0000039.pth, 3 checkpoint files, metrics.json"`` when ``output_dir`` holds
    files of a run (``None`` when it holds none: a missing or empty directory, or only a log/config.yaml)."""
    if not output_dir or "://" in str(output_dir) or not os.path.isdir(output_dir):
        return None
    names = set(os.listdir(output_dir))
    parts = []
    tag = last_complete_checkpoint(output_dir) if "last_checkpoint" in names else None
    if "last_checkpoint" in names:
        parts.append(f"last_checkpoint -> {tag}")
    n = sum(1 for name in names if _CHECKPOINT.match(name) and os.path.isfile(os.path.join(output_dir, name)))
    if n:
        parts.append(f"{n} checkpoint file{'s' if n != 1 else ''}")
    if "metrics.json" in names and os.path.getsize(os.path.join(output_dir, "metrics.json")) > 0:
        parts.append("metrics.json")  # empty: the writer was opened by a run that stopped before logging
    return ", ".join(parts) or None


def move_previous_run(output_dir: str) -> Dict[str, str]:
    """Move the run files of ``output_dir`` into a new ``previous_run_<YYYYmmdd-HHMMSS>/`` beside them.

    Returns ``{old absolute path: new absolute path}``. Nothing is deleted; the lock file and
    earlier ``previous_run_*`` folders stay where they are.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(output_dir, PREVIOUS_PREFIX + stamp)
    i = 1
    while os.path.exists(dest):
        dest = os.path.join(output_dir, f"{PREVIOUS_PREFIX}{stamp}-{i}")
        i += 1
    os.makedirs(dest)
    moved = {}
    for name in sorted(os.listdir(output_dir)):
        if name == LOCK_NAME or name.startswith(PREVIOUS_PREFIX) or not _RUN_FILE.match(name):
            continue
        src, dst = os.path.join(output_dir, name), os.path.join(dest, name)
        os.rename(src, dst)
        moved[os.path.abspath(src)] = os.path.abspath(dst)
    return moved


class Claim:
    """What :func:`claim_output_dir` did: the lock taken (or not), the files moved by ``--overwrite``, the elastic
    restart it resumes (``restart`` > 0)."""

    def __init__(self, lock: Optional[str] = None, moved: Optional[Dict[str, str]] = None, key: str = "OUTPUT_DIR",
                 restart: int = 0):
        self.lock = lock
        self.moved = moved or {}
        self.key = key
        self.restart = restart

    def moved_path(self, path: str) -> str:
        """``path``, or where ``--overwrite`` moved it (for ``MODEL.WEIGHTS`` pointing into the old run)."""
        if not path or "://" in str(path):
            return path
        return self.moved.get(os.path.abspath(path), path)

    def log(self, log: logging.Logger, weights_key: Optional[str] = None, weights: Optional[str] = None) -> None:
        if self.restart:
            log.info(f"Elastic restart {self.restart} ({ELASTIC_RESTART_ENV}={self.restart}): the run continues "
                     f"from the last complete checkpoint in {self.key}, as with --resume.")
        if not self.moved:
            return
        dest = os.path.dirname(next(iter(self.moved.values())))
        log.info(f"--overwrite: moved the previous run's {len(self.moved)} file(s) in {self.key} to {dest}/: "
                 f"{', '.join(sorted(os.path.basename(p) for p in self.moved))}")
        if weights_key and weights and weights in self.moved.values():
            log.info(f"--overwrite: {weights_key} named a file of the previous run; it is read from {weights}.")


def claim_output_dir(output_dir: str, args, key: str = "OUTPUT_DIR") -> Claim:
    """Lock ``output_dir`` for this run and refuse (or with ``--overwrite`` move aside) a previous run's files.

    ``args`` are the command line's (``resume``, ``eval_only``, ``overwrite``) and ``elastic_restart``, set by
    :func:`d2_backbones.launch.elastic_restart` after an elastic restart (with ``resume``): the lock of the stopped
    attempt is waited for (:data:`ELASTIC_LOCK_WAIT` seconds; the operating system releases it when that process
    ends). Only the main process (rank 0) locks and checks; ``--eval-only`` does neither.
    """
    from detectron2.utils import comm

    if getattr(args, "eval_only", False):
        return Claim(key=key)
    claim = _claim_on_main(output_dir, args, key) if comm.get_rank() == 0 else Claim(key=key)
    if comm.get_world_size() > 1:
        # the other processes wait until the main one has moved a previous run aside, and learn where it went
        # (for MODEL.WEIGHTS naming one of its files); if the main process stops here, launch ends them all
        moved = comm.all_gather(claim.moved)[0]
        if comm.get_rank() != 0:
            claim = Claim(moved=moved, key=key)
    return claim


def _claim_on_main(output_dir: str, args, key: str) -> Claim:
    resume, overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output directory and --overwrite moves it aside: "
                          "pass one of them.")
    restart = int(getattr(args, "elastic_restart", 0) or 0)
    lock = lock_output_dir(output_dir, key, wait=ELASTIC_LOCK_WAIT if restart else 0.0)
    held = previous_run(output_dir) if lock else None
    if held is None or resume:
        return Claim(lock, key=key, restart=restart)
    if not overwrite:
        raise ConfigError(
            f"{key} {output_dir} holds a previous run ({held}): continue it with --resume, choose another {key}, "
            f"or pass --overwrite to move its files to {os.path.join(output_dir, PREVIOUS_PREFIX)}"
            f"<YYYYmmdd-HHMMSS>/")
    return Claim(lock, move_previous_run(output_dir), key=key)


# ---------------------------------------------------------------------------------------------- MAX_TO_KEEP
@contextlib.contextmanager
def keep_run_config(output_dir: str, eval_only: bool) -> Iterator[None]:
    """Around detectron2's ``default_setup`` (which writes ``<dir>/config.yaml``): with ``--eval-only`` the
    training run's ``config.yaml`` stays, and the evaluation's config is written to ``config_eval.yaml``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "config.yaml"), "w") as f:
    ...     _ = f.write("the training run's")
    >>> with keep_run_config(d, eval_only=True):
    ...     with open(os.path.join(d, "config.yaml"), "w") as f:   # what default_setup does
    ...         _ = f.write("the evaluation's")
    >>> [open(os.path.join(d, n)).read() for n in ("config.yaml", "config_eval.yaml")]
    ["the training run's", "the evaluation's"]
    """
    path = os.path.join(output_dir, "config.yaml") if output_dir else ""
    if not eval_only or not path or "://" in path or not os.path.isfile(path):
        yield
        return
    with open(path, "rb") as f:
        kept = f.read()
    try:
        yield
    finally:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                written = f.read()
            if written != kept:

                with AtomicFile(os.path.join(output_dir, "config_eval.yaml"), "wb") as f:
                    f.write(written)
                with AtomicFile(path, "wb") as f:
                    f.write(kept)
                logger.info(f"--eval-only: wrote this evaluation's config to "
                            f"{os.path.join(output_dir, 'config_eval.yaml')}; config.yaml stays the training run's.")


# ---------------------------------------------------------------------------------------------- full disk
def no_space_error(path: str, output_dir: str):
    """The weights layer's :class:`CheckpointWriteError`, for ``path`` (any file of the run)."""

    last = last_complete_checkpoint(output_dir) if output_dir else None
    err = CheckpointWriteError(
        f"No space left on device while writing {path}; the last complete checkpoint is "
        + (os.path.join(output_dir, last) if last else f"none (no checkpoint in {output_dir})"))
    err.errno = errno.ENOSPC
    return err


def _is_enospc(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def no_space_left(path: str, output_dir: str) -> Iterator[None]:
    """Turn an ``ENOSPC`` raised inside the block into :func:`no_space_error` for ``path`` (the error's own
    file name when it has one)."""

    try:
        yield
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError) as e:
        if not _is_enospc(e):
            raise
        raise no_space_error(getattr(e, "filename", None) or path, output_dir) from e


def call_guarded(fn, path: str, output_dir: str, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside :func:`no_space_left` (e.g. an evaluation writing its results into ``path``)."""
    with no_space_left(path, output_dir):
        return fn(*args, **kwargs)


def _writer_file(writer: EventWriter, output_dir: str) -> str:
    handle = getattr(writer, "_file_handle", None)  # JSONWriter
    if getattr(handle, "name", None):
        return str(handle.name)
    args = getattr(writer, "_writer_args", None)  # TensorboardXWriter (newer detectron2: made on first write)
    log_dir = args.get("log_dir") if isinstance(args, dict) else None
    inner = getattr(writer, "_writer", None)  # detectron2 0.6: the SummaryWriter itself
    log_dir = log_dir or getattr(inner, "logdir", None) or getattr(inner, "log_dir", None)
    if log_dir:
        return os.path.join(str(log_dir), "events.out.tfevents.*")
    return f"{type(writer).__name__}'s output in {output_dir}"


class GuardedWriter(EventWriter):
    """An event writer whose ``ENOSPC`` names its file and the last complete checkpoint.

    Writers made by one :func:`guard_writers` call share their state: after one of them hit a full disk,
    the others write nothing more (detectron2 calls every writer again while the failed run ends, and a
    second write of the same iteration would replace the error with another one).
    """

    def __init__(self, writer: EventWriter, output_dir: str, state: Optional[Dict[str, bool]] = None):
        self.writer = writer
        self.output_dir = output_dir
        self.file = _writer_file(writer, output_dir)
        self.state = state if state is not None else {"full": False}

    def _guarded(self, fn) -> None:
        try:
            with no_space_left(self.file, self.output_dir):
                fn()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.state["full"] = True
            raise

    def write(self):
        if not self.state["full"]:
            self._guarded(self.writer.write)

    def close(self):
        if self.state["full"]:
            with contextlib.suppress(Exception):
                self.writer.close()
            return
        self._guarded(self.writer.close)


def guard_writers(writers: List[EventWriter], output_dir: str) -> List[EventWriter]:
    """``writers`` (e.g. detectron2's ``default_writers``), each wrapped in a :class:`GuardedWriter`."""
    state = {"full": False}
    return [GuardedWriter(w, output_dir, state) for w in writers]
