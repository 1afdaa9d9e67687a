"""The families: the interface every family class implements, the :class:`Family` record and the registry.

This module knows no family by name. Each family lives in one module of its own (its *home*:
``resnet.py``, ``vovnet.py``, ``ghostnet.py``, ``timm.py``) holding the model, its spec table, its config
section, its weight formats and key maps, its extra builder arguments, its contract variants and one
:class:`Family` record that the module passes to :func:`register_family` when it is imported. Every tool
of the package reads :data:`FAMILIES` instead of naming the families itself: the config
(:func:`d2_backbones.add_config` adds each family's keys), the registered builders
(``build_d2b_<name>_backbone`` / ``build_d2b_<name>_fpn_backbone``), the model table and the
benchmarks (``variants``), the weights layer (``weight_formats``, which family a
``MODEL.BACKBONE.NAME`` builds), the contract tests (``contract_variants``), export, the summary and
the inference folding (through the interface).

Adding a family (``docs/adding_a_family.md``): one module with a class implementing
:class:`FamilyBackbone` (plain keyword arguments, never a cfg), a function adding its config keys and a
:class:`Family` record passed to :func:`register_family`; plus its yaml/Python configs. Nothing else.

Imports point one way: ``errors``/``layers``/``fpn`` <- ``families`` (this registry) and
``weights`` (generic) <- the family homes <- ``config``/``build`` <- trainers, predictors, tools.

Example::

    >>> from d2_backbones import FAMILIES
    >>> [(f.name, f.config_node, f.builder_names[1]) for f in FAMILIES.values()][:3]
    [('resnet', 'MODEL.RESNETS', 'build_d2b_resnet_fpn_backbone'), ('vovnet', 'MODEL.VOVNET', 'build_d2b_vovnet_fpn_backbone'), ('ghostnet', 'MODEL.GHOSTNET', 'build_d2b_ghostnet_fpn_backbone')]
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import nn

from detectron2.layers import ShapeSpec

__all__ = ["FamilyBackbone", "Family", "FAMILIES", "family_of_builder", "register_family", "on_register",
           "BACKBONE_KEYS"]

# The keys every family shares (detectron2's own), for a record's ``arg_keys``.
BACKBONE_KEYS = {"freeze_at": "MODEL.BACKBONE.FREEZE_AT"}


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
        extra_kwargs: ``fn(cfg, kwargs) -> kwargs`` for arguments that need more than one key (ResNet's
            ``RES5_DILATION`` on top of ``STAGE_STRIDES``/``STAGE_DILATIONS``).
        weight_formats: the :class:`~d2_backbones.weights.formats.WeightFormat` rows that convert other
            projects' files into this family, in detection order.
        describe_weights: ``fn(bare_state) -> (text, {config key: value}) | None``: what a state dict in
            this family's names holds ("a ResNet R-50 backbone", ``{"MODEL.RESNETS.DEPTH": 50}``).
        effective_config: config key -> ``fn(cfg, value)`` for keys whose value can mean something else
            than it says (VoVNet's ``ESE_PLACEMENT: ""``); the weights' metadata is compared with that.
        optional_weights: ``(kind, regex)`` of model tensors that weights of the plain network lack by design
            (deformable-conv offsets, plugins): kept at their initialisation when a file has none of a kind.
        also_built_by: other packages' builder names that read this family's config node
            (detectron2's ``build_resnet_backbone`` reads ``MODEL.RESNETS``).
        contract_variants: variant id -> constructor kwargs that ``tests/test_contract.py`` runs the family
            contract on; ids in ``heavy_variants`` run in the slow tier.
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
    extra_kwargs: Optional[Callable[[Any, Dict], Dict]] = None
    weight_formats: Tuple[Any, ...] = ()
    describe_weights: Optional[Callable[[Mapping], Optional[Tuple[str, Dict]]]] = None
    effective_config: Mapping[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    optional_weights: Tuple[Tuple[str, Any], ...] = ()
    also_built_by: Tuple[str, ...] = ()
    contract_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    heavy_variants: Tuple[str, ...] = ()

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
    def weight_format_names(self) -> Tuple[str, ...]:
        """Names of the weight formats :mod:`d2_backbones.weights` converts into this family."""
        return tuple(f.name for f in self.weight_formats)


FAMILIES: Dict[str, Family] = {}
_LISTENERS: List[Callable[[Family], None]] = []


def on_register(fn: Callable[[Family], None]) -> Callable[[Family], None]:
    """Call ``fn(family)`` for every family registered so far and every later one (how :mod:`d2_backbones.build`
    registers the builders and :mod:`d2_backbones.config` learns the keys, without this module importing them)."""
    _LISTENERS.append(fn)
    for fam in list(FAMILIES.values()):
        fn(fam)
    return fn


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES` and register its two builders in detectron2's ``BACKBONE_REGISTRY``.

    Its config keys are added by every later :func:`d2_backbones.add_config` / :func:`d2_backbones.get_cfg`.
    Registering a family of the same name again replaces it.
    """
    FAMILIES[family.name] = family
    for fn in _LISTENERS:
        fn(family)
    return family


def family_of_builder(name: str) -> Optional[Family]:
    """The family a ``MODEL.BACKBONE.NAME`` builds (our builders and their aliases); None for others."""
    for fam in FAMILIES.values():
        if name in fam.builder_names or fam.aliases.get(name) in fam.builder_names:
            return fam
    return None


def family_reading(name: str) -> Optional[Family]:
    """The family whose config node a ``MODEL.BACKBONE.NAME`` reads: :func:`family_of_builder`, or a family
    whose ``also_built_by`` lists the name (detectron2's ResNet builders read ``MODEL.RESNETS``)."""
    fam = family_of_builder(name)
    if fam is None:
        fam = next((f for f in FAMILIES.values() if name in f.also_built_by), None)
    return fam
