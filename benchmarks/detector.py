"""Whole-detector CPU latency: detectron2's ``DefaultPredictor`` vs ours, per runtime and precision.

For each model (Mask R-CNN with R-50-FPN, V-39-eSE-FPN, GhostNet-1.0-FPN by default) and image size
(800x1333 and 640x640), one process builds detectron2's ``DefaultPredictor`` and ours
(:func:`d2_backbones.make_predictor`) for every ``--modes`` entry (``torch-fp32``, ``onnxruntime-fp32``,
``openvino-fp32``, ``torch-bf16``, ``openvino-bf16``, ``onnxruntime-int8``, ``openvino-int8``), all with the
same weights, and times them in paired rounds: each round runs every predictor twice on the same image (the
second run timed) in rotating order, so that all of a round see the same machine speed; the speedup of a row
is the median over rounds of ``detectron2 ms / ours ms`` of the same round.

Weights: random, made realistic so that the heads do the work of a trained model: the norms' statistics are
set from the activations of one image (unit-variance features throughout), and the classifier is sharpened so
that confident, varied scores pass ``SCORE_THRESH_TEST``; every predictor returns ``--detections`` instances
(100, with their masks, by default: ``TEST.DETECTIONS_PER_IMAGE``). int8 modes are calibrated on the fly on
``--calib-images`` synthetic images (the calibration command does the same on a training set).

Each row prints the largest difference to detectron2's output (boxes in pixels, scores; masks as the fraction
of mask pixels that differ) and the header names the CPU and its ISA (AVX-512, AVX512-BF16, AMX, VNNI).

Run (about 30 minutes on 2 idle cores; 22 with --rounds 3)::

    python benchmarks/detector.py --out detector_benchmark.md

Quick form (a minute)::

    python benchmarks/detector.py --models R-50 --sizes 320x320 --modes torch-fp32 onnxruntime-fp32 --rounds 1
"""
import argparse
import copy
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from inference import _size, paired_rounds  # noqa: E402  (HxW sizes and the timing loop of benchmarks/inference.py)

MODELS = {"R-50": "ResNet/mask_rcnn_R_50_FPN_1x.yaml", "V-39-eSE": "VoVNet/mask_rcnn_V_39_eSE_FPN_3x.yaml",
          "GhostNet-1.0": "GhostNet/mask_rcnn_ghostnet_100_FPN_1x.yaml"}
MODES = ["torch-fp32", "onnxruntime-fp32", "openvino-fp32", "torch-bf16", "openvino-bf16", "onnxruntime-int8",
         "openvino-int8"]
DOCS_MARKERS = ("<!-- detector-benchmark-start -->", "<!-- detector-benchmark-end -->")
TARGETS = {"fp32": 1.7, "bf16": 3.0, "int8": 4.0}  # whole detector vs detectron2, on an AVX-512 + BF16 CPU


# ---------------------------------------------------------------------------------------------- weights
def realistic_weights(model: nn.Module, image: torch.Tensor, sharpen: float = 10.0, seed: int = 0) -> nn.Module:
    """Give a randomly initialised detectron2 model the activation statistics of a trained one, in place.

    Every BatchNorm / FrozenBatchNorm2d gets the per-channel mean and variance of its input on ``image``
    (one forward pass, layer by layer), so features stay of unit scale; the RPN objectness and the box
    classifier are scaled by ``sharpen`` so that scores are confident and varied (a freshly initialised head
    scores every class about 1 / (classes + 1)). ``image``: a ``(3, H, W)`` float tensor (0-255, the model's
    input format).
    """
    from detectron2.layers import FrozenBatchNorm2d
    from torch.nn.modules.batchnorm import _BatchNorm

    hooks = []

    def set_stats(module, args):
        x = args[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) + 1e-3)

    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, _BatchNorm)) and m.running_mean is not None:
            hooks.append(m.register_forward_pre_hook(set_stats))
    g = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        model.backbone(images.tensor)
        for h in hooks:
            h.remove()
        rpn = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
        if rpn is not None:
            rpn.objectness_logits.weight.normal_(0, 1.0 / rpn.objectness_logits.weight.shape[1] ** 0.5, generator=g)
        roi = getattr(model, "roi_heads", None)
        predictor = getattr(roi, "box_predictor", None)
        if predictor is not None and hasattr(predictor, "cls_score"):
            predictor.cls_score.weight.mul_(sharpen)
    return model


# ---------------------------------------------------------------------------------------------- helpers
def cpu_header() -> str:
    from d2_backbones.runtime import describe_isa

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}; ISA: {describe_isa()}; {torch.get_num_threads()} threads; torch {torch.__version__}"


def build_cfg(config: str, size: Tuple[int, int], opts: Sequence[str] = ()):
    from d2_backbones.config import get_cfg
    from d2_backbones.model_zoo import get_config_file

    cfg = get_cfg()
    cfg.merge_from_file(get_config_file(config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", min(size),
                         "INPUT.MAX_SIZE_TEST", max(size)] + list(opts))
    return cfg


def synthetic_image(size: Tuple[int, int], seed: int = 0) -> np.ndarray:
    """A synthetic HxWx3 uint8 image with shapes on a smooth background (deterministic)."""
    h, w = size
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 127 // (h + w))], -1)
    img = img.astype(np.float32)
    for _ in range(40):
        cy, cx, r = rng.randint(0, h), rng.randint(0, w), rng.randint(8, max(9, min(h, w) // 6))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if rng.rand() < 0.5 else \
            (abs(yy - cy) < r) & (abs(xx - cx) < r)
        img[mask] = rng.randint(0, 256, size=3)
    return np.clip(img + rng.randn(h, w, 3) * 8, 0, 255).astype(np.uint8)


def compare(ours, ref) -> Dict[str, float]:
    """Largest differences between two ``Instances``, matched one to one (same class, nearest box; instances of
    nearly equal scores may come in another order): ``unmatched`` count, then over the matched pairs the largest
    box difference (px), score difference and the fraction of mask pixels that differ."""
    out = {"count": abs(len(ours) - len(ref)), "boxes": 0.0, "scores": 0.0, "masks": 0.0}
    if len(ref) == 0 or len(ours) == 0:
        out["unmatched"] = max(len(ours), len(ref))
        return out
    a, b = ours.pred_boxes.tensor, ref.pred_boxes.tensor
    dist = (a[:, None, :] - b[None, :, :]).abs().amax(-1)  # (ours, ref) L-inf box distance
    dist[ours.pred_classes[:, None] != ref.pred_classes[None, :]] = float("inf")
    taken, pairs = set(), []
    for j in torch.argsort(ref.scores, descending=True).tolist():
        order = torch.argsort(dist[:, j]).tolist()
        i = next((i for i in order if i not in taken and dist[i, j] < float("inf")), None)
        if i is not None:
            taken.add(i)
            pairs.append((i, j))
    out["unmatched"] = len(ref) - len(pairs)
    if pairs:
        io, jr = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        out["boxes"] = float(dist[io, jr].max())
        out["scores"] = float((ours.scores[io] - ref.scores[jr]).abs().max())
        if ref.has("pred_masks"):
            ma, mb = ours.pred_masks[io].bool(), ref.pred_masks[jr].bool()
            out["masks"] = float((ma ^ mb).sum()) / max(1.0, float((ma | mb).sum()))
    return out


def calibrate_in_process(predictor_cfg, model, images: List[np.ndarray], path: str) -> str:
    """An int8 model of ``model``'s backbone + FPN (and of its mask head), calibrated on ``images`` (as python -m
    d2_backbones.calibrate does on a training set)."""
    from d2_backbones.calibrate import mask_head_inputs, model_inputs, quantize_backbone, quantize_mask_head
    from d2_backbones.runtime import mask_calibration_path, mask_head_hash

    rois = mask_head_inputs(model, predictor_cfg, images)
    if rois:  # the mask head too (openvino int8 runs it)
        quantize_mask_head(model, rois, mask_calibration_path(path),
                           meta={"d2b_hash": "benchmark", "d2b_mask_head_hash": mask_head_hash(predictor_cfg)})
    return quantize_backbone(model, model_inputs(model, predictor_cfg, images), path, meta={"d2b_hash": "benchmark"})


# ---------------------------------------------------------------------------------------------- measure
def build_predictors(name: str, size: Tuple[int, int], modes: Sequence[str], detections: int, calib: int,
                     tmp: str):
    from detectron2.engine import DefaultPredictor
    from d2_backbones import runtime as rt

    base = build_cfg(MODELS[name], size, ["TEST.DETECTIONS_PER_IMAGE", detections])
    torch.manual_seed(0)
    ref = DefaultPredictor(base)
    img = synthetic_image(size)
    realistic_weights(ref.model, torch.as_tensor(img.transpose(2, 0, 1).astype("float32")))
    state = copy.deepcopy(ref.model.state_dict())
    preds = {"detectron2": ref}
    for mode in modes:
        runtime, precision = mode.split("-")
        cfg = base.clone()
        cfg.merge_from_list(["TEST.RUNTIME", runtime, "TEST.PRECISION", precision])
        p = DefaultPredictor(base)
        p.model.load_state_dict(state)
        int8_path = None
        if precision == "int8":  # calibrated here on synthetic images (the calibrate command: a training set)
            int8_path = os.path.join(tmp, f"{name}-{size[0]}x{size[1]}.int8.onnx")
            calibrate_in_process(base, copy.deepcopy(p.model), [synthetic_image(size, s) for s in range(1, calib + 1)],
                                 int8_path)
        p.model = rt.prepare_model(p.model, cfg, int8_path=int8_path)
        preds[mode] = p
    return preds, img


def time_rounds(preds: Dict, img: np.ndarray, rounds: int, warmup: int) -> Dict[str, List[float]]:
    """ms per predictor and round on ``img``: :func:`inference.paired_rounds`."""
    return paired_rounds({k: functools.partial(p, img) for k, p in preds.items()}, rounds, warmup)


def bench(name: str, size: Tuple[int, int], modes: Sequence[str], rounds: int, warmup: int, detections: int,
          calib: int) -> List[Dict]:
    with tempfile.TemporaryDirectory() as tmp:
        preds, img = build_predictors(name, size, modes, detections, calib, tmp)
        with torch.no_grad():
            outs = {k: p(img)["instances"] for k, p in preds.items()}
        times = time_rounds(preds, img, rounds, warmup)
    med = statistics.median
    rows = []
    for mode in ["detectron2"] + list(modes):
        rows.append(dict(model=name, size=size, mode=mode, ms=med(times[mode]), n=len(outs[mode]),
                         speedup=med([a / b for a, b in zip(times["detectron2"], times[mode])]),
                         spread=(min(times[mode]), max(times[mode])), diff=compare(outs[mode], outs["detectron2"])))
    return rows


def format_row(r: Dict) -> str:
    d = r["diff"]
    diff = "—" if r["mode"] == "detectron2" else (
        f"boxes {d['boxes']:.1e} px, scores {d['scores']:.1e}, mask pixels {100 * d['masks']:.2f}%"
        + (f"; {d['unmatched']} unmatched" if d["unmatched"] else ""))
    precision = r["mode"].split("-")[-1]
    target = TARGETS.get(precision) if r["mode"] != "detectron2" else None
    mark = "" if target is None else (" ✓" if r["speedup"] >= target else f" (target {target}×)")
    return (f"| {r['model']} | {r['size'][0]}×{r['size'][1]} | {r['mode']} | {r['ms']:.0f} "
            f"({r['spread'][0]:.0f}–{r['spread'][1]:.0f}) | **{r['speedup']:.2f}×**{mark} | {r['n']} | {diff} |")


def replace_block(path: str, markers: Tuple[str, str], table: str) -> None:
    """Put ``table`` between the two marker lines of ``path`` (written to a temporary file, then renamed)."""
    text = open(path, encoding="utf-8").read()
    start, end = markers
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{before}{start}\n{table}{end}{after}")
    os.replace(tmp, path)


def main(argv: Sequence[str] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", nargs="+", type=_size, default=[(800, 1333), (640, 640)], metavar="HxW")
    p.add_argument("--modes", nargs="+", default=MODES, metavar="RUNTIME-PRECISION",
                   help=f"predictors besides detectron2's (default: {' '.join(MODES)})")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (medians over rounds)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per predictor")
    p.add_argument("--detections", type=int, default=100, help="TEST.DETECTIONS_PER_IMAGE")
    p.add_argument("--calib-images", type=int, default=8, help="synthetic images calibrating the int8 modes")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    p.add_argument("--update-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    a = p.parse_args(argv)
    bad = [m for m in a.modes if not re.fullmatch(r"(torch|onnxruntime|openvino)-(fp32|bf16|int8)", m)]
    if bad:
        p.error(f"unknown mode(s) {bad}: use RUNTIME-PRECISION, e.g. onnxruntime-fp32")

    import logging

    import d2_backbones  # noqa: F401  (registers the backbones)

    logging.getLogger("d2_backbones").setLevel(logging.WARNING)
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    header = cpu_header()
    print(header, flush=True)
    rows = []
    for size in a.sizes:
        for name in a.models:
            for r in bench(name, size, a.modes, a.rounds, a.warmup, a.detections, a.calib_images):
                rows.append(r)
                print(format_row(r), flush=True)
    command = "python benchmarks/detector.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = "\n".join([
        f"Measured by `{command.strip()}` ({(time.time() - t0) / 60:.0f} min): {header}. Mask R-CNN, batch 1, "
        f"{a.detections} detections with masks, random weights with realistic statistics. {a.warmup} warm-up "
        f"run(s) per predictor, then {a.rounds} paired rounds (each predictor twice back to back, the second "
        f"timed); ms: median (min–max) over rounds; speedup: median over rounds of detectron2 ms / ours ms in "
        f"the same round. Difference: ours vs detectron2's outputs.",
        "",
        "| model | image | predictor | ms | vs detectron2 | instances | max difference to detectron2 |",
        "|---|---|---|---:|---:|---:|---|"] + [format_row(r) for r in rows]) + "\n"
    print()
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table)
    if a.update_docs:
        replace_block(os.path.join(REPO, "docs", "benchmarks.md"), DOCS_MARKERS, table)
    return table


if __name__ == "__main__":
    main()
