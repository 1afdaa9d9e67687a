"""The one checkpointer every path of the package loads and saves through.

:class:`Checkpointer` is detectron2's :class:`~detectron2.checkpoint.DetectionCheckpointer`
(same constructor, ``load``, ``resume_or_load``, ``save``; model-zoo names, ``.pkl`` Caffe2
files and ``?matching_heuristics=True`` keep working) with these guarantees:

* **Nothing a file contains can run code.** ``.pkl`` files go through a restricted unpickler
  (numpy arrays and plain containers only), every other file through ``torch.load(...,
  weights_only=True)`` (:mod:`d2_backbones.weights.read`). detectron2 itself reads ``.pkl``
  with plain ``pickle``.
* **Wrong weights stop the load.** The checks of :mod:`d2_backbones.weights.checks` run on
  every load; with ``cfg`` the file's metadata is compared with the config too. Files written
  by the converter load into a backbone without an FPN as well (their ``backbone.bottom_up.``
  prefix becomes ``backbone.``).
* **An honest summary**: one line per top-level module, parameters and buffers apart.
* **Atomic, permission-correct files.** fvcore's own ``save`` / ``tag_last_checkpoint`` run
  unchanged through an :class:`~d2_backbones.weights.write.AtomicPathManager` that wraps
  detectron2's ``PathManager`` (non-local paths go to it untouched).
* **No non-finite state is saved.** ``save`` refuses a model with NaN/Inf tensors
  (:class:`NonFiniteCheckpointError`, naming the last complete checkpoint), so
  ``last_checkpoint`` always names a finite state.
* **A full disk says so**: :class:`CheckpointWriteError` ``No space left on device while writing
  <file> (<size> MB); the last complete checkpoint is <file>``.

In your own scripts, use it in place of ``DetectionCheckpointer`` (one line)::

    from d2_backbones import Checkpointer
    Checkpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)   # instead of DetectionCheckpointer(model).load(...)

:class:`PeriodicCheckpointer` keeps ``max_to_keep`` periodic files counted on disk, so the limit
holds across resumes.
"""
import errno
import os
import re
import shutil
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks

from .checks import (check_missing_backbone, check_shape_skips, check_weights_metadata, count_non_finite,
                     load_summary)
from .formats import METADATA_KEY, PREFIX, listing
from .read import load_file
from .write import AtomicPathManager, remove_stale_temporaries

__all__ = ["Checkpointer", "PeriodicCheckpointer", "NonFiniteCheckpointError", "CheckpointWriteError",
           "state_nbytes"]


class NonFiniteCheckpointError(FloatingPointError):
    """The model holds NaN/Inf values: it was not saved."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous files are intact."""


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


class Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe reading, load-time checks, atomic saves and a finite check.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        cfg: the config the model was built from (optional). With it the metadata of converted
            files is compared with the config and ``MODEL.WEIGHTS_CHECK`` is honoured.

    Example::

        >>> import torch, tempfile
        >>> model = torch.nn.Linear(2, 2)
        >>> cp = Checkpointer(model, tempfile.mkdtemp())
        >>> cp.save("model_0000009")
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(float("nan"))
        >>> cp.save("model_0000019")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        d2_backbones.weights.checkpointer.NonFiniteCheckpointError: The model has 1 tensor(s) with NaN/Inf values (weight); model_0000019.pth was not written. The last complete checkpoint is ...model_0000009.pth (last_checkpoint names it).
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: Optional[bool] = None, cfg=None,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = AtomicPathManager(self.path_manager)
        self.cfg = cfg

    # ------------------------------------------------------------------------------------------ saving
    def last_complete(self) -> Optional[str]:
        """The file ``last_checkpoint`` names (None when there is none)."""
        if not self.save_dir or not self.has_checkpoint():
            return None
        return os.path.basename(self.get_checkpoint_file())

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (atomic through the path manager), refused for a non-finite model."""
        if not self.save_dir or not self.save_to_disk:
            return
        bad = count_non_finite(self.model.state_dict())
        if bad:
            last = self.last_complete()
            raise NonFiniteCheckpointError(
                f"The model has {len(bad)} tensor(s) with NaN/Inf values ({listing(bad, 3)}); {name}.pth was not "
                f"written. The last complete checkpoint is "
                + (f"{os.path.join(self.save_dir, last)} (last_checkpoint names it)." if last else
                   f"none: no checkpoint was completed in {self.save_dir}."))
        self.path_manager.last_enospc = None
        try:
            super().save(name, **kwargs)
        except Exception as e:
            failed = self.path_manager.last_enospc
            if failed is None and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
                raise
            size = state_nbytes(self.model.state_dict()) + sum(
                state_nbytes(c.state_dict()) for c in self.checkpointables.values() if hasattr(c, "state_dict"))
            last = self.last_complete()
            err = CheckpointWriteError(
                f"No space left on device while writing {failed or os.path.join(self.save_dir, name + '.pth')} "
                f"({size / 2 ** 20:.1f} MB); the last complete checkpoint is "
                + (os.path.join(self.save_dir, last) if last else f"none (no checkpoint in {self.save_dir})"))
            err.errno = errno.ENOSPC
            raise err from e

    def prepare_save_dir(self) -> None:
        """At the start of a run (main process): remove temporaries of killed runs and warn when the
        free space is below about three checkpoints."""
        if not self.save_dir or not self.save_to_disk or "://" in self.save_dir:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        remove_stale_temporaries(self.save_dir, self.logger)
        # a checkpoint holds the model and the optimizer state (about one more model for SGD momentum)
        need = 2 * state_nbytes(self.model.state_dict())
        free = shutil.disk_usage(self.save_dir).free
        if free < 3 * need:
            self.logger.warning(f"{self.save_dir} has {free / 2 ** 20:.0f} MB free; a checkpoint needs about "
                                f"{need / 2 ** 20:.0f} MB, so fewer than three fit. Free some space or set "
                                f"SOLVER.MAX_TO_KEEP / OUTPUT_DIR elsewhere.")

    # ------------------------------------------------------------------------------------------ loading
    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_file(filename)
            if not isinstance(data, dict):
                raise ValueError(f"{filename}: holds a {type(data).__name__}, not a detectron2/Detectron checkpoint.")
            if "model" in data and "__author__" in data:  # detectron2 model-zoo format
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 model zoo: the same interpretation as detectron2's loader
            blobs = data.get("blobs", data)
            blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            data = load_file(filename)
            if "model_state" not in data:
                raise ValueError(f"Cannot load .pyth file {filename}; pycls checkpoints must contain 'model_state'.")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # URL queries (matching_heuristics) handled there

    def _torch_load(self, f: str) -> Any:
        return load_file(f)

    def _bare(self):
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def _policy(self) -> str:
        try:
            return str(self.cfg.MODEL.WEIGHTS_CHECK) if self.cfg is not None else "error"
        except AttributeError:
            return "error"

    def _load_model(self, checkpoint: Dict[str, Any]):
        metadata = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
        model_state = self._bare().state_dict()
        keys = list(model_state)
        if metadata and isinstance(checkpoint.get("model"), dict) and not any(k.startswith(PREFIX) for k in keys):
            # a converted file (backbone.bottom_up.*) into a backbone without FPN (backbone.*)
            checkpoint["model"] = {("backbone." + k[len(PREFIX):] if k.startswith(PREFIX) else k): v
                                   for k, v in checkpoint["model"].items()}
        if self.cfg is not None and metadata:
            check_weights_metadata(self.cfg, metadata, log=self.logger, policy=self._policy())
        file_keys = [k for k in checkpoint.get("model", {}) if k in model_state]
        incompatible = super()._load_model(checkpoint)
        params = {k for k, _ in self._bare().named_parameters()}
        not_loaded = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        self.logger.info(f"Weights loading summary: {load_summary(keys, params, not_loaded)}")
        check_shape_skips(keys, incompatible.incorrect_shapes, metadata, loaded_keys=file_keys)
        skipped = {k for k, *_ in incompatible.incorrect_shapes}
        check_missing_backbone(keys, [k for k in incompatible.missing_keys if k not in skipped], metadata,
                               log=self.logger, policy=self._policy())
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        # The per-module summary replaces fvcore's per-key listing of missing keys; what did not
        # fit (shape mismatches, unexpected keys) is still listed, briefly.
        if incompatible.incorrect_shapes:
            shown = "; ".join(f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}"
                              for k, c, m in incompatible.incorrect_shapes[:5])
            more = len(incompatible.incorrect_shapes) - 5
            self.logger.warning(f"Skipped {len(incompatible.incorrect_shapes)} checkpoint tensor(s) with another "
                                f"shape: {shown}" + (f" (+{more} more)" if more > 0 else ""))
        unexpected = [k for k in incompatible.unexpected_keys if not k.endswith("num_batches_tracked")]
        if unexpected:
            groups: Dict[str, int] = {}
            for k in unexpected:
                g = k.split(".")[0]
                groups[g] = groups.get(g, 0) + 1
            self.logger.info("Checkpoint tensors the model does not use: "
                             + ", ".join(f"{g}: {n}" for g, n in groups.items()))


_PERIODIC = re.compile(r"^(?P<prefix>.+)_(?P<iter>\d{7})\.pth$")


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's ``PeriodicCheckpointer`` hook (fvcore's, as a hook) whose ``max_to_keep`` counts the
    periodic files on disk.

    fvcore prunes from a list kept in memory, so every resume leaves the older files behind;
    here after each periodic save the ``<prefix>_NNNNNNN.pth`` files in the directory are listed
    and all but the newest ``max_to_keep`` removed (``model_final.pth`` / ``model_best.pth``
    are never touched).
    """

    def __init__(self, checkpointer, period: int, max_iter: Optional[int] = None, max_to_keep: Optional[int] = None,
                 file_prefix: str = "model"):
        super().__init__(checkpointer, period, max_iter=max_iter, max_to_keep=None, file_prefix=file_prefix)
        self.keep = max_to_keep

    def step(self, iteration: int, **kwargs: Any) -> None:
        super().step(iteration, **kwargs)
        if self.keep and (iteration + 1) % self.period == 0:
            self.prune()

    def prune(self) -> None:
        cp = self.checkpointer
        if not cp.save_dir or not cp.save_to_disk:
            return
        found = []
        for name in cp.path_manager.ls(cp.save_dir):
            m = _PERIODIC.match(os.path.basename(name))
            if m and m.group("prefix") == self.file_prefix:
                found.append((int(m.group("iter")), os.path.basename(name)))
        for _, name in sorted(found)[:-self.keep]:
            path = os.path.join(cp.save_dir, name)
            if cp.path_manager.exists(path) and not path.endswith(f"{self.file_prefix}_final.pth"):
                cp.path_manager.rm(path)
