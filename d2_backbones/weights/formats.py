"""The weight formats the package converts, as one table, and the conversion itself.

Each :class:`WeightFormat` row says how a format is detected (from key names), which family it
belongs to, and how it is converted: the key map (a pure function beside the family, as timm
keeps ``checkpoint_filter_fn`` in each model file), how the architecture is inferred from the
tensors, and the config values the weights need. :data:`FORMATS` lists them in detection
order; :func:`detect_format` takes the first row whose ``detect`` matches.

=======================  ========  ==========================================================
format                   family    source
=======================  ========  ==========================================================
``mmdet-detector``       resnet    MMDetection detector ``{"meta", "state_dict"}``: backbone as
                                   ``mmdet-resnet``, FPN neck -> ``fpn_lateral``/``fpn_output``/
                                   ``top_block``; heads dropped
``vovnet-d2``            vovnet    vovnet-detectron2 / centermask2 files (bare or ``{"model"}``)
``timm-vovnet``          vovnet    timm ``ese_vovnet*`` / ``vovnet*a`` (eSE placement "last")
``ghostnet``             ghostnet  timm ``ghostnet_*`` and Huawei ``ghostnet_pytorch``
``timm-resnet``          resnet    timm ``resnet*c``/``resnet*d`` (deep stem, avg-down)
``mmdet-resnet``         resnet    open-mmlab ``ResNet``/``V1c``/``V1d``/ResNeXt, GN, DCN
``torchvision-resnet``   resnet    torchvision ``resnet*``/``resnext*`` (and timm's plain resnet)
=======================  ========  ==========================================================

Adding a format (or a fourth family's format): write its key map in the family file, then one
``_convert_<family>`` function here (architecture -> model, config) if the family is new, and one
row in :data:`FORMATS`.

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

from ..fpn import build_fpn
from ..ghostnet import GHOSTNET_STEM_CHANNELS, GHOSTNET_WIDTHS, GhostNet, convert_ghostnet_state_dict
from ..layers import make_divisible
from ..resnet import (RESNET_DEPTHS, build_resnet, convert_mmdet_resnet, convert_timm_resnet,
                      convert_torchvision_resnet)
from ..vovnet import VOVNET_SPECS, VoVNet, convert_timm_vovnet, convert_vovnet_detectron2
from .read import CheckpointReadError

__all__ = ["ConvertError", "WeightFormat", "FORMATS", "PREFIX", "METADATA_KEY", "PREPROCESSING_KEYS",
           "detect_format", "convert_checkpoint", "unwrap_state_dict"]

PREFIX = "backbone.bottom_up."
METADATA_KEY = "d2_backbones"
# Config keys that change the input, not the network: a mismatch is a warning. Every other
# key in a file's metadata changes the network, and a mismatch stops the load.
PREPROCESSING_KEYS = ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")

_RGB_IMAGENET = {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
                 "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]}
_BGR_CAFFE = {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
              "MODEL.PIXEL_STD": [1.0, 1.0, 1.0]}
_DROP_ALWAYS = re.compile(r"^(module\.)?(fc|head\.fc|classifier|conv_head)\.|(^|\.)(total_ops|total_params)$")


def _vovnet_ese_placement(cfg, value):
    """``MODEL.VOVNET.ESE_PLACEMENT: ""`` means the CONV_BODY's own placement."""
    if value:
        return value
    spec = VOVNET_SPECS.get(cfg.MODEL.VOVNET.CONV_BODY)
    return spec.ese if spec is not None else value


# Config keys whose value in a config can mean something else than it says; the load-time check
# compares the effective value: key -> fn(cfg, value).
EFFECTIVE_CONFIG_VALUE: Dict[str, Callable[[Any, Any], Any]] = {"MODEL.VOVNET.ESE_PLACEMENT": _vovnet_ese_placement}


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


def _has(sd: Mapping, pattern: str) -> bool:
    return any(re.search(pattern, k) for k in sd)


# ---------------------------------------------------------------------------------------------- ResNet
_ARCH_RE = re.compile(r"^(R|X)-(\d+)(?:-(\d+)x(\d+)d)?(?:-V1([cd]))?$", re.IGNORECASE)


def _resnet_arch_name(v: Mapping) -> str:
    name = f"X-{v['depth']}-{v['num_groups']}x{v['width_per_group']}d" if v["num_groups"] > 1 else f"R-{v['depth']}"
    suffix = "-V1d" if v["deep_stem"] and v["avg_down"] else "-V1c" if v["deep_stem"] else ""
    return name + suffix


def _infer_resnet(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture of a detectron2-named ResNet state dict, from its key names and shapes."""
    blocks: Dict[int, int] = {}
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
    v: Dict[str, Any] = dict(depth=depth, deep_stem=deep_stem, avg_down=False, num_groups=1, width_per_group=64,
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


def _resnet_variant(src_sd, sd, arch: Optional[str]) -> Dict[str, Any]:
    v = _infer_resnet(sd)
    v["avg_down"] = any(re.match(r"^layer\d\.\d+\.downsample\.2\.", k) for k in src_sd)
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


def _resnet_model(v: Mapping) -> nn.Module:
    kw = {k: v[k] for k in ("depth", "deep_stem", "avg_down", "num_groups", "width_per_group", "stem_channels",
                            "norm", "deform_on_per_stage", "res2_channels", "deform_modulated", "deform_num_groups")
          if k in v}
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
    laterals: Dict[int, Dict] = {}
    outputs: Dict[int, Dict] = {}
    unmapped: List[str] = []
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
    fpn: Dict[str, Any] = {"MODEL.FPN.IN_FEATURES": in_features, "MODEL.FPN.OUT_CHANNELS": out_channels}
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


def _convert_resnet(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                    style: Optional[str]) -> Converted:
    dropped: List[str] = []
    neck: Dict[str, torch.Tensor] = {}
    if fmt == "mmdet-detector":
        style = _mmdet_style(extras, style)
        neck = {k[len("neck."):]: v for k, v in src.items() if k.startswith("neck.")}
        dropped = sorted(k for k in src if not k.startswith(("backbone.", "neck.")))
        src = {k[len("backbone."):]: v for k, v in src.items() if k.startswith("backbone.")}
    key_map = {"torchvision-resnet": convert_torchvision_resnet, "timm-resnet": convert_timm_resnet}.get(
        fmt, convert_mmdet_resnet)
    bare, _ = key_map(src)
    v = _resnet_variant(src, bare, arch)
    stride_in_1x1 = style == "caffe"
    model = _resnet_model(v)
    config = {**_resnet_config(v, stride_in_1x1), **(_BGR_CAFFE if stride_in_1x1 else _RGB_IMAGENET)}
    variant = {"arch": _resnet_arch_name(v), "style": "caffe" if stride_in_1x1 else "pytorch", **v}
    extra, reference, unmapped = {}, {}, []
    if fmt == "mmdet-detector":
        extra, fpn_cfg, unmapped = _convert_neck(neck, model)
        config.update(fpn_cfg)
        fpn = build_fpn(model, fpn_cfg["MODEL.FPN.IN_FEATURES"], fpn_cfg["MODEL.FPN.OUT_CHANNELS"],
                        top_block=fpn_cfg["MODEL.FPN.TOP_BLOCK"],
                        top_block_source=fpn_cfg.get("MODEL.FPN.TOP_BLOCK_SOURCE", "on_input"),
                        top_block_relu=fpn_cfg.get("MODEL.FPN.TOP_BLOCK_RELU", True))
        reference = {"backbone." + k: t for k, t in fpn.state_dict().items() if not k.startswith("bottom_up.")}
    return Converted(bare, model, config, variant, dropped, extra, reference, unmapped)


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


def _convert_vovnet(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                    style: Optional[str]) -> Converted:
    dropped: List[str] = []
    if fmt == "timm-vovnet":
        bare, _ = convert_timm_vovnet(src)
    else:
        bare, _ = convert_vovnet_detectron2(src)
        dropped = sorted(k for k in src if not re.match(r"^((module|backbone\.bottom_up|bottom_up)\.)*"
                                                        r"(stem|stage[2-5])\.", k))
    body, placement = _infer_vovnet(bare, arch)
    model = VoVNet(body, norm="BN", ese_placement=placement)
    config = {"MODEL.VOVNET.CONV_BODY": body, "MODEL.VOVNET.ESE_PLACEMENT": placement,
              **(_RGB_IMAGENET if fmt == "timm-vovnet" else _BGR_CAFFE)}
    return Converted(bare, model, config, {"arch": body, "CONV_BODY": body, "ESE_PLACEMENT": placement},
                     dropped, {}, {}, [])


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
    config = {"MODEL.GHOSTNET.WIDTH": width, "MODEL.GHOSTNET.FINAL_CONV": final_conv, **_RGB_IMAGENET}
    variant = {"arch": f"ghostnet width {width:g}", "width": width, "final_conv": final_conv}
    return Converted(bare, model, config, variant, dropped, {}, {}, [])


# ---------------------------------------------------------------------------------------------- the table
def _is_torchvision_resnet(sd) -> bool:
    return _has(sd, r"^layer1\.0\.conv1\.weight$")


FORMATS: Dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("mmdet-detector", "resnet", "MMDetection detector checkpoint (backbone + FPN neck; heads dropped)",
                 lambda sd: _has(sd, r"^backbone\.") and _has(sd, r"^(neck|rpn_head|roi_head|bbox_head)\."),
                 _convert_resnet),
    WeightFormat("vovnet-d2", "vovnet", "vovnet-detectron2 / centermask2 checkpoint",
                 lambda sd: _has(sd, r"(^|\.)stem\.stem_1/"), _convert_vovnet),
    WeightFormat("timm-vovnet", "vovnet", "timm ese_vovnet* / vovnet*a",
                 lambda sd: _has(sd, r"^stages\.\d\.blocks\.\d+\.conv_(mid|concat)\."), _convert_vovnet),
    WeightFormat("ghostnet", "ghostnet", "timm ghostnet_* / Huawei ghostnet_pytorch",
                 lambda sd: "conv_stem.weight" in sd and _has(sd, r"^blocks\.\d+\.\d+\.ghost1\."), _convert_ghostnet),
    WeightFormat("timm-resnet", "resnet", "timm resnet*c / resnet*d (deep stem, avg-down)",
                 lambda sd: _is_torchvision_resnet(sd) and "conv1.0.weight" in sd, _convert_resnet),
    WeightFormat("mmdet-resnet", "resnet", "open-mmlab ResNet / V1c / V1d / ResNeXt, GN, DCN",
                 lambda sd: _is_torchvision_resnet(sd) and ("stem.0.weight" in sd or "gn1.weight" in sd or _has(
                     sd, r"^layer\d\.\d+\.gn\d\.") or _has(sd, r"\.conv2\.conv_offset\.")), _convert_resnet),
    WeightFormat("torchvision-resnet", "resnet", "torchvision resnet* / resnext* (and timm's plain resnet*)",
                 _is_torchvision_resnet, _convert_resnet),
)}


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
