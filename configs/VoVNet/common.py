"""What the VoVNet Python configs in this folder share: the bottom-up network, its feature names, the
input settings its weights need (pixel mean/std, channel order) and the ImageNet weights to start from.

Change a value here for every meta-architecture, or in one config after its imports
(``bottom_up.spec = "V-57-eSE"``), or on the command line (``model.backbone.bottom_up.spec=V-57-eSE``).
"""
from detectron2.config import LazyCall as L

from d2_backbones.vovnet import VoVNet

bottom_up = L(VoVNet)(
    spec="V-39-eSE",  # any name of d2_backbones.VOVNET_SPECS, e.g. "V-19-slim-dw-eSE"
    norm="FrozenBN",
    freeze_at=0,  # vovnet-detectron2's recipe (with FrozenBN every norm is fixed anyway)
)
C2_C5 = ["stage2", "stage3", "stage4", "stage5"]  # R-CNN meta-architectures (FPN p2-p6)
C3_C5 = ["stage3", "stage4", "stage5"]  # RetinaNet, FCOS (FPN p3-p7)
pixel = dict()  # pixel_mean/std: detectron2's defaults (MSRA mean, std 1), as vovnet-detectron2
image_format = "BGR"  # the loaders' image_format and the model's input_format
init_checkpoint = ""  # vovnet-detectron2 ImageNet file (same parameter names), e.g. vovnet39_ese_detectron2.pth
