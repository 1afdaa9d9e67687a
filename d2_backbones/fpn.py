"""FPN with a configurable top block, shared by every family.

There is no FPN class here: :func:`build_fpn` validates the feature graph and returns
detectron2's own :class:`detectron2.modeling.backbone.FPN`. Only the top block varies:

==========  ==========================================================================
top_block   extra levels
==========  ==========================================================================
maxpool     P6 = max_pool(k=1, s=2) of the top FPN output (detectron2 ``LastLevelMaxPool``;
            MMDetection ``add_extra_convs=False``) - Faster/Mask R-CNN. ``top_block_levels``
            > 1 adds P7, ... each pooled from the previous (:class:`LastLevelMaxPools`):
            MMDetection's ``num_outs = len(in_features) + top_block_levels``
p6p7        P6 = conv3x3/s2(source), P7 = conv3x3/s2([ReLU](P6)) - RetinaNet, FCOS
p6          P6 = conv3x3/s2(source) only
none        no extra level
==========  ==========================================================================

``top_block_source`` (MMDetection's ``add_extra_convs`` values) picks the input of the
P6 conv: ``on_input`` the backbone's last FPN input feature (C5; detectron2's
RetinaNet), ``on_lateral`` the last lateral conv's output, ``on_output`` the top FPN
output (P5; centermask2/FCOS). ``top_block_relu`` puts a ReLU between P6 and P7
(detectron2 always does; MMDetection's RetinaNet configs do not). With ``p6p7`` + ReLU
the block is detectron2's ``LastLevelP6P7`` itself (keys ``top_block.p6/p7``).

The FPN's ``size_divisibility`` is the largest input-feature stride (32 for C2-C5):
inputs are padded to it, so every output ``pK`` has exactly ``ceil(H / 2**K)`` rows.

Example::

    >>> from d2_backbones import build_resnet
    >>> fpn = build_fpn(build_resnet(18, norm="BN"), ["res3", "res4", "res5"], 128, top_block="p6p7")
    >>> {k: tuple(v.shape) for k, v in fpn(torch.zeros(1, 3, 128, 96)).items()}
    {'p3': (1, 128, 16, 12), 'p4': (1, 128, 8, 6), 'p5': (1, 128, 4, 3), 'p6': (1, 128, 2, 2), 'p7': (1, 128, 1, 1)}
"""
import math
from typing import Mapping, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from .errors import arg_key, config_error
from .layers import CheckedNorm

__all__ = ["TOP_BLOCKS", "TOP_BLOCK_SOURCES", "LastLevelP6", "ExtraConvLevels", "LastLevelMaxPools",
           "build_top_block", "build_fpn", "describe_features"]

TOP_BLOCKS = ("maxpool", "p6p7", "p6", "none")
TOP_BLOCK_SOURCES = ("on_input", "on_lateral", "on_output")
FUSE_TYPES = ("sum", "avg")


class ExtraConvLevels(nn.Module):
    """P6 (and optionally P7) by 3x3 stride-2 convs, for the cases detectron2's blocks do not cover.

    Args:
        in_channels: channels of the source feature.
        out_channels: FPN channels.
        num_levels: 1 (P6) or 2 (P6, P7).
        in_feature: name of the source feature (backbone or FPN output).
        relu_between: ReLU on P6 before the P7 conv.
        lateral_source: for ``on_lateral``: the source goes through the FPN's top lateral conv
            first; call :meth:`attach_lateral` once the FPN exists.
    """

    def __init__(self, in_channels: int, out_channels: int, num_levels: int, in_feature: str,
                 relu_between: bool = True, lateral_source: bool = False):
        super().__init__()
        self.num_levels = num_levels
        self.in_feature = in_feature
        self.relu_between = relu_between
        self.lateral_source = lateral_source
        self._lateral = ()  # a tuple, so the FPN's lateral conv is referenced, not registered twice
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1) if num_levels == 2 else None
        if self.p7 is not None:
            weight_init.c2_xavier_fill(self.p7)

    @torch.jit.unused
    def _apply_lateral(self, x: torch.Tensor) -> torch.Tensor:
        # not scriptable (a referenced module); tracing and eager are fine
        if not self._lateral:
            raise RuntimeError("ExtraConvLevels(lateral_source=True) needs attach_lateral(fpn_lateral_conv)")
        return self._lateral[0](x)

    def attach_lateral(self, conv: nn.Module) -> None:
        """Use the FPN's top lateral conv (its weights stay under ``fpn_lateralN``)."""
        self._lateral = (conv,)

    def forward(self, x: torch.Tensor):
        if self.lateral_source:
            x = self._apply_lateral(x)
        p6 = self.p6(x)
        if self.p7 is None:
            return [p6]
        return [p6, self.p7(F.relu(p6) if self.relu_between else p6)]


LastLevelP6 = ExtraConvLevels  # P6-only is ExtraConvLevels(num_levels=1)


class LastLevelMaxPools(nn.Module):
    """``num_levels`` extra levels, each ``max_pool2d(kernel 1, stride 2)`` of the previous one.

    MMDetection's FPN with ``add_extra_convs=False`` and ``num_outs`` above the number of used
    levels (e.g. P3-P7 from C3-C5: two pooled levels). ``num_levels=1`` computes exactly
    detectron2's ``LastLevelMaxPool`` (which :func:`build_top_block` uses then).
    """

    def __init__(self, num_levels: int, in_feature: str = "p5"):
        super().__init__()
        self.num_levels = num_levels
        self.in_feature = in_feature

    def forward(self, x: torch.Tensor):
        outs = []
        for _ in range(self.num_levels):
            x = F.max_pool2d(x, kernel_size=1, stride=2, padding=0)
            outs.append(x)
        return outs


def build_top_block(kind: str, *, in_channels: int, out_channels: int, in_feature: str,
                    relu: bool = True, lateral_source: bool = False, levels: int = 1, key: str = "top_block"):
    """Return the top-block module for ``kind`` (see the module docstring), or ``None``."""
    if kind == "none":
        return None
    if kind == "maxpool":
        if levels > 1:
            return LastLevelMaxPools(levels, in_feature)
        block = LastLevelMaxPool()
        block.in_feature = in_feature
        return block
    if kind == "p6p7" and relu and not lateral_source:
        return LastLevelP6P7(in_channels, out_channels, in_feature=in_feature)
    if kind in ("p6p7", "p6"):
        return ExtraConvLevels(in_channels, out_channels, 2 if kind == "p6p7" else 1, in_feature,
                               relu_between=relu, lateral_source=lateral_source)
    raise config_error(key, kind, TOP_BLOCKS, nearest=True)


def describe_features(shapes: Mapping) -> str:
    """``'res2 (stride 4, 256 ch), res3 (stride 8, 512 ch)'`` for a backbone's ``output_shape()``."""
    return ", ".join(f"{k} (stride {v.stride}, {v.channels} ch)" for k, v in shapes.items())


def build_fpn(
    bottom_up: Backbone,
    in_features: Sequence[str],
    out_channels: int = 256,
    *,
    norm: str = "",
    fuse_type: str = "sum",
    top_block: str = "maxpool",
    top_block_source: str = "on_input",
    top_block_relu: bool = True,
    top_block_levels: int = 1,
) -> FPN:
    """Validate the feature graph and build detectron2's :class:`FPN` on ``bottom_up``.

    Args:
        bottom_up: any detectron2 ``Backbone`` (its ``output_shape()`` is the source of truth).
        in_features: a contiguous run of its features, high to low resolution
            (MMDetection's start/end level), strides doubling.
        out_channels: FPN channels ("FPNLite" = 128).
        norm: FPN norm ("" = none, with conv bias), as detectron2's ``MODEL.FPN.NORM``.
        fuse_type: "sum" or "avg".
        top_block, top_block_source, top_block_relu: see the module docstring.
        top_block_levels: extra max-pool levels of ``top_block="maxpool"`` (1 = P6 only).
    """
    key = arg_key  # errors name the argument, or its config key inside errors.argument_keys

    shapes = bottom_up.output_shape()
    in_features = list(in_features)
    if not in_features:
        raise config_error(key("in_features"), in_features, list(shapes), problem="is empty",
                           fix=f"list the backbone features to use, e.g. {list(shapes)}")
    possible = list(getattr(bottom_up, "feature_names", ()))
    for f in in_features:
        if f not in shapes:
            if f in possible:
                hint = f"; or add {f!r} to {key('backbone_out_features')}"
            elif possible:
                hint = f"; {f!r} is no feature of this backbone, whose features are {', '.join(possible)}"
            else:
                hint = ""
            raise config_error(
                key("in_features"), in_features, problem=f"contains {f!r}, which the backbone does not produce",
                fix=f"use features the backbone produces: {describe_features(shapes)}{hint}")
    strides = [shapes[f].stride for f in in_features]
    for (fa, sa), (fb, sb) in zip(zip(in_features, strides), zip(in_features[1:], strides[1:])):
        if sb != 2 * sa:
            raise config_error(
                key("in_features"), in_features,
                problem=(f"needs strides that double from one feature to the next, but {fa} has stride {sa} "
                         f"and {fb} has stride {sb}"),
                fix=("order the features from high to low resolution, drop a dilated (stride-1) stage from the "
                     f"FPN, or change the backbone strides. Backbone features: {describe_features(shapes)}"))
    if fuse_type not in FUSE_TYPES:
        raise config_error(key("fuse_type"), fuse_type, FUSE_TYPES)
    if not isinstance(out_channels, int) or out_channels <= 0:
        raise config_error(key("out_channels"), out_channels, problem="must be a positive int", fix="use e.g. 256")
    if top_block not in TOP_BLOCKS:
        raise config_error(key("top_block"), top_block, TOP_BLOCKS, nearest=True)
    if isinstance(top_block_levels, bool) or not isinstance(top_block_levels, int) or top_block_levels < 1:
        raise config_error(key("top_block_levels"), top_block_levels, problem="must be an int >= 1",
                           fix="use 1 (P6) or more extra max-pool levels")
    if top_block_levels != 1 and top_block != "maxpool":
        raise config_error(key("top_block_levels"), top_block_levels,
                           problem=f"applies to top block 'maxpool' only, not {top_block!r}",
                           fix=f"leave {key('top_block_levels')} at 1 with {key('top_block')}={top_block!r}")
    if top_block_source not in TOP_BLOCK_SOURCES:
        raise config_error(key("top_block_source"), top_block_source, TOP_BLOCK_SOURCES, nearest=True)
    if isinstance(norm, str):
        CheckedNorm(norm, key("norm"))(out_channels)  # validates the name and GN divisibility

    top_name = f"p{int(math.log2(strides[-1]))}"
    last_in = in_features[-1]
    if top_block in ("maxpool",) or top_block_source == "on_output":
        src, src_ch = top_name, out_channels
    else:  # on_input / on_lateral read the backbone's last input feature
        src, src_ch = last_in, shapes[last_in].channels
    on_lateral = top_block_source == "on_lateral" and top_block in ("p6", "p6p7")
    block = build_top_block(top_block, in_channels=out_channels if on_lateral else src_ch,
                            out_channels=out_channels, in_feature=src, relu=top_block_relu,
                            lateral_source=on_lateral, levels=top_block_levels, key=key("top_block"))
    fpn = FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels, norm=norm,
              top_block=block, fuse_type=fuse_type)
    if on_lateral:
        block.attach_lateral(fpn.lateral_convs[0])  # the top lateral (lateral_convs is top-down ordered)
    return fpn
