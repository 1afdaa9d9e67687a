"""What ``train_net.py`` needs beyond detectron2's ``DefaultTrainer``: setup, datasets, checks, CPU DDP.

``train_net.py`` keeps detectron2's standard contract (``default_argument_parser`` flags and
trailing ``KEY VALUE`` overrides) and adds:

* ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable): COCO-format datasets registered inside
  ``main`` (so every spawned worker has them); same name + same files twice is harmless, a
  different file or a clash with a built-in name is an error.
* ``--num-classes auto``: set every head's ``NUM_CLASSES`` from the datasets' ``thing_classes``;
  without it a mismatch is an error naming each key and value.
* ``--skip-image-check``: the datasets are checked on arrival, before the model is built
  (:mod:`d2_backbones.data`); this skips the check that every image file exists.
* ``--overwrite``: ``OUTPUT_DIR`` belongs to one run (:mod:`d2_backbones.rundir`): a directory in use by
  another trainer is refused, and a fresh run over a previous run's files too, unless ``--resume`` (continue
  it) or ``--overwrite`` (move its files to ``previous_run_<time>/``).
* the ``shapes_train`` / ``shapes_val`` quickstart datasets, generated on first use
  (:mod:`d2_backbones.data`).

Setup order: ``get_cfg`` -> :func:`~d2_backbones.add_config` -> file -> overrides -> checks ->
``default_setup``. The :class:`Trainer` uses COCO evaluation, keeps ``SOLVER.MAX_TO_KEEP``
periodic checkpoints (counted on disk), optionally a best checkpoint, saves and loads through the
weights layer's :class:`~d2_backbones.weights.Checkpointer` (safe reading, load checks, atomic
files, no non-finite state saved), logs what ``--resume`` resumes from, and runs
multi-process on CPU (gloo; detectron2's ``create_ddp_model`` passes ``device_ids``, which CPU DDP
rejects).
"""
import argparse
import contextlib
import copy
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

from torch.nn.parallel import DistributedDataParallel

import detectron2.engine.defaults as _d2_defaults
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .build import check_head_features
from .config import add_config, cfg_get, get_cfg
from .data import coco_classes as _coco_classes
from .data import CheckedDatasetMapper, register_coco_datasets, register_used_shapes
from .weights import Checkpointer, NonFiniteCheckpointError, PeriodicCheckpointer, check_weights_policy
from .errors import ConfigError
from .inference import is_optimized_for_inference, optimize_for_inference
from .model_zoo import resolve_config_file
from .rundir import (call_guarded, check_max_to_keep, claim_output_dir, guard_writers, keep_run_config,
                     no_space_left)
from .yaml_safety import allow_unsafe_yaml
from .preflight import (check_dataset_files, check_device, check_yacs_overrides, check_yacs_solver,
                        divergence_cause, is_out_of_memory, out_of_memory_error, warn_large_sizes)

__all__ = ["argument_parser", "check_opts", "register_coco_datasets", "check_num_classes", "setup", "Trainer",
           "AtomicCheckpointer", "ddp_any_device"]

logger = logging.getLogger("d2_backbones")


# ---------------------------------------------------------------------------------------------- CLI
def argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--register-coco`` and ``--num-classes``."""
    parser = default_argument_parser()
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset (repeatable); use NAME in DATASETS.TRAIN/TEST")
    parser.add_argument("--num-classes", default=None,
                        help="'auto': set MODEL.*.NUM_CLASSES from the datasets' classes; an int: set them to it")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="check the --register-coco datasets without looking for every image file on disk")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in an output directory that holds a previous run, moving its files "
                             "to <dir>/previous_run_<time>/ (nothing is deleted)")
    parser.add_argument("--unsafe-yaml", action="store_true",
                        help="read yaml configs with Python tags (!!python/...), which run code when read: only for "
                             "files you trust (default: such a tag is refused)")
    return parser


def check_opts(opts: Sequence[str]) -> None:
    """A flag placed after the ``KEY VALUE`` overrides is an error that says where it belongs."""
    for tok in opts:
        if isinstance(tok, str) and tok.startswith("--"):
            raise SystemExit(
                f"Found flag {tok!r} inside the config overrides {list(opts)}. Put --flags before the KEY VALUE "
                f"overrides, e.g.: train_net.py --config-file X {tok} OUTPUT_DIR out")
    check_yacs_overrides(opts, get_cfg)  # key=value (the Python configs' form): the KEY VALUE spelling, lazy_train
    if len(opts) % 2:
        raise SystemExit(f"Config overrides must be KEY VALUE pairs; got an odd number of items: {list(opts)}")


# ---------------------------------------------------------------------------------------------- datasets
def _head_class_keys(cfg) -> List[str]:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return ["MODEL.RETINANET.NUM_CLASSES"]
    if arch in ("GeneralizedRCNN", "PanopticFPN"):
        return ["MODEL.ROI_HEADS.NUM_CLASSES"]
    return []


def _dataset_classes(names: Sequence[str]) -> Dict[str, List[str]]:
    out = {}
    for n in names:
        if n not in DatasetCatalog.list():
            raise ConfigError(
                f"Dataset {n!r} (in DATASETS.TRAIN/TEST) is not registered in this process (rank "
                f"{comm.get_rank()}). Register it with --register-coco {n} JSON IMAGE_ROOT (done inside main(), so "
                f"spawned workers see it), or register it inside main(); code under 'if __name__ == \"__main__\":' "
                f"is not run in spawned workers.")
        meta = MetadataCatalog.get(n)
        classes = meta.get("thing_classes")
        if classes is None and meta.get("json_file"):
            classes = _coco_classes(meta.json_file)
        if classes is not None:
            out[n] = list(classes)
    return out


def num_classes_override(mode: Optional[str]) -> Optional[int]:
    """The class count ``--num-classes N`` forces (``None`` for no flag and for ``auto``)."""
    if mode in (None, "auto"):
        return None
    try:
        return int(mode)
    except ValueError:
        raise ConfigError(f"--num-classes={mode!r} must be 'auto' or an int.") from None


def check_num_classes(cfg, mode: Optional[str] = None) -> None:
    """Check (or with ``mode='auto'``/an int, set) the heads' NUM_CLASSES against the datasets."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    classes = _dataset_classes(names)
    keys = _head_class_keys(cfg)
    n = num_classes_override(mode)
    if n is not None:
        for k in keys:
            cfg.merge_from_list([k, n])
    counts = {n: len(c) for n, c in classes.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"The datasets disagree on their number of classes: {counts}. Train and test datasets "
                          f"must share one category list.")
    if not counts:
        return
    (dname, dclasses), = list(classes.items())[:1]
    want = len(dclasses)
    if mode == "auto":
        for k in keys:
            cfg.merge_from_list([k, want])
        logger.info(f"--num-classes auto: {', '.join(keys)} = {want} (from {dname!r})")
        return
    wrong = []
    for k in keys:
        value = cfg_get(cfg, k)
        if value != want:
            wrong.append(f"{k}={value}")
    if wrong:
        shown = dclasses if len(dclasses) <= 10 else dclasses[:10] + ["..."]
        raise ConfigError(
            f"Dataset {dname!r} has {want} classes (thing_classes={shown}) but {', '.join(wrong)}. Fix: set "
            f"{' and '.join(k + ' ' + str(want) for k in keys)} (detectron2 counts foreground classes only, no "
            f"background), or pass --num-classes auto.")


def check_amp_device(cfg) -> None:
    """``SOLVER.AMP.ENABLED`` is detectron2's ``AMPTrainer``: float16 autocast with a CUDA grad scaler,
    which stops at its first step on any other device. Say so at start, with the CPU alternative."""
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ConfigError(
            f"SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda (detectron2's AMPTrainer trains in float16 with a "
            f"CUDA grad scaler), but MODEL.DEVICE={cfg.MODEL.DEVICE!r}. Fix: set SOLVER.AMP.ENABLED False; for "
            f"mixed precision on CPU (bfloat16 autocast) train the Python config of the same model: python -m "
            f"d2_backbones.lazy_train --config-file configs/<Family>/<name>.py train.device=cpu "
            f"train.amp.enabled=True (docs/meta_architectures.md).")


# ---------------------------------------------------------------------------------------------- setup
def setup(args):
    """``get_cfg`` -> ``add_config`` -> file -> overrides -> checks (device, dataset files, classes, AMP, solver
    values: :mod:`d2_backbones.preflight`) -> freeze -> ``default_setup``."""
    check_opts(args.opts)
    cfg = get_cfg()
    add_config(cfg)
    if args.config_file:
        args.config_file = resolve_config_file(args.config_file, yacs=True)  # default_setup logs and copies it
        with allow_unsafe_yaml(getattr(args, "unsafe_yaml", False)):  # a Python tag is refused without the flag
            cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_device(cfg.MODEL.DEVICE, "MODEL.DEVICE", "MODEL.DEVICE cpu")
    check_weights_policy(cfg.MODEL.WEIGHTS_CHECK, "MODEL.WEIGHTS_CHECK")
    check_max_to_keep(cfg.SOLVER.MAX_TO_KEEP, "SOLVER.MAX_TO_KEEP")
    claim = claim_output_dir(cfg.OUTPUT_DIR, args)  # one run per OUTPUT_DIR; a previous run: --resume / --overwrite
    cfg.MODEL.WEIGHTS = claim.moved_path(cfg.MODEL.WEIGHTS)
    # our logger first: the datasets' checks on arrival log their warnings through it
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_backbones", abbrev_name="d2b")
    claim.log(logger, "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)
    register_coco_datasets(getattr(args, "register_coco", []) or [],
                           check_images=not getattr(args, "skip_image_check", False))
    register_used_shapes(cfg)
    eval_only = getattr(args, "eval_only", False)
    check_dataset_files([(n, "DATASETS.TRAIN") for n in ([] if eval_only else cfg.DATASETS.TRAIN)]
                        + [(n, "DATASETS.TEST") for n in cfg.DATASETS.TEST])
    check_num_classes(cfg, getattr(args, "num_classes", None))
    if not eval_only:
        check_amp_device(cfg)
        check_yacs_solver(cfg)
        warn_large_sizes({"INPUT.MIN_SIZE_TRAIN": cfg.INPUT.MIN_SIZE_TRAIN,
                          "INPUT.MAX_SIZE_TRAIN": cfg.INPUT.MAX_SIZE_TRAIN})
    cfg.freeze()
    with no_space_left(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.OUTPUT_DIR), \
            keep_run_config(cfg.OUTPUT_DIR, eval_only):  # --eval-only: config_eval.yaml, the run's stays
        default_setup(cfg, args)
    return cfg


# ---------------------------------------------------------------------------------------------- checkpoints
# The checkpointer of the weights layer; kept under its old name for scripts that import it from here.
AtomicCheckpointer = Checkpointer


# ---------------------------------------------------------------------------------------------- DDP on CPU
def ddp_any_device(model, *, fp16_compression=False, **kwargs):
    """``create_ddp_model`` that also works for CPU models (no ``device_ids`` there)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cpu":
        kwargs.pop("device_ids", None)
        return DistributedDataParallel(model, **kwargs)
    return _ORIGINAL_CREATE_DDP(model, fp16_compression=fp16_compression, **kwargs)


_ORIGINAL_CREATE_DDP = _d2_defaults.create_ddp_model


@contextlib.contextmanager
def _ddp_for_any_device():
    _d2_defaults.create_ddp_model = ddp_any_device
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = _ORIGINAL_CREATE_DDP


# ---------------------------------------------------------------------------------------------- trainer
class Trainer(DefaultTrainer):
    """``DefaultTrainer`` + COCO evaluation, atomic checkpoints, max_to_keep, best checkpoint, CPU DDP."""

    def __init__(self, cfg):
        with _ddp_for_any_device():
            super().__init__(cfg)
        if comm.is_main_process():
            self._log_effective_batch(cfg)

    def _log_effective_batch(self, written) -> None:
        """The values the run uses (``self.cfg``: after detectron2's ``auto_scale_workers``), once."""
        s, ws = self.cfg.SOLVER, comm.get_world_size()
        scaled = ""
        if (s.IMS_PER_BATCH, s.MAX_ITER) != (written.SOLVER.IMS_PER_BATCH, written.SOLVER.MAX_ITER):
            scaled = (f" (auto-scaled from the config's IMS_PER_BATCH={written.SOLVER.IMS_PER_BATCH}, BASE_LR="
                      f"{written.SOLVER.BASE_LR}, MAX_ITER={written.SOLVER.MAX_ITER} written for "
                      f"SOLVER.REFERENCE_WORLD_SIZE={written.SOLVER.REFERENCE_WORLD_SIZE}; "
                      f"SOLVER.REFERENCE_WORLD_SIZE 0 uses them as written)")
        logger.info(f"Effective batch: SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} images per iteration over {ws} "
                    f"process(es) ({s.IMS_PER_BATCH // max(ws, 1)} each), SOLVER.BASE_LR={s.BASE_LR}, "
                    f"MAX_ITER={s.MAX_ITER}, device={self.cfg.MODEL.DEVICE}{scaled}")

    @classmethod
    def build_model(cls, cfg):
        """detectron2's; a head asking for a feature the backbone lacks gets :func:`~d2_backbones.check_head_features`'
        message (before any data is loaded)."""
        try:
            model = super().build_model(cfg)
        except KeyError:
            check_head_features(cfg)
            raise
        # detectron2's semantic head drops unknown IN_FEATURES silently: check after a successful build too
        check_head_features(cfg, model.backbone.output_shape())
        return model

    def build_hooks(self):
        cfg = self.cfg
        # same checkpointables (the trainer: optimizer, scheduler, iteration) as detectron2's checkpointer
        self.checkpointer = Checkpointer(self.model, cfg.OUTPUT_DIR, cfg=cfg, **self.checkpointer.checkpointables)
        if comm.is_main_process():
            self.checkpointer.prepare_save_dir()  # temporaries of killed runs, free space
        ret = super().build_hooks()
        keep = cfg.SOLVER.MAX_TO_KEEP or None
        for i, h in enumerate(ret):
            if isinstance(h, hooks.PeriodicCheckpointer):
                # detectron2's hook, with max_to_keep counted on disk (holds across resumes)
                ret[i] = PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=keep)
        metric = cfg.TEST.BEST_CHECKPOINT_METRIC
        if metric and comm.is_main_process() and cfg.TEST.EVAL_PERIOD > 0:
            ret.append(hooks.BestCheckpointer(cfg.TEST.EVAL_PERIOD, self.checkpointer, metric,
                                              mode=cfg.TEST.BEST_CHECKPOINT_MODE))
        return ret

    def build_writers(self):
        """detectron2's writers; a full disk names the file (``metrics.json``, events) and the last checkpoint."""
        return guard_writers(super().build_writers(), self.cfg.OUTPUT_DIR)

    def _keep_configured_lr(self, configured) -> None:
        """A resumed optimizer/scheduler restores the learning rates of the run that wrote the checkpoint;
        a SOLVER.BASE_LR changed since (e.g. after a divergence) is applied to the rest of the schedule."""
        groups = self.optimizer.param_groups
        restored = [g.get("initial_lr", g["lr"]) for g in groups]
        if len(configured) != len(groups) or all(abs(a - b) <= 1e-12 * max(abs(a), 1.0)
                                                 for a, b in zip(configured, restored)):
            return
        base_lrs = getattr(self.scheduler, "base_lrs", None)
        for i, (g, new, old) in enumerate(zip(groups, configured, restored)):
            g["initial_lr"] = new
            g["lr"] = g["lr"] * (new / old) if old else new
            if base_lrs is not None and i < len(base_lrs):
                base_lrs[i] = new
        logger.info(f"--resume: SOLVER.BASE_LR is {self.cfg.SOLVER.BASE_LR} now; the checkpoint's run used other "
                    f"learning rates ({restored[0]:g} for the first parameter group). The rest of the schedule uses "
                    f"the configured ones.")

    def resume_or_load(self, resume=True):
        cp = self.checkpointer
        if resume and cp.has_checkpoint():
            path = cp.get_checkpoint_file()
            configured = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
            super().resume_or_load(resume=True)
            self._keep_configured_lr(configured)
            logger.info(f"--resume: found {os.path.join(cp.save_dir, 'last_checkpoint')} -> {os.path.basename(path)}; "
                        f"resuming at iter {self.start_iter} (MODEL.WEIGHTS is ignored when resuming).")
            final = os.path.join(cp.save_dir, "model_final.pth")
            if self.start_iter > self.max_iter:
                logger.info(f"SOLVER.MAX_ITER={self.max_iter} is below the checkpoint's iteration "
                            f"{self.start_iter - 1}: nothing is left to train.")
            if self.start_iter >= self.max_iter and comm.is_main_process() and not cp.path_manager.exists(final):
                # killed while writing model_final.pth, or MAX_ITER lowered: the final state is the checkpoint's
                logger.info(f"The schedule is complete (iter {self.start_iter} of {self.max_iter}) but "
                            f"model_final.pth is missing; writing it now from iteration {self.start_iter - 1}.")
                cp.save("model_final", iteration=self.start_iter - 1)  # labelled with the iteration it holds
        else:
            if resume:
                logger.info(f"--resume given but no last_checkpoint in OUTPUT_DIR={cp.save_dir}; starting from "
                            f"MODEL.WEIGHTS={self.cfg.MODEL.WEIGHTS!r} at iter 0.")
            super().resume_or_load(resume=False)
            if not self.cfg.MODEL.WEIGHTS:
                logger.info("Weights loading summary: MODEL.WEIGHTS is empty; every module is initialised from scratch.")

    def train(self):
        """detectron2's training loop; a divergence names the last finite checkpoint and the fix (weights that
        did not load first), running out of memory names the input-size keys."""
        try:
            return super().train()
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            i = self.cfg.INPUT
            raise out_of_memory_error(
                e, {"INPUT.MIN_SIZE_TRAIN": i.MIN_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN": i.MAX_SIZE_TRAIN,
                    "SOLVER.IMS_PER_BATCH": self.cfg.SOLVER.IMS_PER_BATCH, "INPUT.MIN_SIZE_TEST": i.MIN_SIZE_TEST,
                    "INPUT.MAX_SIZE_TEST": i.MAX_SIZE_TEST},
                "lower INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN (the shipped configs use (640, ..., 800) / 1333; "
                "the *_TEST keys for the evaluations during training) "
                "or SOLVER.IMS_PER_BATCH (detectron2 scales SOLVER.BASE_LR with it when "
                "SOLVER.REFERENCE_WORLD_SIZE is set)") from e
        except FloatingPointError as e:
            if isinstance(e, NonFiniteCheckpointError):
                msg = str(e)
            else:
                last = self.checkpointer.last_complete() if comm.is_main_process() else None
                msg = (f"{e} The last complete checkpoint is "
                       + (f"{os.path.join(self.cfg.OUTPUT_DIR, last)} (last_checkpoint names it)." if last
                          else "none (no checkpoint was written before the divergence)."))
            cause = divergence_cause(self.checkpointer, "MODEL.WEIGHTS", self.cfg.MODEL.WEIGHTS)
            raise FloatingPointError(
                f"Training diverged: {cause}{msg} Fix: lower SOLVER.BASE_LR (now {self.cfg.SOLVER.BASE_LR}) or "
                f"lengthen SOLVER.WARMUP_ITERS (now {self.cfg.SOLVER.WARMUP_ITERS}); --resume continues from the last "
                f"complete checkpoint.") from e

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation; with ``TEST.OPTIMIZE_FOR_INFERENCE`` it runs on an optimized copy.

        The copy (norms folded, channels_last; see :func:`d2_backbones.optimize_for_inference`)
        keeps the model being trained intact. A model that is already optimized is used as is.
        """
        if cfg.TEST.OPTIMIZE_FOR_INFERENCE and not is_optimized_for_inference(model):
            model = model.module if isinstance(model, DistributedDataParallel) else model
            t0 = time.perf_counter()
            model = optimize_for_inference(copy.deepcopy(model).eval())
            logger.info(f"TEST.OPTIMIZE_FOR_INFERENCE: evaluating an optimized copy of the model (prepared in "
                        f"{time.perf_counter() - t0:.1f} s)")
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's, with :class:`~d2_backbones.data.CheckedDatasetMapper`: an image that cannot be read names
        its file (any DATALOADER.NUM_WORKERS), a >8-bit image is refused instead of read as white."""
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's, with :class:`~d2_backbones.data.CheckedDatasetMapper` (see :meth:`build_train_loader`)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); train_net.py "
                f"evaluates COCO-format datasets. Register yours with --register-coco.")
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator = COCOEvaluator(dataset_name, output_dir=output_folder)
        evaluate = evaluator.evaluate  # a full disk while writing the results names the folder
        evaluator.evaluate = lambda *a, **k: call_guarded(evaluate, output_folder, cfg.OUTPUT_DIR, *a, **k)
        return evaluator
