"""The one checkpointer every path of the package loads and saves through.

:class:`Checkpointer` is detectron2's :class:`~detectron2.checkpoint.DetectionCheckpointer`
(same constructor, ``load``, ``resume_or_load``, ``save``; model-zoo names, ``.pkl`` Caffe2
files and ``?matching_heuristics=True`` keep working) with these guarantees:

* **Nothing a file contains can run code.** ``.pkl`` files go through a restricted unpickler
  (numpy arrays and plain containers only), every other file through ``torch.load(...,
  weights_only=True)`` (:mod:`d2_backbones.weights.read`). detectron2 itself reads ``.pkl``
  with plain ``pickle``.
* **Wrong weights stop the load, before anything is loaded.** The checks of
  :mod:`d2_backbones.weights.checks` run on every load (train, ``--resume``, ``--eval-only``, the
  predictors, lazy_train, export): a file holding bottom-up tensors must give every parameter and
  buffer of the model's bottom-up network, and the model must use all of them; with ``cfg`` a
  converted file's metadata is compared with the config too. detectron2's name matching of
  ``.pkl``/``.pyth`` files runs first, so the rule sees the final names. ``MODEL.WEIGHTS_CHECK warn``
  (``weights_check="warn"``) loads what fits with one WARNING and sets :attr:`Checkpointer.incomplete_load`.
  Files written by the converter load into a backbone without an FPN as well (their
  ``backbone.bottom_up.`` prefix becomes ``backbone.``).
* **An honest summary**: one line per top-level module, parameters and buffers apart; only what
  the file held counts as loaded (FrozenBN's filled-in running statistics do not).
* **File kinds**: a directory, a FIFO or a device given as weights is named as such (from ``stat``,
  never opened); a ``torch.save`` archive named ``.pkl`` is read as a ``.pth``.
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
import zipfile
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts, convert_c2_detectron_names
from detectron2.engine import hooks
from detectron2.utils import comm
from fvcore.common.checkpoint import _strip_prefix_if_present

from ..errors import ConfigError, is_int
from ..families import FAMILIES
from .checks import (WeightsMismatchError, bottom_up_units, check_bottom_up, check_missing_backbone,
                     check_shape_skips, check_weights_metadata, check_weights_policy, compare_bottom_up,
                     count_non_finite, family_of_backbone_name, load_summary)
from .formats import METADATA_KEY, PREFIX, detect_format, listing
from .read import check_file_kind, load_file
from .write import AtomicPathManager, remove_stale_temporaries

__all__ = ["Checkpointer", "PeriodicCheckpointer", "NonFiniteCheckpointError", "CheckpointWriteError",
           "state_nbytes"]


# an ImageNet classifier left in a heuristically matched file: detectron2's torchvision converter renames fc.* to
# stem.fc.* (a name under the bottom-up network's stem that no model has)
_CLASSIFIER_LEFTOVER = re.compile(r"^(stem\.)?(fc|fc1000|classifier|linear)\.(weight|bias)$")


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
        weights_check: ``"error"`` (default) or ``"warn"``; overrides ``MODEL.WEIGHTS_CHECK`` (lazy_train passes
            ``train.weights_check``).

    After a load, :attr:`incomplete_load` is None, or (``warn`` only) a short line saying what did not load.

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
                 weights_check: Optional[str] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = AtomicPathManager(self.path_manager)
        self.cfg = cfg
        self.weights_check = self._checked_policy(weights_check)
        self.incomplete_load: Optional[str] = None
        self._loading: Optional[str] = None
        self._resuming = False

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
    def _checked_policy(self, weights_check: Optional[str]) -> str:
        if weights_check is not None:
            key, value = "weights_check (train.weights_check in a Python config)", weights_check
        else:
            value = getattr(getattr(self.cfg, "MODEL", None), "WEIGHTS_CHECK", "error") if self.cfg is not None \
                else "error"
            key = "MODEL.WEIGHTS_CHECK"
        return check_weights_policy(value, key)

    def load(self, path: str, *args, **kwargs):
        """detectron2's ``load``; a local path that is not a regular file is refused first, naming what it is."""
        if path:
            local = urlparse(path)._replace(query="").geturl()
            if "://" not in local and os.path.lexists(local):
                check_file_kind(local)
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        """detectron2's; the load checks know when the file is OUTPUT_DIR's last checkpoint (their fix differs)."""
        self._resuming = bool(resume and self.has_checkpoint())
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if filename.endswith(".pkl"):
            data = load_file(filename)
            if zipfile.is_zipfile(filename):  # a torch.save archive named .pkl (e.g. a renamed model_final.pth)
                return data if isinstance(data, dict) and "model" in data else {"model": data}
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
        return self.weights_check

    def _match_names(self, checkpoint: Dict[str, Any], model_state) -> List[Tuple[str, Tuple[int, ...]]]:
        """detectron2's name matching (Caffe2 renaming, then suffix matching), done before the checks so that they
        see the final names; returns the file tensors it dropped for another shape. Unmatched file tensors keep
        their (renamed) name; those that look like bottom-up ones get the model's bottom-up prefix."""
        state = checkpoint["model"]
        self._convert_ndarray_to_tensor(state)
        if checkpoint.get("__author__") == "Caffe2":
            state, _ = convert_c2_detectron_names(state)
        # detectron2 returns the matched tensors under the model's names and every other file tensor (also those
        # it dropped for another shape) under the file's name
        aligned = align_and_update_state_dicts(model_state, state, c2_conversion=False)
        checkpoint["matching_heuristics"] = False  # done: detectron2's _load_model must not match again
        prefix = PREFIX if any(k.startswith(PREFIX) for k in model_state) else "backbone."
        tops = {k[len(prefix):].split(".")[0] for k in model_state if k.startswith(prefix)}
        stage = re.compile(r"^(stem|(res|stage)\d+)$")

        def bottom_up(k: str) -> bool:
            return k.split(".")[0] in tops or bool(stage.match(k.split(".")[0]))

        out = {k: v for k, v in aligned.items() if k in model_state}
        skipped, unused_biases = [], []  # unused_biases: file tensors the model has no place for, by design
        for k, v in aligned.items():
            if k in model_state:
                continue
            if not bottom_up(k):
                out[k] = v  # a classifier (fc1000) and the like: not the bottom-up network's
            elif prefix + k in out:
                skipped.append((prefix + k, tuple(v.shape)))  # matched already by another file tensor
            elif k.endswith(".bias") and prefix + k[:-5] + ".weight" in model_state and checkpoint.get(
                    "__author__") == "Caffe2":
                unused_biases.append(k)  # MSRA's conv1_b: the model's conv before a norm has no bias
            elif _CLASSIFIER_LEFTOVER.match(k):
                unused_biases.append(k)  # detectron2's convert-torchvision-to-d2.py turns fc.* into stem.fc.*
            else:
                out[prefix + k] = v  # another shape than the model's tensor of that name, or not in the model
        if unused_biases:
            self.logger.info(f"Not used by the model, as in detectron2 (an ImageNet classifier; a bias of a "
                             f"convolution the model follows with a norm): {', '.join(unused_biases)}")
        checkpoint["model"] = out
        return skipped

    def _out_features_key(self) -> str:
        name = getattr(getattr(getattr(self.cfg, "MODEL", None), "BACKBONE", None), "NAME", None)
        family = family_of_backbone_name(name) if isinstance(name, str) else None
        if family is None:
            return "OUT_FEATURES (MODEL.<FAMILY>.OUT_FEATURES in a yaml config, out_features in a Python config)"
        return f"{FAMILIES[family].config_node}.OUT_FEATURES"

    def _fits_nothing(self, state: Dict[str, Any], model_state) -> None:
        """A file of tensors none of which has a name of the model (e.g. torchvision's resnet50.pth given as it is)."""
        tensors = [k for k, v in state.items() if hasattr(v, "shape")]
        if not tensors or any(k in model_state for k in tensors):
            return
        try:
            fmt = f" Its keys look like the {detect_format(state)!r} format."
        except Exception:
            fmt = ""
        msg = (f"{self._loading}: none of its {len(tensors)} tensors has a name of this model (first: "
               f"{listing(tensors, 3)}; the model's: {listing(list(model_state), 2)}), so nothing would load.{fmt} "
               f"Fix: convert weights of another code base with python -m d2_backbones.convert SRC DST and load DST, "
               f"or give a checkpoint of this model.")
        if self._policy() == "warn":
            self.logger.warning(msg + " Weights check 'warn': loading nothing.")
            self.incomplete_load = f"nothing loaded from {os.path.basename(str(self._loading))}"
            return
        raise WeightsMismatchError(msg + " MODEL.WEIGHTS_CHECK warn (lazy_train: train.weights_check=warn) "
                                         "goes on without them.")

    def _load_model(self, checkpoint: Dict[str, Any]):
        self.incomplete_load = None
        metadata = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
        model_state = self._bare().state_dict()
        keys = list(model_state)
        if metadata and isinstance(checkpoint.get("model"), dict) and not any(k.startswith(PREFIX) for k in keys):
            # a converted file (backbone.bottom_up.*) into a backbone without FPN (backbone.*)
            checkpoint["model"] = {("backbone." + k[len(PREFIX):] if k.startswith(PREFIX) else k): v
                                   for k, v in checkpoint["model"].items()}
        if self.cfg is not None and metadata:
            check_weights_metadata(self.cfg, metadata, log=self.logger, policy=self._policy())
        skipped_by_matching = []
        if checkpoint.get("matching_heuristics", False):
            skipped_by_matching = self._match_names(checkpoint, model_state)
        state = checkpoint.get("model", {})
        self._convert_ndarray_to_tensor(state)
        _strip_prefix_if_present(state, "module.")  # as fvcore does below (a DDP-wrapped model's file)
        self._fits_nothing(state, model_state)
        # the checks, before anything is loaded
        shapes = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state.items()
                  if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]
        skipped = {k for k, *_ in shapes}
        file_keys = [k for k in state if k in model_state]
        check_shape_skips(keys, shapes, metadata, loaded_keys=file_keys, log=self.logger, policy=self._policy())
        check_missing_backbone(keys, [k for k in keys if k not in state], metadata, log=self.logger,
                               policy=self._policy())
        bottom_up = compare_bottom_up(model_state, state, shape_skipped=skipped_by_matching,
                                      affine_only_norms=checkpoint.get("__author__") == "Caffe2")
        units = bottom_up_units(self._bare(), bottom_up.prefix) if bottom_up is not None else []
        self.incomplete_load = check_bottom_up(
            bottom_up, source=str(self._loading), units=units, file_state=state, policy=self._policy(),
            log=self.logger, resuming=self._resuming, out_features_key=self._out_features_key()
        ) or self.incomplete_load
        incompatible = super()._load_model(checkpoint)
        params = {k for k, _ in self._bare().named_parameters()}
        # only what the file held counts (FrozenBN fills missing running statistics without a word)
        not_loaded = {k for k in keys if k not in state} | skipped
        self.logger.info(f"Weights loading summary: {load_summary(keys, params, not_loaded)}")
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


def check_max_to_keep(value, key: str = "SOLVER.MAX_TO_KEEP") -> Optional[int]:
    """The number of periodic checkpoints to keep: ``None`` (keep all) for ``None``, ``0`` and ``-1``."""
    if value is None:
        return None
    if not is_int(value) or value < -1:
        raise ConfigError(f"{key}={value!r} is not valid. Valid values: a positive number of periodic checkpoints "
                          f"to keep, or 0 / -1 to keep them all. Fix: set {key} 0 to keep every checkpoint.")
    return value if value > 0 else None



class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's ``PeriodicCheckpointer`` hook (fvcore's, as a hook) whose ``max_to_keep`` counts the
    periodic files on disk.

    fvcore prunes from a list kept in memory, so every resume leaves the older files behind;
    here after each periodic save the ``<prefix>_NNNNNNN.pth`` files in the directory are listed
    and all but the newest ``max_to_keep`` removed. ``max_to_keep`` ``None``, ``0`` or ``-1`` keeps
    them all; other negatives are refused (:func:`check_max_to_keep`).

    Pruning only removes files of this run's series: files of iterations up to the one just
    saved, never the file ``last_checkpoint`` names, nor one of a later iteration or written
    after it (``model_final.pth`` / ``model_best.pth`` are never touched).

    ``synchronize=True`` (the trainers): the hook runs in every process of a multi-process run; the
    main process writes (the checkpointer's ``save_to_disk``), and every process waits at a barrier
    until the file is complete before the next iteration, so that a run stopped afterwards (an
    elastic restart) finds that checkpoint. Register it in every process then: a barrier in rank 0
    alone would wait for the others until the process group's timeout.
    """

    def __init__(self, checkpointer, period: int, max_iter: Optional[int] = None, max_to_keep: Optional[int] = None,
                 file_prefix: str = "model", synchronize: bool = False):
        super().__init__(checkpointer, period, max_iter=max_iter, max_to_keep=None, file_prefix=file_prefix)
        self.keep = check_max_to_keep(max_to_keep, "max_to_keep")
        self.synchronize = synchronize

    def step(self, iteration: int, **kwargs: Any) -> None:
        super().step(iteration, **kwargs)
        periodic = (int(iteration) + 1) % self.period == 0
        if self.keep and periodic:
            self.prune(int(iteration))
        final = self.max_iter is not None and int(iteration) >= self.max_iter - 1
        if self.synchronize and (periodic or final):
            comm.synchronize()  # the main process has written the file (or failed: then the launcher ends all)

    def prune(self, iteration: Optional[int] = None) -> None:
        """Remove all but the newest ``max_to_keep`` periodic files up to ``iteration`` (default: all on disk)."""
        cp = self.checkpointer
        if not cp.save_dir or not cp.save_to_disk or not self.keep:
            return
        found = []
        for name in cp.path_manager.ls(cp.save_dir):
            m = _PERIODIC.match(os.path.basename(name))
            if m and m.group("prefix") == self.file_prefix:
                found.append((int(m.group("iter")), os.path.basename(name)))
        series = sorted(f for f in found if iteration is None or f[0] <= iteration)
        tagged = cp.last_complete() if hasattr(cp, "last_complete") else None
        m = _PERIODIC.match(tagged or "")
        tagged_iter = int(m.group("iter")) if m and m.group("prefix") == self.file_prefix else None
        tagged_mtime = self._mtime(os.path.join(cp.save_dir, tagged)) if tagged else None
        for it, name in series[:-self.keep]:
            path = os.path.join(cp.save_dir, name)
            mtime = self._mtime(path)
            if (name == tagged or (tagged_iter is not None and it >= tagged_iter)
                    or (tagged_mtime is not None and mtime is not None and mtime > tagged_mtime)):
                continue
            if cp.path_manager.exists(path) and not path.endswith(f"{self.file_prefix}_final.pth"):
                cp.path_manager.rm(path)

    @staticmethod
    def _mtime(path: str) -> Optional[int]:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:  # a non-local directory, or a file already gone
            return None
