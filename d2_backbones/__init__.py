"""d2_backbones: ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2.

Use in an existing detectron2 project::

    import d2_backbones                      # registers the backbones in BACKBONE_REGISTRY
    cfg = d2_backbones.add_config(get_cfg())  # adds MODEL.RESNETS.DEEP_STEM, MODEL.FPN.TOP_BLOCK, ...

Importing the package (once or many times) registers every backbone under the names in
:data:`REGISTERED_NAMES`; none collides with detectron2's, vovnet-detectron2's or
centermask2's own names. It also makes two detectron2 error messages more helpful (an
unknown d2_backbones config key says to call :func:`add_config`; an unregistered backbone
name lists ours, nearest first); nothing else of detectron2 changes.
"""
import re

__version__ = "0.1.0"

# detectron2 versions this package is tested with: >= MIN, < MAX.
DETECTRON2_MIN = (0, 6)
DETECTRON2_MAX = (1, 0)


def _check_detectron2():
    try:
        import detectron2
    except ImportError as e:  # pragma: no cover - exercised by .ci/run, not by pytest
        raise ImportError(
            "d2_backbones needs detectron2, which is not on PyPI. Install it first, e.g. "
            "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
            "(see the README's Install section)."
        ) from e
    found = tuple(int(x) for x in re.findall(r"\d+", detectron2.__version__)[:2])
    if not DETECTRON2_MIN <= found < DETECTRON2_MAX:
        raise ImportError(
            f"d2_backbones {__version__} requires detectron2 >= {'.'.join(map(str, DETECTRON2_MIN))} and < "
            f"{'.'.join(map(str, DETECTRON2_MAX))} (found {detectron2.__version__})."
        )


_check_detectron2()

from .config import add_config, get_cfg, install_config_hints  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .fpn import build_fpn  # noqa: E402
from .ghostnet import GHOSTNET_V1, GhostNet, convert_ghostnet_state_dict  # noqa: E402
from .resnet import RESNET_DEPTHS, ResNet, build_resnet  # noqa: E402
from .vovnet import VOVNET_SPECS, VoVNet, VoVNetSpec, convert_timm_vovnet, convert_vovnet_detectron2  # noqa: E402
from .summary import summarize_backbone  # noqa: E402
from .inference import OptimizedPredictor, is_optimized_for_inference, optimize_for_inference  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .weights import Checkpointer, WeightsMismatchError  # noqa: E402

# Importing `build` is what registers the backbones (keep this import here, and only here).
from . import build as _build  # noqa: E402
from .build import REGISTERED_NAMES  # noqa: E402

install_config_hints()
_build.install_registry_hints()

__all__ = [
    "__version__",
    "add_config",
    "get_cfg",
    "ConfigError",
    "REGISTERED_NAMES",
    "RESNET_DEPTHS",
    "ResNet",
    "build_resnet",
    "VOVNET_SPECS",
    "VoVNetSpec",
    "VoVNet",
    "convert_timm_vovnet",
    "convert_vovnet_detectron2",
    "GHOSTNET_V1",
    "GhostNet",
    "convert_ghostnet_state_dict",
    "build_fpn",
    "summarize_backbone",
    "optimize_for_inference",
    "is_optimized_for_inference",
    "OptimizedPredictor",
    "Predictor",
    "Checkpointer",
    "WeightsMismatchError",
]
