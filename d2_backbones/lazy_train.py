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
  ``train.device=cpu``) use gloo; started by torchrun or SLURM's ``srun`` it takes its processes from the
  environment (:mod:`d2_backbones.launch`; ``torchrun --nproc-per-node 8 -m d2_backbones.lazy_train ...``);
* after training, ``curves.png`` and ``predictions.png`` in ``train.output_dir``, as ``train_net`` writes them.

The checks, the output directory, the error messages and the pictures are those of ``train_net``: both trainers
call the same setup core, :mod:`d2_backbones.engine`. ``configs/quickstart/faster_rcnn_R_18_FPN_shapes_short.py``
is the Python twin of the yaml quickstart::

    python -m d2_backbones.lazy_train --config-file configs/quickstart/faster_rcnn_R_18_FPN_shapes_short.py
"""
import logging
import os
import time
from typing import Sequence

import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from . import engine
from .errors import ConfigError, dotted_get
from .model_zoo import resolve_config_file
from .rundir import call_guarded, guard_writers
from .lazy import instantiate_model
from .launch import launch_main
from .train import argument_parser, ddp_any_device
from .weights import Checkpointer, PeriodicCheckpointer
from .yaml_safety import load_lazy_config
from .data import use_checked_mapper

__all__ = ["check_overrides", "setup", "build_model", "build_trainer", "CPUAutocastTrainer", "do_test", "do_train",
           "main", "invoke_main"]

logger = logging.getLogger("d2_backbones")

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


def setup(args):
    """Load the config, apply the overrides, then :func:`d2_backbones.engine.prepare` (the checks shared with
    ``train_net``: device, output directory, datasets, classes, input format, precision, schedule values) and
    ``default_setup``."""
    check_overrides(args.opts)
    args.config_file = resolve_config_file(args.config_file, yacs=False)  # default_setup logs and copies it
    cfg = load_lazy_config(args.config_file, unsafe=getattr(args, "unsafe_yaml", False))  # yaml: safe_load
    check_training_config(cfg, args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    use_checked_mapper(cfg.get("dataloader"))  # detectron2's DatasetMapper -> one whose errors name the image file
    engine.prepare(cfg, args)
    return cfg


# ---------------------------------------------------------------------------------------------- model, trainer
def build_model(cfg) -> torch.nn.Module:
    """The model of ``cfg.model`` (with :func:`~d2_backbones.lazy.instantiate_model`'s checks) on ``train.device``."""
    model = instantiate_model(cfg.model)
    model.to(dotted_get(cfg, "train.device") or "cuda")
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
    precision = engine.check_precision(cfg)  # None, or float16/bfloat16 (train.amp.precision checked)
    if precision is None:
        return SimpleTrainer(model, data_loader, optimizer)
    on_cuda = str(dotted_get(cfg, "train.device") or "cuda").startswith("cuda")
    logger.info(f"Mixed precision: {str(precision).replace('torch.', '')} autocast on {'CUDA' if on_cuda else 'CPU'}")
    if on_cuda:
        return AMPTrainer(model, data_loader, optimizer, precision=precision)
    return CPUAutocastTrainer(model, data_loader, optimizer, precision=precision)


def do_test(cfg, model):
    """detectron2's evaluation of ``dataloader.test`` with ``dataloader.evaluator`` (none if it is None)."""
    if dotted_get(cfg, "dataloader.evaluator") is None:
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
                                weights_check=dotted_get(cfg, "train.weights_check"))
    if comm.is_main_process():
        checkpointer.prepare_save_dir()
    ckpt = cfg.train.checkpointer
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        # in every process: rank 0 writes, the others wait for the file (the checkpointer's save_to_disk)
        PeriodicCheckpointer(checkpointer, ckpt.period, max_to_keep=ckpt.get("max_to_keep", None) or None,
                             synchronize=True),
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
    with engine.training_errors(cfg, checkpointer):  # out of memory, divergence: named with the config's keys
        trainer.train(start_iter, cfg.train.max_iter)
    engine.write_pictures(cfg, model)  # curves.png, predictions.png (main process)
    return trainer


def main(args):
    """Run in every process started by ``launch``."""
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        model = ddp_any_device(model)
        Checkpointer(model, cfg.train.output_dir, weights_check=dotted_get(cfg, "train.weights_check")).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    do_train(args, cfg)
    return None


def invoke_main() -> None:
    """Parse the command line and run :func:`main` in every process: started by torchrun or srun, or spawned by
    detectron2's ``launch`` (one process per GPU, or per CPU worker); see :mod:`d2_backbones.launch`."""
    args = argument_parser().parse_args()
    check_overrides(args.opts)
    launch_main(main, args)


if __name__ == "__main__":
    invoke_main()
