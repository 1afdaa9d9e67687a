#!/usr/bin/env python
"""Train and evaluate detectron2 models with d2_backbones' backbones.

Standard detectron2 usage (every flag of detectron2's default_argument_parser works):

    python train_net.py --config-file configs/ResNet/mask_rcnn_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CONFIG --resume            # continue from OUTPUT_DIR/last_checkpoint

Additions (flags go before the KEY VALUE overrides):

    --register-coco NAME JSON IMAGE_ROOT   register a COCO-format dataset (repeatable; checked before the model is built)
    --skip-image-check                     ... without looking for every image file on disk
    --num-classes auto                     set the heads' NUM_CLASSES from the datasets

Faster evaluation (norms folded into the convolutions, channels_last; same results):

    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth TEST.OPTIMIZE_FOR_INFERENCE True

On a machine without GPUs use MODEL.DEVICE cpu; --num-gpus N then starts N CPU processes (gloo).

The same program runs from anywhere as `python -m d2_backbones.train_net` (d2_backbones/train_net.py).
"""
from d2_backbones.train_net import invoke_main, main  # noqa: F401  (the program lives in the package)

if __name__ == "__main__":
    invoke_main()
