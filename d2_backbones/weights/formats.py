"""The weight formats the package converts, as one table filled by the families, and the conversion itself.

This module knows no family by name. Each family's home declares its formats (its
:class:`~d2_backbones.families.Family` record's ``weight_formats``): a :class:`WeightFormat` row says how
a format is detected (from key names), which family it belongs to, and how it is converted (the key
map, the architecture inferred from the tensors, the config values the weights need), in one converter
signature ``convert(fmt, state, extras, *, arch, style) -> Converted``, as timm keeps
``checkpoint_filter_fn`` in each model file. :data:`FORMATS` lists every family's rows in registration
order; :func:`detect_format` takes the first row whose ``detect`` matches (a format that cannot be told
from its keys, such as a timm model's, detects nothing and is named with ``--format``). The formats
and their sources are listed in ``docs/weights.md``.

Adding a format (or a fourth family's formats): a key map and a converter in the family's module, one
row in its record's ``weight_formats``.

Example::

    >>> import torchvision
    >>> out = convert_checkpoint(torchvision.models.resnet18().state_dict())
    >>> out["d2_backbones"]["arch"], out["d2_backbones"]["config"]["MODEL.RESNETS.DEPTH"]
    ('R-18', 18)
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..families import FAMILIES
from .read import CheckpointReadError

__all__ = ["ConvertError", "Converted", "WeightFormat", "FORMATS", "PREFIX", "METADATA_KEY", "PREPROCESSING_KEYS",
           "RGB_IMAGENET", "BGR_CAFFE", "has_key", "detect_format", "convert_checkpoint", "unwrap_state_dict",
           "effective_config_values"]

PREFIX = "backbone.bottom_up."
METADATA_KEY = "d2_backbones"
# Config keys that change the input, not the network: a mismatch is a warning. Every other
# key in a file's metadata changes the network, and a mismatch stops the load.
PREPROCESSING_KEYS = ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")

# The preprocessing of ImageNet weights trained in torchvision/timm style, and of Caffe2/MSRA-style weights.
RGB_IMAGENET = {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
                 "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]}
BGR_CAFFE = {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
              "MODEL.PIXEL_STD": [1.0, 1.0, 1.0]}
_DROP_ALWAYS = re.compile(r"^(module\.)?(fc|head\.fc|classifier|conv_head)\.|(^|\.)(total_ops|total_params)$")


class ConvertError(CheckpointReadError):
    """A checkpoint that cannot be converted (unreadable, unsafe, unknown format, wrong architecture)."""


@dataclass
class Converted:
    """What a family's converter returns for :func:`convert_checkpoint`."""
    bare: Dict[str, torch.Tensor]          # backbone tensors in our names, no prefix
    model: nn.Module                       # the architecture they were inferred for (to compare with)
    config: Dict[str, Any]                 # config values the weights need
    variant: Dict[str, Any]                # "arch" + what identifies the variant
    dropped: List[str]                     # source keys deliberately dropped
    extra: Dict[str, torch.Tensor]         # non-backbone tensors in final names (e.g. the FPN)
    extra_reference: Dict[str, torch.Tensor]  # the model's tensors those must match
    unmapped: List[str]                    # source keys that map to nothing


@dataclass(frozen=True)
class WeightFormat:
    """One row of :data:`FORMATS`."""
    name: str
    family: str
    source: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[..., Converted]


def has_key(sd: Mapping, pattern: str) -> bool:
    """Whether a key of ``sd`` matches the regular expression ``pattern`` (for a format's ``detect``)."""
    return any(re.search(pattern, k) for k in sd)


class _FormatTable(Mapping):
    """Format name -> :class:`WeightFormat`, every registered family's rows in registration order (a live view:
    a family registered later adds its rows)."""

    def _rows(self) -> Dict[str, WeightFormat]:
        return {f.name: f for fam in FAMILIES.values() for f in fam.weight_formats}

    def __getitem__(self, name: str) -> WeightFormat:
        return self._rows()[name]

    def __iter__(self):
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())

    def __repr__(self) -> str:
        return f"FORMATS({', '.join(self)})"


FORMATS: Mapping[str, WeightFormat] = _FormatTable()


def effective_config_values() -> Dict[str, Callable[[Any, Any], Any]]:
    """Config key -> ``fn(cfg, value)`` of every family's ``effective_config`` (what the weights' metadata is
    compared with)."""
    return {k: fn for fam in FAMILIES.values() for k, fn in fam.effective_config.items()}


def unwrap_state_dict(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return ``(flat tensor dict, wrapper extras)`` for a bare or wrapped state dict."""
    if not isinstance(obj, Mapping):
        raise ConvertError(f"the file holds a {type(obj).__name__}, not a state dict.")
    extras: Dict[str, Any] = {}
    sd: Mapping = obj
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_state"):
        if isinstance(obj.get(wrapper), Mapping):
            sd = obj[wrapper]
            extras = {k: v for k, v in obj.items() if k != wrapper}
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError("the file contains no tensors (not a state dict, or an unknown wrapper; known wrappers: "
                           "'state_dict', 'model', 'state_dict_ema', 'model_state').")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, extras


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """The first row of :data:`FORMATS` whose key pattern matches; :class:`ConvertError` if none does."""
    for fmt in FORMATS.values():
        if fmt.detect(sd):
            return fmt.name
    sample = ", ".join(list(sd)[:5])
    raise ConvertError(f"cannot tell the checkpoint's format from its keys (first keys: {sample}). Pass "
                       f"--format, one of: {', '.join(FORMATS)}.")


# ---------------------------------------------------------------------------------------------- the conversion
def _shape(t) -> Tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


def _compare(converted: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]):
    ours = {k: v for k, v in model_sd.items() if not k.endswith("num_batches_tracked")}
    unexpected = sorted(k for k in converted if k not in ours)
    missing = [k for k in ours if k not in converted]  # model order: the first differences come first
    shapes = [(k, _shape(converted[k]), _shape(v)) for k, v in ours.items()
              if k in converted and _shape(converted[k]) != _shape(v)]
    return unexpected, missing, shapes


def listing(items: Sequence, n: int = 8) -> str:
    """``a, b, c, ... (N more)``"""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def convert_checkpoint(obj: Any, fmt: str = "auto", *, arch: Optional[str] = None, style: Optional[str] = None,
                       allow_partial: bool = False, source: str = "") -> Dict[str, Any]:
    """Convert a loaded checkpoint object; returns the dict to ``torch.save``.

    The result is ``{"model": {backbone.bottom_up.*: tensor}, "__author__", "matching_heuristics":
    False, "d2_backbones": metadata, "report": {...}}``; the command line prints ``report``
    (``dropped``, ``unexpected``, ``missing``, ``shape_mismatch``) and removes it before saving.
    """
    sd, extras = unwrap_state_dict(obj)
    if fmt == "auto":
        fmt = detect_format(sd)
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r} is not one of: auto, {', '.join(FORMATS)}.")
    if style not in (None, "pytorch", "caffe"):
        raise ConvertError(f"--style {style!r} must be 'pytorch' or 'caffe'.")
    row = FORMATS[fmt]
    dropped = sorted(k for k in sd if k.endswith("num_batches_tracked") or _DROP_ALWAYS.search(k))
    src = {k: v for k, v in sd.items() if k not in set(dropped)}
    try:
        c = row.convert(fmt, src, extras, arch=arch, style=style)
    except KeyError as e:
        raise ConvertError(f"format {fmt}: {e.args[0] if e.args else e}. The file is not a {fmt} checkpoint of a "
                           f"supported layout; check --format.") from None
    dropped = sorted(set(dropped) | set(c.dropped))
    unexpected, missing, shapes = _compare(c.bare, c.model.state_dict())
    if c.extra_reference or c.extra:
        u2, m2, s2 = _compare(c.extra, c.extra_reference)
        unexpected, missing, shapes = unexpected + u2, missing + m2, shapes + s2
    unexpected = sorted(set(unexpected) | set(c.unmapped))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) map to no parameter of the model: "
                        f"{listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} model parameter(s) are not in the checkpoint: {listing(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (key, checkpoint, model): {listing(shapes, 5)}")
    arch_name = c.variant["arch"]
    if problems and not allow_partial:
        raise ConvertError(f"{source or 'checkpoint'} ({fmt}) does not fit {arch_name}"
                           f"{' (from --arch)' if arch else ' (inferred from the checkpoint)'}:\n  - "
                           + "\n  - ".join(problems)
                           + "\nFix: pass the right --arch (depth/width/variant) or --format; --allow-partial "
                             "writes only the matching tensors.")
    bad = set(unexpected) | {k for k, *_ in shapes}
    tensors = {PREFIX + k: v.contiguous() for k, v in c.bare.items() if k not in bad}
    tensors.update({k: v.contiguous() for k, v in c.extra.items() if k not in bad})
    metadata = {"version": 1, "source_format": fmt, "source_file": os.path.basename(source), "family": row.family,
                "arch": arch_name, "variant": c.variant, "config": c.config, "partial": bool(problems)}
    return {"model": tensors, "__author__": f"d2_backbones.convert from {fmt}", "matching_heuristics": False,
            METADATA_KEY: metadata,
            "report": {"dropped": dropped, "unexpected": unexpected, "missing": missing, "shape_mismatch": shapes}}
