"""GhostNet (V1) as a detectron2 backbone: any width, any norm, end-of-resolution feature taps.

Paper: Kai Han, Yunhe Wang, Qi Tian, Jianyuan Guo, Chunjing Xu, Chang Xu,
"GhostNet: More Features from Cheap Operations", CVPR 2020 (arXiv:2001.06907).
References for the layer layout and parameter names: Huawei Noah's
``ghostnet_pytorch/ghostnet.py`` (Efficient-AI-Backbones) and timm's
``timm/models/ghostnet.py``; both build the same V1 network.

Design
------
* The block table :data:`GHOSTNET_V1` is data: one row ``(k, exp, out, se, stride)`` per
  Ghost bottleneck, grouped as the reference groups them into ``blocks.0`` ... ``blocks.8``;
  ``blocks.9`` is the final 1x1 conv + norm + ReLU to ``make_divisible(960 * width, 4)``.
* ``width`` is any positive float (0.5, 1.0 and 1.3 are the published variants). Every
  channel count is ``make_divisible(c * width, 4)``, the reference rounding, and the SE
  reduction is ``make_divisible(mid * 0.25, 4)`` with a hard-sigmoid gate, so parameter
  counts equal timm's ``ghostnet_050/100/130`` exactly.
* The norm is an argument threaded through every layer (stem, both ghost modules, the
  stride-2 depthwise conv, the shortcut, the final conv): ``"BN"``, ``"SyncBN"``,
  ``"FrozenBN"``, ``"naiveSyncBN"``, ``"LN"`` or a callable ``channels -> nn.Module``.
  ``"GN"`` (32 groups) fails with a clear error: GhostNet has 8/12/16/20/56-channel layers.
* Parameter names are timm's and Huawei's (``conv_stem``, ``bn1``,
  ``blocks.{s}.{j}.ghost1.primary_conv.{0,1}``, ``...cheap_operation.{0,1}``,
  ``conv_dw``/``bn_dw``, ``se.conv_reduce``/``se.conv_expand``, ``shortcut.{0,1,2,3}``,
  ``blocks.9.0.conv``/``blocks.9.0.bn1``), so their state dicts load by name after
  :func:`convert_ghostnet_state_dict` drops the classifier head and profiler counters.

Feature taps (end of each resolution)
-------------------------------------
A feature is taken after the *last* group at its stride, i.e. the most refined map of that
resolution (the convention of ResNet's ``res2..res5``):

==========  ======  =====================================  ====  =====  =====
name        stride  taken after                            x0.5  x1.0   x1.3
==========  ======  =====================================  ====  =====  =====
``stem``    2       ``blocks.0`` (stem conv + first block)  8     16     20
``stage2``  4       ``blocks.2``                           12    24     32
``stage3``  8       ``blocks.4``                           20    40     52
``stage4``  16      ``blocks.6``                           56    112    144
``stage5``  32      ``blocks.9`` (final 1x1 conv + ReLU)   480   960    1248
``stage5``  32      ``blocks.8`` with ``final_conv=False``  80    160    208
==========  ======  =====================================  ====  =====  =====

timm's ``features_only`` taps differ: it records the *first* (downsampling) group of each
stride (``blocks.1/3/5/7`` with 24/40/80/160 channels at x1.0, plus the stem conv before its
norm), because its feature list is appended whenever a group has stride 2. Those maps skip
the remaining blocks of the resolution - at stride 16 that is five bottlenecks, including
the two SE blocks that widen 80 to 112 channels.

Groups after the last requested feature are not built. Freezing follows
``MODEL.BACKBONE.FREEZE_AT``: 0 nothing, 1 the stem group (``conv_stem``, ``bn1``,
``blocks.0``), k the stem group and the first k-1 stages; only the norms of frozen groups
become ``FrozenBatchNorm2d``. Every strided layer rounds up, so a stride-``s`` feature has
``ceil(H / s) x ceil(W / s)`` pixels for any input.

Example::

    >>> model = GhostNet(1.0, norm="BN")
    >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 224, 200)).items()}
    {'stage2': (1, 24, 56, 50), 'stage3': (1, 40, 28, 25), 'stage4': (1, 112, 14, 13), 'stage5': (1, 960, 7, 7)}
    >>> GhostNet(1.3, out_features=["stage3", "stage4", "stage5"], final_conv=False).output_shape()["stage5"]
    ShapeSpec(channels=208, height=None, width=None, stride=32)
"""
import functools
import logging
import math
import numbers
import re
from collections import namedtuple
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.modeling.backbone import Backbone

from .families import BACKBONE_KEYS, Family, register_family
from .errors import arg_key, check_bools, check_freeze_at, check_out_features, config_error
from .layers import CheckedNorm, CheckpointMixin, ConvNormAct, NormEvalMixin, SqueezeExcite, freeze_module, \
    make_divisible
from .weights.formats import RGB_IMAGENET, ConvertError, Converted, WeightFormat, has_key

__all__ = [
    "GhostBlockSpec",
    "GHOSTNET_V1",
    "GHOSTNET_WIDTHS",
    "GHOSTNET_FEATURES",
    "GhostModule",
    "GhostBottleneck",
    "GhostNet",
    "convert_ghostnet_state_dict",
]

logger = logging.getLogger("d2_backbones")

GhostBlockSpec = namedtuple("GhostBlockSpec", ["k", "exp", "out", "se", "stride"])
GhostBlockSpec.__doc__ = """One Ghost bottleneck: depthwise kernel, expansion (mid) channels, output channels,
SE ratio (0 = no SE) and stride, all at width 1.0."""


def _rows(*rows) -> Tuple[GhostBlockSpec, ...]:
    return tuple(GhostBlockSpec(*r) for r in rows)


# GhostNet V1 (paper Table 1). Each inner tuple is one group `blocks.{s}` of the reference.
GHOSTNET_V1: Tuple[Tuple[GhostBlockSpec, ...], ...] = (
    # k, exp, out, se, stride
    _rows((3, 16, 16, 0.0, 1)),                 # blocks.0  stride 2
    _rows((3, 48, 24, 0.0, 2)),                 # blocks.1  stride 4
    _rows((3, 72, 24, 0.0, 1)),                 # blocks.2
    _rows((5, 72, 40, 0.25, 2)),                # blocks.3  stride 8
    _rows((5, 120, 40, 0.25, 1)),               # blocks.4
    _rows((3, 240, 80, 0.0, 2)),                # blocks.5  stride 16
    _rows((3, 200, 80, 0.0, 1),                 # blocks.6
          (3, 184, 80, 0.0, 1),
          (3, 184, 80, 0.0, 1),
          (3, 480, 112, 0.25, 1),
          (3, 672, 112, 0.25, 1)),
    _rows((5, 672, 160, 0.25, 2)),              # blocks.7  stride 32
    _rows((5, 960, 160, 0.0, 1),                # blocks.8
          (5, 960, 160, 0.25, 1),
          (5, 960, 160, 0.0, 1),
          (5, 960, 160, 0.25, 1)),
)
GHOSTNET_STEM_CHANNELS = 16
GHOSTNET_FINAL_CHANNELS = 960  # blocks.9: 1x1 conv to make_divisible(960 * width, 4)
# Widths with published ImageNet weights or timm definitions (any positive float builds).
GHOSTNET_WIDTHS = (0.5, 1.0, 1.3)
GHOSTNET_FEATURES = ("stem", "stage2", "stage3", "stage4", "stage5")
_SE_DIVISOR = 4
_CH_DIVISOR = 4


def _feature_name(stride: int) -> str:
    return "stem" if stride == 2 else f"stage{int(math.log2(stride))}"


class GhostModule(nn.Module):
    """Ghost module: a 1x1 ``primary_conv`` makes ``ceil(out / 2)`` maps, a depthwise 3x3
    ``cheap_operation`` makes as many more from them; both are concatenated and cut to ``out``.

    Each branch is conv -> norm (-> ReLU when ``relu``); children are named ``0, 1, 2`` as in
    the reference checkpoints (``primary_conv.0.weight``, ``primary_conv.1.running_mean``).

    Example::

        >>> GhostModule(16, 27, norm="BN")(torch.zeros(1, 16, 9, 9)).shape
        torch.Size([1, 27, 9, 9])
    """

    def __init__(self, in_channels: int, out_channels: int, *, relu: bool = True, norm="BN", ratio: int = 2,
                 dw_size: int = 3):
        super().__init__()
        self.out_channels = out_channels
        init = math.ceil(out_channels / ratio)
        act = functools.partial(nn.ReLU, inplace=True) if relu else None  # in place: no extra feature map
        names = ("0", "1", "2")
        self.primary_conv = ConvNormAct(in_channels, init, 1, norm=norm, activation=act, bias=False, names=names)
        self.cheap_operation = ConvNormAct(init, init * (ratio - 1), dw_size, groups=init, norm=norm,
                                           activation=act, bias=False, names=names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, : self.out_channels]


class GhostBottleneck(CheckpointMixin, nn.Module):
    """Ghost bottleneck: ``ghost1`` (ReLU) -> [stride 2: depthwise ``conv_dw`` + ``bn_dw``] -> [SE]
    -> ``ghost2`` (linear), plus the shortcut; no activation after the sum.

    The shortcut is the identity when ``in == out`` and stride 1, otherwise depthwise kxk
    (stride s) + norm + 1x1 conv + norm (``shortcut.0..3``). The SE has
    ``make_divisible(mid * se, 4)`` reduced channels and a hard-sigmoid gate.
    ``with_cp`` checkpoints the whole block (:class:`~d2_backbones.layers.CheckpointMixin`).
    """

    # forward applies bn_dw directly to conv_dw's output (used by d2_backbones.optimize_for_inference)
    conv_norm_pairs = (("conv_dw", "bn_dw"),)

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, se_ratio: float = 0.0, norm="BN", with_cp: bool = False):
        super().__init__()
        norm = CheckedNorm(norm)
        pad = (kernel_size - 1) // 2
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.ghost1 = GhostModule(in_channels, mid_channels, relu=True, norm=norm)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_channels, mid_channels, kernel_size, stride, pad, groups=mid_channels,
                                     bias=False)
            self.bn_dw = norm(mid_channels)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = None
        if se_ratio > 0:
            rd = make_divisible(mid_channels * se_ratio, _SE_DIVISOR)
            self.se = SqueezeExcite(mid_channels, rd, gate="hard_sigmoid")
        self.ghost2 = GhostModule(mid_channels, out_channels, relu=False, norm=norm)
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size, stride, pad, groups=in_channels, bias=False),
                norm(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                norm(out_channels),
            )
        self.with_cp = with_cp

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.conv_dw is not None:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        out = self.ghost2(out)
        # in place when nothing records the graph (inference): saves a feature-map allocation
        return out + self.shortcut(x) if torch.is_grad_enabled() else out.add_(self.shortcut(x))


def _check_width(width, key: str) -> float:
    ok = isinstance(width, numbers.Real) and not isinstance(width, bool) and math.isfinite(width) and width > 0
    if not ok:
        raise config_error(key, width, problem="must be a positive number (the channel multiplier)",
                           fix=f"set {key} to e.g. 0.5, 1.0 or 1.3 (the widths with ImageNet weights "
                               f"in timm: 1.0)")
    return float(width)


class GhostNet(NormEvalMixin, Backbone):
    """GhostNet V1 body (stem + ``blocks.0..9``) as a detectron2 :class:`Backbone`.

    Implements :class:`d2_backbones.families.FamilyBackbone`.

    Args:
        width: channel multiplier, any positive float (0.5 / 1.0 / 1.3 documented).
        in_channels: input image channels.
        norm: a :func:`detectron2.layers.get_norm` name or a callable ``channels -> nn.Module``,
            used for every norm layer.
        out_features: subset of ``stem, stage2, stage3, stage4, stage5`` (see the module
            docstring for taps and channels). Groups after the last one are not built.
        freeze_at: 0 nothing, 1 the stem group (``conv_stem``, ``bn1``, ``blocks.0``),
            k the stem group and the first k-1 stages (``stage2`` = ``blocks.1-2``, ...).
        norm_eval: keep BatchNorm statistics fixed in train mode (re-applied on ``.train()``).
        with_cp: gradient checkpointing per Ghost bottleneck.
        final_conv: take ``stage5`` after the final 1x1 conv ``blocks.9`` (960 ch at x1.0;
            default, as the reference network) or, if False, after ``blocks.8`` (160 ch at
            x1.0; ``blocks.9`` is then not built).
        spec: the block table (default :data:`GHOSTNET_V1`).
    """

    # Python-only helper property: keep TorchScript from compiling it (forward does not use it).
    __jit_unused_properties__ = ["stage_names"]

    # forward applies bn1 directly to conv_stem's output (used by d2_backbones.optimize_for_inference)
    conv_norm_pairs = (("conv_stem", "bn1"),)
    feature_names = GHOSTNET_FEATURES

    def __init__(
        self,
        width: float = 1.0,
        *,
        in_channels: int = 3,
        norm: Union[str, Callable] = "BN",
        out_features: Sequence[str] = ("stage2", "stage3", "stage4", "stage5"),
        freeze_at: int = 0,
        norm_eval: bool = False,
        with_cp: bool = False,
        final_conv: bool = True,
        spec: Sequence[Sequence[GhostBlockSpec]] = GHOSTNET_V1,
    ):
        super().__init__()
        key = arg_key  # errors name the argument, or its config key inside errors.argument_keys

        width = _check_width(width, key("width"))
        check_bools(norm_eval=norm_eval, with_cp=with_cp, final_conv=final_conv)
        if isinstance(norm, str) and norm == "":
            raise config_error(key("norm"), norm, ["BN", "SyncBN", "FrozenBN", "naiveSyncBN", "LN"],
                               problem="(no normalisation) is not supported by GhostNet: every conv of the "
                                       "reference network is followed by a norm and its weights need it")
        norm = CheckedNorm(norm, key("norm"))

        # Groups: (feature name, stride) per blocks.{s}; the final conv belongs to the last stride.
        groups: List[Tuple[str, int]] = []
        stride = 2
        for rows in spec:
            for r in rows:
                stride *= r.stride
            groups.append((_feature_name(stride), stride))
        groups.append((groups[-1][0], stride))  # blocks.9
        names = list(dict.fromkeys(n for n, _ in groups))

        out_features = check_out_features(out_features, names, key("out_features"), "GhostNet")
        last = max(names.index(f) for f in out_features)
        check_freeze_at(freeze_at, last + 1, names, key("freeze_at"), "GhostNet",
                        stem_note=": conv_stem, bn1, blocks.0")

        # Which groups to build and where each feature ends.
        ends: Dict[str, int] = {}
        for i, (n, _) in enumerate(groups):
            if i == len(groups) - 1 and not final_conv:
                continue
            ends[n] = i
        num_groups = ends[names[last]] + 1

        self.width = width
        self.final_conv = bool(final_conv)
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)
        self.freeze_at = freeze_at
        stem_ch = make_divisible(GHOSTNET_STEM_CHANNELS * width, _CH_DIVISOR)
        self.conv_stem = nn.Conv2d(in_channels, stem_ch, 3, 2, 1, bias=False)
        self.bn1 = norm(stem_ch)
        self.act1 = nn.ReLU()

        blocks: List[nn.Module] = []
        channels = [stem_ch]
        prev = stem_ch
        for rows in spec[:num_groups]:
            layers = []
            for r in rows:
                out = make_divisible(r.out * width, _CH_DIVISOR)
                mid = make_divisible(r.exp * width, _CH_DIVISOR)
                layers.append(GhostBottleneck(prev, mid, out, kernel_size=r.k, stride=r.stride, se_ratio=r.se,
                                              norm=norm, with_cp=with_cp))
                prev = out
            blocks.append(nn.Sequential(*layers))
            channels.append(prev)
        if num_groups > len(spec):
            final = make_divisible(GHOSTNET_FINAL_CHANNELS * width, _CH_DIVISOR)
            blocks.append(nn.Sequential(ConvNormAct(prev, final, 1, norm=norm, activation=nn.ReLU, bias=False,
                                                    names=("conv", "bn1", "act1"))))
            channels.append(final)
        self.blocks = nn.Sequential(*blocks)

        # Stage groups by block index, for freezing; taps by block index.
        self._names = names
        self._group_stage = [names.index(n) for n, _ in groups[:num_groups]]
        self._taps = {ends[f]: f for f in out_features}
        self._out_features = [f for f in names if f in out_features]
        self._out_feature_channels = {f: channels[ends[f] + 1] for f in self._out_features}
        self._out_feature_strides = {f: groups[ends[f]][1] for f in self._out_features}

        self.freeze(freeze_at)
        self.train()

    def freeze(self, freeze_at: int = 0) -> "GhostNet":
        """Freeze the stem group (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages; only their
        norms become FrozenBN."""
        if freeze_at >= 1:
            freeze_module(self.conv_stem)
            self.bn1 = freeze_module(self.bn1)
        for i, stage in enumerate(self._group_stage):
            if stage < freeze_at:
                self.blocks[i] = freeze_module(self.blocks[i])
        return self

    @property
    def stage_names(self) -> List[str]:
        """The built stages after the stem, in network order (``stage2``, ...)."""
        return [n for n in dict.fromkeys(self._names[s] for s in self._group_stage) if n != "stem"]

    def named_stages(self) -> List[Tuple[str, List[nn.Module]]]:
        """``[("stem", [conv_stem, bn1, blocks.0]), ("stage2", [blocks.1, blocks.2]), ...]``."""
        stages: Dict[str, List[nn.Module]] = {"stem": [self.conv_stem, self.bn1]}
        for i, s in enumerate(self._group_stage):
            stages.setdefault(self._names[s], []).append(self.blocks[i])
        return list(stages.items())

    def describe(self) -> str:
        """The variant, e.g. ``"GhostNet-1x"``."""
        return f"GhostNet-{self.width:g}x" + ("" if self.final_conv else " (stage5 before the final conv)")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"GhostNet takes an (N, C, H, W) tensor, got shape {x.shape}")
        outputs: Dict[str, torch.Tensor] = {}
        x = self.act1(self.bn1(self.conv_stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x)
            name = self._taps.get(i)
            if name is not None:
                outputs[name] = x
        return outputs


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
_HEAD = re.compile(r"^(conv_head|classifier|act2|global_pool)\.")
_PROFILER = ("total_ops", "total_params")
_WRAPPERS = ("state_dict", "model", "state_dict_ema")


def convert_ghostnet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: Optional[GhostNet] = None,
    prefix: str = "",
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Turn a timm ``ghostnet_*`` or Huawei ``ghostnet_pytorch`` state dict into ours.

    Names are already ours, so nothing is renamed; the function only *drops*, and returns
    what it dropped (sorted):

    * the classification head: ``conv_head.*``, ``classifier.*``;
    * profiler counters left by ``thop`` (``*.total_ops``, ``*.total_params``, as in
      Huawei's checkpoints);
    * BatchNorm ``num_batches_tracked`` counters (PyTorch BatchNorm refills them on load,
      ``FrozenBatchNorm2d`` has none; with momentum they affect nothing);
    * with ``model``: keys of groups the model did not build (e.g. ``blocks.7-9`` when
      ``stage4`` is the last output, ``blocks.9`` with ``final_conv=False``).

    A ``{"state_dict": ...}``/``{"model": ...}`` wrapper and a ``module.`` prefix
    (DataParallel) are removed. With ``model``, a checkpoint of another width is refused
    with an error naming both widths. ``prefix`` is prepended to every key, e.g.
    ``"backbone.bottom_up."`` to write a file for ``MODEL.WEIGHTS``.

    Example::

        >>> import timm
        >>> sd = timm.create_model("ghostnet_100").state_dict()
        >>> ours, dropped = convert_ghostnet_state_dict(sd)
        >>> GhostNet(1.0, norm="BN").load_state_dict(ours)  # strict
        <All keys matched successfully>
        >>> [k for k in dropped if "num_batches" not in k]
        ['classifier.bias', 'classifier.weight', 'conv_head.bias', 'conv_head.weight']
    """
    sd: Mapping = state_dict
    for wrapper in _WRAPPERS:
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}

    built = None
    if model is not None:
        built = len(model.blocks)
        stem = sd.get("conv_stem.weight")
        if stem is not None and stem.shape != model.conv_stem.weight.shape:
            ckpt_w = {make_divisible(GHOSTNET_STEM_CHANNELS * w, _CH_DIVISOR): w for w in GHOSTNET_WIDTHS}
            guess = ckpt_w.get(stem.shape[0])
            raise config_error(
                "width", model.width,
                problem=(f"does not match the checkpoint: its conv_stem has {stem.shape[0]} output channels"
                         + (f" (width {guess})" if guess else "")
                         + f", the model's has {model.conv_stem.weight.shape[0]}"),
                fix="build the model with the checkpoint's width (MODEL.GHOSTNET.WIDTH) or use weights of this width")

    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for name, value in sd.items():
        last = name.rsplit(".", 1)[-1]
        drop = bool(_HEAD.match(name)) or last in _PROFILER or last == "num_batches_tracked"
        if not drop and built is not None:
            m = re.match(r"^blocks\.(\d+)\.", name)
            drop = m is not None and int(m.group(1)) >= built
        if drop:
            dropped.append(name)
        else:
            out[prefix + name] = value
    dropped.sort()
    n_head = sum(bool(_HEAD.match(d)) for d in dropped)
    n_prof = sum(d.rsplit(".", 1)[-1] in _PROFILER for d in dropped)
    n_nbt = sum(d.endswith("num_batches_tracked") for d in dropped)
    logger.info(f"convert_ghostnet_state_dict: kept {len(out)} keys, dropped {len(dropped)} ({n_head} head, "
                f"{n_prof} profiler, {n_nbt} num_batches_tracked, {len(dropped) - n_head - n_prof - n_nbt} "
                f"of groups not built)")
    return out, dropped


# =============================================================================================
# the family: config section, builder arguments, weight formats and key maps, the record
# =============================================================================================
def add_ghostnet_config(_C: CN) -> None:
    """``MODEL.GHOSTNET`` keys."""
    _C.MODEL.GHOSTNET = CN()
    # Channel multiplier: any positive float. 0.5, 1.0, 1.3 are timm's ghostnet_050/100/130;
    # ImageNet weights exist for 1.0 only (timm ghostnet_100.in1k; Huawei's state_dict_73.98.pth).
    _C.MODEL.GHOSTNET.WIDTH = 1.0
    # Features to return, each taken at the end of its resolution: "stem" (stride 2, after
    # blocks.0), "stage2" (4, after blocks.2), "stage3" (8, after blocks.4), "stage4" (16, after
    # blocks.6), "stage5" (32, after blocks.9 or blocks.8, see FINAL_CONV). Later groups are not built.
    _C.MODEL.GHOSTNET.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    # Norm of every layer: "FrozenBN" (detectron2's default for pretrained backbones), "BN",
    # "SyncBN", "naiveSyncBN", "nnSyncBN", "LN". "GN" fails: GhostNet has 8..56-channel layers
    # that 32 groups do not divide.
    _C.MODEL.GHOSTNET.NORM = "FrozenBN"
    # Keep BatchNorm/SyncBN running statistics fixed while training (mmdet `norm_eval`); affine
    # parameters still learn unless their stage is frozen. Options: True, False.
    _C.MODEL.GHOSTNET.NORM_EVAL = False
    # Gradient checkpointing per Ghost bottleneck: same outputs and gradients, less activation
    # memory, more compute per training step. Options: True, False.
    _C.MODEL.GHOSTNET.WITH_CP = False
    # Where "stage5" is taken. True: after the final 1x1 conv + norm + ReLU (blocks.9; 960
    # channels at width 1.0, as the reference network). False: before it (after blocks.8; 160
    # channels at width 1.0) and blocks.9 is not built.
    _C.MODEL.GHOSTNET.FINAL_CONV = True


_GHOST_ARCH = {"ghostnet_050": 0.5, "ghostnet_100": 1.0, "ghostnet_130": 1.3}


def _infer_ghostnet(sd: Mapping[str, torch.Tensor], arch: Optional[str]) -> float:
    if arch:
        if arch in _GHOST_ARCH:
            return _GHOST_ARCH[arch]
        try:
            return float(arch)
        except ValueError:
            raise ConvertError(f"--arch {arch!r} is not a GhostNet width; use one of {list(_GHOST_ARCH)} or a "
                               f"number such as 1.3.") from None
    stem = int(sd["conv_stem.weight"].shape[0])
    widths = {make_divisible(GHOSTNET_STEM_CHANNELS * w, 4): w for w in GHOSTNET_WIDTHS}
    if stem not in widths:
        raise ConvertError(f"conv_stem has {stem} output channels, which matches no known GhostNet width "
                           f"({ {c: w for c, w in widths.items()} }); pass --arch WIDTH.")
    return widths[stem]


def _convert_ghostnet(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                      style: Optional[str]) -> Converted:
    width = _infer_ghostnet(src, arch)
    final_conv = any(k.startswith("blocks.9.") for k in src)
    try:
        model = GhostNet(width, norm="BN", final_conv=final_conv,
                         out_features=["stem", "stage2", "stage3", "stage4", "stage5"])
    except ValueError as e:
        raise ConvertError(f"cannot build GhostNet width {width}: {e}") from None
    bare, dropped = convert_ghostnet_state_dict(src)
    config = {"MODEL.GHOSTNET.WIDTH": width, "MODEL.GHOSTNET.FINAL_CONV": final_conv, **RGB_IMAGENET}
    variant = {"arch": f"ghostnet width {width:g}", "width": width, "final_conv": final_conv}
    return Converted(bare, model, config, variant, dropped, {}, {}, [])


def _is_ghostnet(sd) -> bool:
    return "conv_stem.weight" in sd and has_key(sd, r"^blocks\.\d+\.\d+\.ghost1\.")


def describe_ghostnet_weights(bare: Mapping[str, torch.Tensor]) -> Optional[Tuple[str, Dict]]:
    """``("a GhostNet width 1 backbone", {"MODEL.GHOSTNET.WIDTH": 1.0})``; None if not a GhostNet."""
    if not _is_ghostnet(bare):
        return None
    width = _infer_ghostnet(bare, None)
    return f"a GhostNet width {width:g} backbone", {"MODEL.GHOSTNET.WIDTH": width}


GHOSTNET_FAMILY = register_family(Family(
    name="ghostnet", build=GhostNet, config_node="MODEL.GHOSTNET", add_config_keys=add_ghostnet_config,
    arg_keys={
        "width": "MODEL.GHOSTNET.WIDTH", "norm": "MODEL.GHOSTNET.NORM",
        "out_features": "MODEL.GHOSTNET.OUT_FEATURES", **BACKBONE_KEYS, "norm_eval": "MODEL.GHOSTNET.NORM_EVAL",
        "with_cp": "MODEL.GHOSTNET.WITH_CP", "final_conv": "MODEL.GHOSTNET.FINAL_CONV"},
    feature_names=GHOSTNET_FEATURES, config_dir="GhostNet",
    variants={f"GhostNet-{w}": ["MODEL.GHOSTNET.WIDTH", w] for w in (0.5, 1.0, 1.3)},
    weight_formats=(WeightFormat("ghostnet", "ghostnet", "timm ghostnet_* / Huawei ghostnet_pytorch", _is_ghostnet,
                                 _convert_ghostnet),),
    describe_weights=describe_ghostnet_weights,
    contract_variants={"GhostNet-0.5": dict(width=0.5),
                       "GhostNet-1.3-no-final-conv": dict(width=1.3, final_conv=False)},
    heavy_variants=("GhostNet-1.3-no-final-conv",),
))
