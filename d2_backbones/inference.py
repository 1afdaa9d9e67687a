"""Inference preparation: fold norms into the convolutions before them, run channels_last.

:func:`optimize_for_inference` takes a model in eval mode **with its weights already loaded**
(a bare backbone, a backbone + FPN, or a whole detectron2 ``GeneralizedRCNN`` / ``RetinaNet``)
and changes it in place:

1. **Norm folding.** Every ``FrozenBatchNorm2d`` / ``BatchNorm2d`` / ``SyncBatchNorm`` that
   directly follows a convolution becomes part of that convolution: with
   ``s = gamma / sqrt(running_var + eps)`` the conv weight becomes ``W * s`` (per output
   channel) and its bias ``(b - running_mean) * s + beta``. The norm module is replaced by
   ``None`` (detectron2 ``Conv2d(norm=...)``) or ``nn.Identity`` (everything else), so its
   kernel no longer runs. Folding is computed in float64 and is exact up to rounding.
   Three structural patterns are recognised, which covers all three families, detectron2's
   FPN and heads, and torchvision/timm-style code:

   * a conv with a ``norm`` child that its ``forward`` applies to its own output
     (detectron2 ``Conv2d``, our deformable convs);
   * ``nn.Sequential`` children ``conv, norm`` next to each other (``ConvNormAct``,
     GhostNet shortcuts, detectron2's RetinaNet head);
   * pairs a module declares in ``conv_norm_pairs`` (``(conv_attr, norm_attr)``; GhostNet
     ``conv_stem``/``bn1`` and ``conv_dw``/``bn_dw``, VoVNet's deformable unit). A new
     family whose forward applies a norm attribute to a conv attribute lists the pair there.

   A module may also prepare itself: every submodule with a ``prepare_for_inference()`` method is
   called first (it returns the names of the norms it folded, which the report lists); a backbone
   uses it to re-parameterise multi-branch blocks or to fold pairs the patterns above cannot see.

   GroupNorm (and LayerNorm) are **kept**: they normalise with statistics of each input, so
   no fixed conv weight reproduces them. BatchNorm without running statistics is kept too.

2. **channels_last.** 4-D weights are converted to ``torch.channels_last``. Convolutions then
   produce NHWC tensors, which oneDNN (CPU) and cuDNN (tensor cores) run faster; the other ops
   follow the input's layout, so outputs are the same tensors in another memory layout.
   ``channels_last=False`` keeps NCHW.

The output of the optimized model equals the eager model's within float32 rounding
(``tests/test_inference.py`` asserts ``max|a - b| <= 1e-4 * max|b|`` for every family).
``output_shape()`` is unchanged. The function is idempotent.

What stops being possible, on purpose (each raises an error that says what to do):

* training the optimized model (``forward`` in training mode) - the norms are gone;
* loading a checkpoint into it - the checkpoint's norm tensors have nowhere to go. Load first,
  then optimize: ``build -> DetectionCheckpointer(model).load(w) -> model.eval() -> optimize``.

Example::

    >>> import torch
    >>> from d2_backbones import build_resnet, optimize_for_inference
    >>> net = build_resnet(50, norm="FrozenBN", out_features=["res4"]).eval()
    >>> net = optimize_for_inference(net)   # logs: folded 43 norm layers into convolutions; channels_last
    >>> net(torch.zeros(1, 3, 224, 224))["res4"].shape
    torch.Size([1, 1024, 14, 14])
    >>> net.output_shape()["res4"]
    ShapeSpec(channels=1024, height=None, width=None, stride=16)

In detectron2 inference code::

    model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model = optimize_for_inference(model.eval())
    # or: predictor = d2_backbones.OptimizedPredictor(cfg)  (DefaultPredictor + this)
    # or: python train_net.py --eval-only ... TEST.OPTIMIZE_FOR_INFERENCE True
"""
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from detectron2.layers import FrozenBatchNorm2d


__all__ = ["optimize_for_inference", "is_optimized_for_inference", "fold_norms",
           "FoldReport"]

logger = logging.getLogger(__name__)

_MARK = "_d2b_inference"  # attribute set on the root module: the FoldReport of the first call
_CONVS = (nn.Conv2d, torchvision.ops.DeformConv2d)


@dataclass
class FoldReport:
    """What :func:`optimize_for_inference` did: names of folded norms and of norms kept."""

    folded: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)  # norms that are not folded, with the reason
    channels_last: bool = False

    def __str__(self) -> str:
        s = f"folded {len(self.folded)} norm layers into convolutions"
        if self.kept:
            s += f"; kept {len(self.kept)}: " + ", ".join(self.kept[:5]) + (" ..." if len(self.kept) > 5 else "")
        return s + ("; channels_last" if self.channels_last else "")


def _affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` in float64 such that ``norm(x) == x * scale + shift`` in eval mode, or None."""
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias, mean, var, eps = norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    elif isinstance(norm, _BatchNorm) and norm.running_mean is not None and norm.running_var is not None:
        ones = torch.ones_like(norm.running_mean)
        weight = norm.weight if norm.weight is not None else ones  # affine=False
        bias = norm.bias if norm.bias is not None else ones * 0
        mean, var, eps = norm.running_mean, norm.running_var, norm.eps
    else:
        return None
    scale = weight.double() / torch.sqrt(var.double() + eps)
    return scale, bias.double() - mean.double() * scale


def _fold_into(conv: nn.Module, norm: nn.Module) -> bool:
    """Fold ``norm`` into ``conv`` in place. False (nothing changed) if it cannot be folded."""
    ab = _affine(norm)
    if ab is None or not isinstance(conv, _CONVS) or conv.weight.shape[0] != ab[0].numel():
        return False
    scale, shift = ab
    w = conv.weight
    with torch.no_grad():
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        new_w = (w.double() * scale.to(w.device).view(-1, 1, 1, 1)).to(w.dtype)
        new_b = (bias.to(w.device) * scale.to(w.device) + shift.to(w.device)).to(w.dtype)
        conv.weight = nn.Parameter(new_w.contiguous(memory_format=torch.preserve_format),
                                   requires_grad=w.requires_grad)
        conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
    return True


def _reason(norm: nn.Module) -> str:
    if isinstance(norm, (nn.GroupNorm, nn.LayerNorm)):
        return "normalises with each input's statistics"
    if isinstance(norm, _BatchNorm) and norm.running_mean is None:
        return "BatchNorm without running statistics"
    return "does not directly follow a convolution"


def fold_norms(model: nn.Module) -> FoldReport:
    """Fold every foldable norm of ``model`` into its convolution (in place); see the module docstring."""
    report = FoldReport()
    folded_ids = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        # 1) conv with its own `norm` child, applied before any `activation` (detectron2 Conv2d,
        #    deformable convs)
        if isinstance(module, _CONVS) and isinstance(getattr(module, "norm", None), nn.Module):
            if _fold_into(module, module.norm):
                folded_ids.add(id(module.norm))
                report.folded.append(prefix + "norm")
                module.norm = None
        # 2) nn.Sequential: conv followed by norm
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, conv), (norm_name, norm) in zip(children, children[1:]):
                plain = getattr(conv, "norm", None) is None and getattr(conv, "activation", None) is None
                if plain and _fold_into(conv, norm):
                    folded_ids.add(id(norm))
                    report.folded.append(prefix + norm_name)
                    setattr(module, norm_name, nn.Identity())
        # 3) pairs the module declares
        for conv_name, norm_name in getattr(module, "conv_norm_pairs", ()):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if conv is not None and norm is not None and _fold_into(conv, norm):
                folded_ids.add(id(norm))
                report.folded.append(prefix + norm_name)
                setattr(module, norm_name, nn.Identity())
    for name, module in model.named_modules():
        if isinstance(module, (FrozenBatchNorm2d, _BatchNorm, nn.GroupNorm)) and id(module) not in folded_ids:
            report.kept.append(f"{name} ({type(module).__name__}: {_reason(module)})")
    return report


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, else the model itself."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def is_optimized_for_inference(model: nn.Module) -> bool:
    """Whether :func:`optimize_for_inference` was applied to ``model`` (or the model wrapped by DDP)."""
    return hasattr(_unwrap(model), _MARK)


def _refuse_training(module: nn.Module, args) -> None:
    if module.training:
        raise RuntimeError(
            f"This {type(module).__name__} was prepared with d2_backbones.optimize_for_inference: its "
            f"BatchNorm layers are folded into the convolutions, so it cannot be trained (model.train() "
            f"was called on it). Train the model as built (or rebuild it and load the checkpoint), and "
            f"call optimize_for_inference only on a copy used for inference, after model.eval()."
        )


def _refuse_loading(module, state_dict, prefix, *args) -> None:
    raise RuntimeError(
        "This model was prepared with d2_backbones.optimize_for_inference (norms folded into the "
        "convolutions), so a checkpoint's norm tensors have nowhere to go. Load the weights first, then "
        "optimize: build_model(cfg) -> DetectionCheckpointer(model).load(path) -> model.eval() -> "
        "optimize_for_inference(model)."
    )


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Fold norms into convolutions and switch to channels_last, in place; returns ``model``.

    Args:
        model: any ``nn.Module`` in eval mode whose weights are loaded: a d2_backbones or
            detectron2 backbone, or a whole detectron2 model (GeneralizedRCNN, RetinaNet, ...).
            A ``DistributedDataParallel`` wrapper is unwrapped.
        channels_last: convert 4-D weights to ``torch.channels_last`` (default). It pays for
            every family here on CPU (oneDNN) and on GPUs with tensor cores; pass False to keep NCHW.

    Raises:
        RuntimeError: if ``model`` or one of its submodules is in training mode.

    A second call does nothing. See the module docstring for what is folded and what is kept.
    """
    model = _unwrap(model)
    if hasattr(model, _MARK):
        return model
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"optimize_for_inference needs a model in eval mode, but {training[0]!r}"
            f"{f' and {len(training) - 1} other modules are' if len(training) > 1 else ' is'} in training "
            f"mode. Call model.eval() first (after loading the weights): folding uses the BatchNorm "
            f"running statistics, which training would keep changing."
        )
    prepared = []  # modules that prepare themselves (re-parameterisation, folds fold_norms cannot see)
    for name, module in list(model.named_modules()):
        hook = getattr(module, "prepare_for_inference", None)
        if callable(hook):
            prepared += [f"{name}.{n}" if name else n for n in (hook() or ())]
    report = fold_norms(model)
    report.folded[:0] = prepared
    if channels_last:
        model.to(memory_format=torch.channels_last)
    report.channels_last = channels_last
    setattr(model, _MARK, report)
    model.register_forward_pre_hook(_refuse_training)
    model.register_load_state_dict_pre_hook(_refuse_loading)
    logger.info(f"optimize_for_inference: {report}")
    return model
