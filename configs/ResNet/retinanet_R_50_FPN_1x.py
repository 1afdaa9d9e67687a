"""RetinaNet, ResNet-50 + FPN, 1x.

The Python twin of retinanet_R_50_FPN_1x.yaml: the same model (parameter names, outputs; tested).
Train: python -m d2_backbones.lazy_train --config-file configs/ResNet/retinanet_R_50_FPN_1x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.lazy import coco_loaders, multistep_lr, retinanet, sgd, train_settings
from d2_backbones.resnet import build_resnet

model = retinanet(
    L(build_fpn)(
        bottom_up=L(build_resnet)(
            depth=50,
            stride_in_1x1=True,  # MSRA caffe-style weights (detectron2's R-50.pkl): BGR, std 1
            deep_stem=False,  # True + avg_down=True: ResNet-50-V1d
            avg_down=False,
            norm="FrozenBN",
            freeze_at=2,  # stem + res2
            out_features=["res3", "res4", "res5"],
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="p6p7", top_block_source="on_input",  # P6/P7 from the last backbone feature (C5): heads on p3-p7
    ),
    num_classes=80,
)

dataloader = coco_loaders(use_instance_mask=False)
optimizer = sgd(lr=0.01)
lr_multiplier = multistep_lr(max_iter=90000, steps=(60000, 80000))
train = train_settings(
    max_iter=90000,
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
)
