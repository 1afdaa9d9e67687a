"""TorchScript and ONNX export of d2_backbones backbones (+ FPN), checked against eager outputs.

Command line::

    python -m d2_backbones.export --config-file configs/VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml \\
        --format onnx --output out/ --height 800 --width 1344 MODEL.WEIGHTS model_final.pth

The tool builds the config the way training does - :func:`d2_backbones.get_cfg` (detectron2's
defaults plus every d2_backbones key), then the yaml, then the ``KEY VALUE`` overrides - so a
yaml with ``MODEL.VOVNET.*`` / ``MODEL.GHOSTNET.*`` keys never hits "Non-existent config key".
It builds ``cfg.MODEL.BACKBONE.NAME`` through detectron2's registry (the backbone + FPN for the
shipped yamls; ``--bottom-up`` exports the backbone without the FPN), loads ``MODEL.WEIGHTS``
when set (a detector checkpoint: ``backbone.*`` keys; the rest is ignored), exports, and then
runs the exported file and the eager model on the export size and on a second size and fails
unless every output agrees (max abs difference <= ``--tolerance`` x max(1, max |eager|)).

Input and output of the exported module: a float tensor ``(N, 3, H, W)``, already normalised
(``(image - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD`` in ``INPUT.FORMAT`` channel order), H and W
multiples of 32 (detectron2 pads images to ``size_divisibility`` = 32 before the FPN; a size
that is not is refused with the fix). ``--include-normalization`` puts that normalisation
inside the exported module instead (input: the raw image in ``INPUT.FORMAT``, 0-255).
TorchScript modules return ``Dict[str, Tensor]`` (``p2 .. p6`` for an FPN); ONNX graphs have one
input ``images`` and one output per feature, named like the features, in
``backbone.output_shape()`` order.

Coverage (what the tests check, ``tests/test_export.py`` and ``tests/test_fpn.py``):

=====================================================  ==========  ===========  ===============
module                                                 TS tracing  TS scripting ONNX (opset 18)
=====================================================  ==========  ===========  ===============
ResNet / ResNeXt (+ deep stem, avg_down, plugins)+FPN  tested      tested       tested (R-18)
ResNet with DCN (``DEFORM_ON_PER_STAGE``)              tested      tested       no [1]
VoVNet V2 (eSE, dw and non-dw) + FPN                   tested      tested       tested
VoVNet with DCN (``STAGE_WITH_DCN``)                   works       no [2]       no [1]
GhostNet (any width) + FPN                             tested      tested       tested
FPN top blocks maxpool, p6p7                           tested      tested       maxpool tested
FPN top block p6                                       works       works        untested
FPN ``TOP_BLOCK_SOURCE: on_lateral``                   works       no [3]       untested
whole detectors                                        ``--whole-model`` [4]
=====================================================  ==========  ===========  ===============

[1] ``torchvision.ops.deform_conv2d`` has no ONNX translation in torch's exporters.
[2] the deformable unit looks its children up by their checkpoint names at run time.
[3] that block references the FPN's lateral conv through a Python tuple (``@torch.jit.unused``).
[4] ``--whole-model`` exports the whole detector (Faster / Mask / Cascade R-CNN, Panoptic FPN,
RetinaNet, FCOS; yaml or Python config) to TorchScript or ONNX: a uint8 ``(H, W, 3)`` image in
(resized, normalised and padded inside), ``boxes``, ``scores``, ``classes`` (, ``masks``, ``sem_seg``)
out, checked against eager on two images. See :mod:`d2_backbones.export_model` and docs/export.md.

``with_cp`` and ``norm_eval`` have no effect on export (the exported module runs the eval
path). Modules with "/" in their names (VoVNet keeps vovnet-detectron2's checkpoint names,
e.g. ``stem_1/conv``) script, trace, save and load fine, and export to ONNX.

ONNX: ``--onnx-exporter dynamo`` (default; ``torch.onnx.export(dynamo=True)``, torch's default
since 2.9) or ``torchscript`` (the legacy exporter, deprecated by torch but 3-5x faster).
Height and width are dynamic (multiples of 32) unless ``--static``. Run the result with
onnxruntime::

    import onnxruntime as ort
    sess = ort.InferenceSession("out/backbone.onnx", providers=["CPUExecutionProvider"])
    feats = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))

and the TorchScript file from Python (``torch.jit.load``) or C++ (``torch::jit::load``).
"""
import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .export_model import ONNX_OPSET, export_and_check, sample_images, setup_cfg
from .weights import Checkpointer

__all__ = [
    "EXPORT_METHODS",
    "FORMATS",
    "ONNX_OPSET",
    "FeatureTuple",
    "Normalize",
    "setup_cfg",
    "build_export_model",
    "check_input_size",
    "export_torchscript",
    "export_onnx",
    "run_onnx",
    "max_rel_diff",
    "main",
]

FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
ONNX_EXPORTERS = ("dynamo", "torchscript")
_DIVISOR = 32


class FeatureTuple(nn.Module):
    """Wraps a backbone so it returns a tuple of its features in ``output_shape()`` order (for ONNX)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.names: List[str] = list(backbone.output_shape())

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        return tuple(out[k] for k in self.names)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, then ``model`` (``--include-normalization``)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.model((x - self.mean) / self.std)

    def output_shape(self):
        return self.model.output_shape()


def build_export_model(cfg, bottom_up: bool = False, load_weights: bool = True) -> nn.Module:
    """Build ``cfg.MODEL.BACKBONE.NAME`` (eval mode), load ``MODEL.WEIGHTS``' backbone tensors if set.

    With ``bottom_up`` the FPN's ``bottom_up`` backbone is returned instead of the FPN.
    """
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    model = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    if load_weights and cfg.MODEL.WEIGHTS:
        # a detector checkpoint has "backbone." keys; wrap so its names line up
        holder = nn.Module()
        holder.backbone = model
        Checkpointer(holder, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    if bottom_up:
        if not hasattr(model, "bottom_up"):
            raise ValueError(f"--bottom-up: {cfg.MODEL.BACKBONE.NAME} builds no FPN (it has no bottom_up); "
                             f"drop --bottom-up")
        model = model.bottom_up
    return model.eval()


def check_input_size(height: int, width: int, divisor: int = _DIVISOR) -> None:
    """Refuse sizes the FPN cannot take (its top-down path needs sides divisible by 32)."""
    if height % divisor or width % divisor or height <= 0 or width <= 0:
        raise ValueError(
            f"Input of size {height}x{width} is not divisible by backbone.size_divisibility={divisor}; the FPN "
            f"top-down path needs padded inputs. Use a multiple of {divisor} (e.g. "
            f"{-(-height // divisor) * divisor}x{-(-width // divisor) * divisor}; detectron2's "
            f"ImageList.from_tensors(images, size_divisibility={divisor}) pads to it).")


def export_torchscript(model: nn.Module, sample: torch.Tensor, method: str = "tracing",
                       path: Optional[str] = None) -> torch.jit.ScriptModule:
    """Trace or script ``model`` (eval mode, ``torch.no_grad``); save to ``path`` if given.

    Scripting applies detectron2's scripting patches (``detectron2.export.torchscript``):
    ResNet's and FPN's ``__prepare_scriptable__`` regroup their stages/convs into ModuleLists
    in the scripted copy (eager modules and checkpoints are unchanged).
    """
    if method not in EXPORT_METHODS:
        raise ValueError(f"export method {method!r} is not one of {EXPORT_METHODS}")
    model.eval()
    with torch.no_grad():
        if method == "scripting":
            import detectron2.export.torchscript  # noqa: F401  (registers detectron2's scripting patches)

            ts = torch.jit.script(model)
        else:
            ts = torch.jit.trace(model, (sample,), strict=False, check_trace=False)
    if path:
        torch.jit.save(ts, path)
    return ts


def export_onnx(model: nn.Module, sample: torch.Tensor, path: str, *, opset: int = ONNX_OPSET,
                dynamic: bool = True, exporter: str = "dynamo") -> List[str]:
    """Export ``model`` (a backbone returning a dict) to ONNX at ``path``; returns the output names.

    Height and width are dynamic (multiples of 32) unless ``dynamic=False``; the batch is fixed.
    """
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"ONNX exporter {exporter!r} is not one of {ONNX_EXPORTERS}")
    wrapped = FeatureTuple(model).eval()
    names = wrapped.names
    kwargs: Dict = dict(input_names=["images"], output_names=names, opset_version=opset)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False)
        if dynamic:
            kwargs["dynamic_shapes"] = {"x": {2: _DIVISOR * torch.export.Dim("h32", min=1, max=256),
                                              3: _DIVISOR * torch.export.Dim("w32", min=1, max=256)}}
    else:
        kwargs.update(dynamo=False)
        if dynamic:
            kwargs["dynamic_axes"] = {"images": {2: "height", 3: "width"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(wrapped, (sample,), path, **kwargs)
    model.eval()  # the legacy exporter restores the wrapper's mode, which cascades to the model
    return names


def run_onnx(path: str, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run an exported file with onnxruntime (CPU); returns ``{output name: tensor}``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})
    return {o.name: torch.from_numpy(v) for o, v in zip(sess.get_outputs(), outs)}


def max_rel_diff(eager: Mapping[str, torch.Tensor], exported: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per feature: max |eager - exported| / max(1, max |eager|). Missing or reshaped outputs raise."""
    if list(eager) != list(exported):
        raise AssertionError(f"exported outputs {list(exported)} differ from eager outputs {list(eager)}")
    out = {}
    for k, ref in eager.items():
        got = exported[k]
        if tuple(got.shape) != tuple(ref.shape):
            raise AssertionError(f"{k}: exported shape {tuple(got.shape)} != eager {tuple(ref.shape)}")
        out[k] = float((got.float() - ref.float()).abs().max()) / max(1.0, float(ref.abs().max()))
    return out


def _runner(fmt: str, path: str) -> Callable[[torch.Tensor], Dict]:
    if fmt == "onnx":
        return lambda x: run_onnx(path, x)
    loaded = torch.jit.load(path)
    return lambda x: {k: v for k, v in loaded(x).items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m d2_backbones.export",
        description="Export a d2_backbones backbone (+FPN) to TorchScript or ONNX and check it against eager.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Covered: backbone + FPN of every family; with --whole-model the whole detector (Faster/Mask/"
               "Cascade R-CNN, Panoptic FPN, RetinaNet, FCOS) from a yaml or Python config, image in, detections "
               "out (see the d2_backbones.export docstring and docs/export.md).")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="yaml config (any shipped config); with --whole-model also a Python (.py) config")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default=None,
                        help="TorchScript only: tracing (default) or scripting (backbone + FPN only)")
    parser.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default=None,
                        help="dynamo (default) or torchscript (the legacy tracer; --whole-model always uses it)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset")
    parser.add_argument("--output", default="export_output", help="output directory")
    parser.add_argument("--height", type=int, default=512, help="export/check input height (multiple of 32)")
    parser.add_argument("--width", type=int, default=512, help="export/check input width (multiple of 32)")
    parser.add_argument("--bottom-up", action="store_true", help="export the backbone without the FPN")
    parser.add_argument("--static", action="store_true", help="ONNX: fixed input size (default: dynamic H, W)")
    parser.add_argument("--include-normalization", action="store_true",
                        help="put (x - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD inside the exported module")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs difference allowed, relative to max(1, max |eager output|)")
    parser.add_argument("--unsafe-yaml", action="store_true",
                        help="read a yaml config with Python tags (they run code when read): only for files you trust")
    whole = parser.add_argument_group("whole detector (--whole-model)")
    whole.add_argument("--whole-model", action="store_true",
                       help="export the whole detector: uint8 HxWx3 image in; boxes, scores, classes (, masks, "
                            "sem_seg) out, resizing and normalisation inside")
    whole.add_argument("--sample-image", nargs="+", default=[], metavar="IMAGE",
                       help="images to export and check on (default: two synthetic shapes pictures)")
    whole.add_argument("--image-format", choices=("BGR", "RGB"), default=None,
                       help="channel order of the images the exported file takes (default: INPUT.FORMAT)")
    whole.add_argument("--box-tolerance", type=float, default=0.05,
                       help="max |box coordinate difference| in pixels between a file's and eager detections")
    whole.add_argument("--score-tolerance", type=float, default=1e-3, help="max |score difference|")
    whole.add_argument("--max-unmatched", type=float, default=0.2,
                       help="fraction of detections per image allowed to differ as a whole (near-ties in the RPN)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE ... (yaml) or key=value ... (Python config)")
    args = parser.parse_args(argv)
    if args.whole_model:
        return _main_whole_model(parser, args)
    args.export_method = args.export_method or "tracing"
    args.onnx_exporter = args.onnx_exporter or "dynamo"

    check_input_size(args.height, args.width)
    from .yaml_safety import allow_unsafe_yaml

    with allow_unsafe_yaml(args.unsafe_yaml):  # without the flag a Python tag in the yaml is refused
        cfg = setup_cfg(args.config_file, args.opts)
    model = build_export_model(cfg, bottom_up=args.bottom_up)
    if args.include_normalization:
        model = Normalize(model, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD).eval()
    os.makedirs(args.output, exist_ok=True)
    stem = "backbone" if args.bottom_up else "backbone_fpn"
    torch.manual_seed(0)
    scale = 255.0 if args.include_normalization else 1.0
    sample = torch.rand(1, 3, args.height, args.width) * scale if args.include_normalization \
        else torch.randn(1, 3, args.height, args.width)

    if args.format == "onnx":
        path = os.path.join(args.output, f"{stem}.onnx")
        export_onnx(model, sample, path, opset=args.opset, dynamic=not args.static, exporter=args.onnx_exporter)
    else:
        path = os.path.join(args.output, f"{stem}_{args.export_method}.ts")
        export_torchscript(model, sample, args.export_method, path)
    run = _runner(args.format, path)

    sizes = [(args.height, args.width)]
    if not (args.format == "onnx" and args.static):
        sizes.append((args.height + _DIVISOR, max(_DIVISOR, args.width - _DIVISOR)))
    report: Dict[str, Dict[str, float]] = {}
    worst = 0.0
    for h, w in sizes:
        x = torch.rand(1, 3, h, w) * scale if args.include_normalization else torch.randn(1, 3, h, w)
        with torch.no_grad():
            eager = model(x)
            diffs = max_rel_diff(eager, run(x))
        report[f"{h}x{w}"] = diffs
        worst = max(worst, max(diffs.values()))
        shapes = ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in eager.items())
        print(f"{h}x{w}: max rel diff {max(diffs.values()):.2e} ({shapes})")
    how = f"{args.onnx_exporter} opset {args.opset}" if args.format == "onnx" else args.export_method
    print(f"Exported {cfg.MODEL.BACKBONE.NAME}{' (bottom-up only)' if args.bottom_up else ''} to {path} "
          f"[{args.format}, {how}]")
    if worst > args.tolerance:
        print(f"FAILED: exported outputs differ from eager by {worst:.2e} > --tolerance {args.tolerance:g}",
              file=sys.stderr)
        raise SystemExit(1)
    return report


def _main_whole_model(parser: argparse.ArgumentParser, args) -> Dict[str, Dict[str, float]]:
    """``--whole-model``: export the detector, check it on the sample images, exit 1 on a disagreement."""
    if not args.config_file:
        parser.error("--whole-model needs --config-file (a yaml or a Python config)")
    unused = [flag for flag, on in (("--bottom-up", args.bottom_up), ("--static", args.static),
                                    ("--include-normalization", args.include_normalization),
                                    ("--export-method scripting", args.export_method == "scripting"),
                                    ("--onnx-exporter dynamo", args.onnx_exporter == "dynamo")) if on]
    if unused:
        parser.error(f"{', '.join(unused)} cannot be used with --whole-model: the whole detector is traced (the "
                     f"legacy TorchScript tracer, also for ONNX: torch.export stops on its data-dependent numbers "
                     f"of boxes), takes an image of any size and normalises it inside. Fix: drop {unused[0]}.")
    images = sample_images(args.sample_image)
    if args.image_format == "BGR":  # PIL reads RGB
        images = [im.flip(-1).contiguous() for im in images]
    result = export_and_check(args.config_file, args.opts, fmt=args.format, output=args.output, images=images,
                              image_format=args.image_format, opset=args.opset, box_tol=args.box_tolerance,
                              score_tol=args.score_tolerance, max_unmatched=args.max_unmatched, unsafe_yaml=args.unsafe_yaml)
    report: Dict[str, Dict[str, float]] = {}
    for image, check in zip(images, result.checks):
        size = f"{image.shape[0]}x{image.shape[1]}"
        print(f"{size}: {check}")
        report[size] = {"matched": check.matched, "box": check.max_box_diff, "score": check.max_score_diff,
                        "mask": check.max_mask_diff}
    print(f"Exported the whole detector ({', '.join(result.names)}) to {result.path} [{args.format}] in "
          f"{result.seconds:.1f} s")
    if not any(c.n_ref for c in result.checks):
        print("WARNING: the model detected nothing on the sample images, so the check compared no detections. "
              "Pass images it detects objects in with --sample-image.", file=sys.stderr)
    if not result.ok:
        print(f"FAILED: the exported file's detections differ from the eager model's (--box-tolerance "
              f"{args.box_tolerance:g} px, --score-tolerance {args.score_tolerance:g}); see above.", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
