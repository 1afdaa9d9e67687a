"""Mask R-CNN, timm efficientnet_b0 + FPN, 1x.

The Python twin of mask_rcnn_timm_efficientnet_b0_FPN_1x.yaml (same model); the network comes from common.py
beside it.
Train: python -m d2_backbones.lazy_train --config-file configs/Timm/mask_rcnn_timm_efficientnet_b0_FPN_1x.py [key=value ...]
"""
from d2_backbones.lazy import coco_loaders, fpn, mask_rcnn_fpn, multistep_lr, sgd, train_settings

from .common import C2_C5, bottom_up, image_format, init_checkpoint, pixel

# P6 = max-pool of P5: RPN on p2-p6, ROI heads on p2-p5
model = mask_rcnn_fpn(fpn(bottom_up, C2_C5), num_classes=80, **pixel, input_format=image_format)
dataloader = coco_loaders(image_format=image_format)
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=90000, steps=(60000, 80000))
train = train_settings(max_iter=90000, init_checkpoint=init_checkpoint)
