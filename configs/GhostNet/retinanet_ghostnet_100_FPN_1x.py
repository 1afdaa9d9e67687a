"""RetinaNet, GhostNet x1.0 + FPN, 1x.

The Python twin of retinanet_ghostnet_100_FPN_1x.yaml: the same model (parameter names, outputs; tested).
Train: python -m d2_backbones.lazy_train --config-file configs/GhostNet/retinanet_ghostnet_100_FPN_1x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.ghostnet import GhostNet
from d2_backbones.lazy import RGB_MEAN, RGB_STD, coco_loaders, multistep_lr, retinanet, sgd, train_settings

model = retinanet(
    L(build_fpn)(
        bottom_up=L(GhostNet)(
            width=1.0,
            norm="FrozenBN",
            freeze_at=2,  # stem group (conv_stem, bn1, blocks.0) + stage2 (blocks.1-2)
            out_features=["stage3", "stage4", "stage5"],
        ),
        in_features=["stage3", "stage4", "stage5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="p6p7", top_block_source="on_input",  # P6/P7 from the last backbone feature (C5): heads on p3-p7
    ),
    num_classes=80, pixel_mean=RGB_MEAN, pixel_std=RGB_STD, input_format="RGB",  # ImageNet mean/std, RGB (timm weights)
)

dataloader = coco_loaders(image_format="RGB", use_instance_mask=False)
optimizer = sgd(lr=0.01)
lr_multiplier = multistep_lr(max_iter=90000, steps=(60000, 80000))
train = train_settings(
    max_iter=90000,
    init_checkpoint="",  # timm ghostnet_100 converted with python -m d2_backbones.convert (RGB, ImageNet mean/std)
)
