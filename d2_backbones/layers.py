"""Reusable building blocks shared by the ResNet, VoVNet and GhostNet families.

Nothing in this module reads a config or keeps module-level state: every piece
takes plain keyword arguments. Normalisation layers are always created through
detectron2's :func:`detectron2.layers.get_norm` (wrapped by :class:`CheckedNorm`
for clear errors), freezing reuses :class:`detectron2.layers.CNNBlockBase` /
:class:`detectron2.layers.FrozenBatchNorm2d`.

Contents:

* :func:`make_divisible` - channel rounding used by GhostNet (timm/Huawei rule).
* :class:`CheckedNorm` - a ``get_norm`` factory that validates the norm name and
  GroupNorm divisibility and names the offending config key.
* :class:`ConvNormAct` - conv -> norm -> activation as an ``nn.Sequential`` whose
  child names are chosen by the caller (so each family keeps the parameter names
  of its published checkpoints).
* :class:`EffectiveSE` (VoVNetV2 eSE), :class:`SqueezeExcite` (GhostNet SE and the
  ResNet SE plugin), :class:`ContextBlock` (GCNet plugin).
* :class:`CheckpointMixin` - ``with_cp`` gradient checkpointing for any block.
* :func:`reduced_precision`, :func:`deform_conv2d_fp32` - mixed precision: the SE/eSE gates
  and the deformable convs compute in float32 under autocast (fp16/bf16) or in half models.
* :func:`set_bn_eval`, :class:`NormEvalMixin` - ``norm_eval`` semantics.
* :func:`freeze_module` - per-module freezing for stems that are not blocks.
"""
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from detectron2.layers import FrozenBatchNorm2d, get_norm

from .errors import config_error

__all__ = [
    "KNOWN_NORMS",
    "make_divisible",
    "CheckedNorm",
    "ConvNormAct",
    "EffectiveSE",
    "SqueezeExcite",
    "ContextBlock",
    "CheckpointMixin",
    "checkpoint_keep_bn_stats",
    "NormEvalMixin",
    "set_bn_eval",
    "split_offset_mask",
    "reduced_precision",
    "deform_conv2d_fp32",
    "freeze_module",
    "count_params",
]

# The strings detectron2's get_norm accepts (besides a callable).
KNOWN_NORMS = ("", "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
_GN_GROUPS = 32  # detectron2's "GN" is GroupNorm(32, C)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going below ``round_limit * v``.

    This is the rounding of the GhostNet/MobileNet reference code: ``max(min_value,
    int(v + divisor / 2) // divisor * divisor)``, bumped up by one ``divisor`` when
    the result lost more than 10%.

    Example::

        >>> make_divisible(16 * 0.5, 4), make_divisible(960 * 1.3, 4), make_divisible(72 * 0.25, 4)
        (8, 1248, 20)
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class CheckedNorm:
    """A norm factory ``channels -> nn.Module`` with errors that name the config key.

    It accepts everything :func:`detectron2.layers.get_norm` accepts (``KNOWN_NORMS``
    or a callable) and can be passed wherever detectron2 expects ``norm=``.

    Example::

        >>> norm = CheckedNorm("GN", key="MODEL.GHOSTNET.NORM")
        >>> type(norm(64)).__name__, norm(64).num_groups
        ('GroupNorm', 32)
        >>> norm(12)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        d2_backbones.errors.ConfigError: MODEL.GHOSTNET.NORM='GN' uses GroupNorm with 32 groups, which does not divide a 12-channel layer ...
    """

    def __init__(self, norm: Union[str, Callable, "CheckedNorm"], key: str = "norm"):
        if isinstance(norm, CheckedNorm):
            key = key if key != "norm" else norm.key
            norm = norm.norm
        if isinstance(norm, str):
            if norm not in KNOWN_NORMS:
                raise config_error(
                    key, norm, KNOWN_NORMS, nearest=True,
                    fix=f"set {key} to one of them (or pass a callable channels -> nn.Module)",
                )
        elif not callable(norm):
            raise config_error(key, norm, KNOWN_NORMS, problem="must be a string or a callable")
        self.norm = norm
        self.key = key

    def __call__(self, channels: int) -> Optional[nn.Module]:
        if self.norm == "GN" and channels % _GN_GROUPS != 0:
            raise config_error(
                self.key, "GN",
                problem=(f"uses GroupNorm with {_GN_GROUPS} groups, which does not divide a "
                         f"{channels}-channel layer of this backbone"),
                fix=(f"use 'BN', 'SyncBN' or 'FrozenBN' for {self.key}, or pass a callable such as "
                     f"lambda c: nn.GroupNorm(math.gcd(c, 32), c)"),
            )
        return get_norm(self.norm, channels)

    @property
    def is_empty(self) -> bool:
        return isinstance(self.norm, str) and self.norm == ""

    def __repr__(self) -> str:
        return f"CheckedNorm({self.norm!r}, key={self.key!r})"


class ConvNormAct(nn.Sequential):
    """``Conv2d -> norm -> activation`` as an ``nn.Sequential`` with caller-chosen child names.

    The names decide the state-dict keys, which is how each family keeps the keys of
    its reference checkpoints: ``names=("0", "1", "2")`` gives timm's
    ``primary_conv.0.weight`` / ``primary_conv.1.*``; ``names=("stem_1/conv",
    "stem_1/norm", "stem_1/relu")`` gives vovnet-detectron2's ``stem_1/conv.weight``.
    The conv has a bias only when there is no norm (unless ``bias`` is given).

    Example::

        >>> m = ConvNormAct(3, 16, 3, stride=2, norm="BN")
        >>> m(torch.zeros(1, 3, 33, 33)).shape
        torch.Size([1, 16, 17, 17])
        >>> [k for k, _ in m.named_children()]
        ['conv', 'norm', 'act']
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        *,
        norm: Union[str, Callable] = "BN",
        activation: Optional[Callable[[], nn.Module]] = nn.ReLU,
        bias: Optional[bool] = None,
        names: Sequence[str] = ("conv", "norm", "act"),
    ):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        norm = norm if isinstance(norm, CheckedNorm) else CheckedNorm(norm)
        norm_layer = norm(out_channels)
        if bias is None:
            bias = norm_layer is None
        layers = [
            (names[0], nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias))
        ]
        if norm_layer is not None:
            layers.append((names[1], norm_layer))
        if activation is not None:
            layers.append((names[2], activation()))
        super().__init__(OrderedDict(layers))
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride


@torch.jit.unused
def reduced_precision(x: torch.Tensor) -> bool:
    """Whether ``x`` is float16/bfloat16 or autocast is on for its device (eager mode only).

    The SE/eSE gates and the deformable convs then compute in float32 (see
    :func:`gate_input_fp32`, :func:`deform_conv2d_fp32`). TorchScript never calls this: the
    callers test ``torch.jit.is_scripting()`` first, and scripted models run in float32.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return True
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _conv_fp32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float32 whatever the dtype of its weights (1x1 gate convs of a half model)."""
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv2d(x, conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@torch.jit.unused
def gate_input_fp32(x: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``gate(mean_hw(x))`` computed in float32 with autocast off, returned in ``x``'s dtype.

    The spatial mean is accumulated in float32 (no float32 copy of ``x``); the 1x1 convs and the
    (hard-)sigmoid then run on a ``C``-vector, so the float32 gate costs nothing measurable. In
    float16 the 1x1 convs can overflow (65504 is its largest value): the gate, multiplied into
    every pixel, then saturates, or turns NaN where infinities of both signs meet; bfloat16 has
    the range but rounds the gate to about 3 significant digits.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return gate(x.mean((2, 3), keepdim=True, dtype=torch.float32)).to(x.dtype)


@torch.jit.unused
def deform_conv2d_fp32(conv: nn.Module, x: torch.Tensor, offset: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` with ``conv``'s weights, computed in float32; result in ``x``'s dtype.

    torchvision's CPU kernel has no float16/bfloat16 version ("deformable_im2col" not
    implemented), and its CUDA autocast rule casts to float32 anyway; the sampling offsets
    also need float32 to address sub-pixel positions of large maps.
    """
    import torchvision  # local: layers.py is imported by modules that never use DCN

    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = torchvision.ops.deform_conv2d(
            x.float(), offset.float(), conv.weight.float(), bias, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, mask=None if mask is None else mask.float())
    return out.to(x.dtype)


class EffectiveSE(nn.Module):
    """Effective Squeeze-Excitation (VoVNetV2, :paper:`CenterMask`).

    ``x * hard_sigmoid(fc(mean_hw(x)))`` with ``fc`` a 1x1 conv C -> C **with bias**;
    hard_sigmoid is ``relu6(x + 3) / 6``. The attribute name ``fc`` matches both
    vovnet-detectron2 (``ese.fc``) and timm (``attn.fc``). Under autocast or in a half
    model the gate is computed in float32 (:func:`gate_input_fp32`).

    Example::

        >>> EffectiveSE(8)(torch.ones(2, 8, 5, 7)).shape
        torch.Size([2, 8, 5, 7])
    """

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and reduced_precision(x):
            gate = self._gate_fp32(x)
        else:
            gate = F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return x * gate if torch.is_grad_enabled() else x.mul_(gate)  # in place when inferring

    @torch.jit.unused
    def _gate_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return gate_input_fp32(x, lambda s: F.hardsigmoid(_conv_fp32(self.fc, s)))


class SqueezeExcite(nn.Module):
    """Squeeze-Excitation: mean -> 1x1 reduce (bias) -> ReLU -> 1x1 expand (bias) -> gate.

    Args:
        channels: input/output channels.
        rd_channels: reduced channels.
        gate: ``"sigmoid"`` (SENet, the ResNet SE plugin) or ``"hard_sigmoid"``
            (GhostNet: ``relu6(x + 3) / 6``).

    Attribute names ``conv_reduce``/``conv_expand`` match timm's GhostNet SE. Under autocast
    or in a half model the gate is computed in float32 (:func:`gate_input_fp32`).

    Example::

        >>> SqueezeExcite(72, 20, gate="hard_sigmoid")(torch.zeros(1, 72, 4, 4)).shape
        torch.Size([1, 72, 4, 4])
    """

    GATES = ("sigmoid", "hard_sigmoid")

    def __init__(self, channels: int, rd_channels: int, gate: str = "sigmoid"):
        super().__init__()
        if gate not in self.GATES:
            raise config_error("gate", gate, self.GATES)
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.hard = gate == "hard_sigmoid"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and reduced_precision(x):
            return x * self._gate_fp32(x)
        s = self.conv_expand(F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        gate = F.hardsigmoid(s) if self.hard else torch.sigmoid(s)
        return x * gate

    @torch.jit.unused
    def _gate_fp32(self, x: torch.Tensor) -> torch.Tensor:
        def gate(s: torch.Tensor) -> torch.Tensor:
            s = _conv_fp32(self.conv_expand, F.relu(_conv_fp32(self.conv_reduce, s)))
            return F.hardsigmoid(s) if self.hard else torch.sigmoid(s)

        return gate_input_fp32(x, gate)


class ContextBlock(nn.Module):
    """Global context block of :paper:`GCNet` (attention pooling + channel-add fusion).

    ``x + transform(sum_hw(softmax_hw(conv_mask(x)) * x))`` where ``transform`` is
    1x1 conv -> LayerNorm -> ReLU -> 1x1 conv with ``int(C * ratio)`` hidden channels,
    as MMDetection's ``ContextBlock(pooling_type='att', fusion_types=('channel_add',))``.
    The last conv is zero-initialised, so a new block starts as the identity.

    Example::

        >>> ContextBlock(64, ratio=1 / 16)(torch.zeros(1, 64, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
    """

    def __init__(self, channels: int, ratio: float = 1.0 / 16):
        super().__init__()
        planes = max(1, int(channels * ratio))
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add_conv[-1].weight)
        nn.init.zeros_(self.channel_add_conv[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        mask = torch.softmax(self.conv_mask(x).view(n, 1, h * w), dim=2)  # N,1,HW
        context = torch.bmm(x.view(n, c, h * w), mask.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.channel_add_conv(context)


def _batchnorms_updating(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


def checkpoint_keep_bn_stats(fn: Callable[..., torch.Tensor], module: nn.Module, *xs: torch.Tensor):
    """``torch.utils.checkpoint`` that does not update BatchNorm running stats twice.

    The backward pass re-runs ``fn``; in train mode that would apply a second
    momentum update to every BatchNorm in ``module``. The recomputation restores
    the buffers afterwards, so running statistics equal those of a run without
    checkpointing.
    """
    calls = [0]

    def run(*inp):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*inp)
        saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                 for m in _batchnorms_updating(module)]
        try:
            return fn(*inp)
        finally:
            for m, mean, var, nbt in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(nbt)

    return checkpoint(run, *xs, use_reentrant=False)


class CheckpointMixin:
    """Adds ``with_cp`` (gradient checkpointing) to a block.

    The block implements ``_forward_impl(x)``; this mixin's ``forward`` runs it under
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) when ``self.with_cp`` is
    set, the module is training and autograd is recording. Outputs, gradients and
    BatchNorm running statistics are identical to the plain forward; activation
    memory inside the block is freed and recomputed in backward. In eval mode, under
    ``torch.no_grad()`` and in TorchScript the plain path runs.
    """

    with_cp: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_checkpointed(x)
        return self._forward_impl(x)

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_keep_bn_stats(self._forward_impl, self, x)


def split_offset_mask(out: torch.Tensor, modulated: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Split a DCN offset-conv output into ``(offset, mask)``: DCNv2 (``modulated``) predicts
    ``2*K*G`` offsets followed by ``K*G`` mask logits (sigmoid-gated); DCNv1 only offsets
    (detectron2's and centermask2's layout, as ``torchvision.ops.deform_conv2d`` expects)."""
    if not modulated:
        return out, None
    n = out.shape[1] // 3
    return out[:, : 2 * n], out[:, 2 * n:].sigmoid()


def set_bn_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm/SyncBatchNorm in ``module`` in eval mode (running stats fixed).

    Affine parameters keep their ``requires_grad``: only the statistics stop updating.
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return module


class NormEvalMixin:
    """``norm_eval`` for a backbone: re-applied on every ``.train()`` (MMDetection semantics).

    Put it before the ``nn.Module`` base in the class list and set ``self.norm_eval``.
    """

    norm_eval: bool = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            set_bn_eval(self)
        return self


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze ``module``: ``requires_grad=False`` and its (and only its) BatchNorms -> FrozenBN.

    Returns the module to use in its place (a new one if ``module`` itself is a BatchNorm).
    This is :meth:`detectron2.layers.CNNBlockBase.freeze` for modules that are not blocks.
    """
    for p in module.parameters():
        p.requires_grad = False
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

