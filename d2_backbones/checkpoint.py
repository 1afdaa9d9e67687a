"""Explicit, reviewable key maps from other ResNet checkpoint formats to ours (detectron2 names).

Pure ``dict -> (dict, dropped)`` functions; they never guess. Tensors are not copied.

* :func:`convert_torchvision_resnet` - torchvision ``resnet*``/``resnext*`` (also MMDetection's
  pytorch-style ``ResNet`` with default BN names and timm's plain ``resnet*``).
* :func:`convert_timm_resnet` - timm ``resnet*`` including the deep-stem ``resnet*c``/``resnet*d``
  (``conv1.{0,1,3,4,6}`` + ``bn1``) and avg-down shortcuts (``downsample.{1,2}``).
* :func:`convert_mmdet_resnet` - open-mmlab/MMDetection ``ResNet``/``ResNetV1c``/``ResNetV1d``/
  ``ResNeXt`` (pytorch and caffe style use the same names): deep stem ``stem.{0,1,3,4,6,7}``,
  GroupNorm ``gn1/gn2/gn3``, DCN ``conv2.conv_offset``.

Avg-down shortcuts are recognised per block: a block with ``downsample.2`` has the pool at
index 0 (conv ``downsample.1``, norm ``downsample.2``); a block without it uses ``downsample.0/1``
(MMDetection versions that skip the pool when the stride is 1).

Weights converted from torchvision/timm expect ``MODEL.RESNETS.STRIDE_IN_1X1: False``,
``INPUT.FORMAT: RGB``, ``PIXEL_MEAN: [123.675, 116.28, 103.53]``,
``PIXEL_STD: [58.395, 57.12, 57.375]``.

Example::

    >>> import torchvision
    >>> sd, dropped = convert_torchvision_resnet(torchvision.models.resnet50().state_dict())
    >>> build_resnet(50, norm="BN").load_state_dict(sd)  # strict
    <All keys matched successfully>
    >>> dropped
    ['fc.bias', 'fc.weight']
"""
import re
from typing import Dict, List, Tuple

import torch

__all__ = ["convert_torchvision_resnet", "convert_timm_resnet", "convert_mmdet_resnet"]

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
    ``bnK``->``convK.norm``, ``downsample.{0,1}``->``shortcut(.norm)``). Returns ``(state_dict, dropped_keys)``."""
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
