"""Cascade Mask R-CNN (three stages, class-agnostic box regression), timm efficientnet_b0 + FPN, 3x.

The Python twin of cascade_mask_rcnn_timm_efficientnet_b0_FPN_3x.yaml (same model; tested);
the network comes from common.py beside it.
Train: python -m d2_backbones.lazy_train --config-file configs/Timm/cascade_mask_rcnn_timm_efficientnet_b0_FPN_3x.py
    [key=value ...]
"""
from d2_backbones.lazy import cascade_mask_rcnn_fpn, coco_loaders, fpn, multistep_lr, sgd, train_settings

from .common import C2_C5, bottom_up, image_format, init_checkpoint, pixel

# P6 = max-pool of P5: RPN on p2-p6, ROI heads on p2-p5
model = cascade_mask_rcnn_fpn(fpn(bottom_up, C2_C5), num_classes=80, **pixel, input_format=image_format)
dataloader = coco_loaders(image_format=image_format)
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(max_iter=270000, init_checkpoint=init_checkpoint)
