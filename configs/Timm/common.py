"""What the timm Python configs in this folder share: the bottom-up network (any timm model that supports
features_only), its feature names, the input settings its weights need (pixel mean/std, channel order) and the
weights to start from.

Change a value here for every meta-architecture, or in one config after its imports
(``bottom_up.name = "convnext_tiny"``), or on the command line (``model.backbone.bottom_up.name=convnext_tiny``).
For a model trained with another normalisation, take pixel mean/std from
``d2_backbones.timm.pixel_config(name)`` (vit_*, tf_efficientnet_lite*: 127.5).
"""
from detectron2.config import LazyCall as L

from d2_backbones.lazy import RGB_MEAN, RGB_STD
from d2_backbones.timm import TimmBackbone

bottom_up = L(TimmBackbone)(
    name="efficientnet_b0",
    norm="FrozenBN",
    freeze_at=2,  # the stem (conv_stem, bn1, blocks.0) + stage2 (blocks.1)
)
C2_C5 = ["stage2", "stage3", "stage4", "stage5"]  # R-CNN meta-architectures (FPN p2-p6)
C3_C5 = ["stage3", "stage4", "stage5"]  # RetinaNet, FCOS (FPN p3-p7)
pixel = dict(pixel_mean=RGB_MEAN, pixel_std=RGB_STD)  # timm's ImageNet mean/std
image_format = "RGB"  # the loaders' image_format and the model's input_format
init_checkpoint = ""  # timm efficientnet_b0 weights converted with python -m d2_backbones.convert --format timm
