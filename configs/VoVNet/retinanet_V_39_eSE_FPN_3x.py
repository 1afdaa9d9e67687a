"""RetinaNet, VoVNetV2-39-eSE + FPN, 3x.

The Python twin of retinanet_V_39_eSE_FPN_3x.yaml (same model; tested);
the network comes from common.py beside it.
Train: python -m d2_backbones.lazy_train --config-file configs/VoVNet/retinanet_V_39_eSE_FPN_3x.py [key=value ...]
"""
from d2_backbones.lazy import coco_loaders, fpn, multistep_lr, retinanet, sgd, train_settings

from .common import C3_C5, bottom_up, image_format, init_checkpoint, pixel

# P6/P7 from the last backbone feature (C5): heads on p3-p7
model = retinanet(fpn(bottom_up, C3_C5, top_block="p6p7", top_block_source="on_input"),
                  num_classes=80, **pixel, input_format=image_format)
dataloader = coco_loaders(image_format=image_format, use_instance_mask=False)
optimizer = sgd(lr=0.01)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(max_iter=270000, init_checkpoint=init_checkpoint)
