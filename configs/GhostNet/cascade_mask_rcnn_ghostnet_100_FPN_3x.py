"""Cascade Mask R-CNN (three stages, class-agnostic box regression), GhostNet x1.0 + FPN, 3x.

The Python twin of cascade_mask_rcnn_ghostnet_100_FPN_3x.yaml: the same model (parameter names, outputs; tested).
Train: python -m d2_backbones.lazy_train --config-file configs/GhostNet/cascade_mask_rcnn_ghostnet_100_FPN_3x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.ghostnet import GhostNet
from d2_backbones.lazy import RGB_MEAN, RGB_STD, cascade_mask_rcnn_fpn, coco_loaders, multistep_lr, sgd, train_settings

model = cascade_mask_rcnn_fpn(
    L(build_fpn)(
        bottom_up=L(GhostNet)(
            width=1.0,
            norm="FrozenBN",
            freeze_at=2,  # stem group (conv_stem, bn1, blocks.0) + stage2 (blocks.1-2)
            out_features=["stage2", "stage3", "stage4", "stage5"],
        ),
        in_features=["stage2", "stage3", "stage4", "stage5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="maxpool",  # P6 = max-pool of P5: RPN on p2-p6, ROI heads on p2-p5
    ),
    num_classes=80, pixel_mean=RGB_MEAN, pixel_std=RGB_STD, input_format="RGB",  # ImageNet mean/std, RGB (timm weights)
)

dataloader = coco_loaders(image_format="RGB")
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(
    max_iter=270000,
    init_checkpoint="",  # timm ghostnet_100 converted with python -m d2_backbones.convert (RGB, ImageNet mean/std)
)
