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

Setup order: ``get_cfg`` -> :func:`~d2_backbones.add_config` -> file -> overrides -> the checks of the setup
core shared with ``lazy_train`` (:func:`d2_backbones.engine.prepare`) -> ``default_setup``. The :class:`Trainer` uses COCO evaluation, keeps ``SOLVER.MAX_TO_KEEP``
periodic checkpoints (counted on disk), optionally a best checkpoint, saves and loads through the
weights layer's :class:`~d2_backbones.weights.Checkpointer` (safe reading, load checks, atomic
files, no non-finite state saved), logs what ``--resume`` resumes from, and runs
multi-process on CPU (gloo; detectron2's ``create_ddp_model`` passes ``device_ids``, which CPU DDP
rejects).
"""
import argparse
import contextlib
import logging
import os
from typing import Sequence

from torch.nn.parallel import DistributedDataParallel

import detectron2.engine.defaults as _d2_defaults
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from . import engine
from .config import add_config, get_cfg
from .data import CheckedDatasetMapper, register_coco_datasets
from .weights import Checkpointer, PeriodicCheckpointer
from .model_zoo import resolve_config_file
from .rundir import call_guarded, guard_writers
from .runtime import check_runtime, evaluation_model
from .yaml_safety import allow_unsafe_yaml
from .preflight import check_yacs_overrides

__all__ = ["argument_parser", "check_opts", "register_coco_datasets", "setup", "Trainer",
           "ddp_any_device"]

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


# ---------------------------------------------------------------------------------------------- setup
# The checks live in the setup core shared with lazy_train (d2_backbones.engine).
def setup(args):
    """``get_cfg`` -> ``add_config`` -> file -> overrides -> :func:`d2_backbones.engine.prepare` (device, output
    directory, datasets, classes, AMP, solver values) -> freeze -> ``default_setup``."""
    check_opts(args.opts)
    cfg = get_cfg()
    add_config(cfg)
    if args.config_file:
        args.config_file = resolve_config_file(args.config_file, yacs=True)  # default_setup logs and copies it
        with allow_unsafe_yaml(getattr(args, "unsafe_yaml", False)):  # a Python tag is refused without the flag
            cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_runtime(cfg, eval_only=bool(getattr(args, "eval_only", False)))  # TEST.RUNTIME / TEST.PRECISION
    engine.prepare(cfg, args)
    return cfg


# ---------------------------------------------------------------------------------------------- checkpoints
# The checkpointer of the weights layer; kept under its old name for scripts that import it from here.


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
            engine.check_head_features(cfg)
            raise
        # detectron2's semantic head drops unknown IN_FEATURES silently: check after a successful build too
        engine.check_head_features(cfg, model.backbone.output_shape())
        return model

    def build_hooks(self):
        cfg = self.cfg
        # same checkpointables (the trainer: optimizer, scheduler, iteration) as detectron2's checkpointer
        self.checkpointer = Checkpointer(self.model, cfg.OUTPUT_DIR, cfg=cfg, **self.checkpointer.checkpointables)
        if comm.is_main_process():
            self.checkpointer.prepare_save_dir()  # temporaries of killed runs, free space
        ret = super().build_hooks()
        keep = cfg.SOLVER.MAX_TO_KEEP or None
        # detectron2's hook (in the main process only), with max_to_keep counted on disk (holds across resumes), in
        # every process at the same place: the main process writes, the others wait until the file is complete
        periodic = PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=keep,
                                        synchronize=True)
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)), None)
        if at is not None:
            ret[at] = periodic
        else:  # the other processes: before the evaluation, as in the main process
            ret.insert(next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), periodic)
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
        """detectron2's training loop; running out of memory names the input-size keys, a divergence the last
        finite checkpoint and the fix, weights that did not load first (:func:`d2_backbones.engine.training_errors`)."""
        with engine.training_errors(self.cfg, self.checkpointer):
            return super().train()

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation; with ``TEST.OPTIMIZE_FOR_INFERENCE`` or a runtime switch (``TEST.RUNTIME``,
        ``TEST.PRECISION``) it runs on a prepared copy (:func:`d2_backbones.runtime.evaluation_model`), so the
        model being trained stays intact. A model that is already prepared is used as is.
        """
        return super().test(cfg, evaluation_model(model, cfg), evaluators)

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
