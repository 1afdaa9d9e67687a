"""The registered backbone builders: the only place that turns a cfg into constructor arguments.

Every family of :data:`~d2_backbones.families.FAMILIES` gets two registered builders,
``build_d2b_<name>_backbone`` and ``build_d2b_<name>_fpn_backbone`` (the FPN one reads
``MODEL.FPN.*``, including the top block, so one builder serves R-CNN and RetinaNet/FCOS).
Both read exactly the family's ``arg_keys`` (:func:`kwargs_from_cfg`, testable without
building anything), build inside :func:`~d2_backbones.errors.argument_keys` so that an invalid
value is reported under its config key, and log a one-line summary of what was built.

A backbone builder checks only the backbone's own keys, so ``build_backbone(cfg)`` works from
:func:`d2_backbones.get_cfg` defaults for every family (feature extraction, your own heads).
The heads' ``IN_FEATURES`` are checked where heads are built (:func:`check_head_features`,
called by train_net's setup and the predictors).

Example::

    >>> import d2_backbones
    >>> from detectron2.modeling import build_backbone
    >>> cfg = d2_backbones.get_cfg()
    >>> cfg.MODEL.BACKBONE.NAME = "build_d2b_ghostnet_fpn_backbone"
    >>> sorted(build_backbone(cfg).output_shape())
    ['p2', 'p3', 'p4', 'p5', 'p6']
"""
import difflib
import logging
from typing import Callable, Dict, List, Mapping, Optional, Union

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.utils import comm

from .config import cfg_get
from .errors import RegistryKeyError, argument_keys, config_error, format_values, nearest_first
from .families import FAMILIES, Family, family_of_builder, on_register, register_family
from .fpn import build_fpn, describe_features
from .summary import summarize_backbone

__all__ = [
    "REGISTERED_NAMES",
    "REGISTRY_ALIASES",
    "FPN_KEYS",
    "kwargs_from_cfg",
    "fpn_kwargs_from_cfg",
    "resolve_freeze_at",
    "check_norm",
    "check_head_features",
    "build_model",
    "register_family",
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
        if getattr(existing, "_d2b_family", None) != getattr(fn, "_d2b_family", object()):
            raise RuntimeError(f"d2_backbones cannot register {name!r}: {existing.__module__} already did")
        BACKBONE_REGISTRY._obj_map[name] = fn  # the same family registered again (e.g. a re-import)
    else:
        BACKBONE_REGISTRY.register(fn)
    if name not in REGISTERED_NAMES:
        REGISTERED_NAMES.append(name)
    return fn


# ---------------------------------------------------------------------------------------------
# reading the cfg
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


def kwargs_from_cfg(family: Union[str, Family], cfg: CfgNode, input_shape: Optional[ShapeSpec] = None) -> Dict:
    """The constructor keyword arguments of ``family`` from ``cfg`` (its ``arg_keys``; no building).

    Lists stay lists, ``norm`` is checked for SyncBN on CPU, ``freeze_at`` honours the family's
    mmdet-style alias, ``in_channels`` comes from ``input_shape`` (default: ``len(MODEL.PIXEL_MEAN)``).
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    kw = {}
    for arg, key in fam.arg_keys.items():
        value = cfg_get(cfg, key)
        kw[arg] = list(value) if isinstance(value, tuple) else value
    if "norm" in fam.arg_keys:
        kw["norm"] = check_norm(cfg, fam.arg_keys["norm"])
    if "freeze_at" in fam.arg_keys:
        kw["freeze_at"] = resolve_freeze_at(cfg, fam.freeze_alias_key)
    kw["in_channels"] = (input_shape.channels if input_shape is not None and input_shape.channels
                         else len(cfg.MODEL.PIXEL_MEAN))
    return fam.extra_kwargs(cfg, kw) if fam.extra_kwargs else kw


FPN_KEYS = {
    "in_features": "MODEL.FPN.IN_FEATURES",
    "out_channels": "MODEL.FPN.OUT_CHANNELS",
    "norm": "MODEL.FPN.NORM",
    "fuse_type": "MODEL.FPN.FUSE_TYPE",
    "top_block": "MODEL.FPN.TOP_BLOCK",
    "top_block_source": "MODEL.FPN.TOP_BLOCK_SOURCE",
    "top_block_relu": "MODEL.FPN.TOP_BLOCK_RELU",
    "top_block_levels": "MODEL.FPN.TOP_BLOCK_LEVELS",
}


def fpn_kwargs_from_cfg(cfg: CfgNode) -> Dict:
    """``build_fpn`` keyword arguments from ``MODEL.FPN``."""
    kw = {name: cfg_get(cfg, key) for name, key in FPN_KEYS.items()}
    kw["in_features"] = list(kw["in_features"])
    check_norm(cfg, "MODEL.FPN.NORM")
    return kw


# ---------------------------------------------------------------------------------------------
# the builders
# ---------------------------------------------------------------------------------------------
def _build(fam: Family, cfg: CfgNode, input_shape: Optional[ShapeSpec], fpn: bool) -> Backbone:
    kw = kwargs_from_cfg(fam, cfg, input_shape)
    with argument_keys(fam.arg_keys):
        model = fam.build(**kw)
    title = model.describe()
    if fpn:
        fkw = fpn_kwargs_from_cfg(cfg)
        if not fkw["in_features"]:  # detectron2's default []: every feature the backbone returns, stem excluded
            fkw["in_features"] = [f for f in model.output_shape() if f != "stem"]
            logger.info(f"MODEL.FPN.IN_FEATURES is empty: using the backbone's outputs {fkw['in_features']}.")
        with argument_keys({**FPN_KEYS, "backbone_out_features": fam.out_features_key}):
            model = build_fpn(model, **fkw)
        title += "-FPN"
    logger.info("Built backbone: " + summarize_backbone(model, title))
    return model


def _make_builder(fam: Family, fpn: bool) -> Callable:
    def builder(cfg: CfgNode, input_shape: Optional[ShapeSpec] = None) -> Backbone:
        return _build(fam, cfg, input_shape, fpn)

    builder.__name__ = builder.__qualname__ = fam.builder_names[1 if fpn else 0]
    builder.__doc__ = (f"{fam.name} backbone{' + detectron2 FPN (MODEL.FPN.*)' if fpn else ''}, configured by "
                       f"{fam.config_node}.* (registered by d2_backbones).")
    builder._d2b_family = (fam.name, fpn)
    return builder


@on_register
def _register_builders(family: Family) -> None:
    """Register the two builders of ``family`` (every family of FAMILIES, and each one registered later)."""
    for fpn in (False, True):
        _register(_make_builder(family, fpn))
    REGISTRY_ALIASES.update(family.aliases)


# ---------------------------------------------------------------------------------------------
# head features: checked where heads are built
# ---------------------------------------------------------------------------------------------
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


def check_head_features(cfg: CfgNode, shapes: Optional[Mapping[str, ShapeSpec]] = None) -> None:
    """Fail when a head's ``IN_FEATURES`` asks for a feature the backbone does not produce.

    ``shapes`` is the backbone's ``output_shape()`` (built from ``cfg`` when not given). The
    message lists what the backbone produces and names the keys that change it: the family's
    own ``OUT_FEATURES`` key and its stage names, and the FPN keys.
    """
    keys = _head_keys(cfg)
    if not keys:
        return
    if shapes is None:
        from detectron2.modeling import build_backbone

        shapes = build_backbone(cfg).output_shape()
    fam = family_of_builder(cfg.MODEL.BACKBONE.NAME)
    fpn = REGISTRY_ALIASES.get(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.NAME).endswith("fpn_backbone")
    if fam is None:
        change = "the backbone's output features"
    elif fpn:
        change = (f"MODEL.FPN.IN_FEATURES (from the stages of {fam.out_features_key}: "
                  f"{', '.join(fam.feature_names)}) or MODEL.FPN.TOP_BLOCK")
    else:
        change = f"{fam.out_features_key} (valid: {', '.join(fam.feature_names)})"
    for key in keys:
        wanted = list(cfg_get(cfg, key))
        missing = [f for f in wanted if f not in shapes]
        if missing:
            raise config_error(
                key, wanted, problem=f"contains {missing[0]!r}, which the backbone ({cfg.MODEL.BACKBONE.NAME}) "
                f"does not produce",
                fix=f"use features it produces: {describe_features(shapes)}; or change {change} so it produces them")


def build_model(cfg: CfgNode):
    """detectron2's ``build_model``; when a head asks for a feature the backbone does not produce, the
    error is :func:`check_head_features`' (key, value, what the backbone produces, what to change)
    instead of detectron2's bare ``KeyError``."""
    from detectron2.modeling import build_model as _d2_build_model

    try:
        model = _d2_build_model(cfg)
    except KeyError:
        check_head_features(cfg)
        raise
    check_head_features(cfg, model.backbone.output_shape())  # the semantic head drops unknown features silently
    return model


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
