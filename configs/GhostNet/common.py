"""What the GhostNet Python configs in this folder share: the bottom-up network, its feature names, the
input settings its weights need (pixel mean/std, channel order) and the ImageNet weights to start from.

Change a value here for every meta-architecture, or in one config after its imports
(``bottom_up.width = 1.3``), or on the command line (``model.backbone.bottom_up.width=1.3``).
"""
from detectron2.config import LazyCall as L

from d2_backbones.ghostnet import GhostNet
from d2_backbones.lazy import RGB_MEAN, RGB_STD

bottom_up = L(GhostNet)(
    width=1.0,
    norm="FrozenBN",
    freeze_at=2,  # stem group (conv_stem, bn1, blocks.0) + stage2 (blocks.1-2)
)
C2_C5 = ["stage2", "stage3", "stage4", "stage5"]  # R-CNN meta-architectures (FPN p2-p6)
C3_C5 = ["stage3", "stage4", "stage5"]  # RetinaNet, FCOS (FPN p3-p7)
pixel = dict(pixel_mean=RGB_MEAN, pixel_std=RGB_STD)  # ImageNet mean/std (timm weights)
image_format = "RGB"  # the loaders' image_format and the model's input_format
init_checkpoint = ""  # timm ghostnet_100 converted with python -m d2_backbones.convert (RGB, ImageNet mean/std)
