"""First-run checks shared by both trainers: a newcomer's mistakes refused before the model is built.

``train_net`` (yacs keys) and ``lazy_train`` (Python-config keys) run the same checks; each takes the
names of the keys, so its message names the key the user wrote, the value, the valid values and the fix:

* :func:`check_device`: a CUDA device on a machine without CUDA names the CPU setting
  (``MODEL.DEVICE cpu`` / ``train.device=cpu``) instead of torch's "Found no NVIDIA driver".
* :func:`check_num_processes` (before ``launch`` spawns anything): ``--num-gpus N`` with CUDA and fewer
  devices is refused (detectron2's ``launch`` would assert); without CUDA, N CPU processes (gloo) are
  started and one line says so, N above ``os.cpu_count()`` is refused (``D2B_ALLOW_OVERSUBSCRIBE=1`` starts
  them anyway).
* :func:`check_dataset_files`: a registered dataset whose files (``json_file``, ``image_root``, ...) are
  missing names the path, ``DETECTRON2_DATASETS`` and ``--register-coco``, instead of a
  ``FileNotFoundError`` after the model is built.
* :func:`check_yacs_overrides`: ``key=value`` given to ``train_net`` names the ``KEY VALUE`` form (with
  the yacs key when it can be guessed) and ``lazy_train`` for Python configs.
* :func:`check_values`: values no training can use (periods, iterations, batch, learning rate), one
  line per key; :func:`check_yacs_solver` lists the yacs keys (``SOLVER.STEPS`` that detectron2 would
  drop only warn), :func:`warn_large_sizes` warns about input sizes above :data:`LARGE_SIZE` pixels.
* In the run: :func:`is_out_of_memory` / :func:`out_of_memory_error` name the input-size keys and their
  values when a step runs out of memory; :func:`divergence_cause` starts a divergence message with
  weights that did not load (or training from scratch) when that happened.
"""
import logging
import math
import os
import shlex
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from .errors import ConfigError, is_int, is_number

__all__ = ["check_device", "check_num_processes", "check_dataset_files", "check_yacs_overrides", "check_values",
           "check_yacs_solver", "warn_large_sizes", "is_out_of_memory", "out_of_memory_error", "divergence_cause",
           "LARGE_SIZE", "OVERSUBSCRIBE_ENV"]

logger = logging.getLogger("d2_backbones")

LARGE_SIZE = 4000  # pixels; a larger input side gets a warning at start (a step may need tens of GiB)
OVERSUBSCRIBE_ENV = "D2B_ALLOW_OVERSUBSCRIBE"  # "1": more CPU processes than cores are started anyway


# ---------------------------------------------------------------------------------------------- device, processes
def check_device(device: str, key: str, cpu_override: str) -> None:
    """``device`` (the value of ``key``) must exist here; ``cpu_override`` is the override that fixes it."""
    device = str(device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={device!r} but CUDA is not available on this machine (torch {torch.__version__}). "
                          f"Fix: add {cpu_override} to the overrides to train and evaluate on the CPU, or run on a "
                          f"machine with an NVIDIA GPU.")
    index = device.partition(":")[2]
    count = torch.cuda.device_count()
    if index.isdigit() and int(index) >= count:
        raise ConfigError(f"{key}={device!r} but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})."
                          f" Fix: use one of them, or 'cuda' (each process takes its own device).")


def check_num_processes(num_gpus: int, *, cuda_devices: Optional[int] = None,
                        cpu_count: Optional[int] = None) -> Optional[str]:
    """``--num-gpus N`` against this machine, before anything is spawned; the line to print, or ``None``.

    ``cuda_devices`` / ``cpu_count`` default to this machine's (``torch.cuda.device_count()`` when CUDA is
    available, else 0; ``os.cpu_count()``).
    """
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cpu_count is None:
        cpu_count = os.cpu_count() or 1
    n = int(num_gpus)
    if cuda_devices:
        if n > cuda_devices:
            raise ConfigError(
                f"--num-gpus {n} but this machine has {cuda_devices} CUDA device(s) (detectron2 starts one process "
                f"per GPU). Fix: --num-gpus {cuda_devices} or fewer (SOLVER.IMS_PER_BATCH is the global batch, "
                f"split over the processes); for CPU processes instead, hide the GPUs with CUDA_VISIBLE_DEVICES= "
                f"and set the device to cpu.")
        return None
    if n <= 1:
        return None
    if n > cpu_count and os.environ.get(OVERSUBSCRIBE_ENV) != "1":
        raise ConfigError(
            f"--num-gpus {n} but CUDA is not available, so {n} CPU training processes would share this machine's "
            f"{cpu_count} CPU core(s) (os.cpu_count()), each slower than one process alone. Fix: --num-gpus "
            f"{cpu_count} or fewer (or leave it out: 1 process uses every core), or run on a machine with {n} GPUs; "
            f"to start them anyway (e.g. to test multi-process code), set {OVERSUBSCRIBE_ENV}=1.")
    return (f"--num-gpus {n}: CUDA is not available; starting {n} CPU processes (gloo) on {cpu_count} CPU cores "
            f"(the device must be cpu: MODEL.DEVICE cpu / train.device=cpu).")


# ---------------------------------------------------------------------------------------------- datasets
_PATH_KEYS = ("json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root", "dirname", "image_dir",
              "gt_dir")


def check_dataset_files(datasets: Iterable[Tuple[str, str]]) -> None:
    """Every file and folder a registered dataset's metadata names must exist.

    ``datasets``: ``(name, key)`` pairs, ``key`` the config key that uses the name (``DATASETS.TRAIN``,
    ``dataloader.train.dataset.names``). Names not registered are left to the registration check.
    """
    registered = set(DatasetCatalog.list())
    for name, key in dict.fromkeys(datasets):
        if name not in registered:
            continue
        meta = MetadataCatalog.get(name)
        missing = [(k, meta.get(k)) for k in _PATH_KEYS
                   if isinstance(meta.get(k), str) and meta.get(k) and not os.path.exists(meta.get(k))]
        if not missing:
            continue
        shown = ", ".join(f"{k}={p!r}" for k, p in missing)
        where = "" if os.path.isabs(missing[0][1]) else f" (relative to the current directory {os.getcwd()})"
        root = os.environ.get("DETECTRON2_DATASETS")
        raise ConfigError(
            f"Dataset {name!r} ({key}) is registered with {shown}, which does not exist{where}. detectron2's "
            f"built-in datasets live under $DETECTRON2_DATASETS (now "
            f"{repr(root) if root else 'unset: ./datasets'}, read when detectron2 is imported). Fix: put the dataset "
            f"there or set DETECTRON2_DATASETS to the folder that holds it, or register your copy under another "
            f"name: --register-coco my_{name} JSON IMAGE_ROOT, and use my_{name} in {key}.")


# ---------------------------------------------------------------------------------------------- overrides
_LAZY_TO_YACS = {
    "train.max_iter": "SOLVER.MAX_ITER", "optimizer.lr": "SOLVER.BASE_LR", "train.output_dir": "OUTPUT_DIR",
    "train.device": "MODEL.DEVICE", "train.init_checkpoint": "MODEL.WEIGHTS", "train.eval_period": "TEST.EVAL_PERIOD",
    "train.checkpointer.period": "SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.max_to_keep": "SOLVER.MAX_TO_KEEP",
    "dataloader.train.total_batch_size": "SOLVER.IMS_PER_BATCH", "dataloader.train.num_workers":
    "DATALOADER.NUM_WORKERS", "model.roi_heads.num_classes": "MODEL.ROI_HEADS.NUM_CLASSES", "train.seed": "SEED",
    "train.amp.enabled": "SOLVER.AMP.ENABLED", "model.backbone.bottom_up.depth": "MODEL.RESNETS.DEPTH",
}


def _leaf_keys(node, prefix: str = "") -> List[str]:
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def _yacs_guess(key: str, cfg) -> List[str]:
    """The yacs keys ``key`` (a Python-config or lower-case key) most likely means, best first (at most 3)."""
    if key in _LAZY_TO_YACS:
        return [_LAZY_TO_YACS[key]]
    keys = _leaf_keys(cfg)
    if key.upper() in keys:
        return [key.upper()]
    leaf = key.rsplit(".", 1)[-1].upper()
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return same_leaf if len(same_leaf) <= 3 else []


def _is_assignment(tok: str) -> bool:
    name, eq, _ = tok.partition("=")
    return bool(eq) and bool(name) and all(part.isidentifier() for part in name.split("."))


def check_yacs_overrides(opts: Sequence[str], cfg_factory) -> None:
    """``train_net``'s overrides are ``KEY VALUE`` pairs: a ``key=value`` in a key's place (or a dotted one
    anywhere) is refused with the ``KEY VALUE`` spelling and ``lazy_train``. ``cfg_factory()`` gives the
    config whose keys the guess is made from (only built when needed)."""
    for i, tok in enumerate(opts):
        if not isinstance(tok, str) or not _is_assignment(tok) or (i % 2 and "." not in tok.partition("=")[0]):
            continue
        key, _, value = tok.partition("=")
        guesses = _yacs_guess(key, cfg_factory())
        if len(guesses) == 1:
            spelled = f"{guesses[0]} {shlex.quote(value)}"
        elif guesses:
            spelled = " or ".join(f"{g} {shlex.quote(value)}" for g in guesses)
        else:
            spelled = f"KEY {shlex.quote(value)} with KEY a yacs key (docs/configuration.md)"
        raise SystemExit(
            f"Override {tok!r} is key=value, the form of Python (LazyConfig) configs; train_net reads yaml configs, "
            f"whose overrides are KEY VALUE pairs after the flags: {spelled}. For a Python config run python -m "
            f"d2_backbones.lazy_train --config-file CONFIG.py {tok}.")


# ---------------------------------------------------------------------------------------------- values
_RULES = {
    "int>=1": ("an integer >= 1", lambda v: is_int(v) and v >= 1),
    "int>=0": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "lr": ("a finite number > 0", lambda v: is_number(v) and math.isfinite(v) and v > 0),
}


def check_values(checks: Sequence[Tuple[str, Any, str, str]]) -> None:
    """``(key, value, rule, fix)`` rows, rule one of ``int>=1``, ``int>=0``, ``lr``; ``None`` values are not
    checked. All failures are raised together, one line per key: key, value, valid range, fix."""
    lines = []
    for key, value, rule, fix in checks:
        valid, ok = _RULES[rule]
        if value is not None and not ok(value):
            lines.append(f"{key}={value!r} is invalid; valid: {valid}. Fix: {fix}.")
    if lines:
        raise ConfigError("These values cannot train (checked before the model is built):\n  " + "\n  ".join(lines))


def check_yacs_solver(cfg) -> None:
    """The yacs training schedule: see :func:`check_values`; ``SOLVER.STEPS`` must increase and stay below
    ``SOLVER.MAX_ITER`` (fvcore refuses a step at MAX_ITER; larger ones detectron2 drops with its own warning)."""
    s = cfg.SOLVER
    check_values([
        ("SOLVER.MAX_ITER", s.MAX_ITER, "int>=1", "set the number of training iterations, e.g. SOLVER.MAX_ITER 1000"),
        ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, "int>=1",
         "set the global batch (images per iteration over all processes), e.g. SOLVER.IMS_PER_BATCH 2"),
        ("SOLVER.BASE_LR", s.BASE_LR, "lr", "set the learning rate, e.g. SOLVER.BASE_LR 0.02 for a batch of 16"),
        ("SOLVER.WARMUP_ITERS", s.WARMUP_ITERS, "int>=0", "set SOLVER.WARMUP_ITERS 0 for no warm-up"),
        ("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, "int>=1",
         "set the iterations between checkpoints, e.g. SOLVER.CHECKPOINT_PERIOD 5000 (more than SOLVER.MAX_ITER: "
         "only model_final.pth)"),
        ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, "int>=0", "set TEST.EVAL_PERIOD 0 to evaluate only at the end"),
    ])
    ref = s.REFERENCE_WORLD_SIZE
    if is_int(ref) and ref > 0 and s.IMS_PER_BATCH % ref:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} is not divisible by SOLVER.REFERENCE_WORLD_SIZE="
                          f"{ref}, so detectron2 cannot rescale the batch to the number of processes. Fix: a multiple "
                          f"of {ref}, or SOLVER.REFERENCE_WORLD_SIZE 0 to use the numbers as written.")
    if s.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return
    steps = list(s.STEPS)
    bad = [i for i in range(len(steps)) if not is_int(steps[i]) or steps[i] <= (steps[i - 1] if i else 0)]
    if bad:
        raise ConfigError(f"SOLVER.STEPS={tuple(steps)} is invalid; valid: increasing integers > 0 (the iterations "
                          f"where the learning rate drops). Fix: e.g. SOLVER.STEPS \"({int(s.MAX_ITER * 0.75)},)\".")
    if s.MAX_ITER in steps:
        raise ConfigError(f"SOLVER.STEPS={tuple(steps)} contains SOLVER.MAX_ITER={s.MAX_ITER}; valid: steps below "
                          f"SOLVER.MAX_ITER (a drop at the last iteration does nothing). Fix: remove it or lower it.")


def warn_large_sizes(sizes: Mapping[str, Any]) -> None:
    """One WARNING per input-size key with a side above :data:`LARGE_SIZE` pixels."""
    for key, value in sizes.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        big = [v for v in values if is_number(v) and v > LARGE_SIZE]
        if big:
            logger.warning(f"{key}={value!r}: images with a side above {LARGE_SIZE} px need many GiB per image in a "
                           f"training step; expect an out-of-memory error unless this is intended.")


# ---------------------------------------------------------------------------------------------- in the run
_OOM_TEXTS = ("can't allocate memory", "out of memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """``MemoryError``, torch's CPU allocator failure or CUDA's out-of-memory error."""
    if isinstance(e, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXTS)


def out_of_memory_error(e: BaseException, sizes: Mapping[str, Any], fix: str) -> MemoryError:
    """The ``MemoryError`` to raise from ``e``: what ran out, the input-size keys with their values, the fix."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = f"{type(e).__name__}: {lines[-1][:300]}" if lines else type(e).__name__
    shown = ", ".join(f"{k}={v!r}" for k, v in sizes.items())
    return MemoryError(f"Out of memory while training (a training step, or an evaluation run by the training loop) "
                       f"({detail}). The memory of a step grows with the input size and the batch: {shown}. "
                       f"Fix: {fix}.")


def divergence_cause(checkpointer, weights_key: str, weights: str) -> str:
    """The sentence a divergence message starts with when the cause may not be the learning rate: weights
    that loaded only partly (the checkpointer's ``incomplete_load``), or no weights at all; else ``""``."""
    incomplete = getattr(checkpointer, "incomplete_load", None)
    if incomplete:
        detail = f"{incomplete}; " if isinstance(incomplete, str) else ""
        return (f"The weights did not load completely ({detail}the weights check was set to warn): the parts of the "
                f"model that {weights_key}={weights!r} did not fill started from random values, which diverges "
                f"easily. Fix this first: weights that match the config (see the Weights loading summary at start). ")
    if not weights:
        return (f"{weights_key} is empty: the whole model trained from random initialisation, which needs a lower "
                f"learning rate and a longer warm-up than fine-tuning; if you meant to start from pretrained "
                f"weights, set {weights_key}. ")
    return ""
