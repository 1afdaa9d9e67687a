"""VoVNetV2 (eSE) and VoVNetV1 backbones for detectron2, checkpoint-compatible with vovnet-detectron2.

Papers:

* VoVNetV1 - Lee et al., "An Energy and GPU-Computation Efficient Backbone Network for
  Real-Time Object Detection" (CVPR-W 2019), https://arxiv.org/abs/1904.09730
* VoVNetV2 - Lee & Park, "CenterMask: Real-Time Anchor-Free Instance Segmentation"
  (CVPR 2020), https://arxiv.org/abs/1911.06667 (identity mapping + effective SE)

Reference implementation: ``youngwanLEE/vovnet-detectron2`` (``vovnet/vovnet.py``; centermask2
adds DCN). The architecture and the state-dict names are the reference's, so its ImageNet and
detection checkpoints load unchanged through detectron2's ``DetectionCheckpointer``::

    stem.stem_1/conv.weight                                stem.stem_1/norm.{weight,bias,running_*}
    stem.stem_2/dw_conv3x3.weight  .../pw_conv1x1.weight   .../pw_norm.*         (dw variants)
    stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight            stage2.OSA2_1.layers.0.OSA2_1_0/norm.*
    stage3.OSA3_1.conv_reduction.OSA3_1_reduction_0/conv.weight                  (dw variants)
    stage2.OSA2_1.concat.OSA2_1_concat/{conv,norm}.*       stage2.OSA2_1.ese.fc.{weight,bias}
    stage3.OSA3_1.layers.0.OSA3_1_0/conv_offset.{weight,bias}                    (DCN, centermask2)

Architecture (all sizes in :data:`VOVNET_SPECS`):

* stem: three 3x3 conv+norm+ReLU (stride 2, 1, 2); the dw variants make the last two
  depthwise-separable (3x3 depthwise conv, 1x1 conv, norm, ReLU). Stride 4.
* ``stage2`` .. ``stage5``: ``MaxPool2d(3, 2, ceil_mode=True)`` (no padding) before stages 3-5,
  then ``block_per_stage`` OSA modules.
* OSA module: ``layer_per_block`` sequential 3x3 conv+norm+ReLU layers (depthwise-separable in
  dw variants, after a 1x1 ``conv_reduction`` when the input width differs); the module input
  and every layer output are concatenated, aggregated by a 1x1 conv+norm+ReLU, gated by eSE
  (global mean -> 1x1 conv with bias -> hard-sigmoid -> multiply) and, in every module but the
  first of a stage, added to the module input (no ReLU after the add).

**eSE placement** is a spec field, :attr:`VoVNetSpec.ese`:

* ``"all"`` - eSE in every OSA module: vovnet-detectron2 / CenterMask (their ``SE`` flag is
  computed but never used). Default for the ``V-*-eSE`` specs; V-39-eSE has 25,184,128
  parameters with BN.
* ``"last"`` - eSE only in the last module of each stage: timm's ``ese_vovnet*b``
  (ese_vovnet39b body: 23,543,936). Needed to load timm weights (:func:`convert_timm_vovnet`).
* ``"none"`` - no eSE (VoVNetV1, together with ``residual=False``).

The V-19 variants have one module per stage, so "all" and "last" are the same network.
``VoVNet(..., ese_placement=...)`` overrides the spec's placement.

**VoVNetV1** rows are named ``VoVNetV1-39`` and ``VoVNetV1-57`` (timm ``vovnet39a`` /
``vovnet57a``): the V-39/V-57 widths without identity and without eSE. They are deliberately
not called "V-39": that was a common typo of "V-39-eSE" and must stay an error.

**Output sizes.** The stem's stride-2 convs round up (``ceil(H / 4)``), but the stage
max-pools use ``ceil_mode=True`` *without padding*, which gives ``floor(n / 2)``. A feature of
stride ``s >= 8`` therefore has size ``floor(ceil(H / 4) * 4 / s)``: a 1333-wide input gives
334 (stem), 167 (stage3), **83** (stage4) where ResNet's padded strided convs give 84. With an
FPN this never matters (detectron2 pads inputs to a multiple of 32); ``output_shape()``
reports the nominal strides 4, 4, 8, 16, 32.

**Differences from the reference** (bugs not reproduced):

* ``freeze_at=k`` freezes the stem and the first ``k - 1`` stages and converts *only their*
  BatchNorms to ``FrozenBatchNorm2d`` (the reference converts every BN of the model).
* no module-global norm: ``norm`` is an argument (any ``get_norm`` name or callable); GroupNorm
  fails with a clear error when 32 does not divide a width (slim variants: 80, 112).
* with ``norm=""`` the convs get a bias (the reference cannot build without a norm).
* stages after the last requested feature are not built.
* DCN on a depthwise variant is an error (centermask2 silently ignores it).

Example::

    >>> model = VoVNet("V-39-eSE", norm="BN")
    >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 224, 167)).items()}
    {'stage2': (1, 256, 56, 42), 'stage3': (1, 512, 28, 21), 'stage4': (1, 768, 14, 10), 'stage5': (1, 1024, 7, 5)}
    >>> model.output_shape()["stage4"]
    ShapeSpec(channels=768, height=None, width=None, stride=16)
"""
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone import Backbone

from .families import BACKBONE_KEYS, Family, register_family
from .errors import arg_key, check_bools, check_freeze_at, check_out_features, config_error
from .layers import (CheckedNorm, CheckpointMixin, ConvNormAct, EffectiveSE, NormEvalMixin, checkpoint_keep_bn_stats,
                     split_offset_mask)
from .layers import deform_conv2d_fp32, reduced_precision
from .weights.formats import BGR_CAFFE, RGB_IMAGENET, ConvertError, Converted, WeightFormat, has_key

__all__ = [
    "ESE_PLACEMENTS",
    "VOVNET_STAGE_NAMES",
    "VOVNET_FEATURES",
    "VoVNetSpec",
    "VOVNET_SPECS",
    "VoVNetStem",
    "OSAModule",
    "OSAStage",
    "DeformConvUnit",
    "VoVNet",
    "resolve_vovnet_spec",
    "convert_timm_vovnet",
    "convert_vovnet_detectron2",
]

ESE_PLACEMENTS = ("all", "last", "none")
VOVNET_STAGE_NAMES = ("stage2", "stage3", "stage4", "stage5")
VOVNET_FEATURES = ("stem",) + VOVNET_STAGE_NAMES


class VoVNetSpec(NamedTuple):
    """One VoVNet architecture (a row of :data:`VOVNET_SPECS`; users may build their own).

    Attributes:
        stem: output channels of the three stem convs.
        stage_conv_ch: width of the 3x3 layers of stage2..stage5.
        stage_out_ch: output channels of stage2..stage5 (the 1x1 aggregation conv).
        layer_per_block: 3x3 layers per OSA module.
        block_per_stage: OSA modules in stage2..stage5.
        depthwise: depthwise-separable 3x3 layers (and stem convs 2-3).
        residual: identity add in every module but the first of a stage (VoVNetV2).
        ese: eSE placement, "all" (every module), "last" (last module of a stage) or "none".
    """

    stem: Tuple[int, int, int]
    stage_conv_ch: Tuple[int, int, int, int]
    stage_out_ch: Tuple[int, int, int, int]
    layer_per_block: int
    block_per_stage: Tuple[int, int, int, int]
    depthwise: bool
    residual: bool
    ese: str


_SLIM = dict(stage_conv_ch=(64, 80, 96, 112), stage_out_ch=(112, 256, 384, 512))
_WIDE = dict(stage_conv_ch=(128, 160, 192, 224), stage_out_ch=(256, 512, 768, 1024))
_V2 = dict(residual=True, ese="all")

# CONV_BODY name -> spec. The seven V2 rows are vovnet-detectron2's table; VoVNetV1-* are timm's
# vovnet39a / vovnet57a.
VOVNET_SPECS: Dict[str, VoVNetSpec] = {
    "V-19-slim-dw-eSE": VoVNetSpec((64, 64, 64), **_SLIM, layer_per_block=3, block_per_stage=(1, 1, 1, 1),
                                   depthwise=True, **_V2),
    "V-19-dw-eSE": VoVNetSpec((64, 64, 64), **_WIDE, layer_per_block=3, block_per_stage=(1, 1, 1, 1),
                              depthwise=True, **_V2),
    "V-19-slim-eSE": VoVNetSpec((64, 64, 128), **_SLIM, layer_per_block=3, block_per_stage=(1, 1, 1, 1),
                                depthwise=False, **_V2),
    "V-19-eSE": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=3, block_per_stage=(1, 1, 1, 1),
                           depthwise=False, **_V2),
    "V-39-eSE": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=5, block_per_stage=(1, 1, 2, 2),
                           depthwise=False, **_V2),
    "V-57-eSE": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=5, block_per_stage=(1, 1, 4, 3),
                           depthwise=False, **_V2),
    "V-99-eSE": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=5, block_per_stage=(1, 3, 9, 3),
                           depthwise=False, **_V2),
    "VoVNetV1-39": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=5, block_per_stage=(1, 1, 2, 2),
                              depthwise=False, residual=False, ese="none"),
    "VoVNetV1-57": VoVNetSpec((64, 64, 128), **_WIDE, layer_per_block=5, block_per_stage=(1, 1, 4, 3),
                              depthwise=False, residual=False, ese="none"),
}


def _relu():
    return nn.ReLU(inplace=True)


def _conv_unit(in_ch: int, out_ch: int, kernel_size: int, prefix: str, norm: CheckedNorm,
               stride: int = 1) -> ConvNormAct:
    """conv -> norm -> ReLU with children ``{prefix}/conv``, ``{prefix}/norm``, ``{prefix}/relu``."""
    return ConvNormAct(in_ch, out_ch, kernel_size, stride=stride, norm=norm, activation=_relu,
                       names=(f"{prefix}/conv", f"{prefix}/norm", f"{prefix}/relu"))


def _dw_unit(in_ch: int, out_ch: int, prefix: str, norm: CheckedNorm, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (no norm) -> 1x1 -> norm -> ReLU (``/dw_conv3x3``, ``/pw_conv1x1``, ``/pw_norm``)."""
    norm_layer = norm(out_ch)
    layers = [
        (f"{prefix}/dw_conv3x3", nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False)),
        (f"{prefix}/pw_conv1x1", nn.Conv2d(in_ch, out_ch, 1, bias=norm_layer is None)),
    ]
    if norm_layer is not None:
        layers.append((f"{prefix}/pw_norm", norm_layer))
    layers.append((f"{prefix}/pw_relu", _relu()))
    return nn.Sequential(OrderedDict(layers))


class DeformConvUnit(nn.Module):
    """Deformable 3x3 conv -> norm -> ReLU (DCNv1, or DCNv2 with ``modulated``), centermask2 names.

    Children ``{prefix}/conv_offset`` (plain 3x3 conv with bias, zero-initialised, so a new unit
    starts as a regular conv), ``{prefix}/conv`` (deformable weight, no bias), ``{prefix}/norm``.
    The offset conv predicts ``18 * G`` offsets (+ ``9 * G`` mask logits for v2, sigmoid-gated;
    channel layout offsets first, mask last, as centermask2). Runs
    ``torchvision.ops.deform_conv2d``, so it works on CPU and GPU. Stride 1, dilation 1. Under
    autocast or in a half model the deformable conv computes in float32
    (:func:`~d2_backbones.layers.deform_conv2d_fp32`).
    """

    def __init__(self, in_ch: int, out_ch: int, prefix: str, norm: CheckedNorm, *, modulated: bool = False,
                 deformable_groups: int = 1):
        super().__init__()
        self.modulated = modulated
        self._names = (f"{prefix}/conv_offset", f"{prefix}/conv", f"{prefix}/norm")
        self.conv_norm_pairs = (self._names[1:],)  # for d2_backbones.optimize_for_inference
        offset = nn.Conv2d(in_ch, (27 if modulated else 18) * deformable_groups, 3, padding=1, bias=True)
        nn.init.zeros_(offset.weight)
        nn.init.zeros_(offset.bias)
        norm_layer = norm(out_ch)
        self.add_module(self._names[0], offset)
        self.add_module(self._names[1], torchvision.ops.DeformConv2d(in_ch, out_ch, 3, padding=1,
                                                                     bias=norm_layer is None))
        if norm_layer is not None:
            self.add_module(self._names[2], norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = split_offset_mask(getattr(self, self._names[0])(x), self.modulated)
        dcn = getattr(self, self._names[1])
        if not torch.jit.is_scripting() and reduced_precision(x):
            x = deform_conv2d_fp32(dcn, x, offset, mask)
        else:
            x = dcn(x, offset, mask)
        norm = getattr(self, self._names[2], None)
        if norm is not None:
            x = norm(x)
        return torch.relu_(x)


class VoVNetStem(CNNBlockBase):
    """The 3-conv stem (stride 4); children ``stem_1/conv`` ... as in vovnet-detectron2."""

    def __init__(self, in_channels: int, channels: Sequence[int], *, depthwise: bool, norm: CheckedNorm):
        super().__init__(in_channels, channels[2], 4)
        units = [_conv_unit(in_channels, channels[0], 3, "stem_1", norm, stride=2)]
        if depthwise:
            units += [_dw_unit(channels[0], channels[1], "stem_2", norm),
                      _dw_unit(channels[1], channels[2], "stem_3", norm, stride=2)]
        else:
            units += [_conv_unit(channels[0], channels[1], 3, "stem_2", norm),
                      _conv_unit(channels[1], channels[2], 3, "stem_3", norm, stride=2)]
        for unit in units:
            for name, module in unit.named_children():
                self.add_module(name, module)
        # conv -> norm pairs its forward applies in order (for d2_backbones.optimize_for_inference)
        names = [n for n, _ in self.named_children()]
        self.conv_norm_pairs = tuple((c, n) for c, n in zip(names, names[1:]) if n.endswith("norm"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


class OSAModule(CheckpointMixin, nn.Module):
    """One-shot aggregation module (see the module docstring).

    Args:
        in_channels, stage_channels, out_channels: input, 3x3-layer and output widths.
        layer_per_block: number of 3x3 layers.
        name: ``OSA{stage}_{index}``; prefixes every child (the checkpoint names).
        norm: norm factory.
        identity: add the input to the output (needs ``in_channels == out_channels``).
        depthwise: depthwise-separable 3x3 layers (+ 1x1 reduction when widths differ).
        ese: build the eSE gate (attribute ``ese``; ``None`` without it).
        dcn: ``None`` or ``{"modulated": bool, "deformable_groups": int}`` for deformable layers.
        with_cp: gradient checkpointing inside the module (each 3x3 layer and the aggregation apart).
    """

    def __init__(self, in_channels: int, stage_channels: int, out_channels: int, layer_per_block: int, name: str,
                 *, norm: CheckedNorm, identity: bool = False, depthwise: bool = False, ese: bool = True,
                 dcn: Optional[Mapping] = None, with_cp: bool = False):
        super().__init__()
        self.identity = identity
        self.with_cp = with_cp
        self.conv_reduction = None
        if depthwise and in_channels != stage_channels:
            self.conv_reduction = _conv_unit(in_channels, stage_channels, 1, f"{name}_reduction_0", norm)
        layers = []
        ch = stage_channels if depthwise else in_channels
        for i in range(layer_per_block):
            if depthwise:
                layers.append(_dw_unit(ch, stage_channels, f"{name}_{i}", norm))
            elif dcn:
                layers.append(DeformConvUnit(ch, stage_channels, f"{name}_{i}", norm, **dcn))
            else:
                layers.append(_conv_unit(ch, stage_channels, 3, f"{name}_{i}", norm))
            ch = stage_channels
        self.layers = nn.ModuleList(layers)
        self.concat = _conv_unit(in_channels + layer_per_block * stage_channels, out_channels, 1,
                                 f"{name}_concat", norm)
        self.ese = EffectiveSE(out_channels) if ese else None

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        y = x if self.conv_reduction is None else self.conv_reduction(x)
        for layer in self.layers:
            y = layer(y)
            feats.append(y)
        return self._aggregate(feats)

    def _aggregate(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """concat -> 1x1 ``concat`` unit -> eSE -> + identity (``feats[0]`` is the module input)."""
        out = self.concat(torch.cat(feats, dim=1))
        if self.ese is not None:
            out = self.ese(out)
        if self.identity:
            # in place when nothing records the graph (inference): saves a feature-map allocation
            out = out + feats[0] if torch.is_grad_enabled() else out.add_(feats[0])
        return out

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        # Finer than the whole module: each 3x3 layer and the aggregation are recomputed on their own,
        # so backward holds one part's activations at a time (the layer outputs are kept: the
        # aggregation needs them anyway). Same outputs, gradients and BatchNorm statistics.
        feats = [x]
        y = x if self.conv_reduction is None else checkpoint_keep_bn_stats(self.conv_reduction, self.conv_reduction, x)
        for layer in self.layers:
            y = checkpoint_keep_bn_stats(layer, layer, y)
            feats.append(y)
        return checkpoint_keep_bn_stats(lambda *f: self._aggregate(list(f)), self.concat, *feats)


class OSAStage(CNNBlockBase):
    """``stage{n}``: ``Pooling`` (n >= 3) and modules ``OSA{n}_1`` .. ``OSA{n}_{blocks}``.

    A :class:`~detectron2.layers.CNNBlockBase`, so ``freeze()`` converts the norms of this stage only.
    """

    def __init__(self, stage: int, in_channels: int, stage_channels: int, out_channels: int, num_blocks: int,
                 layer_per_block: int, *, norm: CheckedNorm, depthwise: bool, residual: bool, ese: str,
                 dcn: Optional[Mapping] = None, with_cp: bool = False):
        super().__init__(in_channels, out_channels, 1 if stage == 2 else 2)
        if stage != 2:
            self.Pooling = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        ch = in_channels
        for b in range(num_blocks):
            with_ese = ese == "all" or (ese == "last" and b == num_blocks - 1)
            name = f"OSA{stage}_{b + 1}"
            self.add_module(name, OSAModule(ch, stage_channels, out_channels, layer_per_block, name, norm=norm,
                                            identity=residual and b > 0, depthwise=depthwise, ese=with_ese,
                                            dcn=dcn, with_cp=with_cp))
            ch = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def _check_ints(key, value, n, what):
    vals = tuple(value) if isinstance(value, (list, tuple)) else None
    if vals is None or len(vals) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in vals):
        raise config_error(key, value, problem=f"must be {n} positive ints ({what})")
    return vals


def resolve_vovnet_spec(spec: Union[str, VoVNetSpec, Mapping], key: str = "spec") -> Tuple[str, VoVNetSpec]:
    """Return ``(name, VoVNetSpec)`` for a :data:`VOVNET_SPECS` name, a spec or a mapping of its fields."""
    if isinstance(spec, str):
        if spec not in VOVNET_SPECS:
            raise config_error(key, spec, list(VOVNET_SPECS), nearest=True,
                               fix=f"set {key} to one of them (or pass a VoVNetSpec to d2_backbones.vovnet.VoVNet)")
        return spec, VOVNET_SPECS[spec]
    if isinstance(spec, Mapping) and not isinstance(spec, VoVNetSpec):
        fields = {str(k).lower(): v for k, v in spec.items()}
        unknown = sorted(set(fields) - set(VoVNetSpec._fields))
        missing = sorted(set(VoVNetSpec._fields) - set(fields))
        if unknown or missing:
            raise config_error(key, dict(spec), list(VoVNetSpec._fields),
                               problem=f"is not a VoVNet spec (unknown fields {unknown}, missing fields {missing})",
                               fix="give exactly the VoVNetSpec fields")
        spec = VoVNetSpec(**fields)
    if not isinstance(spec, VoVNetSpec):
        raise config_error(key, spec, list(VOVNET_SPECS), problem="must be a spec name, a VoVNetSpec or a mapping")
    spec = spec._replace(
        stem=_check_ints(f"{key}.stem", spec.stem, 3, "stem conv widths"),
        stage_conv_ch=_check_ints(f"{key}.stage_conv_ch", spec.stage_conv_ch, 4, "stage2..stage5"),
        stage_out_ch=_check_ints(f"{key}.stage_out_ch", spec.stage_out_ch, 4, "stage2..stage5"),
        block_per_stage=_check_ints(f"{key}.block_per_stage", spec.block_per_stage, 4, "stage2..stage5"),
        layer_per_block=_check_ints(f"{key}.layer_per_block", (spec.layer_per_block,), 1, "3x3 layers")[0],
    )
    if spec.ese not in ESE_PLACEMENTS:
        raise config_error(f"{key}.ese", spec.ese, ESE_PLACEMENTS, nearest=True)
    return "custom", spec


class VoVNet(NormEvalMixin, Backbone):
    """VoVNetV2-eSE / VoVNetV1 as a detectron2 ``Backbone`` (plain keyword arguments, no cfg).

    Implements :class:`d2_backbones.families.FamilyBackbone`.

    Args:
        spec: a :data:`VOVNET_SPECS` name (``"V-39-eSE"``), a :class:`VoVNetSpec` or a mapping
            of its fields.
        in_channels: input image channels.
        norm: any :func:`detectron2.layers.get_norm` name ("FrozenBN", "BN", "SyncBN", "GN", ...)
            or a callable ``channels -> nn.Module``.
        out_features: subset of ``stem, stage2..stage5``; later stages are not built.
        freeze_at: 0 nothing, 1 stem, k stem + stage2..stage(k) (``requires_grad=False`` and
            *their* BatchNorms become FrozenBatchNorm2d).
        norm_eval: keep BatchNorm statistics fixed in train mode (affine parameters still learn).
        with_cp: gradient checkpointing inside every OSA module (see OSAModule).
        ese_placement: ``None`` (the spec's), "all", "last" or "none".
        stage_with_dcn: 4 bools (stage2..stage5): deformable 3x3 OSA layers in that stage.
        with_modulated_dcn: DCNv2 (offsets + mask) instead of DCNv1.
        deformable_groups: offset groups of the deformable convs.
    """

    feature_names = VOVNET_FEATURES
    conv_norm_pairs: Tuple[Tuple[str, str], ...] = ()  # the stem declares its own pairs

    def __init__(
        self,
        spec: Union[str, VoVNetSpec, Mapping] = "V-39-eSE",
        *,
        in_channels: int = 3,
        norm: Union[str, Callable] = "FrozenBN",
        out_features: Sequence[str] = VOVNET_STAGE_NAMES,
        freeze_at: int = 0,
        norm_eval: bool = False,
        with_cp: bool = False,
        ese_placement: Optional[str] = None,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        with_modulated_dcn: bool = False,
        deformable_groups: int = 1,
    ):
        super().__init__()
        key = arg_key  # errors name the argument, or its config key inside errors.argument_keys

        self.spec_name, spec = resolve_vovnet_spec(spec, key("spec"))
        check_bools(norm_eval=norm_eval, with_cp=with_cp, with_modulated_dcn=with_modulated_dcn)
        if ese_placement not in (None, ""):
            if ese_placement not in ESE_PLACEMENTS:
                raise config_error(key("ese_placement"), ese_placement, ("",) + ESE_PLACEMENTS, nearest=True,
                                   fix=f"set {key('ese_placement')} to one of them ('' keeps the spec's "
                                       f"placement, {spec.ese!r} here)")
            spec = spec._replace(ese=ese_placement)
        self.spec = spec

        out_features = check_out_features(out_features, VOVNET_FEATURES, key("out_features"), "VoVNet",
                                          hint=" (VoVNet names its stages stage2..stage5, not res2..res5)")
        num_stages = max(VOVNET_FEATURES.index(f) for f in out_features)
        check_freeze_at(freeze_at, num_stages + 1, VOVNET_FEATURES, key("freeze_at"), "VoVNet")

        dcn_stages = tuple(stage_with_dcn)
        if len(dcn_stages) != 4 or not all(isinstance(v, bool) for v in dcn_stages):
            raise config_error(key("stage_with_dcn"), list(dcn_stages), problem="must be 4 booleans (stage2..stage5)",
                               fix=f"set {key('stage_with_dcn')} to e.g. [False, True, True, True]")
        if any(dcn_stages):
            if spec.depthwise:
                raise config_error(key("stage_with_dcn"), list(dcn_stages),
                                   problem=f"asks for DCN, but {self.spec_name} has depthwise 3x3 layers",
                                   fix=f"set {key('stage_with_dcn')} to [False, False, False, False] or use a "
                                       f"non-dw variant")
            if isinstance(deformable_groups, bool) or not isinstance(deformable_groups, int) or deformable_groups < 1:
                raise config_error(key("deformable_groups"), deformable_groups, problem="must be a positive int")
            for i, on in enumerate(dcn_stages):
                widths = (spec.stage_conv_ch[i], ([spec.stem[2]] + list(spec.stage_out_ch))[i])
                if on and any(w % deformable_groups for w in widths):
                    raise config_error(key("deformable_groups"), deformable_groups,
                                       problem=f"must divide the input widths {widths} of the "
                                               f"deformable layers of {VOVNET_STAGE_NAMES[i]}",
                                       fix="use 1 or a common divisor")

        norm = CheckedNorm(norm, key("norm"))
        self.stem = VoVNetStem(in_channels, spec.stem, depthwise=spec.depthwise, norm=norm)
        self._out_feature_strides = {"stem": self.stem.stride}
        self._out_feature_channels = {"stem": self.stem.out_channels}
        self.stage_names: List[str] = []
        ch, stride = self.stem.out_channels, self.stem.stride
        for i in range(num_stages):
            name = VOVNET_STAGE_NAMES[i]
            dcn = dict(modulated=bool(with_modulated_dcn), deformable_groups=deformable_groups) \
                if dcn_stages[i] else None
            stage = OSAStage(i + 2, ch, spec.stage_conv_ch[i], spec.stage_out_ch[i], spec.block_per_stage[i],
                             spec.layer_per_block, norm=norm, depthwise=spec.depthwise, residual=spec.residual,
                             ese=spec.ese, dcn=dcn, with_cp=with_cp)
            self.add_module(name, stage)
            self.stage_names.append(name)
            ch, stride = stage.out_channels, stride * stage.stride
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = ch
        self._out_features = [f for f in VOVNET_FEATURES if f in out_features]

        self._init_weights()
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.freeze_at = freeze_at
        self.freeze(freeze_at)
        self.train()

    def _init_weights(self) -> None:
        # kaiming_normal_ (fan_in) on every conv weight, as the reference; offsets stay zero.
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, torchvision.ops.DeformConv2d)) and not name.endswith("/conv_offset"):
                nn.init.kaiming_normal_(m.weight)

    def freeze(self, freeze_at: int = 0) -> "VoVNet":
        """Freeze the stem (``freeze_at >= 1``) and ``stage2..stage(freeze_at)``; only their norms convert."""
        if freeze_at >= 1:
            self.stem.freeze()
        for i, name in enumerate(self.stage_names):
            if freeze_at >= i + 2:
                getattr(self, name).freeze()
        return self

    def named_stages(self) -> List[Tuple[str, List[nn.Module]]]:
        """``[("stem", [stem]), ("stage2", [stage2]), ...]`` for the built stages."""
        return [("stem", [self.stem])] + [(n, [getattr(self, n)]) for n in self.stage_names]

    def describe(self) -> str:
        """The variant, e.g. ``"VoVNet V-39-eSE (eSE=all, residual=True)"``."""
        dcn = [n for n in self.stage_names if any("/conv_offset" in k for k, _ in getattr(self, n).named_modules())]
        return (f"VoVNet {self.spec_name} (eSE={self.spec.ese}, residual={self.spec.residual}"
                + (f", DCN in {', '.join(dcn)}" if dcn else "") + ")")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # The children are exactly stem, stage2.. in network order; iterating them (instead of
        # getattr by name) keeps forward scriptable and free of data-dependent control flow.
        outputs: Dict[str, torch.Tensor] = {}
        for name, module in self.named_children():
            x = module(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
_TIMM_STEM = re.compile(r"^stem\.(\d)\.(conv|bn|conv_dw|conv_pw)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^stages\.(\d)\.blocks\.(\d+)\.(.+)$")
_TIMM_UNIT = re.compile(r"^(conv_mid\.(\d+)|conv_reduction|conv_concat)\.(conv|bn|conv_dw|conv_pw)\.(.+)$")
_DW_NAMES = {"conv_dw": "dw_conv3x3", "conv_pw": "pw_conv1x1", "bn": "pw_norm"}
_PLAIN_NAMES = {"conv": "conv", "bn": "norm"}


def _unit_name(sd: Mapping, src_prefix: str, part: str) -> str:
    names = _DW_NAMES if f"{src_prefix}.conv_dw.weight" in sd else _PLAIN_NAMES
    return names[part]


def convert_timm_vovnet(sd: Mapping[str, torch.Tensor], prefix: str = "") -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """timm ``ese_vovnet*`` / ``vovnet*a`` state dict -> :class:`VoVNet` names. Returns ``(state_dict, dropped)``.

    ============================================  ==================================================
    timm                                          d2_backbones / vovnet-detectron2
    ============================================  ==================================================
    ``stem.{i}.conv`` / ``.bn``                   ``stem.stem_{i+1}/conv`` / ``/norm``
    ``stem.{i}.conv_dw`` / ``.conv_pw`` / ``.bn`` ``stem.stem_{i+1}/dw_conv3x3`` / ``/pw_conv1x1`` /
                                                  ``/pw_norm`` (dw variants)
    ``stages.{k}.blocks.{b}.conv_mid.{i}.*``      ``stage{k+2}.OSA{k+2}_{b+1}.layers.{i}.OSA.._{i}/*``
    ``...conv_reduction.*``                       ``...conv_reduction.OSA.._reduction_0/*``
    ``...conv_concat.*``                          ``...concat.OSA.._concat/*``
    ``...attn.fc.*``                              ``...ese.fc.*``
    ``head.*``, ``*.num_batches_tracked``         dropped
    ============================================  ==================================================

    timm puts eSE only in the last module of each stage, so build the target with
    ``ese_placement="last"`` (``MODEL.VOVNET.ESE_PLACEMENT: "last"``); a model with "all" reports
    the missing ``ese.fc`` keys of the other modules on a strict load. Pair
    ``ese_vovnet19b_dw`` -> ``V-19-dw-eSE``, ``ese_vovnet19b_slim_dw`` -> ``V-19-slim-dw-eSE``,
    ``ese_vovnet19b_slim`` -> ``V-19-slim-eSE``, ``ese_vovnet39b/57b/99b`` -> ``V-39/57/99-eSE``,
    ``vovnet39a/57a`` -> ``VoVNetV1-39/57``. timm weights expect RGB input normalised with the
    ImageNet mean/std (``INPUT.FORMAT: RGB``, ``PIXEL_MEAN: [123.675, 116.28, 103.53]``,
    ``PIXEL_STD: [58.395, 57.12, 57.375]``; ``ese_vovnet57b.ra4_e3600_r256_in1k`` uses mean
    = std = 127.5). Unknown keys raise ``KeyError``. ``prefix`` is put before every output key:
    ``"backbone.bottom_up."`` gives a file for ``MODEL.WEIGHTS`` of a detector.

    Example::

        >>> import timm
        >>> sd, dropped = convert_timm_vovnet(timm.create_model("ese_vovnet39b").state_dict())
        >>> VoVNet("V-39-eSE", norm="BN", ese_placement="last").load_state_dict(sd)
        <All keys matched successfully>

    For ``MODEL.WEIGHTS`` of a detector, ``python -m d2_backbones.convert`` writes the file (with the
    ``backbone.bottom_up.`` prefix, metadata and the config the weights need).
    """
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith("head.") or k.endswith("num_batches_tracked"):
            dropped.append(k)
            continue
        m = _TIMM_STEM.match(k)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            out[f"stem.stem_{i + 1}/{_unit_name(sd, f'stem.{i}', part)}.{rest}"] = v
            continue
        m = _TIMM_BLOCK.match(k)
        if m:
            n, b, rest = int(m.group(1)) + 2, int(m.group(2)) + 1, m.group(3)
            osa = f"OSA{n}_{b}"
            src = f"stages.{m.group(1)}.blocks.{m.group(2)}"
            if rest.startswith("attn.fc."):
                out[f"stage{n}.{osa}.ese.fc.{rest[len('attn.fc.'):]}"] = v
                continue
            u = _TIMM_UNIT.match(rest)
            if u:
                unit, idx, part, tail = u.group(1), u.group(2), u.group(3), u.group(4)
                part = _unit_name(sd, f"{src}.{unit}", part)
                if idx is not None:
                    out[f"stage{n}.{osa}.layers.{idx}.{osa}_{idx}/{part}.{tail}"] = v
                elif unit == "conv_reduction":
                    out[f"stage{n}.{osa}.conv_reduction.{osa}_reduction_0/{part}.{tail}"] = v
                else:
                    out[f"stage{n}.{osa}.concat.{osa}_concat/{part}.{tail}"] = v
                continue
        raise KeyError(f"Unmapped timm VoVNet key {k!r} (expected stem.*, stages.*.blocks.*, head.*)")
    return {prefix + k: v for k, v in out.items()}, sorted(dropped)


_D2_PREFIXES = ("module.", "backbone.bottom_up.", "bottom_up.")


def convert_vovnet_detectron2(ckpt: Mapping) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A vovnet-detectron2 / centermask2 checkpoint -> the state dict of a bare :class:`VoVNet`.

    Accepts the bare dict or the ``{"model": ...}`` wrapper, with or without the
    ``backbone.bottom_up.`` (or ``bottom_up.``/``module.``) prefix; keys of other parts (FPN,
    heads, solver state) are returned in ``dropped``. Only needed to load into a bare VoVNet:
    detectron2's ``DetectionCheckpointer`` loads these files into a full model built with
    ``build_d2b_vovnet_fpn_backbone`` unchanged (names are equal). A bare file *without* the
    prefix needs detectron2's suffix matching there: ``MODEL.WEIGHTS: "file.pth?matching_heuristics=True"``.
    """
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    out, dropped = {}, []
    for k, v in sd.items():
        name = k
        for p in _D2_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
        if re.match(r"^(stem|stage[2-5])\.", name) and hasattr(v, "shape"):
            out[name] = torch.as_tensor(v)
        else:
            dropped.append(k)
    return out, sorted(dropped)


# =============================================================================================
# the family: config section, builder arguments, weight formats and key maps, the record
# =============================================================================================
def add_vovnet_config(_C: CN) -> None:
    """``MODEL.VOVNET`` keys."""
    # Same node and key names as vovnet-detectron2 / centermask2 (their yamls merge unchanged);
    # their dead keys OUT_CHANNELS and BACKBONE_OUT_CHANNELS are not added (no yaml of either
    # project sets them; the FPN width is MODEL.FPN.OUT_CHANNELS).
    _C.MODEL.VOVNET = CN()
    # Architecture: "V-19-slim-dw-eSE", "V-19-dw-eSE", "V-19-slim-eSE", "V-19-eSE", "V-39-eSE",
    # "V-57-eSE", "V-99-eSE" (VoVNetV2, vovnet-detectron2's names) or "VoVNetV1-39", "VoVNetV1-57"
    # (no identity, no eSE; timm vovnet39a/57a). See d2_backbones.vovnet.VOVNET_SPECS.
    _C.MODEL.VOVNET.CONV_BODY = "V-39-eSE"
    # Features to return: "stem" (stride 4), "stage2" (4), "stage3" (8), "stage4" (16),
    # "stage5" (32). Stages after the last one listed are not built.
    _C.MODEL.VOVNET.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    # Norm of every layer: "FrozenBN" (vovnet-detectron2's default), "BN", "SyncBN",
    # "naiveSyncBN", "nnSyncBN", "GN" (GroupNorm(32, C): fails for the slim variants, whose 80-
    # and 112-channel layers 32 does not divide), "" (no norm; convs get a bias).
    _C.MODEL.VOVNET.NORM = "FrozenBN"
    # Where the eSE gates are: "" (the CONV_BODY's own: "all" for V-*-eSE, "none" for VoVNetV1),
    # "all" (every OSA module: vovnet-detectron2/CenterMask, needed for their checkpoints),
    # "last" (last module of each stage: timm ese_vovnet*, needed for timm weights), "none".
    _C.MODEL.VOVNET.ESE_PLACEMENT = ""
    # Keep BatchNorm/SyncBN running statistics fixed while training (mmdet `norm_eval`); affine
    # parameters still learn unless their stage is frozen. Options: True, False.
    _C.MODEL.VOVNET.NORM_EVAL = False
    # Gradient checkpointing inside every OSA module (each 3x3 layer and the concat + 1x1 + eSE part are
    # recomputed apart): same outputs and gradients, less activation memory,
    # more compute per training step. Options: True, False.
    _C.MODEL.VOVNET.WITH_CP = False
    # Deformable 3x3 OSA layers per stage (4 bools for stage2..stage5; centermask2's key), e.g.
    # [False, True, True, True]. Not available for the dw variants.
    _C.MODEL.VOVNET.STAGE_WITH_DCN = [False, False, False, False]
    # DCNv2 (offsets + modulation mask) instead of DCNv1 (offsets only). Options: True, False.
    _C.MODEL.VOVNET.WITH_MODULATED_DCN = False
    # Offset groups of the deformable convs (positive int dividing the layer widths).
    _C.MODEL.VOVNET.DEFORMABLE_GROUPS = 1


def _vovnet_ese_placement(cfg, value):
    """``MODEL.VOVNET.ESE_PLACEMENT: ""`` means the CONV_BODY's own placement."""
    if value:
        return value
    spec = VOVNET_SPECS.get(cfg.MODEL.VOVNET.CONV_BODY)
    return spec.ese if spec is not None else value


def _infer_vovnet(sd: Mapping[str, torch.Tensor], arch: Optional[str]) -> Tuple[str, str]:
    """``(CONV_BODY, ESE_PLACEMENT)`` of a VoVNet state dict in our names."""
    modules: Dict[int, List[int]] = {}
    for k in sd:
        m = re.match(r"^stage(\d)\.OSA\d_(\d+)\.", k)
        if m:
            modules.setdefault(int(m.group(1)), [])
            if int(m.group(2)) not in modules[int(m.group(1))]:
                modules[int(m.group(1))].append(int(m.group(2)))
    with_ese = {(s, b) for s, bs in modules.items() for b in bs if f"stage{s}.OSA{s}_{b}.ese.fc.weight" in sd}
    all_modules = {(s, b) for s, bs in modules.items() for b in bs}
    last = {(s, max(bs)) for s, bs in modules.items()}
    placement = "none" if not with_ese else "all" if with_ese == all_modules else "last" if with_ese == last \
        else None
    if placement is None:
        raise ConvertError(f"eSE layers in {sorted(with_ese)} are neither in every OSA module nor in the last "
                           f"module of each stage; no VoVNet variant has that layout.")
    if arch:
        if arch not in VOVNET_SPECS:
            raise ConvertError(f"--arch {arch!r} is not a VoVNet CONV_BODY; use one of {list(VOVNET_SPECS)}.")
        return arch, placement
    dw = "stem.stem_2/dw_conv3x3.weight" in sd

    def out_ch(prefix):
        t = sd.get(prefix + "/pw_conv1x1.weight", sd.get(prefix + "/conv.weight"))
        return None if t is None else int(t.shape[0])

    stem = tuple(out_ch(f"stem.stem_{i}") for i in (1, 2, 3))
    bps = tuple(len(modules.get(s, [])) for s in (2, 3, 4, 5))
    lpb = len({k.split(".")[3] for k in sd if k.startswith("stage2.OSA2_1.layers.")})
    conv_ch = tuple(out_ch(f"stage{s}.OSA{s}_1.layers.0.OSA{s}_1_0") for s in (2, 3, 4, 5))
    out = tuple(out_ch(f"stage{s}.OSA{s}_1.concat.OSA{s}_1_concat") for s in (2, 3, 4, 5))
    for name, spec in VOVNET_SPECS.items():
        if (spec.stem, spec.stage_conv_ch, spec.stage_out_ch, spec.layer_per_block, spec.block_per_stage,
                spec.depthwise) == (stem, conv_ch, out, lpb, bps, dw) and (spec.ese == "none") == (placement == "none"):
            return name, placement
    raise ConvertError(f"no VoVNet variant has stem {stem}, widths {conv_ch}/{out}, {lpb} layers per module, "
                       f"{bps} modules per stage (depthwise={dw}); known: {list(VOVNET_SPECS)}. Pass --arch.")


def _convert_vovnet(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                    style: Optional[str]) -> Converted:
    dropped: List[str] = []
    if fmt == "timm-vovnet":
        bare, _ = convert_timm_vovnet(src)
    else:
        bare, _ = convert_vovnet_detectron2(src)
        dropped = sorted(k for k in src if not re.match(r"^((module|backbone\.bottom_up|bottom_up)\.)*"
                                                        r"(stem|stage[2-5])\.", k))
    body, placement = _infer_vovnet(bare, arch)
    model = VoVNet(body, norm="BN", ese_placement=placement)
    config = {"MODEL.VOVNET.CONV_BODY": body, "MODEL.VOVNET.ESE_PLACEMENT": placement,
              **(RGB_IMAGENET if fmt == "timm-vovnet" else BGR_CAFFE)}
    return Converted(bare, model, config, {"arch": body, "CONV_BODY": body, "ESE_PLACEMENT": placement},
                     dropped, {}, {}, [])


VOVNET_FORMATS = (
    WeightFormat("vovnet-d2", "vovnet", "vovnet-detectron2 / centermask2 checkpoint",
                 lambda sd: has_key(sd, r"(^|\.)stem\.stem_1/"), _convert_vovnet),
    WeightFormat("timm-vovnet", "vovnet", "timm ese_vovnet* / vovnet*a",
                 lambda sd: has_key(sd, r"^stages\.\d\.blocks\.\d+\.conv_(mid|concat)\."), _convert_vovnet),
)


def describe_vovnet_weights(bare: Mapping[str, torch.Tensor]) -> Optional[Tuple[str, Dict]]:
    """``("a VoVNet V-39-eSE backbone", {"MODEL.VOVNET.CONV_BODY": "V-39-eSE"})``; None if not a VoVNet."""
    if not has_key(bare, r"(^|\.)stem\.stem_1/"):
        return None
    body, _ = _infer_vovnet(bare, None)
    return f"a VoVNet {body} backbone", {"MODEL.VOVNET.CONV_BODY": body}


VOVNET_FAMILY = register_family(Family(
    name="vovnet", build=VoVNet, config_node="MODEL.VOVNET", add_config_keys=add_vovnet_config,
    arg_keys={
        "spec": "MODEL.VOVNET.CONV_BODY", "norm": "MODEL.VOVNET.NORM", "out_features": "MODEL.VOVNET.OUT_FEATURES",
        **BACKBONE_KEYS, "norm_eval": "MODEL.VOVNET.NORM_EVAL", "with_cp": "MODEL.VOVNET.WITH_CP",
        "ese_placement": "MODEL.VOVNET.ESE_PLACEMENT", "stage_with_dcn": "MODEL.VOVNET.STAGE_WITH_DCN",
        "with_modulated_dcn": "MODEL.VOVNET.WITH_MODULATED_DCN",
        "deformable_groups": "MODEL.VOVNET.DEFORMABLE_GROUPS"},
    feature_names=VOVNET_FEATURES, config_dir="VoVNet",
    variants={v: ["MODEL.VOVNET.CONV_BODY", v] for v in VOVNET_SPECS if v.startswith("V-")},
    aliases={"build_vovnet_backbone": "build_d2b_vovnet_backbone",
             "build_vovnet_fpn_backbone": "build_d2b_vovnet_fpn_backbone"},
    weight_formats=VOVNET_FORMATS, describe_weights=describe_vovnet_weights,
    effective_config={"MODEL.VOVNET.ESE_PLACEMENT": _vovnet_ese_placement},
    contract_variants={
        "V-19-slim-dw-eSE": dict(spec="V-19-slim-dw-eSE"),
        "V-19-eSE-last-DCNv2": dict(spec="V-19-eSE", ese_placement="last", stage_with_dcn=[False, False, True, True],
                                    with_modulated_dcn=True)},
))
