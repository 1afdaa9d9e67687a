"""d2_backbones: ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2.

Use in an existing detectron2 project::

    import d2_backbones                      # registers the backbones in BACKBONE_REGISTRY
    cfg = d2_backbones.get_cfg()             # detectron2's defaults + ours (or add_config(your_cfg))

What importing the package changes in detectron2, exactly:

1. ``BACKBONE_REGISTRY`` gains two builders per family of :data:`FAMILIES`
   (:data:`REGISTERED_NAMES`, all ``build_d2b_*``); none collides with detectron2's,
   vovnet-detectron2's or centermask2's names.
2. ``BACKBONE_REGISTRY.get`` is wrapped: a name that is not registered resolves through
   :data:`~d2_backbones.build.REGISTRY_ALIASES` (vovnet-detectron2's ``build_vovnet_backbone`` /
   ``build_vovnet_fpn_backbone`` -> ours, only while vovnet-detectron2 itself is not imported), and
   otherwise fails with a message listing our names, nearest first. Registered names resolve as before.
3. ``CfgNode.merge_from_other_cfg`` and ``CfgNode.merge_from_list`` (so also ``merge_from_file``) are
   wrapped: an int given for a float key is taken as that float (``MODEL.GHOSTNET.WIDTH 1``; yacs
   refuses it), and an unknown key of this package says to call :func:`add_config` (a near-miss key
   suggests the closest existing one). Merges that succeed otherwise behave as before.
4. ``CfgNode.load_yaml_with_base`` (what ``merge_from_file`` and every ``_BASE_`` read through) is
   wrapped: yaml is read with ``yaml.safe_load`` and a Python tag (``!!python/object/apply:...``, which
   runs code when read) is refused naming the file, the line and the tag, unless inside
   :func:`allow_unsafe_yaml` (the files installed with detectron2 itself load as before).
5. fvcore's ``JitModelAnalysis._analyze`` (under detectron2's ``FlopCountAnalysis``, ``flop_count_operators``
   and ``activation_count_operators``) is wrapped: a model with "/" in its module names (VoVNet's
   ``stem_1/conv``) is traced with those names escaped and reported under the real ones, where it stopped
   with a ``KeyError`` (:mod:`d2_backbones.analyze`). Other models are analysed as before.

Nothing else: detectron2's global default config is never modified (:func:`add_config` mutates only
the cfg it is given).
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

from .errors import ConfigError  # noqa: E402
from .families import FAMILIES, Family, FamilyBackbone, register_family  # noqa: E402
# The family homes: importing each one registers its family (FAMILIES, in this order).
from .fpn import build_fpn  # noqa: E402
from .resnet import RESNET_DEPTHS, ResNet, build_resnet  # noqa: E402
from .vovnet import VOVNET_SPECS, VoVNet, VoVNetSpec, convert_timm_vovnet, convert_vovnet_detectron2  # noqa: E402
from .ghostnet import GHOSTNET_V1, GhostNet, convert_ghostnet_state_dict  # noqa: E402
from .timm import TimmBackbone  # noqa: E402  (timm itself is optional: see d2_backbones/timm.py)
from .config import add_config, get_cfg, install_config_hints  # noqa: E402
from .summary import summarize_backbone  # noqa: E402
from .inference import is_optimized_for_inference, optimize_for_inference  # noqa: E402
from .predictor import OptimizedPredictor, Predictor, make_predictor  # noqa: E402
from .model_zoo import get_config_file  # noqa: E402  (the configs shipped with the package)
from .weights import Checkpointer, WeightsMismatchError  # noqa: E402
from .yaml_safety import UnsafeYamlError, allow_unsafe_yaml  # noqa: E402
from .analyze import install_scope_names as _install_scope_names  # noqa: E402

# Importing `build` is what registers the backbones (keep this import here, and only here).
from . import build as _build  # noqa: E402
from .build import REGISTERED_NAMES, check_head_features, kwargs_from_cfg  # noqa: E402

install_config_hints()
_build.install_registry_hints()
_install_scope_names()

__all__ = [
    "__version__",
    "add_config",
    "get_cfg",
    "get_config_file",
    "ConfigError",
    "REGISTERED_NAMES",
    "FAMILIES",
    "Family",
    "FamilyBackbone",
    "register_family",
    "kwargs_from_cfg",
    "check_head_features",
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
    "TimmBackbone",
    "build_fpn",
    "summarize_backbone",
    "optimize_for_inference",
    "is_optimized_for_inference",
    "OptimizedPredictor",
    "Predictor",
    "make_predictor",
    "Checkpointer",
    "WeightsMismatchError",
    "allow_unsafe_yaml",
    "UnsafeYamlError",
]
