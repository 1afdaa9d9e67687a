"""Convert pretrained checkpoints into files detectron2 loads into our backbones, and check them at load time.

Command line::

    python -m d2_backbones.convert SRC DST [--format auto|FORMAT] [--arch ARCH] [--style pytorch|caffe]
                                           [--allow-partial]

``DST`` is a ``torch.save`` file ``{"model": state_dict, "__author__": ..., "matching_heuristics":
False, "d2_backbones": metadata}`` whose keys carry the ``backbone.bottom_up.`` prefix (and
``backbone.fpn_*`` / ``backbone.top_block.*`` for detector checkpoints), so
``DetectionCheckpointer(model).load(DST)`` (``MODEL.WEIGHTS: DST``) loads it into a model built
from the matching config with zero missing and zero unexpected backbone keys. No name matching
heuristics are involved.

Formats (``--format``; ``auto`` detects them from the key names):

========================  ========================================================================
format                    source
========================  ========================================================================
``torchvision-resnet``    torchvision ``resnet*``/``resnext*`` (``conv1``, ``bn1``, ``layerN.i``,
                          ``downsample.0/1``, ``fc``); timm's plain ``resnet*`` has the same names
``timm-resnet``           timm ``resnet*c``/``resnet*d`` (deep stem ``conv1.{0,1,3,4,6}`` + ``bn1``,
                          avg-down ``downsample.1/2``)
``mmdet-resnet``          open-mmlab / MMDetection ``ResNet``, ``ResNetV1c``/``V1d`` (``stem.{0,1,3,
                          4,6,7}``), ResNeXt, GN (``gn1/2/3``), DCN (``conv2.conv_offset``); pytorch
                          and caffe style have the same names: pass ``--style caffe`` for caffe
                          weights (default ``pytorch``; for a detector checkpoint the style is
                          read from the config text in ``meta`` when present)
``mmdet-detector``        MMDetection detector checkpoints ``{"meta", "state_dict"}``: ``backbone.*``
                          as ``mmdet-resnet``, ``neck.lateral_convs.i.conv`` -> ``fpn_lateral{s}``,
                          ``neck.fpn_convs.i.conv`` -> ``fpn_output{s}``, extra ``fpn_convs`` ->
                          ``top_block.p6``/``p7``; heads (``rpn_head``, ``roi_head``, ...) dropped
``timm-vovnet``           timm ``ese_vovnet*`` / ``vovnet*a`` (eSE placement "last")
``vovnet-d2``             vovnet-detectron2 / centermask2 files, bare or ``{"model": ...}``, with
                          or without ``backbone.bottom_up.``
``ghostnet``              timm ``ghostnet_*`` and Huawei ``ghostnet_pytorch`` (``total_ops``-style
                          profiler keys and the classifier dropped)
========================  ========================================================================

detectron2's MSRA/Caffe2 ``.pkl`` files (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``) need
no conversion: detectron2's own loader reads them (``MODEL.WEIGHTS`` = the ``.pkl``). This tool
refuses ``.pkl`` input, because reading it would mean unpickling arbitrary objects.

``--arch`` (optional; inferred from tensor shapes otherwise): ResNet ``R-50``, ``R-101-V1d``,
``X-101-32x8d``, ``X-50-32x4d-V1c`` ...; VoVNet a ``MODEL.VOVNET.CONV_BODY`` name (``V-39-eSE``);
GhostNet ``ghostnet_050``/``ghostnet_100``/``ghostnet_130`` or a width (``1.3``). The converted
tensors are compared with a model built from it; GN and DCN layers follow the checkpoint.

**Strict by default.** A backbone tensor that maps to no parameter of that model, a parameter
the checkpoint lacks, or a shape mismatch stops the conversion with an error naming the keys
(:class:`ConvertError`). ``--allow-partial`` writes what matches and lists the rest. Classifier
and profiler keys (``fc``, ``head.fc``, ``classifier``, ``conv_head``, ``total_ops``,
``total_params``) and ``num_batches_tracked`` counters are always dropped and printed.

**Safety.** ``SRC`` is read with ``torch.load(path, map_location="cpu", weights_only=True)``: a
pickle that would import or call anything but tensors and plain containers is refused before
any of it runs.

**Metadata** (``checkpoint["d2_backbones"]``): ``source_format``, ``family``, ``arch``,
``variant`` (depth/groups/deep stem/avg_down/GN/DCN; CONV_BODY + ESE_PLACEMENT; width) and
``config``, the config values the weights expect, e.g. ``MODEL.RESNETS.STRIDE_IN_1X1``,
``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN``, ``MODEL.PIXEL_STD``. :func:`check_weights_metadata`
compares them with a running config and logs one WARNING naming every key to set;
:class:`~d2_backbones.train.AtomicCheckpointer` calls it whenever it loads such a file.

Example::

    $ python -m d2_backbones.convert resnet50-0676ba61.pth r50_tv.pth
    format torchvision-resnet, arch R-50: 265 tensors written to r50_tv.pth
    dropped (2 classifier/profiler/head, 53 num_batches_tracked): fc.bias, fc.weight
    config for these weights: MODEL.RESNETS.DEPTH 50 ... INPUT.FORMAT 'RGB' MODEL.PIXEL_MEAN [123.675, ...]
"""
import argparse
import logging
import os
import pickle
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoint import convert_mmdet_resnet, convert_timm_resnet, convert_torchvision_resnet
from .fpn import build_fpn
from .ghostnet import GHOSTNET_STEM_CHANNELS, GHOSTNET_WIDTHS, GhostNet, convert_ghostnet_state_dict
from .layers import make_divisible
from .resnet import RESNET_DEPTHS, build_resnet
from .vovnet import VOVNET_SPECS, VoVNet, convert_timm_vovnet, convert_vovnet_detectron2

__all__ = ["FORMATS", "ConvertError", "WeightsMismatchError", "read_checkpoint", "detect_format",
           "convert_checkpoint", "check_weights_metadata", "check_shape_skips", "main"]

logger = logging.getLogger("d2_backbones")

FORMATS = ("torchvision-resnet", "timm-resnet", "mmdet-resnet", "mmdet-detector", "timm-vovnet", "vovnet-d2",
           "ghostnet")
PREFIX = "backbone.bottom_up."
METADATA_KEY = "d2_backbones"

_RGB_IMAGENET = {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
                 "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]}
_BGR_CAFFE = {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
              "MODEL.PIXEL_STD": [1.0, 1.0, 1.0]}
_DROP_ALWAYS = re.compile(r"^(module\.)?(fc|head\.fc|classifier|conv_head)\.|(^|\.)(total_ops|total_params)$")


class ConvertError(ValueError):
    """A checkpoint that cannot be converted (unreadable, unsafe, unknown format, wrong architecture)."""


class WeightsMismatchError(ValueError):
    """Most backbone tensors of a checkpoint did not fit the model (wrong depth/width/variant)."""


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Raises :class:`ConvertError` for a ``.pkl`` (leave it to detectron2), a pickle that would
    run code, and a truncated/corrupted file.
    """
    if path.endswith(".pkl"):
        raise ConvertError(
            f"{path}: detectron2/Caffe2 .pkl files (e.g. the MSRA ImageNet weights) need no conversion - set "
            f"MODEL.WEIGHTS to the .pkl and detectron2's own loader reads it (MSRA weights expect "
            f"MODEL.RESNETS.STRIDE_IN_1X1 True, INPUT.FORMAT BGR, MODEL.PIXEL_STD [1.0, 1.0, 1.0]).")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(
            f"{path}: refused - its pickle wants to import or call something other than tensors and plain "
            f"containers, which could execute code. Nothing from it was run. Details: "
            f"{str(e).splitlines()[-1] if str(e) else type(e).__name__}. If you trust the file, re-save its "
            f"state_dict as plain tensors in a trusted environment and convert that.") from None
    except Exception as e:  # zip errors, truncated streams, not a torch file at all
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _unwrap(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
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
    """Pick the format from key names (see the module docstring); :class:`ConvertError` if none fits."""
    keys = list(sd)

    def has(pattern):
        return any(re.search(pattern, k) for k in keys)

    if has(r"^backbone\.") and has(r"^(neck|rpn_head|roi_head|bbox_head)\."):
        return "mmdet-detector"
    if has(r"(^|\.)stem\.stem_1/"):
        return "vovnet-d2"
    if has(r"^stages\.\d\.blocks\.\d+\.conv_(mid|concat)\."):
        return "timm-vovnet"
    if "conv_stem.weight" in sd and has(r"^blocks\.\d+\.\d+\.ghost1\."):
        return "ghostnet"
    if has(r"^layer1\.0\.conv1\.weight$"):
        if "conv1.0.weight" in sd:
            return "timm-resnet"
        if "stem.0.weight" in sd or has(r"^layer\d\.\d+\.gn\d\.") or has(r"\.conv2\.conv_offset\.") \
                or "gn1.weight" in sd:
            return "mmdet-resnet"
        return "torchvision-resnet"
    sample = ", ".join(keys[:5])
    raise ConvertError(f"cannot tell the checkpoint's format from its keys (first keys: {sample}). Pass "
                       f"--format, one of: {', '.join(FORMATS)}.")


# ---------------------------------------------------------------------------------------------- ResNet
_ARCH_RE = re.compile(r"^(R|X)-(\d+)(?:-(\d+)x(\d+)d)?(?:-V1([cd]))?$", re.IGNORECASE)


def _resnet_arch_name(v: Mapping) -> str:
    name = f"X-{v['depth']}-{v['num_groups']}x{v['width_per_group']}d" if v["num_groups"] > 1 else f"R-{v['depth']}"
    suffix = "-V1d" if v["deep_stem"] and v["avg_down"] else "-V1c" if v["deep_stem"] else ""
    return name + suffix


def _infer_resnet(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture of a detectron2-named ResNet state dict, from its key names and shapes."""
    blocks = {}
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
    v: Dict[str, Any] = dict(depth=depth, deep_stem=deep_stem,
                             avg_down=False, num_groups=1, width_per_group=64,
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


def _avg_down(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(re.match(r"^layer\d\.\d+\.downsample\.2\.", k) for k in sd)


def _resnet_variant(src_sd, sd, arch: Optional[str]) -> Dict[str, Any]:
    v = _infer_resnet(sd)
    v["avg_down"] = _avg_down(src_sd)
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


def _resnet_model(v: Mapping):
    kw = {k: v[k] for k in ("depth", "deep_stem", "avg_down", "num_groups", "width_per_group", "stem_channels",
                            "norm", "deform_on_per_stage") if k in v}
    for k in ("res2_channels", "deform_modulated", "deform_num_groups"):
        if k in v:
            kw[k] = v[k]
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


# ---------------------------------------------------------------------------------------------- VoVNet
def _infer_vovnet(sd: Mapping[str, torch.Tensor], arch: Optional[str]) -> Tuple[str, str]:
    """``(CONV_BODY, ESE_PLACEMENT)`` of a VoVNet state dict in our names."""
    modules: Dict[int, List[int]] = {}
    for k in sd:
        m = re.match(r"^stage(\d)\.OSA\d_(\d+)\.", k)
        if m:
            modules.setdefault(int(m.group(1)), [])
            if int(m.group(2)) not in modules[int(m.group(1))]:
                modules[int(m.group(1))].append(int(m.group(2)))
    with_ese = {(s, b) for s, bs in modules.items() for b in bs if f"stage{s}.OSA{s}_{b}.ese.fc.weight" in sd}
    all_modules = {(s, b) for s, bs in modules.items() for b in bs}
    last = {(s, max(bs)) for s, bs in modules.items()}
    placement = "none" if not with_ese else "all" if with_ese == all_modules else "last" if with_ese == last \
        else None
    if placement is None:
        raise ConvertError(f"eSE layers in {sorted(with_ese)} are neither in every OSA module nor in the last "
                           f"module of each stage; no VoVNet variant has that layout.")
    if arch:
        if arch not in VOVNET_SPECS:
            raise ConvertError(f"--arch {arch!r} is not a VoVNet CONV_BODY; use one of {list(VOVNET_SPECS)}.")
        return arch, placement
    dw = "stem.stem_2/dw_conv3x3.weight" in sd

    def out_ch(prefix):
        t = sd.get(prefix + "/pw_conv1x1.weight", sd.get(prefix + "/conv.weight"))
        return None if t is None else int(t.shape[0])

    stem = tuple(out_ch(f"stem.stem_{i}") for i in (1, 2, 3))
    bps = tuple(len(modules.get(s, [])) for s in (2, 3, 4, 5))
    lpb = len({k.split(".")[3] for k in sd if k.startswith("stage2.OSA2_1.layers.")})
    conv_ch = tuple(out_ch(f"stage{s}.OSA{s}_1.layers.0.OSA{s}_1_0") for s in (2, 3, 4, 5))
    out = tuple(out_ch(f"stage{s}.OSA{s}_1.concat.OSA{s}_1_concat") for s in (2, 3, 4, 5))
    for name, spec in VOVNET_SPECS.items():
        if (spec.stem, spec.stage_conv_ch, spec.stage_out_ch, spec.layer_per_block, spec.block_per_stage,
                spec.depthwise) == (stem, conv_ch, out, lpb, bps, dw) and (spec.ese == "none") == (placement == "none"):
            return name, placement
    raise ConvertError(f"no VoVNet variant has stem {stem}, widths {conv_ch}/{out}, {lpb} layers per module, "
                       f"{bps} modules per stage (depthwise={dw}); known: {list(VOVNET_SPECS)}. Pass --arch.")


# ---------------------------------------------------------------------------------------------- GhostNet
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


# ---------------------------------------------------------------------------------------------- mmdet detector
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
    laterals, outputs, extra, unmapped = {}, {}, {}, []
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
    fpn = {"MODEL.FPN.IN_FEATURES": in_features, "MODEL.FPN.OUT_CHANNELS": out_channels}
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


def _listing(items: Sequence, n: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def convert_checkpoint(obj: Any, fmt: str = "auto", *, arch: Optional[str] = None, style: Optional[str] = None,
                       allow_partial: bool = False, source: str = "") -> Dict[str, Any]:
    """Convert a loaded checkpoint object; returns the dict to ``torch.save`` (see the module docstring).

    The result has an extra ``"report"`` entry (``dropped``, ``unexpected``, ``missing``,
    ``shape_mismatch``) that :func:`main` prints and removes before saving.
    """
    sd, extras = _unwrap(obj)
    if fmt == "auto":
        fmt = detect_format(sd)
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r} is not one of: auto, {', '.join(FORMATS)}.")
    if style not in (None, "pytorch", "caffe"):
        raise ConvertError(f"--style {style!r} must be 'pytorch' or 'caffe'.")
    dropped = sorted(k for k in sd if k.endswith("num_batches_tracked") or _DROP_ALWAYS.search(k))
    src = {k: v for k, v in sd.items() if k not in set(dropped)}
    extra_out: Dict[str, torch.Tensor] = {}
    fpn_model_cfg: Dict[str, Any] = {}
    variant: Dict[str, Any]

    try:
        if fmt in ("torchvision-resnet", "timm-resnet", "mmdet-resnet", "mmdet-detector"):
            family = "resnet"
            unmapped_src: List[str] = []
            if fmt == "mmdet-detector":
                style = _mmdet_style(extras, style)
                neck = {k[len("neck."):]: v for k, v in src.items() if k.startswith("neck.")}
                heads = sorted(k for k in src if not k.startswith(("backbone.", "neck.")))
                dropped = sorted(dropped + heads)
                src = {k[len("backbone."):]: v for k, v in src.items() if k.startswith("backbone.")}
            fn = {"torchvision-resnet": convert_torchvision_resnet, "timm-resnet": convert_timm_resnet}.get(
                fmt, convert_mmdet_resnet)
            bare, _ = fn(src)
            variant = _resnet_variant(src, bare, arch)
            stride_in_1x1 = style == "caffe"
            model = _resnet_model(variant)
            config = _resnet_config(variant, stride_in_1x1)
            config.update(_BGR_CAFFE if stride_in_1x1 else _RGB_IMAGENET)
            variant = {"arch": _resnet_arch_name(variant), "style": "caffe" if stride_in_1x1 else "pytorch",
                       **{k: v for k, v in variant.items()}}
            if fmt == "mmdet-detector":
                extra_out, fpn_model_cfg, unmapped_neck = _convert_neck(neck, model)
                config.update(fpn_model_cfg)
                unmapped_src += unmapped_neck
        elif fmt in ("timm-vovnet", "vovnet-d2"):
            family = "vovnet"
            bare, _ = convert_timm_vovnet(src) if fmt == "timm-vovnet" else convert_vovnet_detectron2(src)
            if fmt == "vovnet-d2":
                fpn_like = sorted(k for k in src if not re.match(r"^((module|backbone\.bottom_up|bottom_up)\.)*"
                                                                  r"(stem|stage[2-5])\.", k))
                dropped = sorted(dropped + fpn_like)
            body, placement = _infer_vovnet(bare, arch)
            model = VoVNet(body, norm="BN", ese_placement=placement)
            config = {"MODEL.VOVNET.CONV_BODY": body, "MODEL.VOVNET.ESE_PLACEMENT": placement,
                      **(_RGB_IMAGENET if fmt == "timm-vovnet" else _BGR_CAFFE)}
            variant = {"arch": body, "CONV_BODY": body, "ESE_PLACEMENT": placement}
            unmapped_src = []
        else:
            family = "ghostnet"
            width = _infer_ghostnet(src, arch)
            final_conv = any(k.startswith("blocks.9.") for k in src)
            try:
                model = GhostNet(width, norm="BN", final_conv=final_conv,
                                 out_features=["stem", "stage2", "stage3", "stage4", "stage5"])
            except ValueError as e:
                raise ConvertError(f"cannot build GhostNet width {width}: {e}") from None
            bare, more = convert_ghostnet_state_dict(src)
            dropped = sorted(set(dropped) | set(more))
            config = {"MODEL.GHOSTNET.WIDTH": width, "MODEL.GHOSTNET.FINAL_CONV": final_conv, **_RGB_IMAGENET}
            variant = {"arch": f"ghostnet width {width:g}", "width": width, "final_conv": final_conv}
            unmapped_src = []
    except KeyError as e:
        raise ConvertError(f"format {fmt}: {e.args[0] if e.args else e}. The file is not a {fmt} checkpoint of a "
                           f"supported layout; check --format.") from None

    unexpected, missing, shapes = _compare(bare, model.state_dict())
    if fmt == "mmdet-detector":
        fpn = build_fpn(model, fpn_model_cfg["MODEL.FPN.IN_FEATURES"], fpn_model_cfg["MODEL.FPN.OUT_CHANNELS"],
                        top_block=fpn_model_cfg["MODEL.FPN.TOP_BLOCK"],
                        top_block_source=fpn_model_cfg.get("MODEL.FPN.TOP_BLOCK_SOURCE", "on_input"),
                        top_block_relu=fpn_model_cfg.get("MODEL.FPN.TOP_BLOCK_RELU", True))
        fpn_sd = {"backbone." + k: v for k, v in fpn.state_dict().items() if not k.startswith("bottom_up.")}
        u2, m2, s2 = _compare(extra_out, fpn_sd)
        unexpected, missing, shapes = unexpected + u2, missing + m2, shapes + s2
    unexpected = sorted(set(unexpected) | set(unmapped_src))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) map to no parameter of the model: "
                        f"{_listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} model parameter(s) are not in the checkpoint: {_listing(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (key, checkpoint, model): {_listing(shapes, 5)}")
    arch_name = variant["arch"]
    if problems and not allow_partial:
        raise ConvertError(f"{source or 'checkpoint'} ({fmt}) does not fit {arch_name}"
                           f"{' (from --arch)' if arch else ' (inferred from the checkpoint)'}:\n  - "
                           + "\n  - ".join(problems)
                           + "\nFix: pass the right --arch (depth/width/variant) or --format; --allow-partial "
                             "writes only the matching tensors.")
    bad = set(unexpected) | {k for k, *_ in shapes}
    tensors = {PREFIX + k: v.contiguous() for k, v in bare.items() if k not in bad}
    tensors.update({k: v.contiguous() for k, v in extra_out.items() if k not in bad})
    metadata = {"version": 1, "source_format": fmt, "source_file": os.path.basename(source), "family": family,
                "arch": arch_name, "variant": variant, "config": config, "partial": bool(problems)}
    return {"model": tensors, "__author__": f"d2_backbones.convert from {fmt}", "matching_heuristics": False,
            METADATA_KEY: metadata,
            "report": {"dropped": dropped, "unexpected": unexpected, "missing": missing, "shape_mismatch": shapes}}


# ---------------------------------------------------------------------------------------------- load-time checks
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


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else str(list(v) if isinstance(v, tuple) else v)


def check_weights_metadata(cfg, checkpoint: Any, log: Optional[logging.Logger] = None) -> List[Tuple[str, Any, Any]]:
    """Compare a converted file's metadata with ``cfg``; log one WARNING naming every key to set.

    ``checkpoint`` is a path, a loaded checkpoint dict or its ``"d2_backbones"`` metadata. Returns
    ``[(key, value the weights expect, value in cfg), ...]`` (empty when all agree or the file has
    no metadata). Usable from any script::

        >>> check_weights_metadata(cfg, "r50_converted.pth")
        [('INPUT.FORMAT', 'RGB', 'BGR'), ('MODEL.PIXEL_STD', [58.395, 57.12, 57.375], [1.0, 1.0, 1.0])]
    """
    if isinstance(checkpoint, str):
        checkpoint = read_checkpoint(checkpoint)
    meta = checkpoint.get(METADATA_KEY, checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config"), Mapping):
        return []
    wrong = []
    for key, want in meta["config"].items():
        have = _cfg_value(cfg, key)
        if have is KeyError:
            continue
        if not _same(have, want):
            wrong.append((key, want, have))
    if wrong:
        sets = " ".join(f"{k} {_fmt(w)}" for k, w, _ in wrong)
        now = ", ".join(f"{k}={_fmt(h)}" for k, _, h in wrong)
        (log or logger).warning(
            f"The weights ({meta.get('arch')}, converted from {meta.get('source_format')}) expect other config "
            f"values than the running config ({now}). Set: {sets}")
    return wrong


def check_shape_skips(model_keys: Sequence[str], incorrect_shapes: Sequence, metadata: Optional[Mapping] = None,
                      loaded_keys: Optional[Sequence[str]] = None) -> None:
    """Raise :class:`WeightsMismatchError` when most backbone tensors were skipped for a shape mismatch.

    Counts the checkpoint's tensors that have a name in the model's backbone (``backbone.bottom_up.*``,
    or ``backbone.*`` without an FPN): if more than half of them had another shape, the checkpoint
    is for another depth/width/variant and training from it would silently start from scratch.
    """
    prefix = PREFIX if any(k.startswith(PREFIX) for k in model_keys) else "backbone."
    bb = [(k, c, m) for k, c, m in incorrect_shapes if k.startswith(prefix)]
    loaded = [k for k in (loaded_keys or ()) if k.startswith(prefix)]
    total = len(bb) + len(loaded)
    if not bb or len(bb) * 2 <= total:
        return
    examples = "; ".join(f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in bb[:3])
    msg = (f"{len(bb)} of the {total} backbone tensors in the checkpoint have other shapes than the model and were "
           f"skipped ({examples}). The checkpoint was made for another depth, width or variant than "
           f"MODEL.BACKBONE / the family config describes.")
    if metadata and isinstance(metadata.get("config"), Mapping):
        sets = " ".join(f"{k} {_fmt(v)}" for k, v in metadata["config"].items()
                        if not k.startswith(("INPUT", "MODEL.PIXEL")))
        msg += f" The file says it holds {metadata.get('arch')}: set {sets}."
    else:
        msg += (" Fix: set the family keys to the checkpoint's architecture (e.g. MODEL.RESNETS.DEPTH, "
                "MODEL.VOVNET.CONV_BODY, MODEL.GHOSTNET.WIDTH), or convert it with python -m d2_backbones.convert.")
    raise WeightsMismatchError(msg)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2_backbones.convert",
                                description="Convert a pretrained checkpoint for d2_backbones (see the module doc).")
    p.add_argument("src", help="checkpoint to read (.pth/.pt/.bin saved by torch.save)")
    p.add_argument("dst", help="file to write (load it with MODEL.WEIGHTS)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--arch", default=None, help="R-50, R-101-V1d, X-101-32x8d, V-39-eSE, ghostnet_100, 1.3, ...")
    p.add_argument("--style", default=None, choices=("pytorch", "caffe"),
                   help="MMDetection weights only: caffe sets STRIDE_IN_1X1 True, BGR and std 1 (default pytorch)")
    p.add_argument("--allow-partial", action="store_true",
                   help="write the matching tensors even if some do not map or fit (experts)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if os.path.abspath(args.src) == os.path.abspath(args.dst):
            raise ConvertError("SRC and DST are the same file.")
        result = convert_checkpoint(read_checkpoint(args.src), args.format, arch=args.arch, style=args.style,
                                    allow_partial=args.allow_partial, source=args.src)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = result.pop("report")
    meta = result[METADATA_KEY]
    torch.save(result, args.dst)
    nbt = [k for k in report["dropped"] if k.endswith("num_batches_tracked")]
    other = [k for k in report["dropped"] if not k.endswith("num_batches_tracked")]
    print(f"format {meta['source_format']}, arch {meta['arch']}: {len(result['model'])} tensors written to "
          f"{args.dst}")
    print(f"dropped ({len(other)} classifier/profiler/head, {len(nbt)} num_batches_tracked): {_listing(other, 20)}")
    if meta["partial"]:
        print(f"--allow-partial: NOT written: {len(report['unexpected'])} unmapped "
              f"({_listing(report['unexpected'])}), {len(report['shape_mismatch'])} shape mismatches "
              f"({_listing(report['shape_mismatch'], 5)}); {len(report['missing'])} model parameters stay "
              f"initialised ({_listing(report['missing'])})")
    print("config for these weights: " + " ".join(f"{k} {_fmt(v)}" for k, v in meta["config"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
