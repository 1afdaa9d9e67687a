"""Panoptic FPN (Mask R-CNN + semantic FPN head on p2-p5), VoVNetV2-39-eSE + FPN, 3x.

The Python twin of panoptic_fpn_V_39_eSE_3x.yaml: the same model (parameter names, outputs; tested).
Train: python -m d2_backbones.lazy_train --config-file configs/VoVNet/panoptic_fpn_V_39_eSE_3x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.lazy import coco_loaders, multistep_lr, panoptic_fpn, sgd, train_settings
from d2_backbones.vovnet import VoVNet

model = panoptic_fpn(
    L(build_fpn)(
        bottom_up=L(VoVNet)(
            spec="V-39-eSE",  # any name of d2_backbones.VOVNET_SPECS, e.g. "V-19-slim-dw-eSE"
            norm="FrozenBN",
            freeze_at=0,  # vovnet-detectron2's recipe (with FrozenBN every norm is fixed anyway)
            out_features=["stage2", "stage3", "stage4", "stage5"],
        ),
        in_features=["stage2", "stage3", "stage4", "stage5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="maxpool",  # P6 = max-pool of P5: RPN on p2-p6, ROI heads on p2-p5
    ),
    num_classes=80,
)

dataloader = coco_loaders(panoptic=True)
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(
    max_iter=270000,
    init_checkpoint="",  # vovnet-detectron2 ImageNet file (same parameter names), e.g. vovnet39_ese_detectron2.pth
)
