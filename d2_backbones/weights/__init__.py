"""Weights and checkpoints: one safe, checked layer that every entry point of the package uses.

============================  ===============================================================
module                        what it holds
============================  ===============================================================
:mod:`.read`                  reading files without running code (``weights_only``, restricted
                              ``.pkl`` unpickler)
:mod:`.formats`               the table of formats (detection, key map, architecture
                              inference, config the weights need) and the conversion
:mod:`.checks`                load-time checks (metadata, the bottom-up rule, missing
                              backbone tensors, shape skips), the finite check, the summary
:mod:`.write`                 atomic files, temporaries of killed runs
:mod:`.checkpointer`          :class:`Checkpointer` (a ``DetectionCheckpointer``) and the
                              disk-pruned :class:`PeriodicCheckpointer`
:mod:`.cli`                   ``python -m d2_backbones.convert``
============================  ===============================================================

Imports point one way: the families' key maps (``resnet.py``, ``vovnet.py``, ``ghostnet.py``) <-
``formats`` <- ``checks`` <- ``checkpointer`` <- the trainer, predictors and tools.
"""
from .checkpointer import (CheckpointWriteError, Checkpointer, NonFiniteCheckpointError, PeriodicCheckpointer,
                           state_nbytes)
from .checks import (WeightsMismatchError, check_missing_backbone, check_shape_skips, check_weights_metadata,
                     check_weights_policy, count_non_finite, load_summary, overrides_string, read_metadata)
from .formats import FORMATS, METADATA_KEY, PREFIX, ConvertError, WeightFormat, convert_checkpoint, detect_format
from .read import CheckpointReadError, RestrictedUnpickler, UnsafeCheckpointError, load_file
from .write import AtomicFile, AtomicPathManager, remove_stale_temporaries

__all__ = [
    "Checkpointer", "PeriodicCheckpointer", "NonFiniteCheckpointError", "CheckpointWriteError", "state_nbytes",
    "WeightsMismatchError", "check_weights_metadata", "check_weights_policy", "check_missing_backbone",
    "check_shape_skips",
    "count_non_finite", "load_summary", "overrides_string", "read_metadata",
    "FORMATS", "METADATA_KEY", "PREFIX", "ConvertError", "WeightFormat", "convert_checkpoint", "detect_format",
    "CheckpointReadError", "UnsafeCheckpointError", "RestrictedUnpickler", "load_file",
    "AtomicFile", "AtomicPathManager", "remove_stale_temporaries",
]
