"""Cascade Mask R-CNN (three stages, class-agnostic box regression), ResNet-50 + FPN, 3x.

The Python twin of cascade_mask_rcnn_R_50_FPN_3x.yaml: the same model (parameter names, outputs; tested).
Train: python -m d2_backbones.lazy_train --config-file configs/ResNet/cascade_mask_rcnn_R_50_FPN_3x.py
    [--num-gpus 8] [key=value ...]
(or detectron2's tools/lazyconfig_train_net.py with the same arguments; see docs/meta_architectures.md).
"""
from detectron2.config import LazyCall as L

from d2_backbones.fpn import build_fpn
from d2_backbones.lazy import cascade_mask_rcnn_fpn, coco_loaders, multistep_lr, sgd, train_settings
from d2_backbones.resnet import build_resnet

model = cascade_mask_rcnn_fpn(
    L(build_fpn)(
        bottom_up=L(build_resnet)(
            depth=50,
            stride_in_1x1=True,  # MSRA caffe-style weights (detectron2's R-50.pkl): BGR, std 1
            deep_stem=False,  # True + avg_down=True: ResNet-50-V1d
            avg_down=False,
            norm="FrozenBN",
            freeze_at=2,  # stem + res2
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=256,  # 128: FPNLite (every head reads model.backbone.out_channels)
        top_block="maxpool",  # P6 = max-pool of P5: RPN on p2-p6, ROI heads on p2-p5
    ),
    num_classes=80,
)

dataloader = coco_loaders()
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
train = train_settings(
    max_iter=270000,
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
)
