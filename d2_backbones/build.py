"""The registered backbone builders: the only place that reads a cfg or touches the registry.

Each family has a pure ``<family>_kwargs_from_cfg(cfg, input_shape) -> dict`` (testable
without building anything) and two thin registered builders,
``build_d2b_<family>_backbone`` and ``build_d2b_<family>_fpn_backbone``. The FPN variant
reads ``MODEL.FPN.*`` (including the top block), so one builder serves R-CNN (max-pool P6)
and RetinaNet/FCOS (P6/P7). Every builder validates the config first and logs a one-line
summary of what it built.

Adding a family: write ``<family>.py`` (modules with plain kwargs), add its keys in
``config.py``, then here a ``<family>_kwargs_from_cfg`` and two registered builders.
"""
import difflib
import logging
from typing import Callable, Dict, List, Mapping

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.utils import comm

from .config import cfg_get
from .errors import RegistryKeyError, config_error, format_values, nearest_first
from .fpn import build_fpn, describe_features
from .ghostnet import GhostNet
from .resnet import build_resnet
from .summary import summarize_backbone
from .vovnet import VoVNet

__all__ = [
    "REGISTERED_NAMES",
    "REGISTRY_ALIASES",
    "resnet_kwargs_from_cfg",
    "fpn_kwargs_from_cfg",
    "resolve_freeze_at",
    "check_head_features",
    "build_d2b_resnet_backbone",
    "build_d2b_resnet_fpn_backbone",
    "vovnet_kwargs_from_cfg",
    "build_d2b_vovnet_backbone",
    "build_d2b_vovnet_fpn_backbone",
    "ghostnet_kwargs_from_cfg",
    "build_d2b_ghostnet_backbone",
    "build_d2b_ghostnet_fpn_backbone",
    "install_registry_hints",
]

logger = logging.getLogger("d2_backbones")

REGISTERED_NAMES: List[str] = []
# Names other packages register for the same models; when such a name is *not* registered
# (that package is not imported), ``BACKBONE_REGISTRY.get`` resolves it to ours.
REGISTRY_ALIASES: Dict[str, str] = {}


def _register(fn: Callable) -> Callable:
    """Register ``fn`` in BACKBONE_REGISTRY under its name; re-registering our own function is a no-op."""
    name = fn.__name__
    if name in BACKBONE_REGISTRY:
        existing = BACKBONE_REGISTRY.get(name)
        if (existing.__module__, existing.__qualname__) != (fn.__module__, fn.__qualname__):
            raise RuntimeError(f"d2_backbones cannot register {name!r}: {existing.__module__} already did")
    else:
        BACKBONE_REGISTRY.register(fn)
    if name not in REGISTERED_NAMES:
        REGISTERED_NAMES.append(name)
    return fn


# ---------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------
_SYNC_BN = ("SyncBN", "nnSyncBN")


def check_norm(cfg: CfgNode, key: str):
    """Return the norm at ``key``; refuse torch SyncBN for multi-process CPU training (it needs GPUs)."""
    norm = cfg_get(cfg, key)
    if isinstance(norm, str) and norm in _SYNC_BN:
        world = comm.get_world_size()
        if world > 1 and str(cfg.MODEL.DEVICE).startswith("cpu"):
            raise config_error(
                key, norm, problem=f"needs CUDA devices for its all-reduce, but MODEL.DEVICE={cfg.MODEL.DEVICE!r} "
                f"with {world} processes",
                fix=f"set {key} to 'naiveSyncBN' (synchronises over gloo on CPU), 'BN', 'FrozenBN' or 'GN'")
        if world == 1:
            logger.info(f"{key}={norm!r} in a single process: it computes exactly what 'BN' computes.")
    return norm


def resolve_freeze_at(cfg: CfgNode, alias_key: str = "") -> int:
    """``MODEL.BACKBONE.FREEZE_AT``, or ``alias + 1`` for an mmdet-style ``frozen_stages`` alias.

    FREEZE_AT still at detectron2's default (2) counts as unset when the alias is given;
    any other disagreement is an error.
    """
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    alias = cfg_get(cfg, alias_key) if alias_key else None
    if alias is None:
        return freeze_at
    if not isinstance(alias, int) or alias < -1:
        raise config_error(alias_key, alias, problem="must be None or an int >= -1",
                           fix="use -1 (nothing), 0 (stem), k (stem + first k stages), or None to use "
                               "MODEL.BACKBONE.FREEZE_AT")
    if freeze_at not in (2, alias + 1):
        raise config_error(
            alias_key, alias,
            problem=(f"(mmdet-style, equivalent to MODEL.BACKBONE.FREEZE_AT={alias + 1}) disagrees with "
                     f"MODEL.BACKBONE.FREEZE_AT={freeze_at}"),
            fix=f"set only one of them: MODEL.BACKBONE.FREEZE_AT={freeze_at} with {alias_key}=None, "
                f"or {alias_key}={freeze_at - 1} (FROZEN_STAGES k == FREEZE_AT k+1)")
    return alias + 1


def _head_keys(cfg: CfgNode) -> List[str]:
    arch = cfg.MODEL.META_ARCHITECTURE
    keys = []
    if arch in ("GeneralizedRCNN", "ProposalNetwork", "PanopticFPN"):
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN":
            keys.append("MODEL.RPN.IN_FEATURES")
        if arch != "ProposalNetwork":
            keys.append("MODEL.ROI_HEADS.IN_FEATURES")
    if arch in ("PanopticFPN", "SemanticSegmentor"):
        keys.append("MODEL.SEM_SEG_HEAD.IN_FEATURES")
    if arch == "RetinaNet":
        keys.append("MODEL.RETINANET.IN_FEATURES")
    return keys


def check_head_features(cfg: CfgNode, shapes: Mapping[str, ShapeSpec]) -> None:
    """Fail at build time if a head's ``IN_FEATURES`` asks for a feature the backbone does not produce."""
    for key in _head_keys(cfg):
        wanted = list(cfg_get(cfg, key))
        missing = [f for f in wanted if f not in shapes]
        if missing:
            raise config_error(
                key, wanted, problem=f"contains {missing[0]!r}, which the backbone ({cfg.MODEL.BACKBONE.NAME}) "
                f"does not produce",
                fix=f"use features it produces: {describe_features(shapes)}; or change the backbone's "
                    f"OUT_FEATURES / MODEL.FPN.IN_FEATURES / MODEL.FPN.TOP_BLOCK so it produces them")


def _finish(cfg: CfgNode, model: Backbone, title: str) -> Backbone:
    check_head_features(cfg, model.output_shape())
    logger.info("Built backbone: " + summarize_backbone(model, title))
    return model


# ---------------------------------------------------------------------------------------------
# FPN (shared by every family)
# ---------------------------------------------------------------------------------------------
FPN_KEYS = {
    "in_features": "MODEL.FPN.IN_FEATURES",
    "out_channels": "MODEL.FPN.OUT_CHANNELS",
    "norm": "MODEL.FPN.NORM",
    "fuse_type": "MODEL.FPN.FUSE_TYPE",
    "top_block": "MODEL.FPN.TOP_BLOCK",
    "top_block_source": "MODEL.FPN.TOP_BLOCK_SOURCE",
    "top_block_relu": "MODEL.FPN.TOP_BLOCK_RELU",
}


def fpn_kwargs_from_cfg(cfg: CfgNode) -> Dict:
    """``build_fpn`` keyword arguments from ``MODEL.FPN``."""
    kw = {name: cfg_get(cfg, key) for name, key in FPN_KEYS.items()}
    kw["in_features"] = list(kw["in_features"])
    check_norm(cfg, "MODEL.FPN.NORM")
    return kw


def attach_fpn(cfg: CfgNode, bottom_up: Backbone, title: str) -> Backbone:
    """Wrap ``bottom_up`` in detectron2's FPN as configured by ``MODEL.FPN`` and validate the heads."""
    fpn = build_fpn(bottom_up, **fpn_kwargs_from_cfg(cfg), keys=FPN_KEYS)
    return _finish(cfg, fpn, title + "-FPN")


# ---------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------
RESNET_KEYS = {
    "depth": "MODEL.RESNETS.DEPTH",
    "stem_channels": "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "res2_channels": "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "deep_stem": "MODEL.RESNETS.DEEP_STEM",
    "avg_down": "MODEL.RESNETS.AVG_DOWN",
    "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    "num_groups": "MODEL.RESNETS.NUM_GROUPS",
    "width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
    "strides": "MODEL.RESNETS.STAGE_STRIDES",
    "dilations": "MODEL.RESNETS.STAGE_DILATIONS",
    "norm": "MODEL.RESNETS.NORM",
    "out_features": "MODEL.RESNETS.OUT_FEATURES",
    "freeze_at": "MODEL.BACKBONE.FREEZE_AT",
    "norm_eval": "MODEL.RESNETS.NORM_EVAL",
    "with_cp": "MODEL.RESNETS.WITH_CP",
    "zero_init_residual": "MODEL.RESNETS.ZERO_INIT_RESIDUAL",
    "deform_on_per_stage": "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
    "deform_modulated": "MODEL.RESNETS.DEFORM_MODULATED",
    "deform_num_groups": "MODEL.RESNETS.DEFORM_NUM_GROUPS",
    "plugins": "MODEL.RESNETS.PLUGINS",
}


def _resnet_strides_dilations(cfg: CfgNode):
    strides = list(cfg_get(cfg, "MODEL.RESNETS.STAGE_STRIDES"))
    dilations = list(cfg_get(cfg, "MODEL.RESNETS.STAGE_DILATIONS"))
    res5 = cfg.MODEL.RESNETS.RES5_DILATION
    if res5 not in (1, 2):
        raise config_error("MODEL.RESNETS.RES5_DILATION", res5, [1, 2],
                           fix="use MODEL.RESNETS.STAGE_DILATIONS / STAGE_STRIDES for other dilations")
    if res5 == 2 and len(dilations) == 4 and len(strides) == 4:
        if dilations[3] == 1:  # detectron2's convention: res5 keeps stride 16 and dilates by 2
            dilations[3], strides[3] = 2, 1
        elif dilations[3] != 2:
            raise config_error("MODEL.RESNETS.RES5_DILATION", res5,
                               problem=f"disagrees with MODEL.RESNETS.STAGE_DILATIONS={dilations}",
                               fix="set only MODEL.RESNETS.STAGE_DILATIONS (and STAGE_STRIDES) and leave "
                                   "RES5_DILATION at 1")
    return strides, dilations


def resnet_kwargs_from_cfg(cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
    """:func:`~d2_backbones.resnet.build_resnet` keyword arguments from ``MODEL.RESNETS`` (no building)."""
    r = cfg.MODEL.RESNETS
    strides, dilations = _resnet_strides_dilations(cfg)
    depth = r.DEPTH
    return dict(
        depth=depth,
        in_channels=input_shape.channels,
        stem_channels=r.STEM_OUT_CHANNELS,
        res2_channels=r.RES2_OUT_CHANNELS,
        deep_stem=cfg_get(cfg, "MODEL.RESNETS.DEEP_STEM"),
        avg_down=cfg_get(cfg, "MODEL.RESNETS.AVG_DOWN"),
        stride_in_1x1=r.STRIDE_IN_1X1,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        strides=strides,
        dilations=dilations,
        norm=check_norm(cfg, "MODEL.RESNETS.NORM"),
        out_features=list(r.OUT_FEATURES),
        freeze_at=resolve_freeze_at(cfg, "MODEL.RESNETS.FROZEN_STAGES"),
        norm_eval=cfg_get(cfg, "MODEL.RESNETS.NORM_EVAL"),
        with_cp=cfg_get(cfg, "MODEL.RESNETS.WITH_CP"),
        zero_init_residual=cfg_get(cfg, "MODEL.RESNETS.ZERO_INIT_RESIDUAL"),
        deform_on_per_stage=list(r.DEFORM_ON_PER_STAGE),
        deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
        plugins=list(cfg_get(cfg, "MODEL.RESNETS.PLUGINS")),
    )


def _resnet_title(kw: Dict) -> str:
    name = f"ResNeXt-{kw['depth']}-{kw['num_groups']}x{kw['width_per_group']}d" if kw["num_groups"] > 1 \
        else f"ResNet-{kw['depth']}"
    variant = "d" if kw["deep_stem"] and kw["avg_down"] else "c" if kw["deep_stem"] else ""
    style = "caffe" if kw["stride_in_1x1"] else "pytorch"
    return f"{name}{'-V1' + variant if variant else ''} (style={style})"


@_register
def build_d2b_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet/ResNeXt with MMDetection's options (``MODEL.RESNETS.*``), no FPN."""
    kw = resnet_kwargs_from_cfg(cfg, input_shape)
    return _finish(cfg, build_resnet(**kw, keys=RESNET_KEYS), _resnet_title(kw))


@_register
def build_d2b_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet + detectron2 FPN; the top block (max-pool P6 or P6/P7) comes from ``MODEL.FPN.TOP_BLOCK``."""
    kw = resnet_kwargs_from_cfg(cfg, input_shape)
    return attach_fpn(cfg, build_resnet(**kw, keys=RESNET_KEYS), _resnet_title(kw))


# ---------------------------------------------------------------------------------------------
# GhostNet
# ---------------------------------------------------------------------------------------------
GHOSTNET_KEYS = {
    "width": "MODEL.GHOSTNET.WIDTH",
    "norm": "MODEL.GHOSTNET.NORM",
    "out_features": "MODEL.GHOSTNET.OUT_FEATURES",
    "freeze_at": "MODEL.BACKBONE.FREEZE_AT",
    "norm_eval": "MODEL.GHOSTNET.NORM_EVAL",
    "with_cp": "MODEL.GHOSTNET.WITH_CP",
    "final_conv": "MODEL.GHOSTNET.FINAL_CONV",
}


def ghostnet_kwargs_from_cfg(cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
    """:class:`~d2_backbones.ghostnet.GhostNet` keyword arguments from ``MODEL.GHOSTNET`` (no building)."""
    kw = {name: cfg_get(cfg, key) for name, key in GHOSTNET_KEYS.items() if name not in ("norm", "freeze_at")}
    for name in ("norm_eval", "with_cp", "final_conv"):
        if not isinstance(kw[name], bool):
            raise config_error(GHOSTNET_KEYS[name], kw[name], [True, False])
    out_features = kw["out_features"]
    if isinstance(out_features, str) or not isinstance(out_features, (list, tuple)):
        raise config_error(GHOSTNET_KEYS["out_features"], out_features,
                           problem="must be a list of feature names",
                           fix='write it as a list, e.g. ["stage2", "stage3", "stage4", "stage5"]')
    kw["out_features"] = list(out_features)
    kw["norm"] = check_norm(cfg, "MODEL.GHOSTNET.NORM")
    kw["freeze_at"] = resolve_freeze_at(cfg)
    kw["in_channels"] = input_shape.channels
    return kw


def _ghostnet_title(kw: Dict) -> str:
    return f"GhostNet-{kw['width']:g}x" + ("" if kw["final_conv"] else " (stage5 before the final conv)")


@_register
def build_d2b_ghostnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """GhostNet V1 of any width (``MODEL.GHOSTNET.*``), no FPN."""
    kw = ghostnet_kwargs_from_cfg(cfg, input_shape)
    return _finish(cfg, GhostNet(**kw, keys=GHOSTNET_KEYS), _ghostnet_title(kw))


@_register
def build_d2b_ghostnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """GhostNet + detectron2 FPN; the top block (max-pool P6 or P6/P7) comes from ``MODEL.FPN.TOP_BLOCK``."""
    kw = ghostnet_kwargs_from_cfg(cfg, input_shape)
    return attach_fpn(cfg, GhostNet(**kw, keys=GHOSTNET_KEYS), _ghostnet_title(kw))


# ---------------------------------------------------------------------------------------------
# VoVNet
# ---------------------------------------------------------------------------------------------
VOVNET_KEYS = {
    "spec": "MODEL.VOVNET.CONV_BODY",
    "norm": "MODEL.VOVNET.NORM",
    "out_features": "MODEL.VOVNET.OUT_FEATURES",
    "freeze_at": "MODEL.BACKBONE.FREEZE_AT",
    "norm_eval": "MODEL.VOVNET.NORM_EVAL",
    "with_cp": "MODEL.VOVNET.WITH_CP",
    "ese_placement": "MODEL.VOVNET.ESE_PLACEMENT",
    "stage_with_dcn": "MODEL.VOVNET.STAGE_WITH_DCN",
    "with_modulated_dcn": "MODEL.VOVNET.WITH_MODULATED_DCN",
    "deformable_groups": "MODEL.VOVNET.DEFORMABLE_GROUPS",
}
# vovnet-detectron2 / centermask2 register these; when they are not imported, their yamls use ours.
REGISTRY_ALIASES.update({
    "build_vovnet_backbone": "build_d2b_vovnet_backbone",
    "build_vovnet_fpn_backbone": "build_d2b_vovnet_fpn_backbone",
})


def vovnet_kwargs_from_cfg(cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
    """:class:`~d2_backbones.vovnet.VoVNet` keyword arguments from ``MODEL.VOVNET`` (no building)."""
    kw = {name: cfg_get(cfg, key) for name, key in VOVNET_KEYS.items() if name not in ("norm", "freeze_at")}
    for name in ("norm_eval", "with_cp", "with_modulated_dcn"):
        if not isinstance(kw[name], bool):
            raise config_error(VOVNET_KEYS[name], kw[name], [True, False])
    for name in ("out_features", "stage_with_dcn"):
        if isinstance(kw[name], str) or not isinstance(kw[name], (list, tuple)):
            raise config_error(VOVNET_KEYS[name], kw[name], problem="must be a list",
                               fix='write it as a list, e.g. ["stage2", "stage3", "stage4", "stage5"]'
                               if name == "out_features" else "write it as a list of 4 bools")
        kw[name] = list(kw[name])
    kw["ese_placement"] = kw["ese_placement"] or None
    kw["norm"] = check_norm(cfg, "MODEL.VOVNET.NORM")
    kw["freeze_at"] = resolve_freeze_at(cfg)
    kw["in_channels"] = input_shape.channels
    return kw


def _vovnet_title(model: VoVNet) -> str:
    dcn = [n for n in model.stage_names if any("/conv_offset" in k for k, _ in getattr(model, n).named_modules())]
    return (f"VoVNet {model.spec_name} (eSE={model.spec.ese}, residual={model.spec.residual}"
            + (f", DCN in {', '.join(dcn)}" if dcn else "") + ")")


@_register
def build_d2b_vovnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """VoVNetV2-eSE / VoVNetV1 (``MODEL.VOVNET.*``, vovnet-detectron2 names), no FPN."""
    model = VoVNet(**vovnet_kwargs_from_cfg(cfg, input_shape), keys=VOVNET_KEYS)
    return _finish(cfg, model, _vovnet_title(model))


@_register
def build_d2b_vovnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """VoVNet + detectron2 FPN; the top block (max-pool P6 or P6/P7) comes from ``MODEL.FPN.TOP_BLOCK``."""
    model = VoVNet(**vovnet_kwargs_from_cfg(cfg, input_shape), keys=VOVNET_KEYS)
    return attach_fpn(cfg, model, _vovnet_title(model))


# ---------------------------------------------------------------------------------------------
# registry miss messages
# ---------------------------------------------------------------------------------------------
def _hinted_get(get):
    if getattr(get, "_d2b_hinted", False):
        return get

    def wrapper(name):
        try:
            return get(name)
        except KeyError:
            target = REGISTRY_ALIASES.get(name)
            if target is not None:
                logger.info(f"MODEL.BACKBONE.NAME={name!r} is not registered by its original package; "
                            f"using d2_backbones' {target}.")
                return get(target)
            ours = nearest_first(name, REGISTERED_NAMES)
            others = [n for n, _ in BACKBONE_REGISTRY if n not in REGISTERED_NAMES]
            close = difflib.get_close_matches(name, others, n=3, cutoff=0.6)
            msg = (f"MODEL.BACKBONE.NAME={name!r} is not a registered backbone. "
                   f"d2_backbones registers (nearest first): {format_values(ours)}.")
            if close:
                msg += f" Other registered names close to it: {format_values(close)}."
            msg += (" Fix: correct MODEL.BACKBONE.NAME, and `import d2_backbones` (or the package that "
                    "defines the backbone) before build_model.")
            raise RegistryKeyError(msg) from None

    wrapper._d2b_hinted = True
    return wrapper


def install_registry_hints() -> None:
    """Make a BACKBONE_REGISTRY miss list our names (nearest first) and resolve REGISTRY_ALIASES.

    Only lookups that would fail change; registered names resolve exactly as before.
    """
    BACKBONE_REGISTRY.get = _hinted_get(BACKBONE_REGISTRY.get)

