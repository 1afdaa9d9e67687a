"""FCOS, VoVNetV2-39-eSE + FPN, 3x.

FCOS exists only as a Python config (detectron2 has no yaml builder for it).
Train: python -m d2_backbones.lazy_train --config-file configs/VoVNet/fcos_V_39_eSE_FPN_3x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.lazy import coco_loaders, fcos, multistep_lr, sgd, train_settings
from d2_backbones.vovnet import VoVNet

model = fcos(
    L(build_fpn)(
        bottom_up=L(VoVNet)(
            spec="V-39-eSE",  # any name of d2_backbones.VOVNET_SPECS, e.g. "V-19-slim-dw-eSE"
            norm="FrozenBN",
            freeze_at=0,  # vovnet-detectron2's recipe (with FrozenBN every norm is fixed anyway)
            out_features=["stage3", "stage4", "stage5"],
        ),
        in_features=["stage3", "stage4", "stage5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="p6p7", top_block_source="on_output",  # P6/P7 from P5 (FCOS paper, Sec 2.2): heads on p3-p7
    ),
    num_classes=80,
)

dataloader = coco_loaders(use_instance_mask=False)
optimizer = sgd(lr=0.01)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(
    max_iter=270000,
    init_checkpoint="",  # vovnet-detectron2 ImageNet file (same parameter names), e.g. vovnet39_ese_detectron2.pth
)
