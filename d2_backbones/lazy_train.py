"""Train and evaluate Python (LazyConfig) configs: ``python -m d2_backbones.lazy_train``.

The same program as detectron2's ``tools/lazyconfig_train_net.py`` - same flags, same config
keys (``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``), trailing
``key=value`` overrides - with the package's checkpointer and checks::

    python -m d2_backbones.lazy_train --config-file configs/VoVNet/mask_rcnn_V_39_eSE_FPN_3x.py --num-gpus 8
    python -m d2_backbones.lazy_train --config-file CONFIG --resume          # continue from train.output_dir
    python -m d2_backbones.lazy_train --config-file CONFIG --eval-only train.init_checkpoint=model_final.pth
    python -m d2_backbones.lazy_train --config-file configs/GhostNet/fcos_ghostnet_100_FPN_1x.py \\
        train.device=cpu dataloader.train.dataset.names=shapes_train dataloader.test.dataset.names=shapes_val \\
        model.num_classes=3 dataloader.train.total_batch_size=4 train.max_iter=200

What it adds to detectron2's script:

* **checkpoints** go through :class:`d2_backbones.weights.Checkpointer` (safe reading, load checks,
  atomic files, no non-finite state saved); ``train.checkpointer.max_to_keep`` is counted on disk;
* **checks before anything is built**: overrides are ``key=value`` after the flags; ``train.device``
  exists; the datasets are registered (``shapes_train`` / ``shapes_val`` are generated and registered
  on first use, ``--register-coco NAME JSON IMAGE_ROOT`` registers yours); the model's class count
  (``model.num_classes`` / ``model.roi_heads.num_classes``) equals the datasets' (``--num-classes auto``
  sets it); the model's ``input_format`` equals the data loader's ``image_format``;
* **checks while the model is built** (:func:`d2_backbones.lazy.instantiate_model`): a family
  argument error names its key (``model.backbone.bottom_up.depth``), and the features, anchor
  strides and pooler scales the heads use must match the backbone's outputs;
* ``train.amp.enabled=True``: detectron2's ``AMPTrainer`` (float16 + grad scaler) on CUDA, bfloat16
  autocast on CPU (``train.amp.precision`` overrides the dtype);
* a divergence names the last complete checkpoint; several CPU processes (``--num-gpus N`` with
  ``train.device=cpu``) use gloo.
"""
import logging
import os
import time
from typing import List, Optional, Sequence

import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks, launch
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .errors import ConfigError
from .model_zoo import resolve_config_file
from .rundir import (call_guarded, check_max_to_keep, claim_output_dir, guard_writers, keep_run_config,
                     no_space_left)
from .lazy import class_count_keys, instantiate_model
from .preflight import (check_dataset_files, check_device, check_num_processes, check_values, divergence_cause,
                        is_out_of_memory, out_of_memory_error, warn_large_sizes)
from .train import argument_parser, ddp_any_device, num_classes_override, register_coco_datasets
from .weights import Checkpointer, NonFiniteCheckpointError, PeriodicCheckpointer, check_weights_policy
from .yaml_safety import load_lazy_config
from .data import use_checked_mapper

__all__ = ["check_overrides", "setup", "build_model", "build_trainer", "CPUAutocastTrainer", "do_test", "do_train",
           "main", "invoke_main"]

logger = logging.getLogger("d2_backbones")

_SHAPES = ("shapes_train", "shapes_val")


# ---------------------------------------------------------------------------------------------- checks
def check_overrides(opts: Sequence[str]) -> None:
    """Overrides are ``key=value``; a ``--flag`` among them is an error that says where it belongs."""
    for tok in opts:
        if tok.startswith("--"):
            raise SystemExit(f"Found flag {tok!r} among the key=value overrides {list(opts)}. Put --flags before "
                             f"the overrides, e.g.: lazy_train --config-file X.py {tok} train.max_iter=100")
        if "=" not in tok:
            hint = " (Python configs take key=value, not 'KEY VALUE' as the yaml train_net.py does)"
            raise SystemExit(f"Override {tok!r} is not of the form key=value{hint}.")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _dataset_names(cfg) -> List[str]:
    names = []
    for key in ("dataloader.train.dataset.names", "dataloader.test.dataset.names"):
        v = _get(cfg, key)
        if v is not None:
            names += [v] if isinstance(v, str) else list(v)
    return names


TRAINING_KEYS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def check_training_config(cfg, path: str) -> None:
    """A file without the five top-level keys of a training config (a ``common.py``, a yaml) is
    refused before anything else runs, with the configs that can be trained."""
    missing = [k for k in TRAINING_KEYS if k not in cfg]
    if not missing:
        return
    folder = os.path.dirname(os.path.abspath(path))
    trainable = sorted(f for f in os.listdir(folder) if f.endswith(".py") and f != os.path.basename(path)
                       and f != "common.py") if os.path.isdir(folder) else []
    if path.endswith((".yaml", ".yml")):
        why = "it is a yaml config: train it with python -m d2_backbones.train_net --config-file " + path
    elif os.path.basename(path) == "common.py":
        why = "common.py holds what the Python configs beside it share; pass one of them"
    else:
        why = "pass a Python config that defines them"
    listed = f" Python configs in {folder}: {', '.join(trainable)}." if trainable else ""
    raise ConfigError(f"Config file {path} is not a training config: it has no {', '.join(missing)} (a training "
                      f"config defines {', '.join(TRAINING_KEYS)}). Fix: {why}.{listed}")


def _check_device(cfg) -> None:
    check_device(_get(cfg, "train.device") or "cuda", "train.device", "train.device=cpu")


def _input_sizes(cfg) -> dict:
    """The input sizes of training and evaluation (the resize augmentations' fields) and the batch, by key."""
    sizes = {}
    for split in ("train", "test"):
        for i, aug in enumerate(_get(cfg, f"dataloader.{split}.mapper.augmentations") or []):
            for field in ("short_edge_length", "max_size", "min_scale", "max_scale", "target_height", "target_width"):
                if hasattr(aug, "get") and aug.get(field, None) is not None:
                    value = aug.get(field)
                    sizes[f"dataloader.{split}.mapper.augmentations.{i}.{field}"] = (
                        list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value)
    sizes["dataloader.train.total_batch_size"] = _get(cfg, "dataloader.train.total_batch_size")
    return sizes


def _check_values(cfg) -> None:
    """Values no training can use, refused before the model is built (:func:`~d2_backbones.preflight.check_values`)."""
    check_values([
        ("train.max_iter", _get(cfg, "train.max_iter"), "int>=1",
         "set the number of iterations, e.g. train.max_iter=1000"),
        ("dataloader.train.total_batch_size", _get(cfg, "dataloader.train.total_batch_size"), "int>=1",
         "set the global batch, e.g. dataloader.train.total_batch_size=2"),
        ("optimizer.lr", _get(cfg, "optimizer.lr"), "lr",
         "set the learning rate, e.g. optimizer.lr=0.02 for a batch of 16"),
        ("train.checkpointer.period", _get(cfg, "train.checkpointer.period"), "int>=1",
         "set the iterations between checkpoints, e.g. train.checkpointer.period=5000 (more than train.max_iter: "
         "only model_final.pth)"),
        ("train.eval_period", _get(cfg, "train.eval_period"), "int>=0",
         "train.eval_period=0 evaluates only at the end"),
        ("train.log_period", _get(cfg, "train.log_period"), "int>=1", "e.g. train.log_period=20"),
    ])


def _check_classes(cfg, mode: Optional[str]) -> None:
    """The model's class count against the datasets' ``thing_classes`` (or set it: ``auto`` / an int)."""
    keys = class_count_keys(cfg)
    n = num_classes_override(mode)
    if n is not None:
        for k in keys:
            LazyConfig.apply_overrides(cfg, [f"{k}={n}"])
    classes = {}
    for name in _dataset_names(cfg):
        if name not in DatasetCatalog.list():
            raise ConfigError(
                f"Dataset {name!r} (dataloader.*.dataset.names) is not registered in this process. Register it with "
                f"--register-coco {name} JSON IMAGE_ROOT, or use a registered name (shapes_train / shapes_val are "
                f"generated on first use).")
        thing = MetadataCatalog.get(name).get("thing_classes")
        if thing is not None:
            classes[name] = list(thing)
    if not classes or not keys:
        return
    counts = {n: len(c) for n, c in classes.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"The datasets disagree on their number of classes: {counts}.")
    dname, dclasses = next(iter(classes.items()))
    want = len(dclasses)
    if mode == "auto":
        LazyConfig.apply_overrides(cfg, [f"{k}={want}" for k in keys])
        logger.info(f"--num-classes auto: {', '.join(keys)} = {want} (from {dname!r})")
        return
    wrong = [f"{k}={_get(cfg, k)}" for k in keys if _get(cfg, k) != want]
    if wrong:
        shown = dclasses if len(dclasses) <= 10 else dclasses[:10] + ["..."]
        raise ConfigError(f"Dataset {dname!r} has {want} classes (thing_classes={shown}) but {', '.join(wrong)}. "
                          f"Fix: add {' '.join(f'{k}={want}' for k in keys)} to the overrides (foreground classes "
                          f"only), or pass --num-classes auto.")


def _check_input_format(cfg) -> None:
    model_fmt = _get(cfg, "model.input_format")
    for key in ("dataloader.train.mapper.image_format", "dataloader.test.mapper.image_format"):
        data_fmt = _get(cfg, key)
        if model_fmt is not None and data_fmt is not None and data_fmt != model_fmt:
            raise ConfigError(f"{key}={data_fmt!r} but model.input_format={model_fmt!r}: the model would see "
                              f"swapped color channels. Fix: set both to the format the weights expect.")


def setup(args):
    """Load the config, apply the overrides, register datasets, run the checks, ``default_setup``."""
    check_overrides(args.opts)
    args.config_file = resolve_config_file(args.config_file, yacs=False)  # default_setup logs and copies it
    cfg = load_lazy_config(args.config_file, unsafe=getattr(args, "unsafe_yaml", False))  # yaml: safe_load
    check_training_config(cfg, args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if _get(cfg, "train.weights_check") is not None:
        check_weights_policy(_get(cfg, "train.weights_check"), "train.weights_check")
    use_checked_mapper(cfg.get("dataloader"))  # detectron2's DatasetMapper -> one whose errors name the image file
    output_dir = _get(cfg, "train.output_dir")
    check_max_to_keep(_get(cfg, "train.checkpointer.max_to_keep"), "train.checkpointer.max_to_keep")
    claim = claim_output_dir(output_dir, args, "train.output_dir")  # one run per directory; --resume / --overwrite
    if _get(cfg, "train.init_checkpoint"):
        cfg.train.init_checkpoint = claim.moved_path(cfg.train.init_checkpoint)
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2_backbones", abbrev_name="d2b")
    claim.log(logger, "train.init_checkpoint", _get(cfg, "train.init_checkpoint"))
    register_coco_datasets(getattr(args, "register_coco", []) or [],
                           check_images=not getattr(args, "skip_image_check", False))
    if set(_dataset_names(cfg)) & set(_SHAPES):
        from .data import register_shapes

        register_shapes()
    _check_device(cfg)
    used = []
    for key in ("dataloader.test.dataset.names",) + (() if args.eval_only else ("dataloader.train.dataset.names",)):
        names = _get(cfg, key) or []
        used += [(n, key) for n in ([names] if isinstance(names, str) else names)]
    _check_classes(cfg, getattr(args, "num_classes", None))
    _check_input_format(cfg)
    check_dataset_files(used)
    if not args.eval_only:
        _check_values(cfg)
        warn_large_sizes(_input_sizes(cfg))
    with no_space_left(os.path.join(str(output_dir), "config.yaml"), output_dir), \
            keep_run_config(output_dir, args.eval_only):  # --eval-only: config_eval.yaml, the run's stays
        default_setup(cfg, args)
    return cfg


# ---------------------------------------------------------------------------------------------- model, trainer
def build_model(cfg) -> torch.nn.Module:
    """The model of ``cfg.model`` (with :func:`~d2_backbones.lazy.instantiate_model`'s checks) on ``train.device``."""
    model = instantiate_model(cfg.model)
    model.to(_get(cfg, "train.device") or "cuda")
    logger.info(f"Model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters "
                f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable)")
    return model


class CPUAutocastTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` whose forward (and loss) runs under CPU autocast.

    Mixed precision without CUDA: convolutions and matrix products in ``precision``
    (default bfloat16, which has float32's range, so no loss scaling is needed), everything
    autocast keeps in float32 (norms, softmax, losses) in float32; gradients and the optimizer
    step are float32, as with detectron2's ``AMPTrainer``.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_trainer(cfg, model, data_loader, optimizer):
    """``SimpleTrainer``, or with ``train.amp.enabled`` detectron2's ``AMPTrainer`` (CUDA, float16 by
    default) / :class:`CPUAutocastTrainer` (CPU, bfloat16 by default)."""
    amp = _get(cfg, "train.amp") or {}
    if not amp.get("enabled", False):
        return SimpleTrainer(model, data_loader, optimizer)
    on_cuda = str(_get(cfg, "train.device") or "cuda").startswith("cuda")
    name = amp.get("precision", None) or ("float16" if on_cuda else "bfloat16")
    precision = getattr(torch, str(name), None)
    if precision not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"train.amp.precision={name!r} is not supported. Valid values: 'float16', 'bfloat16'.")
    logger.info(f"Mixed precision: {name} autocast on {'CUDA' if on_cuda else 'CPU'}")
    if on_cuda:
        return AMPTrainer(model, data_loader, optimizer, precision=precision)
    return CPUAutocastTrainer(model, data_loader, optimizer, precision=precision)


def do_test(cfg, model):
    """detectron2's evaluation of ``dataloader.test`` with ``dataloader.evaluator`` (none if it is None)."""
    if _get(cfg, "dataloader.evaluator") is None:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def do_train(args, cfg):
    """detectron2's LazyConfig training loop with the package's checkpointer (see the module docstring)."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = ddp_any_device(model, **cfg.train.ddp)
    trainer = build_trainer(cfg, model, train_loader, optimizer)
    output_dir = cfg.train.output_dir
    checkpointer = Checkpointer(model, output_dir, trainer=trainer,
                                weights_check=_get(cfg, "train.weights_check"))
    if comm.is_main_process():
        checkpointer.prepare_save_dir()
    ckpt = cfg.train.checkpointer
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        PeriodicCheckpointer(checkpointer, ckpt.period, max_to_keep=ckpt.get("max_to_keep", None) or None)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period,  # a full disk while writing the results names the folder
                       lambda: call_guarded(do_test, os.path.join(output_dir, "inference"), output_dir, cfg, model)),
        hooks.PeriodicWriter(guard_writers(default_writers(output_dir, cfg.train.max_iter), output_dir),
                             period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        start_iter = trainer.iter + 1  # the checkpoint holds the iteration that just finished
        logger.info(f"--resume: continuing from {checkpointer.get_checkpoint_file()} at iter {start_iter}.")
        if start_iter > cfg.train.max_iter:
            logger.info(f"train.max_iter={cfg.train.max_iter} is below the checkpoint's iteration {start_iter - 1}: "
                        f"nothing is left to train.")
    else:
        start_iter = 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory_error(e, _input_sizes(cfg), "lower the resize augmentation's sizes (e.g. dataloader.train."
                                  "mapper.augmentations.0.short_edge_length=[640] ...max_size=1024) or "
                                  "dataloader.train.total_batch_size") from e
    except FloatingPointError as e:
        if isinstance(e, NonFiniteCheckpointError):
            raise
        last = checkpointer.last_complete() if comm.is_main_process() else None
        cause = divergence_cause(checkpointer, "train.init_checkpoint", cfg.train.init_checkpoint)
        raise FloatingPointError(
            f"Training diverged: {cause}{e} The last complete checkpoint is "
            + (f"{os.path.join(output_dir, last)}" if last else "none") + f". Fix: lower optimizer.lr (now "
            f"{cfg.optimizer.lr}) or lengthen the warm-up; --resume continues from the last checkpoint.") from e
    return trainer


def main(args):
    """Run in every process started by ``launch``."""
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        model = ddp_any_device(model)
        Checkpointer(model, cfg.train.output_dir, weights_check=_get(cfg, "train.weights_check")).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    do_train(args, cfg)
    return None


def invoke_main() -> None:
    """Parse the command line and ``launch`` :func:`main` (one process per GPU, or per CPU worker)."""
    args = argument_parser().parse_args()
    check_overrides(args.opts)
    processes = check_num_processes(args.num_gpus)  # before spawning: more processes than GPUs / CPU cores
    if processes:
        print(processes)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
