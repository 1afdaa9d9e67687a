"""ResNet / ResNeXt with MMDetection's options, built on detectron2's own ResNet.

This is detectron2's :class:`~detectron2.modeling.backbone.resnet.ResNet`,
:meth:`ResNet.make_stage`, ``BasicStem``, ``BasicBlock`` and ``BottleneckBlock``,
extended (by subclassing, not forking) with the options of MMDetection's
``ResNet`` (``mmdet/models/backbones/resnet.py``):

=========================  ===============================================================
option                     how it is built here
=========================  ===============================================================
style pytorch / caffe      ``stride_in_1x1`` (detectron2's flag: True = caffe/MSRA)
deep stem (V1c)            :class:`DeepStem`: three 3x3 convs (C/2 s2, C/2, C) + max-pool
avg_down (V1d)             ``shortcut_pool`` = ``AvgPool2d(s, s, ceil_mode=True,
                           count_include_pad=False)`` before the 1x1 ``shortcut`` (stride 1)
per-stage strides/dilation ``strides``/``dilations`` (4 values each), any stage
frozen stages              ``freeze_at`` (detectron2 indexing; mmdet ``frozen_stages`` k = k+1)
norm_eval                  BatchNorm statistics fixed in train mode, re-applied on ``.train()``
with_cp                    per-block gradient checkpointing (:class:`~.layers.CheckpointMixin`)
zero_init_residual         last norm of every residual branch starts at 0
DCN v1 / v2                ``torchvision.ops.deform_conv2d`` on conv2 (CPU and GPU)
plugins                    GCNet context block / SE after conv1, conv2 or conv3
=========================  ===============================================================

Parameter names are detectron2's (``stem.conv1.weight``, ``res2.0.conv1.norm.*``,
``res3.0.shortcut.*``), so detectron2's MSRA ``.pkl`` and converted torchvision weights
load natively. New parts are named:

* deep stem: ``stem.conv1``, ``stem.conv2``, ``stem.conv3`` (each with ``.norm``);
* avg_down: ``resN.0.shortcut_pool`` (no parameters; ``shortcut`` keeps its name);
* DCN: ``resN.i.conv2`` (deformable weight + ``.norm``) and ``resN.i.conv2_offset``
  (zero-initialised offset/mask conv), exactly as detectron2's ``DeformBottleneckBlock``;
* plugins: ``resN.i.after_conv{1,2,3}.{gc,se}.*``.

avg_down with stride 1: no pool is inserted (the 1x1 projection stays where channels
change); this is timm's ``resnet*d`` behaviour and gives timm's parameter counts.

Output sizes: every strided layer rounds up, so a feature of stride ``s`` has spatial
size ``ceil(H / s) x ceil(W / s)`` for any input size.

Example::

    >>> model = build_resnet(50, deep_stem=True, avg_down=True, norm="BN")
    >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 224, 200)).items()}
    {'res2': (1, 256, 56, 50), 'res3': (1, 512, 28, 25), 'res4': (1, 1024, 14, 13), 'res5': (1, 2048, 7, 7)}
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.layers import CNNBlockBase, Conv2d
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.modeling.backbone.resnet import ResNet as _D2ResNet
from detectron2.modeling.backbone.resnet import BasicStem

from .families import BACKBONE_KEYS, Family, register_family
from .fpn import build_fpn
from .errors import arg_key, check_bools, check_freeze_at, check_out_features, config_error
from .layers import CheckedNorm, CheckpointMixin, ContextBlock, NormEvalMixin, SqueezeExcite, split_offset_mask
from .layers import deform_conv2d_fp32, reduced_precision
from .weights.formats import BGR_CAFFE, RGB_IMAGENET, ConvertError, Converted, WeightFormat, has_key

__all__ = [
    "RESNET_DEPTHS",
    "RESNET_STAGE_NAMES",
    "PLUGIN_TYPES",
    "PLUGIN_POSITIONS",
    "DeepStem",
    "ResNetBasicBlock",
    "ResNetBottleneckBlock",
    "ResNetDeformBottleneckBlock",
    "ResNet",
    "build_resnet",
    "convert_torchvision_resnet",
    "convert_timm_resnet",
    "convert_mmdet_resnet",
]

# depth -> (block kind, blocks per stage). The only depth table of the package.
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
RESNET_STAGE_NAMES = ("res2", "res3", "res4", "res5")
RESNET_FEATURES = ("stem",) + RESNET_STAGE_NAMES
PLUGIN_TYPES = ("gc", "se")
PLUGIN_POSITIONS = ("after_conv1", "after_conv2", "after_conv3")
_PLUGIN_FIELDS = ("type", "position", "stages", "ratio")


class DeepStem(CNNBlockBase):
    """ResNet-V1c/V1d stem: 3x3 s2 (C/2) -> 3x3 (C/2) -> 3x3 (C), each conv+norm+ReLU, then max-pool.

    Same layout as MMDetection's ``deep_stem`` and timm's ``stem_type='deep'``; stride 4.

    Example::

        >>> DeepStem(3, 64, norm="BN")(torch.zeros(1, 3, 65, 64)).shape
        torch.Size([1, 64, 17, 16])
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        norm = CheckedNorm(norm)
        self.conv1 = Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False, norm=norm(mid))
        self.conv2 = Conv2d(mid, mid, 3, stride=1, padding=1, bias=False, norm=norm(mid))
        self.conv3 = Conv2d(mid, out_channels, 3, stride=1, padding=1, bias=False, norm=norm(out_channels))
        for layer in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        x = F.relu_(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _make_plugins(plugins: Sequence[Mapping], position: str, channels: int) -> nn.Sequential:
    mods: "OrderedDict[str, nn.Module]" = OrderedDict()
    for p in plugins:
        if p["position"] != position:
            continue
        kind = p["type"]
        if kind == "gc":
            m: nn.Module = ContextBlock(channels, ratio=p.get("ratio", 1.0 / 16))
        else:  # "se"
            rd = max(1, int(round(channels * p.get("ratio", 1.0 / 16))))
            m = SqueezeExcite(channels, rd, gate="sigmoid")
        name, i = kind, 1
        while name in mods:
            name, i = f"{kind}_{i}", i + 1
        mods[name] = m
    return nn.Sequential(mods)


def _setup_shortcut(block: CNNBlockBase, norm, stride: int, avg_down: bool) -> None:
    """Projection shortcut when channels change *or* the block is strided (detectron2 only checks
    channels, which misses a strided block with equal channels); with ``avg_down`` a strided
    projection becomes AvgPool(stride) + 1x1 conv with stride 1."""
    block.shortcut_pool = None
    if block.shortcut is None and stride == 1:
        return
    out = block.out_channels
    if avg_down and stride > 1:
        block.shortcut_pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        stride = 1
    elif block.shortcut is not None:
        return  # detectron2's own strided 1x1 projection
    block.shortcut = Conv2d(block.in_channels, out, kernel_size=1, stride=stride, bias=False, norm=norm(out))
    weight_init.c2_msra_fill(block.shortcut)


def _zero_init(norm: Optional[nn.Module]) -> None:
    w = getattr(norm, "weight", None)
    if isinstance(w, nn.Parameter):
        nn.init.zeros_(w)


class ResNetBasicBlock(CheckpointMixin, BasicBlock):
    """detectron2's ``BasicBlock`` plus dilation, avg_down, plugins, zero-init and ``with_cp``.

    Dilation applies to conv1 only (MMDetection's BasicBlock). Plugins may sit after
    conv1 or conv2.
    """

    def __init__(self, in_channels, out_channels, *, stride=1, norm="BN", dilation=1, avg_down=False,
                 plugins=(), zero_init_residual=False, with_cp=False):
        norm = CheckedNorm(norm)
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        if dilation != 1:
            self.conv1.dilation = (dilation, dilation)
            self.conv1.padding = (dilation, dilation)
        _setup_shortcut(self, norm, stride, avg_down)
        self.after_conv1 = _make_plugins(plugins, "after_conv1", out_channels)
        self.after_conv2 = _make_plugins(plugins, "after_conv2", out_channels)
        if zero_init_residual:
            _zero_init(self.conv2.norm)
        self.with_cp = with_cp

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = self.after_conv1(out)
        out = self.conv2(out)
        out = self.after_conv2(out)
        shortcut = x
        if self.shortcut_pool is not None:
            shortcut = self.shortcut_pool(shortcut)
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        out += shortcut  # in place, as detectron2 (a new tensor here costs page faults on CPU)
        return F.relu_(out)


class ResNetBottleneckBlock(CheckpointMixin, BottleneckBlock):
    """detectron2's ``BottleneckBlock`` plus avg_down, plugins, zero-init and ``with_cp``."""

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, avg_down=False, plugins=(), zero_init_residual=False,
                 with_cp=False):
        norm = CheckedNorm(norm)
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
                         num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation)
        _setup_shortcut(self, norm, stride, avg_down)
        self.after_conv1 = _make_plugins(plugins, "after_conv1", bottleneck_channels)
        self.after_conv2 = _make_plugins(plugins, "after_conv2", bottleneck_channels)
        self.after_conv3 = _make_plugins(plugins, "after_conv3", out_channels)
        if zero_init_residual:
            _zero_init(self.conv3.norm)
        self.with_cp = with_cp

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_pool is not None:
            x = self.shortcut_pool(x)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = self.after_conv1(out)
        out = F.relu_(self.conv2(out))
        out = self.after_conv2(out)
        out = self.conv3(out)
        out = self.after_conv3(out)
        out += self._shortcut(x)  # in place, as detectron2
        return F.relu_(out)


class _DeformConv2d(torchvision.ops.DeformConv2d):
    """torchvision's deformable conv (CPU and GPU) with a detectron2-style ``norm`` child.

    Under autocast or in a half model the deformable conv computes in float32 (torchvision's CPU
    kernel has no float16/bfloat16 version), see :func:`~d2_backbones.layers.deform_conv2d_fp32`.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting() and reduced_precision(x):
            x = deform_conv2d_fp32(self, x, offset, mask)
        else:
            x = torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                                              padding=self.padding, dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        return x


class ResNetDeformBottleneckBlock(ResNetBottleneckBlock):
    """Bottleneck with a deformable 3x3 conv (DCNv1, or DCNv2 with ``deform_modulated``).

    Same parameter names and offset layout as detectron2's ``DeformBottleneckBlock``
    (``conv2_offset`` predicts ``2*9*G`` offsets, plus ``9*G`` mask logits for v2), but
    the op is ``torchvision.ops.deform_conv2d``, which runs on CPU and GPU.
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, deform_modulated=False, deform_num_groups=1, **kwargs):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
                         num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation, **kwargs)
        norm = CheckedNorm(norm)
        stride_3x3 = 1 if stride_in_1x1 else stride
        self.deform_modulated = deform_modulated
        offset_channels = (27 if deform_modulated else 18) * deform_num_groups
        self.conv2_offset = Conv2d(bottleneck_channels, offset_channels, kernel_size=3, stride=stride_3x3,
                                   padding=dilation, dilation=dilation)
        old_norm = self.conv2.norm
        self.conv2 = _DeformConv2d(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                                   padding=dilation, dilation=dilation, groups=num_groups, bias=False,
                                   norm=norm(bottleneck_channels) if old_norm is not None else None)
        weight_init.c2_msra_fill(self.conv2)
        nn.init.zeros_(self.conv2_offset.weight)
        nn.init.zeros_(self.conv2_offset.bias)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = self.after_conv1(out)
        offset, mask = split_offset_mask(self.conv2_offset(out), self.deform_modulated)
        out = F.relu_(self.conv2(out, offset, mask))
        out = self.after_conv2(out)
        out = self.conv3(out)
        out = self.after_conv3(out)
        out += self._shortcut(x)  # in place, as detectron2
        return F.relu_(out)


class ResNet(NormEvalMixin, _D2ResNet):
    """detectron2's :class:`ResNet` plus ``norm_eval``; freezing is detectron2's per-block freeze.

    Implements :class:`d2_backbones.families.FamilyBackbone`. ``freeze_at=k`` freezes the
    stem (k >= 1) and ``res2..res(k)``: their parameters get ``requires_grad=False`` and
    *only their* BatchNorms become ``FrozenBatchNorm2d``. ``norm_eval=True`` keeps the
    running statistics of every other BatchNorm fixed in train mode (affine parameters
    still learn). Use :func:`build_resnet` to construct one.
    """

    feature_names = RESNET_FEATURES
    conv_norm_pairs: Tuple[Tuple[str, str], ...] = ()  # every conv-norm pair is a detectron2 Conv2d(norm=...)

    def __init__(self, stem: nn.Module, stages: List[List[CNNBlockBase]], out_features: Sequence[str],
                 freeze_at: int = 0, norm_eval: bool = False, with_cp: bool = False, title: str = "ResNet"):
        super().__init__(stem, stages, num_classes=None, out_features=list(out_features), freeze_at=freeze_at)
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.freeze_at = freeze_at
        self._title = title
        self.train()

    def named_stages(self) -> List[Tuple[str, List[nn.Module]]]:
        """``[("stem", [stem]), ("res2", [res2]), ...]`` for the built stages."""
        return [("stem", [self.stem])] + [(n, [getattr(self, n)]) for n in self.stage_names]

    def describe(self) -> str:
        """The variant, e.g. ``"ResNet-50-V1d (style=pytorch)"``."""
        return self._title


def _check_choice(key, value, valid):
    if value not in valid:
        raise config_error(key, value, valid)


def _check_per_stage(key, values, ok, what):
    values = tuple(values)
    if len(values) != 4 or not all(ok(v) for v in values):
        raise config_error(key, list(values), problem=f"must be 4 {what}, one per stage res2..res5",
                           fix=f"set {key} to 4 {what}, e.g. {[1, 2, 2, 2] if 'stride' in key.lower() else [1, 1, 1, 1]}")
    return values


def _normalise_plugins(plugins, key) -> List[Dict]:
    out = []
    for i, p in enumerate(plugins or ()):
        if not isinstance(p, Mapping):
            raise config_error(f"{key}[{i}]", p, problem="must be a mapping",
                               fix="write each plugin as {TYPE: 'gc', POSITION: 'after_conv3', STAGES: [F, T, T, T]}")
        p = {str(k).lower(): v for k, v in p.items()}
        unknown = sorted(set(p) - set(_PLUGIN_FIELDS))
        if unknown:
            raise config_error(f"{key}[{i}]", unknown[0].upper(), [f.upper() for f in _PLUGIN_FIELDS], nearest=True,
                               problem="is not a plugin field", fix="remove or rename that field")
        kind = str(p.get("type", "")).lower()
        _check_choice(f"{key}[{i}].TYPE", kind, PLUGIN_TYPES)
        pos = str(p.get("position", "after_conv3")).lower()
        _check_choice(f"{key}[{i}].POSITION", pos, PLUGIN_POSITIONS)
        stages = _check_per_stage(f"{key}[{i}].STAGES", p.get("stages", (True,) * 4),
                                  lambda v: isinstance(v, bool), "booleans")
        ratio = float(p.get("ratio", 1.0 / 16))
        if not 0.0 < ratio <= 1.0:
            raise config_error(f"{key}[{i}].RATIO", ratio, problem="must be in (0, 1]", fix="use e.g. 0.0625 (1/16)")
        out.append({"type": kind, "position": pos, "stages": stages, "ratio": ratio})
    return out


def build_resnet(
    depth: int = 50,
    *,
    in_channels: int = 3,
    stem_channels: int = 64,
    res2_channels: Optional[int] = None,
    deep_stem: bool = False,
    avg_down: bool = False,
    stride_in_1x1: bool = False,
    num_groups: int = 1,
    width_per_group: int = 64,
    strides: Sequence[int] = (1, 2, 2, 2),
    dilations: Sequence[int] = (1, 1, 1, 1),
    norm: Union[str, callable] = "BN",
    out_features: Sequence[str] = RESNET_STAGE_NAMES,
    freeze_at: int = 0,
    norm_eval: bool = False,
    with_cp: bool = False,
    zero_init_residual: bool = False,
    deform_on_per_stage: Sequence[bool] = (False, False, False, False),
    deform_modulated: bool = False,
    deform_num_groups: int = 1,
    plugins: Sequence[Mapping] = (),
) -> ResNet:
    """Build a :class:`ResNet` from plain keyword arguments (no config needed).

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
        in_channels: input image channels.
        stem_channels: stem output channels (deep stem: the 3x3 convs use C/2, C/2, C).
        res2_channels: res2 output channels; default 64 (Basic) / 256 (Bottleneck), doubled per stage.
        deep_stem: three 3x3 convs instead of the 7x7 (ResNet-V1c).
        avg_down: average-pool before the strided 1x1 shortcut (ResNet-V1d with ``deep_stem``).
        stride_in_1x1: caffe/MSRA style (stride on the first 1x1) if True, pytorch style (3x3) if False.
        num_groups, width_per_group: ResNeXt cardinality and width (res2 bottleneck = groups * width).
        strides, dilations: per stage res2..res5 (first block's stride; every block's dilation).
        norm: any :func:`detectron2.layers.get_norm` name or a callable.
        out_features: subset of ``stem, res2..res5``; later stages are not built.
        freeze_at: 0 nothing, 1 stem, k stem + res2..res(k) (mmdet ``frozen_stages`` = freeze_at - 1).
        norm_eval: keep BatchNorm statistics fixed in train mode.
        with_cp: gradient checkpointing per block.
        zero_init_residual: zero the last norm's weight of every residual branch.
        deform_on_per_stage, deform_modulated, deform_num_groups: DCN (Bottleneck only).
        plugins: dicts ``{"type": "gc"|"se", "position": "after_conv1|2|3", "stages": [4 bools], "ratio": r}``.

    Returns:
        ResNet: a detectron2 ``Backbone`` whose ``output_shape()`` gives the exact channels and strides.
    """
    key = arg_key  # errors name the argument, or its config key inside errors.argument_keys
    if depth not in RESNET_DEPTHS:
        raise config_error(key("depth"), depth, list(RESNET_DEPTHS))
    check_bools(deep_stem=deep_stem, avg_down=avg_down, stride_in_1x1=stride_in_1x1, norm_eval=norm_eval,
                with_cp=with_cp, zero_init_residual=zero_init_residual, deform_modulated=deform_modulated)
    kind, blocks_per_stage = RESNET_DEPTHS[depth]
    out_features = check_out_features(out_features, RESNET_FEATURES, key("out_features"), "ResNet")
    strides = _check_per_stage(key("strides"), strides, lambda v: isinstance(v, int) and v >= 1, "positive ints")
    dilations = _check_per_stage(key("dilations"), dilations, lambda v: isinstance(v, int) and v >= 1,
                                 "positive ints")
    deform = _check_per_stage(key("deform_on_per_stage"), deform_on_per_stage, lambda v: isinstance(v, bool),
                              "booleans")
    plugins = _normalise_plugins(plugins, key("plugins"))
    num_built = max(RESNET_FEATURES.index(f) for f in out_features)
    check_freeze_at(freeze_at, num_built + 1, RESNET_FEATURES, key("freeze_at"), "ResNet")
    if res2_channels is None:
        res2_channels = 64 if kind == "basic" else 256
    norm = CheckedNorm(norm, key("norm"))

    if kind == "basic":
        if res2_channels != 64:
            raise config_error(key("res2_channels"), res2_channels, [64],
                               problem=f"must be 64 for ResNet-{depth} (BasicBlock)")
        if num_groups != 1:
            raise config_error(key("num_groups"), num_groups, [1], problem=f"must be 1 for ResNet-{depth}",
                               fix="use depth >= 50 for ResNeXt")
        if any(deform):
            raise config_error(key("deform_on_per_stage"), list(deform), [[False] * 4],
                               problem=f"asks for DCN, which needs Bottleneck blocks (depth >= 50), not ResNet-{depth}",
                               fix=f"set {key('deform_on_per_stage')} to [False, False, False, False] or use depth 50/101/152")
        for i, p in enumerate(plugins):
            if p["position"] == "after_conv3":
                raise config_error(f"{key('plugins')}[{i}].POSITION", "after_conv3",
                                   ["after_conv1", "after_conv2"],
                                   problem=f"does not exist in ResNet-{depth} (BasicBlock has two convs)")

    stem_cls = DeepStem if deep_stem else BasicStem
    stem = stem_cls(in_channels=in_channels, out_channels=stem_channels, norm=norm)

    stages = []
    in_ch, out_ch = stem_channels, res2_channels
    bottleneck = num_groups * width_per_group
    for idx, n in enumerate(blocks_per_stage[:num_built]):
        stage_plugins = [p for p in plugins if p["stages"][idx]]
        common = dict(norm=norm, dilation=dilations[idx], avg_down=avg_down, plugins=stage_plugins,
                      zero_init_residual=zero_init_residual, with_cp=with_cp)
        if kind == "basic":
            block_cls = ResNetBasicBlock
        else:
            common.update(bottleneck_channels=bottleneck, num_groups=num_groups, stride_in_1x1=stride_in_1x1)
            block_cls = ResNetBottleneckBlock
            if deform[idx]:
                block_cls = ResNetDeformBottleneckBlock
                common.update(deform_modulated=deform_modulated, deform_num_groups=deform_num_groups)
        stages.append(_D2ResNet.make_stage(block_cls, n, in_channels=in_ch, out_channels=out_ch,
                                           stride_per_block=[strides[idx]] + [1] * (n - 1), **common))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    name = f"ResNeXt-{depth}-{num_groups}x{width_per_group}d" if num_groups > 1 else f"ResNet-{depth}"
    variant = "-V1d" if deep_stem and avg_down else "-V1c" if deep_stem else ""
    title = f"{name}{variant} (style={'caffe' if stride_in_1x1 else 'pytorch'})"
    return ResNet(stem, stages, out_features=out_features, freeze_at=freeze_at, norm_eval=norm_eval,
                  with_cp=with_cp, title=title)


# ---------------------------------------------------------------------------------------------
# weights: explicit key maps from other ResNet checkpoint formats to ours (detectron2 names)
# ---------------------------------------------------------------------------------------------
# Pure ``dict -> (dict, dropped)`` functions; they never guess and never copy tensors. Used by
# the weights layer's format table (``d2_backbones.weights.formats``). Avg-down shortcuts are
# recognised per block: a block with ``downsample.2`` has the pool at index 0 (conv
# ``downsample.1``, norm ``downsample.2``); a block without it uses ``downsample.0/1``
# (MMDetection versions that skip the pool when the stride is 1). Weights converted from
# torchvision/timm expect ``MODEL.RESNETS.STRIDE_IN_1X1: False``, ``INPUT.FORMAT: RGB`` and the
# ImageNet mean/std.
_CLASSIFIER = re.compile(r"^(fc|head\.fc|classifier)\.")


def _layer_key(k: str, avg_down: bool) -> str:
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^(?:bn|gn)(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^conv2\.conv_offset\.", "conv2_offset.", rest)
    conv_i, norm_i = ("1", "2") if avg_down else ("0", "1")
    rest = re.sub(rf"^downsample\.{conv_i}\.", "shortcut.", rest)
    rest = re.sub(rf"^downsample\.{norm_i}\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def _convert(sd: Dict[str, torch.Tensor], stem_map: Dict[str, str]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    avg_blocks = {m.group(1) for m in (re.match(r"^(layer\d\.\d+)\.downsample\.2\.", k) for k in sd) if m}
    out, dropped = {}, []
    for k, v in sd.items():
        if _CLASSIFIER.match(k):
            dropped.append(k)
            continue
        if k.startswith("layer"):
            out[_layer_key(k, ".".join(k.split(".")[:2]) in avg_blocks)] = v
            continue
        for src, dst in stem_map.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise KeyError(f"Unmapped ResNet checkpoint key {k!r}: it is neither a stem, stage nor classifier key")
    return out, sorted(dropped)


def convert_torchvision_resnet(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """torchvision names -> detectron2 names (``conv1``->``stem.conv1``, ``layerN``->``res{N+1}``,
    ``bnK``->``convK.norm``, ``downsample.{0,1}``->``shortcut(.norm)``). Returns ``(state_dict, dropped_keys)``.

    Example::

        >>> import torchvision
        >>> sd, dropped = convert_torchvision_resnet(torchvision.models.resnet50().state_dict())
        >>> build_resnet(50, norm="BN").load_state_dict(sd)  # strict
        <All keys matched successfully>
        >>> dropped
        ['fc.bias', 'fc.weight']
    """
    return _convert(sd, {"conv1.": "stem.conv1.", "bn1.": "stem.conv1.norm."})


def convert_timm_resnet(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """timm ``resnet*``/``resnet*c``/``resnet*d`` -> detectron2 names with :class:`~.resnet.DeepStem`.

    Deep stem: ``conv1.0``->``stem.conv1``, ``conv1.1``->``stem.conv1.norm``, ``conv1.3``->``stem.conv2``,
    ``conv1.4``->``stem.conv2.norm``, ``conv1.6``->``stem.conv3``, ``bn1``->``stem.conv3.norm``;
    avg-down shortcuts ``downsample.1/2`` -> ``shortcut``/``shortcut.norm`` (index 0 is the pool).
    """
    if "conv1.0.weight" not in sd:
        return convert_torchvision_resnet(sd)
    stem = {"conv1.0.": "stem.conv1.", "conv1.1.": "stem.conv1.norm.", "conv1.3.": "stem.conv2.",
            "conv1.4.": "stem.conv2.norm.", "conv1.6.": "stem.conv3.", "bn1.": "stem.conv3.norm."}
    return _convert(sd, stem)


def convert_mmdet_resnet(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """open-mmlab/MMDetection ``ResNet`` (any ``style``, V1c/V1d, ResNeXt, GN, DCN) -> detectron2 names.

    Stem: ``conv1``/``bn1`` (or ``gn1``) -> ``stem.conv1(.norm)``; deep stem ``stem.0/1`` ->
    ``stem.conv1(.norm)``, ``stem.3/4`` -> ``stem.conv2(.norm)``, ``stem.6/7`` -> ``stem.conv3(.norm)``.
    Blocks: ``bnK``/``gnK`` -> ``convK.norm``; DCN ``conv2.conv_offset`` -> ``conv2_offset`` (the
    deformable weight stays ``conv2.weight``). The names do not say whether the weights are
    pytorch or caffe style: that is ``MODEL.RESNETS.STRIDE_IN_1X1`` and must be known separately.
    """
    if "stem.0.weight" in sd:
        stem = {"stem.0.": "stem.conv1.", "stem.1.": "stem.conv1.norm.", "stem.3.": "stem.conv2.",
                "stem.4.": "stem.conv2.norm.", "stem.6.": "stem.conv3.", "stem.7.": "stem.conv3.norm."}
    else:
        stem = {"conv1.": "stem.conv1.", "bn1.": "stem.conv1.norm.", "gn1.": "stem.conv1.norm."}
    return _convert(sd, stem)


# =============================================================================================
# the family: config section, builder arguments, weight formats and key maps, the record
# =============================================================================================
def add_resnet_config(_C: CN) -> None:
    """``MODEL.RESNETS`` keys beyond detectron2's (which stay as they are)."""
    _C.MODEL.RESNETS = CN()
    # Deep stem (ResNet-V1c): three 3x3 convs (STEM_OUT_CHANNELS/2 stride 2, /2, STEM_OUT_CHANNELS)
    # instead of the 7x7 conv. Options: True, False (MMDetection `deep_stem`).
    _C.MODEL.RESNETS.DEEP_STEM = False
    # Average-pool shortcuts (ResNet-V1d with DEEP_STEM): a strided shortcut becomes
    # AvgPool2d(s, s, ceil_mode=True) + 1x1 conv with stride 1. Options: True, False (mmdet `avg_down`).
    _C.MODEL.RESNETS.AVG_DOWN = False
    # Stride of the first block of res2..res5 (4 positive ints; mmdet `strides`).
    _C.MODEL.RESNETS.STAGE_STRIDES = [1, 2, 2, 2]
    # Dilation of the 3x3 convs of res2..res5 (4 positive ints; mmdet `dilations`). detectron2's
    # RES5_DILATION=2 is still honoured: it means STAGE_STRIDES[3]=1, STAGE_DILATIONS[3]=2.
    _C.MODEL.RESNETS.STAGE_DILATIONS = [1, 1, 1, 1]
    # MMDetection-style alias of MODEL.BACKBONE.FREEZE_AT: None = unset, -1 = nothing frozen,
    # 0 = stem, k = stem + res2..res(k+1)... i.e. FROZEN_STAGES k == FREEZE_AT k+1.
    # Setting both to disagreeing values is an error (FREEZE_AT left at detectron2's default 2
    # counts as unset).
    _C.MODEL.RESNETS.FROZEN_STAGES = None
    # Keep BatchNorm/SyncBN running statistics fixed while training (mmdet `norm_eval`); affine
    # parameters still learn unless their stage is frozen. Options: True, False.
    _C.MODEL.RESNETS.NORM_EVAL = False
    # Gradient checkpointing per residual block (mmdet `with_cp`): same outputs and gradients,
    # less activation memory, ~25-35% more compute per training step. Options: True, False.
    _C.MODEL.RESNETS.WITH_CP = False
    # Zero-initialise the last norm weight of every residual branch (mmdet `zero_init_residual`);
    # only matters when training without pretrained weights. Options: True, False.
    _C.MODEL.RESNETS.ZERO_INIT_RESIDUAL = False
    # Plugins inserted in the residual blocks (mmdet `plugins`). A list of mappings:
    #   {TYPE: "gc" (GCNet context block) | "se" (squeeze-excitation),
    #    POSITION: "after_conv1" | "after_conv2" | "after_conv3" (default),
    #    STAGES: [4 bools for res2..res5] (default all), RATIO: hidden/in channels (default 1/16)}
    _C.MODEL.RESNETS.PLUGINS = []


def resnet_strides_dilations(cfg: CN, kw: Dict) -> Dict:
    """detectron2's ``MODEL.RESNETS.RES5_DILATION`` on top of ``STAGE_STRIDES``/``STAGE_DILATIONS``."""
    strides, dilations = list(kw["strides"]), list(kw["dilations"])
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
    return {**kw, "strides": strides, "dilations": dilations}


_ARCH_RE = re.compile(r"^(R|X)-(\d+)(?:-(\d+)x(\d+)d)?(?:-V1([cd]))?$", re.IGNORECASE)


def _resnet_arch_name(v: Mapping) -> str:
    name = f"X-{v['depth']}-{v['num_groups']}x{v['width_per_group']}d" if v["num_groups"] > 1 else f"R-{v['depth']}"
    suffix = "-V1d" if v["deep_stem"] and v["avg_down"] else "-V1c" if v["deep_stem"] else ""
    return name + suffix


def _infer_resnet(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture of a detectron2-named ResNet state dict, from its key names and shapes."""
    blocks: Dict[int, int] = {}
    for k in sd:
        m = re.match(r"^res(\d)\.(\d+)\.", k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    counts = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
    kind = "bottleneck" if "res2.0.conv3.weight" in sd else "basic"
    depth = next((d for d, (kd, n) in RESNET_DEPTHS.items() if kd == kind and n == counts), None)
    if depth is None:
        raise ConvertError(f"the ResNet stages have {counts} {kind} blocks, which is no known depth "
                           f"({ {d: n for d, (_, n) in RESNET_DEPTHS.items()} }). Pass --arch if the file is "
                           f"truncated, or check the file.")
    deep_stem = "stem.conv3.weight" in sd
    stem_key = "stem.conv3.weight" if deep_stem else "stem.conv1.weight"
    v: Dict[str, Any] = dict(depth=depth, deep_stem=deep_stem, avg_down=False, num_groups=1, width_per_group=64,
                             stem_channels=int(sd[stem_key].shape[0]))
    if kind == "bottleneck":
        w = sd["res2.0.conv2.weight"]
        bottleneck = int(w.shape[0])
        groups = bottleneck // int(w.shape[1])
        v.update(num_groups=groups, width_per_group=bottleneck // groups,
                 res2_channels=int(sd["res2.0.conv3.weight"].shape[0]))
    v["norm"] = "GN" if ("stem.conv1.norm.weight" in sd and "stem.conv1.norm.running_mean" not in sd) else "BN"
    dcn = [any(k.startswith(f"res{s}.") and ".conv2_offset." in k for k in sd) for s in (2, 3, 4, 5)]
    v["deform_on_per_stage"] = dcn
    if any(dcn):
        ch = next(int(t.shape[0]) for k, t in sd.items() if k.endswith("conv2_offset.weight"))
        v["deform_modulated"] = ch % 27 == 0
        v["deform_num_groups"] = ch // 27 if ch % 27 == 0 else ch // 18
    return v


def _resnet_variant(src_sd, sd, arch: Optional[str]) -> Dict[str, Any]:
    v = _infer_resnet(sd)
    v["avg_down"] = any(re.match(r"^layer\d\.\d+\.downsample\.2\.", k) for k in src_sd)
    if arch:
        m = _ARCH_RE.match(arch)
        if not m:
            raise ConvertError(f"--arch {arch!r} is not a ResNet name; use e.g. R-50, R-101-V1d, X-101-32x8d, "
                               f"X-50-32x4d-V1c.")
        fam, depth, g, w, variant = m.groups()
        v.update(depth=int(depth), deep_stem=variant is not None, avg_down=(variant or "").lower() == "d",
                 num_groups=int(g) if fam.upper() == "X" else 1, width_per_group=int(w) if fam.upper() == "X" else 64,
                 stem_channels=64)
        v.pop("res2_channels", None)
        if int(depth) not in RESNET_DEPTHS:
            raise ConvertError(f"--arch {arch!r}: depth {depth} is not one of {list(RESNET_DEPTHS)}.")
    return v


def _resnet_model(v: Mapping) -> nn.Module:
    kw = {k: v[k] for k in ("depth", "deep_stem", "avg_down", "num_groups", "width_per_group", "stem_channels",
                            "norm", "deform_on_per_stage", "res2_channels", "deform_modulated", "deform_num_groups")
          if k in v}
    if RESNET_DEPTHS[v["depth"]][0] == "basic":
        kw.pop("res2_channels", None)
    try:
        return build_resnet(**kw)
    except ValueError as e:
        raise ConvertError(f"cannot build the architecture {_resnet_arch_name(v)}: {e}") from None


def _resnet_config(v: Mapping, stride_in_1x1: bool) -> Dict[str, Any]:
    cfg = {"MODEL.RESNETS.DEPTH": v["depth"], "MODEL.RESNETS.NUM_GROUPS": v["num_groups"],
           "MODEL.RESNETS.WIDTH_PER_GROUP": v["width_per_group"], "MODEL.RESNETS.DEEP_STEM": v["deep_stem"],
           "MODEL.RESNETS.AVG_DOWN": v["avg_down"], "MODEL.RESNETS.STRIDE_IN_1X1": stride_in_1x1,
           "MODEL.RESNETS.STEM_OUT_CHANNELS": v["stem_channels"],
           "MODEL.RESNETS.RES2_OUT_CHANNELS": v.get("res2_channels", 64 if v["depth"] < 50 else 256)}
    if v["norm"] == "GN":
        cfg["MODEL.RESNETS.NORM"] = "GN"
    if any(v["deform_on_per_stage"]):
        cfg["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] = list(v["deform_on_per_stage"])
        cfg["MODEL.RESNETS.DEFORM_MODULATED"] = v["deform_modulated"]
        cfg["MODEL.RESNETS.DEFORM_NUM_GROUPS"] = v["deform_num_groups"]
    return cfg


def _mmdet_style(extras: Mapping, style: Optional[str]) -> str:
    if style:
        return style
    meta = extras.get("meta")
    text = meta.get("config", "") if isinstance(meta, Mapping) else ""
    if isinstance(text, str) and re.search(r"style\s*=\s*['\"]caffe['\"]", text):
        return "caffe"
    return "pytorch"


def _convert_neck(neck: Mapping[str, torch.Tensor], bottom_up) -> Tuple[Dict[str, torch.Tensor], Dict, List[str]]:
    """MMDetection FPN neck -> detectron2 FPN names; returns (tensors, fpn config, unmapped keys)."""
    shapes = bottom_up.output_shape()
    by_channels = {s.channels: name for name, s in shapes.items() if name.startswith("res")}
    laterals: Dict[int, Dict] = {}
    outputs: Dict[int, Dict] = {}
    unmapped: List[str] = []
    for k, v in neck.items():
        m = re.match(r"^(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$", k)
        if not m:
            unmapped.append("neck." + k)
            continue
        (laterals if m.group(1) == "lateral_convs" else outputs).setdefault(int(m.group(2)), {})[m.group(3)] = v
    n = len(laterals)
    if n == 0:
        raise ConvertError("the neck has no lateral_convs.i.conv: not an MMDetection FPN neck.")
    in_features = []
    for i in range(n):
        feat = by_channels.get(int(laterals[i]["weight"].shape[1]))
        if feat is None:
            raise ConvertError(f"neck.lateral_convs.{i} takes {laterals[i]['weight'].shape[1]} channels, which no "
                               f"stage of the backbone produces ({ {s.channels: k for k, s in shapes.items()} }).")
        in_features.append(feat)
    out: Dict[str, torch.Tensor] = {}
    for i, feat in enumerate(in_features):
        s = feat[len("res"):]
        for part, t in laterals[i].items():
            out[f"backbone.fpn_lateral{s}.{part}"] = t
        for part, t in outputs.pop(i, {}).items():
            out[f"backbone.fpn_output{s}.{part}"] = t
    extra = [outputs[i] for i in sorted(outputs)]
    out_channels = int(laterals[0]["weight"].shape[0])
    fpn: Dict[str, Any] = {"MODEL.FPN.IN_FEATURES": in_features, "MODEL.FPN.OUT_CHANNELS": out_channels}
    if not extra:
        fpn["MODEL.FPN.TOP_BLOCK"] = "maxpool"
    else:
        if len(extra) > 2:
            raise ConvertError(f"the neck has {len(extra)} extra fpn_convs; detectron2's FPN top blocks make at most "
                               f"two (P6, P7).")
        src_ch = int(extra[0]["weight"].shape[1])
        fpn["MODEL.FPN.TOP_BLOCK"] = "p6p7" if len(extra) == 2 else "p6"
        fpn["MODEL.FPN.TOP_BLOCK_SOURCE"] = "on_output" if src_ch == out_channels else "on_input"
        fpn["MODEL.FPN.TOP_BLOCK_RELU"] = False  # MMDetection's default relu_before_extra_convs=False
        for name, conv in zip(("p6", "p7"), extra):
            for part, t in conv.items():
                out[f"backbone.top_block.{name}.{part}"] = t
    return out, fpn, unmapped


def _convert_resnet(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                    style: Optional[str]) -> Converted:
    dropped: List[str] = []
    neck: Dict[str, torch.Tensor] = {}
    if fmt == "mmdet-detector":
        style = _mmdet_style(extras, style)
        neck = {k[len("neck."):]: v for k, v in src.items() if k.startswith("neck.")}
        dropped = sorted(k for k in src if not k.startswith(("backbone.", "neck.")))
        src = {k[len("backbone."):]: v for k, v in src.items() if k.startswith("backbone.")}
    key_map = {"torchvision-resnet": convert_torchvision_resnet, "timm-resnet": convert_timm_resnet}.get(
        fmt, convert_mmdet_resnet)
    bare, _ = key_map(src)
    v = _resnet_variant(src, bare, arch)
    stride_in_1x1 = style == "caffe"
    model = _resnet_model(v)
    config = {**_resnet_config(v, stride_in_1x1), **(BGR_CAFFE if stride_in_1x1 else RGB_IMAGENET)}
    variant = {"arch": _resnet_arch_name(v), "style": "caffe" if stride_in_1x1 else "pytorch", **v}
    extra, reference, unmapped = {}, {}, []
    if fmt == "mmdet-detector":
        extra, fpn_cfg, unmapped = _convert_neck(neck, model)
        config.update(fpn_cfg)
        fpn = build_fpn(model, fpn_cfg["MODEL.FPN.IN_FEATURES"], fpn_cfg["MODEL.FPN.OUT_CHANNELS"],
                        top_block=fpn_cfg["MODEL.FPN.TOP_BLOCK"],
                        top_block_source=fpn_cfg.get("MODEL.FPN.TOP_BLOCK_SOURCE", "on_input"),
                        top_block_relu=fpn_cfg.get("MODEL.FPN.TOP_BLOCK_RELU", True))
        reference = {"backbone." + k: t for k, t in fpn.state_dict().items() if not k.startswith("bottom_up.")}
    return Converted(bare, model, config, variant, dropped, extra, reference, unmapped)


def _is_torchvision_resnet(sd) -> bool:
    return has_key(sd, r"^layer1\.0\.conv1\.weight$")


RESNET_FORMATS = (
    WeightFormat("mmdet-detector", "resnet", "MMDetection detector checkpoint (backbone + FPN neck; heads dropped)",
                 lambda sd: has_key(sd, r"^backbone\.") and has_key(sd, r"^(neck|rpn_head|roi_head|bbox_head)\."),
                 _convert_resnet),
    WeightFormat("timm-resnet", "resnet", "timm resnet*c / resnet*d (deep stem, avg-down)",
                 lambda sd: _is_torchvision_resnet(sd) and "conv1.0.weight" in sd, _convert_resnet),
    WeightFormat("mmdet-resnet", "resnet", "open-mmlab ResNet / V1c / V1d / ResNeXt, GN, DCN",
                 lambda sd: _is_torchvision_resnet(sd) and ("stem.0.weight" in sd or "gn1.weight" in sd or has_key(
                     sd, r"^layer\d\.\d+\.gn\d\.") or has_key(sd, r"\.conv2\.conv_offset\.")), _convert_resnet),
    WeightFormat("torchvision-resnet", "resnet", "torchvision resnet* / resnext* (and timm's plain resnet*)",
                 _is_torchvision_resnet, _convert_resnet),
)


def describe_resnet_weights(bare: Mapping[str, torch.Tensor]) -> Optional[Tuple[str, Dict]]:
    """``("a ResNet R-50 backbone", {"MODEL.RESNETS.DEPTH": 50})`` for tensors in our names; None if not a ResNet."""
    if not any(re.match(r"^res[2-5]\.\d+\.", k) for k in bare):
        return None
    v = _infer_resnet(bare)
    return f"a ResNet {_resnet_arch_name(v)} backbone", {"MODEL.RESNETS.DEPTH": v["depth"]}


_RESNET_VARIANTS: Dict[str, List] = {}
for _d in (18, 34, 50, 101, 152):
    _RESNET_VARIANTS[f"R-{_d}"] = ["MODEL.RESNETS.DEPTH", _d, "MODEL.RESNETS.RES2_OUT_CHANNELS",
                                   64 if _d < 50 else 256, "MODEL.RESNETS.STRIDE_IN_1X1", False]
_RESNET_VARIANTS["X-101-32x8d"] = ["MODEL.RESNETS.DEPTH", 101, "MODEL.RESNETS.NUM_GROUPS", 32,
                                   "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.STRIDE_IN_1X1", False]
_GC_SE = [dict(type="gc", position="after_conv3", stages=(False, True, True, True)),
          dict(type="se", position="after_conv2", stages=(True, False, False, False))]

RESNET_FAMILY = register_family(Family(
    name="resnet", build=build_resnet, config_node="MODEL.RESNETS", add_config_keys=add_resnet_config,
    arg_keys={
        "depth": "MODEL.RESNETS.DEPTH", "stem_channels": "MODEL.RESNETS.STEM_OUT_CHANNELS",
        "res2_channels": "MODEL.RESNETS.RES2_OUT_CHANNELS", "deep_stem": "MODEL.RESNETS.DEEP_STEM",
        "avg_down": "MODEL.RESNETS.AVG_DOWN", "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
        "num_groups": "MODEL.RESNETS.NUM_GROUPS", "width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
        "strides": "MODEL.RESNETS.STAGE_STRIDES", "dilations": "MODEL.RESNETS.STAGE_DILATIONS",
        "norm": "MODEL.RESNETS.NORM", "out_features": "MODEL.RESNETS.OUT_FEATURES", **BACKBONE_KEYS,
        "norm_eval": "MODEL.RESNETS.NORM_EVAL", "with_cp": "MODEL.RESNETS.WITH_CP",
        "zero_init_residual": "MODEL.RESNETS.ZERO_INIT_RESIDUAL",
        "deform_on_per_stage": "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        "deform_modulated": "MODEL.RESNETS.DEFORM_MODULATED",
        "deform_num_groups": "MODEL.RESNETS.DEFORM_NUM_GROUPS", "plugins": "MODEL.RESNETS.PLUGINS"},
    feature_names=RESNET_FEATURES, variants=_RESNET_VARIANTS, config_dir="ResNet",
    freeze_alias_key="MODEL.RESNETS.FROZEN_STAGES", extra_kwargs=resnet_strides_dilations,
    weight_formats=RESNET_FORMATS, describe_weights=describe_resnet_weights,
    optional_weights=(
        ("deformable-conv offsets (conv2_offset, zero-initialised)", re.compile(r"\.conv2_offset\.")),
        ("plugins (GC / SE blocks, after_convN)", re.compile(r"\.after_conv\d\."))),
    also_built_by=("build_resnet_backbone", "build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"),
    contract_variants={
        "R-18": dict(depth=18, res2_channels=64),
        "R-50-V1d-caffe": dict(depth=50, deep_stem=True, avg_down=True, stride_in_1x1=True),
        "R-50-DCNv2-GC-SE": dict(depth=50, deform_on_per_stage=[False, True, True, True], deform_modulated=True,
                                 plugins=_GC_SE, out_features=["stem", "res2", "res3", "res4"])},
    heavy_variants=("R-50-V1d-caffe", "R-50-DCNv2-GC-SE"),
))
