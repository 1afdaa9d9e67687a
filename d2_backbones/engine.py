"""The setup core both trainers call: ``train_net`` (yacs configs) and ``lazy_train`` (Python configs).

One implementation of what a run needs before and after detectron2's training loop, for both config systems;
:class:`ConfigKeys` says how each system spells the keys, so every message names the key the user wrote:

==============================  ========================================================================
step                            what it does
==============================  ========================================================================
:func:`check_device`            a CUDA device on a machine without one names the CPU override
:func:`claim_run_dir`           weights-check policy, ``max_to_keep``, one run per output directory
                                (:mod:`d2_backbones.rundir`), the package's logger in that directory
:func:`register_datasets`       ``--register-coco`` datasets, and the shapes datasets when used
:func:`check_datasets`          every dataset registered (in this process), its files on disk
:func:`check_num_classes`       the heads' class count against the datasets' classes (``thing_classes``,
                                else the categories of the dataset's COCO JSON), or set from them
                                (``--num-classes auto`` / an int)
:func:`check_precision`         mixed precision: what each trainer supports on the configured device
:func:`check_schedule`          values no training can use (iterations, batch, learning rate, periods)
:func:`check_head_features`     the features the heads read against the backbone's outputs
:func:`prepare`                 all of the above in order, then ``default_setup``
:func:`training_errors`         out of memory and divergence during training, named with the keys
:func:`write_pictures`          ``curves.png`` and ``predictions.png`` after training
==============================  ========================================================================
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from detectron2.config import CfgNode, LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .data import SHAPES_DATASETS, coco_classes, register_coco_datasets, register_shapes
from .errors import ConfigError, dotted_get
from .preflight import (check_dataset_files, check_values, check_yacs_solver, divergence_cause, is_out_of_memory,
                        out_of_memory_error, warn_large_sizes)
from .preflight import check_device as _check_device
from .rundir import check_max_to_keep, claim_output_dir, keep_run_config, no_space_left

__all__ = ["ConfigKeys", "YACS", "LAZY", "keys_of", "set_values", "dataset_names", "check_device", "claim_run_dir",
           "register_datasets", "check_datasets", "dataset_classes", "class_count_keys", "check_num_classes",
           "num_classes_override", "check_precision", "check_input_format", "check_schedule", "input_sizes",
           "check_head_features", "prepare", "training_errors", "evaluation_input", "write_pictures"]

logger = logging.getLogger("d2_backbones")


# ---------------------------------------------------------------------------------------------- the two systems
@dataclass(frozen=True)
class ConfigKeys:
    """How one config system spells the settings the core reads (and an override of them)."""

    name: str  # "yacs" (train_net) or "lazy" (lazy_train)
    program: str
    device: str
    train_sets: str
    test_sets: str
    output_dir: str
    weights: str
    weights_check: str
    max_to_keep: str
    amp: str
    lr: str
    warmup: str

    def override(self, key: str, value) -> str:
        """``key`` set to ``value`` as the command line takes it: ``KEY VALUE`` (yacs) or ``key=value``."""
        return f"{key} {value}" if self.name == "yacs" else f"{key}={value}"


YACS = ConfigKeys("yacs", "train_net", device="MODEL.DEVICE", train_sets="DATASETS.TRAIN",
                  test_sets="DATASETS.TEST", output_dir="OUTPUT_DIR", weights="MODEL.WEIGHTS",
                  weights_check="MODEL.WEIGHTS_CHECK", max_to_keep="SOLVER.MAX_TO_KEEP", amp="SOLVER.AMP.ENABLED",
                  lr="SOLVER.BASE_LR", warmup="SOLVER.WARMUP_ITERS")
LAZY = ConfigKeys("lazy", "lazy_train", device="train.device", train_sets="dataloader.train.dataset.names",
                  test_sets="dataloader.test.dataset.names", output_dir="train.output_dir",
                  weights="train.init_checkpoint", weights_check="train.weights_check",
                  max_to_keep="train.checkpointer.max_to_keep", amp="train.amp.enabled", lr="optimizer.lr",
                  warmup="lr_multiplier.warmup_length")


def keys_of(cfg) -> ConfigKeys:
    """:data:`YACS` for a yacs ``CfgNode``, :data:`LAZY` for a Python config (omegaconf / dict)."""
    return YACS if isinstance(cfg, CfgNode) else LAZY


def set_values(cfg, keys: Sequence[str], value) -> None:
    """Set every key of ``keys`` to ``value`` the way the config system does (typed merge / override)."""
    if not keys:
        return
    if keys_of(cfg) is YACS:
        cfg.merge_from_list([x for k in keys for x in (k, value)])
    else:
        LazyConfig.apply_overrides(cfg, [f"{k}={value}" for k in keys])


def dataset_names(cfg, key: str) -> List[str]:
    """The dataset names under ``key`` (a name or a list of names)."""
    v = dotted_get(cfg, key)
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(n) for n in v]


def _used_datasets(cfg, eval_only: bool) -> List[Tuple[str, str]]:
    keys = keys_of(cfg)
    used = [] if eval_only else [(n, keys.train_sets) for n in dataset_names(cfg, keys.train_sets)]
    return used + [(n, keys.test_sets) for n in dataset_names(cfg, keys.test_sets)]


# ---------------------------------------------------------------------------------------------- device, run dir
def check_device(cfg) -> None:
    """The configured device exists on this machine (:func:`d2_backbones.preflight.check_device`)."""
    keys = keys_of(cfg)
    _check_device(dotted_get(cfg, keys.device) or "cuda", keys.device, keys.override(keys.device, "cpu"))


def claim_run_dir(cfg, args):
    """The output directory of this run: the weights-check policy and ``max_to_keep`` checked, the directory
    claimed (:func:`d2_backbones.rundir.claim_output_dir`: a previous run needs ``--resume`` or
    ``--overwrite``; weights named inside a run moved aside are read from their new place) and the package's
    logger writing into it. Returns the directory."""
    from .weights import check_weights_policy

    keys = keys_of(cfg)
    policy = dotted_get(cfg, keys.weights_check)
    if policy is not None:
        check_weights_policy(policy, keys.weights_check)
    check_max_to_keep(dotted_get(cfg, keys.max_to_keep), keys.max_to_keep)
    output_dir = dotted_get(cfg, keys.output_dir)
    claim = claim_output_dir(output_dir, args, keys.output_dir)
    weights = dotted_get(cfg, keys.weights)
    if weights:
        moved = claim.moved_path(weights)
        if moved != weights:
            _set(cfg, keys.weights, moved)
    # our logger first: the datasets' checks on arrival log their warnings through it
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2_backbones", abbrev_name="d2b")
    claim.log(logger, keys.weights, dotted_get(cfg, keys.weights))
    return output_dir


def _set(cfg, dotted: str, value) -> None:
    """``cfg.<dotted> = value`` without type conversion (a yacs node before freezing, or a Python config)."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------- datasets
def register_datasets(cfg, args) -> None:
    """Register the ``--register-coco`` datasets of ``args`` (checked on arrival, :mod:`d2_backbones.data`) and
    the synthetic shapes datasets when the config uses them (generated on first use)."""
    register_coco_datasets(getattr(args, "register_coco", []) or [],
                           check_images=not getattr(args, "skip_image_check", False))
    keys = keys_of(cfg)
    if set(dataset_names(cfg, keys.train_sets) + dataset_names(cfg, keys.test_sets)) & set(SHAPES_DATASETS):
        register_shapes()


def _check_registered(name: str, key: str) -> None:
    if name not in DatasetCatalog.list():
        raise ConfigError(
            f"Dataset {name!r} (in {key}) is not registered in this process (rank {comm.get_rank()}). Register it "
            f"with --register-coco {name} JSON IMAGE_ROOT (done inside main(), so spawned workers see it), or use a "
            f"registered name (shapes_train / shapes_val are generated on first use); code under "
            f"'if __name__ == \"__main__\":' is not run in spawned workers.")


def check_datasets(cfg, eval_only: bool = False) -> None:
    """Every dataset the config names is registered, and the files of those the run reads exist (the train
    datasets are not read by ``--eval-only``)."""
    keys = keys_of(cfg)
    for key in (keys.train_sets, keys.test_sets):
        for name in dataset_names(cfg, key):
            _check_registered(name, key)
    check_dataset_files(_used_datasets(cfg, eval_only))


def dataset_classes(names: Sequence[Tuple[str, str]]) -> Dict[str, List[str]]:
    """``{dataset: class names}`` for ``(name, key)`` pairs: the metadata's ``thing_classes``, else the
    categories of its COCO ``json_file`` (ordered by id, as detectron2 sets ``thing_classes`` when it loads
    the file); datasets with neither are left out."""
    out = {}
    for name, key in names:
        _check_registered(name, key)
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        json_file = meta.get("json_file")
        if classes is None and isinstance(json_file, str) and os.path.isfile(json_file):
            classes = coco_classes(json_file)
        if classes is not None:
            out.setdefault(name, list(classes))
    return out


def class_count_keys(cfg) -> List[str]:
    """The keys holding the model's number of foreground classes."""
    if keys_of(cfg) is LAZY:
        from .lazy import class_count_keys as lazy_keys

        return lazy_keys(cfg)
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return ["MODEL.RETINANET.NUM_CLASSES"]
    if arch in ("GeneralizedRCNN", "PanopticFPN"):
        return ["MODEL.ROI_HEADS.NUM_CLASSES"]
    return []


def num_classes_override(mode: Optional[str]) -> Optional[int]:
    """The class count ``--num-classes N`` forces (``None`` for no flag and for ``auto``)."""
    if mode in (None, "auto"):
        return None
    try:
        return int(mode)
    except ValueError:
        raise ConfigError(f"--num-classes={mode!r} is not supported. Valid values: 'auto' or an integer. Fix: pass "
                          f"--num-classes auto (the datasets' count) or the number of foreground classes.") from None


def check_num_classes(cfg, mode: Optional[str] = None) -> None:
    """Check (or with ``mode='auto'``/an int, set) the heads' class count against the datasets'."""
    k = keys_of(cfg)
    keys = class_count_keys(cfg)
    n = num_classes_override(mode)
    if n is not None:
        set_values(cfg, keys, n)
    classes = dataset_classes([(name, k.train_sets) for name in dataset_names(cfg, k.train_sets)]
                              + [(name, k.test_sets) for name in dataset_names(cfg, k.test_sets)])
    counts = {name: len(c) for name, c in classes.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"The datasets disagree on their number of classes: {counts}. Train and test datasets "
                          f"must share one category list.")
    if not counts or not keys:
        return
    dname, dclasses = next(iter(classes.items()))
    want = len(dclasses)
    if mode == "auto":
        set_values(cfg, keys, want)
        logger.info(f"--num-classes auto: {', '.join(keys)} = {want} (from {dname!r})")
        return
    wrong = [f"{key}={dotted_get(cfg, key)}" for key in keys if dotted_get(cfg, key) != want]
    if wrong:
        shown = dclasses if len(dclasses) <= 10 else dclasses[:10] + ["..."]
        where = "set " + " and ".join(k.override(key, want) for key in keys) if k is YACS else \
            "add " + " ".join(k.override(key, want) for key in keys) + " to the overrides"
        raise ConfigError(
            f"Dataset {dname!r} has {want} classes (thing_classes={shown}) but {', '.join(wrong)}. Fix: {where} "
            f"(detectron2 counts foreground classes only, no background), or pass --num-classes auto.")


def check_input_format(cfg) -> None:
    """Python configs: the data loaders' ``image_format`` equals the model's ``input_format`` (a yacs config has
    one key, ``INPUT.FORMAT``, for both)."""
    if keys_of(cfg) is YACS:
        return
    model_fmt = dotted_get(cfg, "model.input_format")
    for key in ("dataloader.train.mapper.image_format", "dataloader.test.mapper.image_format"):
        data_fmt = dotted_get(cfg, key)
        if model_fmt is not None and data_fmt is not None and data_fmt != model_fmt:
            raise ConfigError(f"{key}={data_fmt!r} but model.input_format={model_fmt!r}: the model would see "
                              f"swapped color channels. Fix: set both to the format the weights expect.")


# ---------------------------------------------------------------------------------------------- precision
_PRECISIONS = ("float16", "bfloat16")


def check_precision(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of the training step, ``None`` without mixed precision.

    ``train_net``: ``SOLVER.AMP.ENABLED`` is detectron2's ``AMPTrainer`` (float16 with a CUDA grad scaler),
    which stops at its first step on any other device: refused at start with the CPU alternative.
    ``lazy_train``: ``train.amp.enabled`` is float16 on CUDA and bfloat16 on CPU; ``train.amp.precision``
    chooses one of ``float16``/``bfloat16``.
    """
    keys = keys_of(cfg)
    if not dotted_get(cfg, keys.amp, False):
        return None
    device = str(dotted_get(cfg, keys.device) or "cuda")
    on_cuda = device.startswith("cuda")
    if keys is YACS:
        if not on_cuda:
            raise ConfigError(
                f"SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda (detectron2's AMPTrainer trains in float16 with a "
                f"CUDA grad scaler), but MODEL.DEVICE={device!r}. Fix: set SOLVER.AMP.ENABLED False; for "
                f"mixed precision on CPU (bfloat16 autocast) train the Python config of the same model: python -m "
                f"d2_backbones.lazy_train --config-file configs/<Family>/<name>.py train.device=cpu "
                f"train.amp.enabled=True (docs/meta_architectures.md).")
        return torch.float16
    name = dotted_get(cfg, "train.amp.precision") or ("float16" if on_cuda else "bfloat16")
    if str(name) not in _PRECISIONS:
        raise ConfigError(f"train.amp.precision={name!r} is not supported. Valid values: 'float16', 'bfloat16'. "
                          f"Fix: set train.amp.precision to one of them, or to None (float16 on CUDA, bfloat16 on "
                          f"CPU).")
    return getattr(torch, str(name))


# ---------------------------------------------------------------------------------------------- schedule, sizes
def check_schedule(cfg) -> None:
    """Values no training can use, refused before the model is built (:func:`~d2_backbones.preflight.check_values`)."""
    if keys_of(cfg) is YACS:
        check_yacs_solver(cfg)
        return
    check_values([
        ("train.max_iter", dotted_get(cfg, "train.max_iter"), "int>=1",
         "set the number of iterations, e.g. train.max_iter=1000"),
        ("dataloader.train.total_batch_size", dotted_get(cfg, "dataloader.train.total_batch_size"), "int>=1",
         "set the global batch, e.g. dataloader.train.total_batch_size=2"),
        ("optimizer.lr", dotted_get(cfg, "optimizer.lr"), "lr",
         "set the learning rate, e.g. optimizer.lr=0.02 for a batch of 16"),
        ("train.checkpointer.period", dotted_get(cfg, "train.checkpointer.period"), "int>=1",
         "set the iterations between checkpoints, e.g. train.checkpointer.period=5000 (more than train.max_iter: "
         "only model_final.pth)"),
        ("train.eval_period", dotted_get(cfg, "train.eval_period"), "int>=0",
         "train.eval_period=0 evaluates only at the end"),
        ("train.log_period", dotted_get(cfg, "train.log_period"), "int>=1", "e.g. train.log_period=20"),
    ])


_RESIZE_FIELDS = ("short_edge_length", "max_size", "min_scale", "max_scale", "target_height", "target_width")


def input_sizes(cfg) -> Dict[str, object]:
    """The input sizes of training and evaluation and the batch, by key (for the large-size warning and the
    out-of-memory message)."""
    if keys_of(cfg) is YACS:
        i = cfg.INPUT
        return {"INPUT.MIN_SIZE_TRAIN": i.MIN_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN": i.MAX_SIZE_TRAIN,
                "SOLVER.IMS_PER_BATCH": cfg.SOLVER.IMS_PER_BATCH, "INPUT.MIN_SIZE_TEST": i.MIN_SIZE_TEST,
                "INPUT.MAX_SIZE_TEST": i.MAX_SIZE_TEST}
    sizes = {}
    for split in ("train", "test"):
        for i, aug in enumerate(dotted_get(cfg, f"dataloader.{split}.mapper.augmentations") or []):
            for field in _RESIZE_FIELDS:
                value = dotted_get(aug, field)
                if value is not None:
                    sizes[f"dataloader.{split}.mapper.augmentations.{i}.{field}"] = (
                        list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value)
    sizes["dataloader.train.total_batch_size"] = dotted_get(cfg, "dataloader.train.total_batch_size")
    return sizes


def _oom_fix(cfg) -> str:
    if keys_of(cfg) is YACS:
        return ("lower INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN (the shipped configs use (640, ..., 800) / 1333; "
                "the *_TEST keys for the evaluations during training) "
                "or SOLVER.IMS_PER_BATCH (detectron2 scales SOLVER.BASE_LR with it when "
                "SOLVER.REFERENCE_WORLD_SIZE is set)")
    return ("lower the resize augmentation's sizes (e.g. dataloader.train.mapper.augmentations.0.short_edge_length="
            "[640] ...max_size=1024; the dataloader.test ones for the evaluations during training) or "
            "dataloader.train.total_batch_size")


# ---------------------------------------------------------------------------------------------- heads
def check_head_features(cfg, shapes=None) -> None:
    """The features the heads read exist among the backbone's outputs (``shapes``: its ``output_shape()``).

    yacs: the heads' ``IN_FEATURES`` (:func:`d2_backbones.build.check_head_features`, whose key table is
    ``build._head_keys``); Python configs: the heads' feature names, anchor strides and pooler scales
    (:func:`d2_backbones.lazy.check_model_features`; ``shapes`` required).
    """
    if keys_of(cfg) is YACS:
        from .build import check_head_features as check_yacs

        check_yacs(cfg, shapes)
        return
    from .lazy import check_model_features

    if shapes is None:
        raise ValueError("check_head_features of a Python config needs the backbone's output_shape()")
    check_model_features(cfg.model if "model" in cfg else cfg, shapes)


# ---------------------------------------------------------------------------------------------- setup
def prepare(cfg, args) -> str:
    """The checks and preparations of a run, in order, once the config is loaded with its overrides: device,
    output directory, datasets, class count, input format and, for training, precision, schedule values and
    input sizes; then detectron2's ``default_setup`` (a yacs config is frozen first). Returns the output
    directory."""
    keys = keys_of(cfg)
    eval_only = bool(getattr(args, "eval_only", False))
    check_device(cfg)
    output_dir = claim_run_dir(cfg, args)
    register_datasets(cfg, args)
    check_num_classes(cfg, getattr(args, "num_classes", None))  # every dataset registered, then the class count
    check_input_format(cfg)
    check_datasets(cfg, eval_only)  # the files on disk
    if not eval_only:
        check_precision(cfg)
        check_schedule(cfg)
        warn_large_sizes(input_sizes(cfg))
    if keys is YACS:
        cfg.freeze()
    with no_space_left(os.path.join(str(output_dir), "config.yaml"), output_dir), \
            keep_run_config(output_dir, eval_only):  # --eval-only: config_eval.yaml, the run's stays
        default_setup(cfg, args)
    return output_dir


# ---------------------------------------------------------------------------------------------- in the run
@contextlib.contextmanager
def training_errors(cfg, checkpointer) -> Iterator[None]:
    """Around the training loop: running out of memory names the input-size keys and their values; a divergence
    names weights that did not load (or training from scratch), the last complete checkpoint and the fix."""
    from .weights import NonFiniteCheckpointError

    keys = keys_of(cfg)
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory_error(e, input_sizes(cfg), _oom_fix(cfg)) from e
    except FloatingPointError as e:
        output_dir = dotted_get(cfg, keys.output_dir)
        if isinstance(e, NonFiniteCheckpointError):
            msg = str(e)
        else:
            last = checkpointer.last_complete() if comm.is_main_process() else None
            msg = (f"{e} The last complete checkpoint is "
                   + (f"{os.path.join(output_dir, last)} (last_checkpoint names it)." if last
                      else "none (no checkpoint was written before the divergence)."))
        cause = divergence_cause(checkpointer, keys.weights, dotted_get(cfg, keys.weights))
        raise FloatingPointError(
            f"Training diverged: {cause}{msg} Fix: lower {keys.lr} (now {dotted_get(cfg, keys.lr)}) or lengthen "
            f"{keys.warmup} (now {dotted_get(cfg, keys.warmup)}); --resume continues from the last complete "
            f"checkpoint.") from e


def evaluation_input(cfg) -> Tuple[Optional[int], Optional[int], str]:
    """``(shortest edge, longest edge, image format)`` of the evaluation inputs: ``INPUT.*_TEST`` /
    ``INPUT.FORMAT``, or a Python config's ``dataloader.test.mapper`` (its first resize augmentation; ``None``
    when it has none)."""
    if keys_of(cfg) is YACS:
        return cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT
    short = longest = None
    for aug in dotted_get(cfg, "dataloader.test.mapper.augmentations") or []:
        edge = dotted_get(aug, "short_edge_length")
        if edge is not None:
            short = edge if isinstance(edge, int) else list(edge)[0]
            longest = dotted_get(aug, "max_size")
            break
    fmt = dotted_get(cfg, "dataloader.test.mapper.image_format") or dotted_get(cfg, "model.input_format") or "BGR"
    return short, longest, str(fmt)


def write_pictures(cfg, model) -> List[str]:
    """After training, in the main process: ``curves.png`` (loss and AP by iteration, from ``metrics.json``) and,
    when the config has a test dataset, ``predictions.png`` (the model on its first images beside the ground
    truth), both in the output directory (:mod:`d2_backbones.visualize`). Returns the files written."""
    if not comm.is_main_process():
        return []
    from .visualize import draw_predictions, plot_curves

    keys = keys_of(cfg)
    output_dir = dotted_get(cfg, keys.output_dir)
    written = []
    with no_space_left(os.path.join(output_dir, "curves.png"), output_dir):  # a full disk names the file
        written.append(plot_curves(output_dir))
        logger.info(f"Wrote {written[-1]}")
    tests = dataset_names(cfg, keys.test_sets)
    if tests:
        png = os.path.join(output_dir, "predictions.png")
        model = getattr(model, "module", model)  # unwrap DDP
        short, longest, fmt = evaluation_input(cfg)
        with no_space_left(png, output_dir):
            written.append(draw_predictions(None, model, tests[0], png, min_size=short, max_size=longest,
                                            image_format=fmt))
            logger.info(f"Wrote {written[-1]}")
    return written
