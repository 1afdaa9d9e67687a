"""Explicit, reviewable key maps from other ResNet checkpoint formats to ours (detectron2 names).

Pure ``dict -> (dict, dropped)`` functions; they never guess. Tensors are not copied.

* :func:`convert_torchvision_resnet` - torchvision ``resnet*``/``resnext*`` (also MMDetection's
  pytorch-style ``ResNet`` with default BN names and timm's plain ``resnet*``).
* :func:`convert_timm_resnet` - timm ``resnet*`` including the deep-stem ``resnet*c``/``resnet*d``
  (``conv1.{0,1,3,4,6}`` + ``bn1``) and avg-down shortcuts (``downsample.{1,2}``).

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

__all__ = ["convert_torchvision_resnet", "convert_timm_resnet"]

_CLASSIFIER = re.compile(r"^(fc|head\.fc|classifier)\.")


def _layer_key(k: str, avg_down: bool) -> str:
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    conv_i, norm_i = ("1", "2") if avg_down else ("0", "1")
    rest = re.sub(rf"^downsample\.{conv_i}\.", "shortcut.", rest)
    rest = re.sub(rf"^downsample\.{norm_i}\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def _convert(sd: Dict[str, torch.Tensor], stem_map: Dict[str, str]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    avg_down = any(re.match(r"^layer\d\.\d+\.downsample\.2\.", k) for k in sd)
    out, dropped = {}, []
    for k, v in sd.items():
        if _CLASSIFIER.match(k):
            dropped.append(k)
            continue
        if k.startswith("layer"):
            out[_layer_key(k, avg_down)] = v
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
