"""Train and evaluate detectron2 models with d2_backbones' backbones: ``python -m d2_backbones.train_net``.

The same program as the checkout's ``train_net.py`` (which calls this module), runnable from any
directory once the package is installed. Standard detectron2 usage (every flag of detectron2's
``default_argument_parser`` works); the configs shipped with the package are found with
:func:`d2_backbones.get_config_file`::

    python -m d2_backbones.train_net --config-file CONFIG --num-gpus 8
    python -m d2_backbones.train_net --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python -m d2_backbones.train_net --config-file CONFIG --resume   # continue from OUTPUT_DIR/last_checkpoint
    python -m d2_backbones.train_net --config-file \\
        "$(python -c 'import d2_backbones; print(d2_backbones.get_config_file("ResNet/faster_rcnn_R_50_FPN_1x.yaml"))')"

Additions (flags go before the KEY VALUE overrides): ``--register-coco NAME JSON IMAGE_ROOT``
(repeatable; checked on arrival, see :mod:`d2_backbones.data`), ``--skip-image-check``,
``--num-classes auto``. On a machine without GPUs use ``MODEL.DEVICE cpu``; ``--num-gpus N`` then
starts N CPU processes (gloo), at most ``os.cpu_count()``; with GPUs, at most one per GPU. Started by torchrun
or SLURM's ``srun``, it takes its processes from the environment instead (:mod:`d2_backbones.launch`)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m d2_backbones.train_net --config-file CONFIG
    sbatch scripts/slurm_train.sh CONFIG OUTPUT_DIR output/run
"""
import logging

from detectron2.evaluation import verify_results
from detectron2.utils import comm

from d2_backbones import engine  # (any d2_backbones import registers the backbones)
from d2_backbones.inference import optimize_for_inference
from d2_backbones.launch import launch_main
from d2_backbones.train import Trainer, argument_parser, check_opts, setup
from d2_backbones.weights import Checkpointer

__all__ = ["main", "invoke_main"]

logger = logging.getLogger("d2_backbones")


def main(args):
    """Run in every process started by ``launch``: set up (datasets registered and checked), then train or evaluate."""
    cfg = setup(args)  # registers --register-coco datasets in every worker process
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR, cfg=cfg).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.TEST.OPTIMIZE_FOR_INFERENCE:  # after loading: fold norms, channels_last (see the README)
            optimize_for_inference(model.eval())
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    engine.write_pictures(cfg, trainer.model)  # curves.png, predictions.png (main process)
    return res


def invoke_main() -> None:
    """Parse the command line and run :func:`main` in every process: started by torchrun or srun, or spawned by
    detectron2's ``launch`` (one process per GPU, or per CPU worker); see :mod:`d2_backbones.launch`."""
    args = argument_parser().parse_args()
    check_opts(args.opts)
    print("Command Line Args:", args)
    launch_main(main, args)


if __name__ == "__main__":
    invoke_main()
