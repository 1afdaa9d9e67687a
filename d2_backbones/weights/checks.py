"""Checks that run whenever weights are loaded or saved (by :class:`~d2_backbones.weights.Checkpointer`).

At load time, in this order:

1. :func:`check_weights_metadata` - a file written by ``python -m d2_backbones.convert`` says
   which architecture and preprocessing its weights need (``checkpoint["d2_backbones"]``).
   Keys that change the network (``MODEL.RESNETS.DEPTH``, ``MODEL.VOVNET.ESE_PLACEMENT``,
   ``MODEL.GHOSTNET.WIDTH``, FPN keys, ...) that disagree with the config stop the load with
   :class:`WeightsMismatchError`, naming each key, the file's value, the config's value and the
   overrides to set; ``INPUT.FORMAT`` / ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` give one
   WARNING. ``MODEL.WEIGHTS_CHECK "warn"`` turns the error into a warning (experts only).
2. :func:`check_missing_backbone` - such a file holds the whole backbone: a backbone parameter
   the file lacks (e.g. an eSE layer of ``ESE_PLACEMENT "all"`` loaded from "last" weights)
   stops the load even without a config.
3. :func:`check_shape_skips` - for any file: when more than half of the backbone tensors it
   has were skipped for another shape, the checkpoint is for another depth/width/variant.

At save time :func:`count_non_finite` finds NaN/Inf in a model's state (one pass, see the
README for its cost), so that training never writes or tags a diverged state.

Example::

    >>> from d2_backbones.weights import load_summary
    >>> load_summary(["backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.running_mean",
    ...               "roi_heads.box_predictor.cls_score.weight"], params={"backbone.bottom_up.stem.conv1.weight",
    ...               "roi_heads.box_predictor.cls_score.weight"}, not_loaded={"roi_heads.box_predictor.cls_score.weight"})
    'backbone.bottom_up: 1/1 parameters, 1/1 buffers loaded; roi_heads: 0/1 parameters (initialised)'
"""
import logging
import re
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from .formats import EFFECTIVE_CONFIG_VALUE, METADATA_KEY, PREFIX, PREPROCESSING_KEYS, listing
from .read import CheckpointReadError, load_file

__all__ = ["WeightsMismatchError", "check_weights_metadata", "check_missing_backbone", "check_shape_skips",
           "count_non_finite", "load_summary", "overrides_string", "family_of_backbone_name"]

logger = logging.getLogger("d2_backbones")

# detectron2's own ResNet builders read MODEL.RESNETS too. Other unknown names: the config is not
# compared, the structural checks still run.
_DETECTRON2_RESNET_BUILDERS = ("build_resnet_backbone", "build_resnet_fpn_backbone",
                               "build_retinanet_resnet_fpn_backbone")


class WeightsMismatchError(ValueError):
    """Weights made for another architecture than the model (depth, width, variant, eSE placement, ...)."""


def family_of_backbone_name(name: str) -> Optional[str]:
    """The family (``FAMILIES`` name) a ``MODEL.BACKBONE.NAME`` builds; detectron2's ResNet builders count as
    ``"resnet"``; None for others."""
    from ..families import family_of_builder

    if name in _DETECTRON2_RESNET_BUILDERS:
        return "resnet"
    fam = family_of_builder(name)
    return fam.name if fam is not None else None


def _cfg_value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return KeyError
        node = node[part]
    return node


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    return a == b


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return str(v)


_PLAIN = re.compile(r"^[A-Za-z][\w.-]*$")  # strings yacs reads back as the same string without quotes
_LITERALS = ("True", "False", "None")


def overrides_string(values: Mapping[str, Any]) -> str:
    """``KEY VALUE`` pairs to paste on a train_net command line; lists and strings quoted for the shell.

    >>> overrides_string({"MODEL.RESNETS.DEPTH": 18, "INPUT.FORMAT": "RGB", "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]})
    'MODEL.RESNETS.DEPTH 18 INPUT.FORMAT RGB MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"'
    """
    out = []
    for k, v in values.items():
        text = _yaml_value(v)
        if isinstance(v, (bool, int, float)) or (isinstance(v, str) and _PLAIN.match(v) and v not in _LITERALS):
            out.append(f"{k} {v if isinstance(v, str) else text}")
        else:
            out.append(f'{k} "{text}"')
    return " ".join(out)


def _metadata(checkpoint: Any) -> Optional[Mapping]:
    if isinstance(checkpoint, str):
        checkpoint = load_file(checkpoint)
    meta = checkpoint.get(METADATA_KEY, checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config"), Mapping):
        return None
    return meta


def check_weights_metadata(cfg, checkpoint: Any, log: Optional[logging.Logger] = None,
                           policy: Optional[str] = None) -> List[Tuple[str, Any, Any]]:
    """Compare a converted file's metadata with ``cfg`` (see the module docstring).

    ``checkpoint`` is a path, a loaded checkpoint dict or its ``"d2_backbones"`` metadata.
    Architecture keys that differ raise :class:`WeightsMismatchError` (``policy="warn"`` or
    ``cfg.MODEL.WEIGHTS_CHECK "warn"``: a WARNING instead). Returns the preprocessing keys that
    differ, ``[(key, value the weights expect, value in cfg), ...]``, after one WARNING naming them.
    Usable from any script (the cfg has BGR caffe preprocessing, the file torchvision's)::

        check_weights_metadata(cfg, "r50_converted.pth")
        # [('INPUT.FORMAT', 'RGB', 'BGR'), ('MODEL.PIXEL_STD', [58.395, 57.12, 57.375], [1.0, 1.0, 1.0])]
    """
    meta = _metadata(checkpoint)
    if meta is None:
        return []
    log = log or logger
    if policy is None:
        policy = _cfg_value(cfg, "MODEL.WEIGHTS_CHECK")
        policy = "error" if policy is KeyError else policy
    backbone_name = _cfg_value(cfg, "MODEL.BACKBONE.NAME")
    running = family_of_backbone_name(backbone_name) if isinstance(backbone_name, str) else None
    file_family = meta.get("family")
    described = f"{meta.get('arch')}, converted from {meta.get('source_format')}"
    arch_wrong, prep_wrong = [], []
    if running is not None and file_family is not None and running != file_family:
        msg = (f"The weights hold a {file_family} backbone ({described}) but MODEL.BACKBONE.NAME={backbone_name!r} "
               f"builds a {running} backbone. Fix: use a {file_family} config (configs/ has one per family) or "
               f"weights of the {running} family.")
        if policy != "warn":
            raise WeightsMismatchError(msg)
        log.warning(msg + " (MODEL.WEIGHTS_CHECK warn: loading anyway)")
    for key, want in meta["config"].items():
        have = _cfg_value(cfg, key)
        if have is not KeyError and key in EFFECTIVE_CONFIG_VALUE:
            try:
                have = EFFECTIVE_CONFIG_VALUE[key](cfg, have)
            except (AttributeError, KeyError):
                pass
        if have is KeyError or _same(have, want):
            continue
        if key in PREPROCESSING_KEYS:
            prep_wrong.append((key, want, have))
        elif running is None or running != file_family:
            continue  # another family's (or an unknown builder's) keys do not describe this network
        elif key.startswith("MODEL.FPN.") and "fpn" not in str(backbone_name):
            continue
        else:
            arch_wrong.append((key, want, have))
    if arch_wrong:
        lines = "\n".join(f"  - {k}: the weights need {_yaml_value(w)}, the config has {_yaml_value(h)}"
                          for k, w, h in arch_wrong)
        msg = (f"The weights ({described}) were made for another network than the config builds:\n{lines}\n"
               f"Fix: add these overrides: {overrides_string({k: w for k, w, _ in arch_wrong})} (or merge the .yaml "
               f"the converter wrote beside the weights).")
        if policy != "warn":
            raise WeightsMismatchError(msg + " Experts: MODEL.WEIGHTS_CHECK warn loads anyway.")
        log.warning(msg + " MODEL.WEIGHTS_CHECK is 'warn': loading anyway; mismatched layers keep their "
                          "initialisation.")
    if prep_wrong:
        now = ", ".join(f"{k}={_yaml_value(h)}" for k, _, h in prep_wrong)
        log.warning(f"The weights ({described}) expect other input preprocessing than the running config ({now}). "
                    f"Set: {overrides_string({k: w for k, w, _ in prep_wrong})}")
    return prep_wrong


def _backbone_prefix(model_keys: Iterable[str]) -> str:
    keys = list(model_keys)
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else "backbone."


def check_missing_backbone(model_keys: Sequence[str], missing_keys: Iterable[str], metadata: Optional[Mapping],
                           log: Optional[logging.Logger] = None, policy: str = "error") -> None:
    """A converted (non-partial) file holds the whole backbone: a backbone tensor it lacks is an architecture
    mismatch (raises :class:`WeightsMismatchError`; ``policy="warn"``: a WARNING)."""
    if not metadata or metadata.get("partial"):
        return
    prefix = _backbone_prefix(model_keys)
    lacking = [k for k in missing_keys if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    if not lacking:
        return
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    arch = {k: v for k, v in config.items() if k not in PREPROCESSING_KEYS}
    msg = (f"{len(lacking)} backbone tensor(s) of the model are not in the weights, which hold a complete "
           f"{metadata.get('arch')} backbone (converted from {metadata.get('source_format')}): {listing(lacking, 4)}. "
           f"The model is another variant; those layers would stay randomly initialised. Fix: "
           f"{overrides_string(arch)}.")
    if policy == "warn":
        (log or logger).warning(msg + " (MODEL.WEIGHTS_CHECK warn: loading anyway)")
        return
    raise WeightsMismatchError(msg)


def check_shape_skips(model_keys: Sequence[str], incorrect_shapes: Sequence, metadata: Optional[Mapping] = None,
                      loaded_keys: Optional[Sequence[str]] = None) -> None:
    """Raise :class:`WeightsMismatchError` when most backbone tensors were skipped for a shape mismatch.

    Counts the checkpoint's tensors that have a name in the model's backbone (``backbone.bottom_up.*``,
    or ``backbone.*`` without an FPN): if more than half of them had another shape, the checkpoint
    is for another depth/width/variant and training from it would silently start from scratch.
    """
    prefix = _backbone_prefix(model_keys)
    bb = [(k, c, m) for k, c, m in incorrect_shapes if k.startswith(prefix)]
    skipped = {k for k, *_ in bb}
    loaded = [k for k in (loaded_keys or ()) if k.startswith(prefix) and k not in skipped]
    total = len(bb) + len(loaded)
    if not bb or len(bb) * 2 <= total:
        return
    examples = "; ".join(f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in bb[:3])
    msg = (f"{len(bb)} of the {total} backbone tensors in the checkpoint have other shapes than the model and were "
           f"skipped ({examples}). The checkpoint was made for another depth, width or variant than "
           f"MODEL.BACKBONE / the family config describes.")
    if metadata and isinstance(metadata.get("config"), Mapping):
        arch = {k: v for k, v in metadata["config"].items() if k not in PREPROCESSING_KEYS}
        msg += f" The file says it holds {metadata.get('arch')}: set {overrides_string(arch)}."
    else:
        msg += (" Fix: set the family keys to the checkpoint's architecture (e.g. MODEL.RESNETS.DEPTH, "
                "MODEL.VOVNET.CONV_BODY, MODEL.GHOSTNET.WIDTH), or convert it with python -m d2_backbones.convert.")
    raise WeightsMismatchError(msg)


def count_non_finite(state: Mapping[str, Any]) -> List[str]:
    """Names of floating-point tensors in ``state`` (a state dict) that hold NaN or Inf."""
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def _group(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "backbone" and len(parts) > 2 and parts[1] == "bottom_up":
        return "backbone.bottom_up"
    return parts[0] if len(parts) > 1 else key


def load_summary(model_keys: Sequence[str], params: Set[str], not_loaded: Set[str]) -> str:
    """One line: per top-level module (``backbone.bottom_up`` apart), parameters and buffers loaded / total.

    ``num_batches_tracked`` counters and detectron2's ``pixel_mean``/``pixel_std`` (set from the
    config) are not counted.
    """
    groups = {}
    for k in model_keys:
        if k.endswith("num_batches_tracked") or k in ("pixel_mean", "pixel_std"):
            continue
        g = groups.setdefault(_group(k), [0, 0, 0, 0])  # params loaded, params, buffers loaded, buffers
        i = 0 if k in params else 2
        g[i + 1] += 1
        g[i] += k not in not_loaded
    parts = []
    for name, (pl, pt, bl, bt) in groups.items():
        text = f"{pl}/{pt} parameters"
        if bt:
            text += f", {bl}/{bt} buffers"
        text += " loaded" if pl or bl else " (initialised)"
        parts.append(f"{name}: {text}")
    return "; ".join(parts)


def read_metadata(path: str) -> Optional[Mapping]:
    """The ``d2_backbones`` metadata of a weights file (None when it has none)."""
    try:
        return _metadata(path)
    except CheckpointReadError:
        return None
