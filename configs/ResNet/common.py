"""What the ResNet Python configs in this folder share: the bottom-up network, its feature names, the
input settings its weights need (pixel mean/std, channel order) and the ImageNet weights to start from.

Change a value here for every meta-architecture, or in one config after its imports
(``bottom_up.depth = 101``), or on the command line (``model.backbone.bottom_up.depth=101``).
"""
from detectron2.config import LazyCall as L

from d2_backbones.resnet import build_resnet

bottom_up = L(build_resnet)(
    depth=50,
    stride_in_1x1=True,  # MSRA caffe-style weights (detectron2's R-50.pkl): BGR, std 1
    deep_stem=False,  # True + avg_down=True: ResNet-50-V1d
    avg_down=False,
    norm="FrozenBN",
    freeze_at=2,  # stem + res2
)
C2_C5 = ["res2", "res3", "res4", "res5"]  # R-CNN meta-architectures (FPN p2-p6)
C3_C5 = ["res3", "res4", "res5"]  # RetinaNet, FCOS (FPN p3-p7)
pixel = dict()  # pixel_mean/std: detectron2's defaults (MSRA mean, std 1)
image_format = "BGR"  # the loaders' image_format and the model's input_format
init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
