"""FCOS, timm efficientnet_b0 + FPN, 1x.

FCOS exists only as a Python config (detectron2 has no yaml builder for it); the network comes from common.py
beside it.
Train: python -m d2_backbones.lazy_train --config-file configs/Timm/fcos_timm_efficientnet_b0_FPN_1x.py [key=value ...]
"""
from d2_backbones.lazy import coco_loaders, fcos, fpn, multistep_lr, sgd, train_settings

from .common import C3_C5, bottom_up, image_format, init_checkpoint, pixel

# P6/P7 from P5 (FCOS paper, Sec 2.2): heads on p3-p7. FCOS has no input_format: the
# loaders' image_format is what the model gets
model = fcos(fpn(bottom_up, C3_C5, top_block="p6p7", top_block_source="on_output"), num_classes=80, **pixel)
dataloader = coco_loaders(image_format=image_format, use_instance_mask=False)
optimizer = sgd(lr=0.01)
lr_multiplier = multistep_lr(max_iter=90000, steps=(60000, 80000))
train = train_settings(max_iter=90000, init_checkpoint=init_checkpoint)
