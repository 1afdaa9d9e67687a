"""The families: one record each (:data:`FAMILIES`) and the interface every family class implements.

Every tool of the package reads this table instead of naming the families itself: the config
(:func:`d2_backbones.add_config` adds each family's keys), the registered builders
(``build_d2b_<name>_backbone`` / ``build_d2b_<name>_fpn_backbone``), the model table and the
benchmarks (``variants``), the weights layer (``weight_formats``, and which family a
``MODEL.BACKBONE.NAME`` builds), export, the summary and the inference folding (through the
interface).

Adding a fourth family (see ``docs/adding_a_family.md``): write ``<name>.py`` with a class that
implements :class:`FamilyBackbone` and takes plain keyword arguments, a function adding its
config keys, and one :class:`Family` record passed to :func:`d2_backbones.register_family`
(for a family of the package itself: appended to :data:`FAMILIES` below). Nothing else changes.

Example::

    >>> from d2_backbones import FAMILIES
    >>> [(f.name, f.config_node, f.builder_names[1]) for f in FAMILIES.values()]
    [('resnet', 'MODEL.RESNETS', 'build_d2b_resnet_fpn_backbone'), ('vovnet', 'MODEL.VOVNET', 'build_d2b_vovnet_fpn_backbone'), ('ghostnet', 'MODEL.GHOSTNET', 'build_d2b_ghostnet_fpn_backbone')]
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import nn

from detectron2.layers import ShapeSpec

from .ghostnet import GHOSTNET_FEATURES, GhostNet
from .resnet import RESNET_FEATURES, build_resnet
from .vovnet import VOVNET_FEATURES, VOVNET_SPECS, VoVNet

__all__ = ["FamilyBackbone", "Family", "FAMILIES", "family_of_builder"]


@runtime_checkable
class FamilyBackbone(Protocol):
    """What a family's backbone class offers the rest of the package (besides detectron2's ``Backbone``).

    Attributes and methods, with the same names in every family:

    * ``output_shape() -> {feature: ShapeSpec}`` (detectron2's ``Backbone``): exact channels and
      strides; ``forward`` returns exactly these features, each ``ceil(H / stride)`` high.
    * ``feature_names``: every feature the class can produce (``"stem"`` first).
    * ``stage_names``: the built stages after the stem, in network order (stages after the last
      requested feature are not built).
    * ``named_stages() -> [(name, [modules])]``: ``"stem"`` then each built stage: the units
      ``freeze_at`` counts (1 = stem, 2 = stem + first stage, ...).
    * ``freeze(freeze_at) -> self``: ``requires_grad=False`` for those units and *only their*
      BatchNorms become ``FrozenBatchNorm2d``; ``freeze_at`` (attribute) records the value built with.
    * ``norm_eval``: BatchNorm statistics stay fixed in train mode (re-applied on every ``.train()``).
    * ``with_cp``: gradient checkpointing inside the blocks (same outputs, gradients, BN statistics).
    * ``conv_norm_pairs``: ``(conv child, norm child)`` names that ``forward`` applies in sequence
      outside a detectron2 ``Conv2d(norm=...)`` / ``nn.Sequential`` (what
      :func:`~d2_backbones.optimize_for_inference` needs to fold them); any submodule may declare its own.
    * ``describe() -> str``: the variant, for the build summary.
    """

    feature_names: Sequence[str]
    stage_names: Sequence[str]
    conv_norm_pairs: Sequence[Tuple[str, str]]
    norm_eval: bool
    with_cp: bool
    freeze_at: int

    def output_shape(self) -> Dict[str, ShapeSpec]: ...

    def named_stages(self) -> List[Tuple[str, List[nn.Module]]]: ...

    def freeze(self, freeze_at: int) -> "FamilyBackbone": ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Family:
    """One family of backbones.

    Args:
        name: short lowercase name; the builders are ``build_d2b_<name>_backbone`` and
            ``build_d2b_<name>_fpn_backbone``.
        build: the constructor, plain keyword arguments (a class or a factory function).
        config_node: the config node of its keys, e.g. ``"MODEL.VOVNET"``.
        add_config_keys: ``fn(cfg_template)`` that adds the family's keys with their defaults
            (only keys missing from a config are ever added).
        arg_keys: constructor argument -> config key; the builders read exactly these keys, and
            constructor errors name these keys (:func:`d2_backbones.errors.argument_keys`).
        feature_names: every feature the family can produce (``"stem"`` first).
        variants: name -> config overrides of the variants the model table and benchmarks use.
        config_dir: folder of its yaml files under ``configs/``.
        aliases: other packages' builder names that resolve to ours while those packages are not
            imported (vovnet-detectron2's ``build_vovnet_fpn_backbone``).
        freeze_alias_key: an mmdet-style ``frozen_stages`` alias of ``MODEL.BACKBONE.FREEZE_AT``.
    """

    name: str
    build: Callable[..., nn.Module]
    config_node: str
    add_config_keys: Callable[[Any], None]
    arg_keys: Mapping[str, str]
    feature_names: Tuple[str, ...]
    variants: Mapping[str, Sequence] = field(default_factory=dict)
    config_dir: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)
    freeze_alias_key: str = ""

    @property
    def builder_names(self) -> Tuple[str, str]:
        """``(backbone builder, backbone + FPN builder)`` registered in detectron2's ``BACKBONE_REGISTRY``."""
        return f"build_d2b_{self.name}_backbone", f"build_d2b_{self.name}_fpn_backbone"

    @property
    def stage_names(self) -> Tuple[str, ...]:
        """The features after the stem (the FPN's usual inputs)."""
        return tuple(f for f in self.feature_names if f != "stem")

    @property
    def out_features_key(self) -> str:
        return self.arg_keys["out_features"]

    @property
    def weight_formats(self) -> Tuple[str, ...]:
        """Names of the weight formats :mod:`d2_backbones.weights` converts into this family."""
        from .weights.formats import FORMATS

        return tuple(f.name for f in FORMATS.values() if f.family == self.name)


def family_of_builder(name: str) -> Optional[Family]:
    """The family a ``MODEL.BACKBONE.NAME`` builds (our builders and their aliases); None for others."""
    for fam in FAMILIES.values():
        if name in fam.builder_names or fam.aliases.get(name) in fam.builder_names:
            return fam
    return None


# ---------------------------------------------------------------------------------------------
# the package's families; their config keys live in config.py (one section each)
# ---------------------------------------------------------------------------------------------
def _config_section(name: str) -> Callable[[Any], None]:
    def add(cfg) -> None:
        from . import config

        getattr(config, f"_{name}_keys")(cfg)

    add.__name__ = f"add_{name}_keys"
    return add


_BACKBONE = {"freeze_at": "MODEL.BACKBONE.FREEZE_AT"}

_RESNET_VARIANTS: Dict[str, List] = {}
for _d in (18, 34, 50, 101, 152):
    _RESNET_VARIANTS[f"R-{_d}"] = ["MODEL.RESNETS.DEPTH", _d, "MODEL.RESNETS.RES2_OUT_CHANNELS",
                                   64 if _d < 50 else 256, "MODEL.RESNETS.STRIDE_IN_1X1", False]
_RESNET_VARIANTS["X-101-32x8d"] = ["MODEL.RESNETS.DEPTH", 101, "MODEL.RESNETS.NUM_GROUPS", 32,
                                   "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.STRIDE_IN_1X1", False]

FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family(
        name="resnet", build=build_resnet, config_node="MODEL.RESNETS", add_config_keys=_config_section("resnet"),
        arg_keys={
            "depth": "MODEL.RESNETS.DEPTH", "stem_channels": "MODEL.RESNETS.STEM_OUT_CHANNELS",
            "res2_channels": "MODEL.RESNETS.RES2_OUT_CHANNELS", "deep_stem": "MODEL.RESNETS.DEEP_STEM",
            "avg_down": "MODEL.RESNETS.AVG_DOWN", "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
            "num_groups": "MODEL.RESNETS.NUM_GROUPS", "width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
            "strides": "MODEL.RESNETS.STAGE_STRIDES", "dilations": "MODEL.RESNETS.STAGE_DILATIONS",
            "norm": "MODEL.RESNETS.NORM", "out_features": "MODEL.RESNETS.OUT_FEATURES", **_BACKBONE,
            "norm_eval": "MODEL.RESNETS.NORM_EVAL", "with_cp": "MODEL.RESNETS.WITH_CP",
            "zero_init_residual": "MODEL.RESNETS.ZERO_INIT_RESIDUAL",
            "deform_on_per_stage": "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            "deform_modulated": "MODEL.RESNETS.DEFORM_MODULATED",
            "deform_num_groups": "MODEL.RESNETS.DEFORM_NUM_GROUPS", "plugins": "MODEL.RESNETS.PLUGINS"},
        feature_names=RESNET_FEATURES, variants=_RESNET_VARIANTS, config_dir="ResNet",
        freeze_alias_key="MODEL.RESNETS.FROZEN_STAGES"),
    Family(
        name="vovnet", build=VoVNet, config_node="MODEL.VOVNET", add_config_keys=_config_section("vovnet"),
        arg_keys={
            "spec": "MODEL.VOVNET.CONV_BODY", "norm": "MODEL.VOVNET.NORM", "out_features": "MODEL.VOVNET.OUT_FEATURES",
            **_BACKBONE, "norm_eval": "MODEL.VOVNET.NORM_EVAL", "with_cp": "MODEL.VOVNET.WITH_CP",
            "ese_placement": "MODEL.VOVNET.ESE_PLACEMENT", "stage_with_dcn": "MODEL.VOVNET.STAGE_WITH_DCN",
            "with_modulated_dcn": "MODEL.VOVNET.WITH_MODULATED_DCN",
            "deformable_groups": "MODEL.VOVNET.DEFORMABLE_GROUPS"},
        feature_names=VOVNET_FEATURES, config_dir="VoVNet",
        variants={v: ["MODEL.VOVNET.CONV_BODY", v] for v in VOVNET_SPECS if v.startswith("V-")},
        aliases={"build_vovnet_backbone": "build_d2b_vovnet_backbone",
                 "build_vovnet_fpn_backbone": "build_d2b_vovnet_fpn_backbone"}),
    Family(
        name="ghostnet", build=GhostNet, config_node="MODEL.GHOSTNET", add_config_keys=_config_section("ghostnet"),
        arg_keys={
            "width": "MODEL.GHOSTNET.WIDTH", "norm": "MODEL.GHOSTNET.NORM",
            "out_features": "MODEL.GHOSTNET.OUT_FEATURES", **_BACKBONE, "norm_eval": "MODEL.GHOSTNET.NORM_EVAL",
            "with_cp": "MODEL.GHOSTNET.WITH_CP", "final_conv": "MODEL.GHOSTNET.FINAL_CONV"},
        feature_names=GHOSTNET_FEATURES, config_dir="GhostNet",
        variants={f"GhostNet-{w}": ["MODEL.GHOSTNET.WIDTH", w] for w in (0.5, 1.0, 1.3)}),
)}
