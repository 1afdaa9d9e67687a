"""One-line, family-agnostic description of a built backbone (logged by the builders).

Example output::

    ResNet-50 | frozen: stem, res2 (FrozenBatchNorm2d) | trainable: res3 BatchNorm2d, res4 BatchNorm2d,
    res5 BatchNorm2d | norm_eval=False | with_cp=False | out: res2 s4 256ch, res3 s8 512ch, ...
"""
from typing import List

from torch import nn

from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN

__all__ = ["summarize_backbone"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _norm_names(module: nn.Module) -> List[str]:
    names = set()
    for m in module.modules():
        cls = type(m).__name__
        if isinstance(m, _NORM_TYPES) or cls.endswith(("Norm", "Norm2d")):
            names.add(cls)
    return sorted(names)


def summarize_backbone(model: Backbone, title: str = "") -> str:
    """Describe frozen parts, norm per stage, norm_eval, with_cp and outputs of ``model``.

    Works for any detectron2 ``Backbone`` (an FPN is described through its bottom-up network).
    A "stage" is an entry of ``body.named_stages()`` (the family interface,
    :class:`~d2_backbones.families.FamilyBackbone`); for another backbone, a direct child with
    parameters or buffers.
    """
    body = model.bottom_up if isinstance(model, FPN) else model
    if callable(getattr(body, "named_stages", None)):
        stages = [(n, nn.ModuleList(mods)) for n, mods in body.named_stages()]
    else:
        stages = list(body.named_children())
    frozen, trainable = [], []
    for name, child in stages:
        params = list(child.parameters())
        if not params and not list(child.buffers()):
            continue
        norms = "/".join(_norm_names(child)) or "no norm"
        if params and not any(p.requires_grad for p in params):
            frozen.append(f"{name} ({norms})")
        else:
            trainable.append(f"{name} {norms}")
    with_cp = bool(getattr(body, "with_cp", False)) or any(getattr(m, "with_cp", False) for m in body.modules())
    outs = ", ".join(f"{k} s{v.stride} {v.channels}ch" for k, v in model.output_shape().items())
    parts = [title or type(body).__name__,
             "frozen: " + (", ".join(frozen) if frozen else "nothing"),
             "trainable: " + (", ".join(trainable) if trainable else "nothing"),
             f"norm_eval={bool(getattr(body, 'norm_eval', False))}",
             f"with_cp={with_cp}",
             f"out: {outs}"]
    return " | ".join(parts)
