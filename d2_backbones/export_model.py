"""The whole detector as one file: image in, boxes / scores / classes (/ masks) out.

:class:`DetectorExport` wraps a detectron2 meta-architecture built from a yacs or Python config
(any family) so that one call does everything ``DefaultPredictor`` does:

1. takes a ``uint8`` image ``(H, W, 3)`` in the model's channel order (``INPUT.FORMAT``, or
   ``image_format`` to have the channels flipped inside),
2. resizes it so its shorter side is ``INPUT.MIN_SIZE_TEST`` and its longer side at most
   ``INPUT.MAX_SIZE_TEST`` (detectron2's ``ResizeShortestEdge`` arithmetic for the size; bilinear
   as ``F.interpolate(align_corners=False)``, kept in float: detectron2's ``DefaultPredictor`` resizes the
   ``uint8`` image with PIL, which rounds and, when shrinking, antialiases, so its outputs differ
   slightly - the price of a resize that runs inside the file),
3. normalises with ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` and pads to the backbone's
   ``size_divisibility`` (the model's own ``preprocess_image``),
4. runs the backbone, the proposal generator and the heads (detectron2's modules, unchanged),
5. scales the boxes back to the input image, clips them, drops empty ones and pastes the masks
   into full-image masks (:func:`paste_masks`: detectron2's ``paste_masks_in_image`` arithmetic,
   written as two matrix products so it exports as plain ``MatMul``).

Outputs, in this order (:func:`output_names`): ``boxes`` float32 ``(N, 4)`` x0, y0, x1, y1 in
input-image pixels; ``scores`` float32 ``(N,)``; ``classes`` int64 ``(N,)``; ``masks`` uint8
``(N, H, W)`` of 0/1 (Mask R-CNN, Cascade Mask R-CNN, Panoptic FPN); ``sem_seg`` int64 ``(H, W)``,
the semantic class of every pixel (Panoptic FPN; the panoptic merge of instances and stuff is left to
the caller, see docs/export.md).

Covered meta-architectures: ``GeneralizedRCNN`` (Faster / Mask R-CNN, Cascade R-CNN through its
``CascadeROIHeads``), ``PanopticFPN``, ``RetinaNet``, ``FCOS`` (detectron2's dense detectors).
Others are refused with the list.

Both export formats trace :class:`DetectorExport` with the TorchScript tracer
(``torch.jit.trace``; ONNX: ``torch.onnx.export(..., dynamo=False)``): torch's default ONNX exporter
(``torch.export``) stops on the data-dependent numbers of boxes; the tracer records them as
``NonZero`` / ``TopK`` / ``NonMaxSuppression`` whose output sizes ONNX allows to vary.

>>> import torch
>>> m = torch.rand(1, 4, 4)
>>> paste_masks(m, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 8, 8, threshold=-1).shape
torch.Size([1, 8, 8])
"""
import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import get_cfg
from .weights import Checkpointer

__all__ = [
    "ONNX_OPSET",
    "IMAGE_FORMATS",
    "DetectorExport",
    "DetectionMatch",
    "setup_cfg",
    "paste_masks",
    "output_names",
    "build_detector",
    "export_detector_torchscript",
    "export_detector_onnx",
    "match_detections",
]

ONNX_OPSET = 18
IMAGE_FORMATS = ("BGR", "RGB")
_SUPPORTED = ("GeneralizedRCNN", "PanopticFPN", "RetinaNet", "FCOS")


def setup_cfg(config_file: str = "", opts: Sequence[str] = ()):
    """``d2_backbones.get_cfg()`` + ``config_file`` + ``opts`` (the order training uses), on CPU."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(opts))
    cfg.freeze()
    return cfg


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, size: torch.Tensor, m: int) -> torch.Tensor:
    """``(N, size, m)`` bilinear weights of the ``m`` mask cells for every pixel of one image axis.

    Pixel ``i`` (centre ``i + 0.5``) samples the mask at ``u = (i + 0.5 - lo) / (hi - lo) * m - 0.5``
    (``grid_sample`` with ``align_corners=False``); cell ``k`` weighs ``max(0, 1 - |u - k|)``, cells
    outside the mask weigh nothing (zero padding)."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    u = (centres[None, :] - lo[:, None]) / (hi - lo)[:, None] * m - 0.5
    cells = torch.arange(m, dtype=torch.float32)
    return (1 - (u[:, :, None] - cells).abs()).clamp(min=0)


def _resize_axis(x: torch.Tensor, dim: int, size: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` along ``dim`` to ``size`` (``align_corners=False``, as ``F.interpolate``).

    Written as two gathers and a linear blend rather than ``F.interpolate``: ONNX Runtime's ``Resize``
    computes its sampling positions another way and differs from torch by up to 3e-3 (of 255) at
    non-integer scales, which random-weight and cascade models amplify; gathers and element-wise
    float32 operations give the same bits in torch and in ONNX Runtime."""
    n_in = torch._shape_as_tensor(x)[dim]
    scale = n_in.float() / size.float()
    u = ((torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = torch.minimum(u.floor().long(), n_in - 1)
    i1 = torch.minimum(i0 + 1, n_in - 1)
    lam = u - i0.float()
    shape = [1] * x.dim()
    shape[dim] = -1
    x0, x1 = x.index_select(dim, i0), x.index_select(dim, i1)
    return x0 + (x1 - x0) * lam.reshape(shape)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height, width, threshold: float = 0.5) -> torch.Tensor:
    """Paste ``(N, M, M)`` mask probabilities into ``(N, height, width)`` image masks.

    The values are those of detectron2's ``paste_masks_in_image`` (bilinear ``grid_sample`` of each
    mask over its box, ``align_corners=False``, zeros outside): bilinear sampling on a grid whose x
    depends only on the column and y only on the row is separable, so each image mask is
    ``Wy @ mask @ Wx.T`` - two matrix products, no per-box loop, exportable to ONNX as ``MatMul``.
    Returns uint8 0/1 (``mask >= threshold``), or the float probabilities if ``threshold < 0``.
    ``height`` and ``width`` may be 0-dim tensors (traced image sizes).
    """
    m = masks.shape[-1]
    wy = _axis_weights(boxes[:, 1], boxes[:, 3], height, m)
    wx = _axis_weights(boxes[:, 0], boxes[:, 2], width, m)
    pasted = torch.matmul(torch.matmul(wy, masks.float()), wx.transpose(1, 2))
    if threshold < 0:
        return pasted
    return (pasted >= threshold).to(torch.uint8)


def _meta_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in _SUPPORTED:
            return cls.__name__
    raise ValueError(
        f"Whole-model export supports the meta-architectures {', '.join(_SUPPORTED)} (Cascade R-CNN is a "
        f"GeneralizedRCNN with CascadeROIHeads); got {type(model).__name__} (MODEL.META_ARCHITECTURE / "
        f"model._target_). Fix: export one of those, or its backbone + FPN (drop --whole-model).")


def output_names(model: nn.Module) -> List[str]:
    """The outputs :class:`DetectorExport` returns for ``model`` (a detectron2 meta-architecture)."""
    kind = _meta_name(model)
    if getattr(getattr(model, "roi_heads", None), "keypoint_on", False):
        raise ValueError("Whole-model export does not cover keypoint heads (MODEL.KEYPOINT_ON True): its outputs "
                         "are boxes, scores, classes, masks and sem_seg. Fix: set MODEL.KEYPOINT_ON False, or "
                         "export the backbone + FPN (drop --whole-model).")
    names = ["boxes", "scores", "classes"]
    if kind in ("GeneralizedRCNN", "PanopticFPN") and getattr(model.roi_heads, "mask_on", False):
        names.append("masks")
    if kind == "PanopticFPN":
        names.append("sem_seg")
    return names


class DetectorExport(nn.Module):
    """A detectron2 detector with its pre- and post-processing: ``uint8 (H, W, 3)`` image in, tuple out.

    Args:
        model: a detectron2 ``GeneralizedRCNN`` (Faster/Mask/Cascade R-CNN), ``PanopticFPN``,
            ``RetinaNet`` or ``FCOS`` in eval mode.
        min_size, max_size: the test-time resize (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``);
            ``min_size=0`` keeps the input size.
        model_format: the channel order the model expects (``INPUT.FORMAT``).
        image_format: the channel order of the images the exported file will get (default: the
            model's); the channels are flipped inside when they differ.
        mask_threshold: masks are ``probability >= mask_threshold`` (detectron2: 0.5).

    ``forward(image)`` returns the tensors named by :func:`output_names`.
    """

    def __init__(self, model: nn.Module, *, min_size: int, max_size: int, model_format: str = "BGR",
                 image_format: Optional[str] = None, mask_threshold: float = 0.5):
        super().__init__()
        self.kind = _meta_name(model)
        for name, fmt in (("model_format", model_format), ("image_format", image_format or model_format)):
            if fmt not in IMAGE_FORMATS:
                raise ValueError(f"{name} {fmt!r} is not one of {IMAGE_FORMATS} (the exported file takes a 3-channel "
                                 f"uint8 image). Fix: use BGR or RGB.")
        self.model = model.eval()
        self.names = output_names(model)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.flip = (image_format or model_format) != model_format
        self.mask_threshold = float(mask_threshold)

    def target_size(self, hw: torch.Tensor) -> torch.Tensor:
        """detectron2's ``ResizeShortestEdge.get_output_shape`` on a float64 ``(h, w)`` tensor -> int64 ``(h, w)``
        (float64, as detectron2's Python floats, so halves round the same way)."""
        if self.min_size <= 0:
            return hw.long()
        scale = self.min_size / hw.min()
        if self.max_size > 0:
            scale = torch.minimum(scale, self.max_size / (hw * scale).max() * scale)
        return torch.floor(hw * scale + 0.5).long()

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> the resized ``(3, h, w)`` float image (0-255) the model gets."""
        x = image.permute(2, 0, 1).float()
        if self.flip:
            x = x.flip(0)
        if self.min_size <= 0:
            return x
        new = self.target_size(torch._shape_as_tensor(image)[:2].double())
        return _resize_axis(_resize_axis(x, 1, new[0]), 2, new[1])

    def _instances(self, x: torch.Tensor):
        model = self.model
        if self.kind in ("RetinaNet", "FCOS"):
            images = model.preprocess_image([{"image": x}])
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            return model.forward_inference(images, features, model.head(features))[0], None
        images = model.preprocess_image([{"image": x}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        instances, _ = model.roi_heads(images, features, proposals, None)
        sem_seg = model.sem_seg_head(features, None)[0] if self.kind == "PanopticFPN" else None
        return instances[0], sem_seg

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.preprocess(image)
        inst, sem_seg = self._instances(x)
        in_hw = torch._shape_as_tensor(x)[1:].float()
        out_hw = torch._shape_as_tensor(image)[:2]
        out_h, out_w = out_hw[0], out_hw[1]
        scale = (out_hw.float() / in_hw).flip(0).repeat(2)  # (sx, sy, sx, sy)
        boxes = inst.pred_boxes.tensor * scale
        boxes = torch.stack([boxes[:, 0].clamp(min=0, max=out_w), boxes[:, 1].clamp(min=0, max=out_h),
                             boxes[:, 2].clamp(min=0, max=out_w), boxes[:, 3].clamp(min=0, max=out_h)], dim=1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # detectron2 drops empty boxes
        outs = [boxes[keep], inst.scores[keep], inst.pred_classes[keep].long()]
        if "masks" in self.names:
            outs.append(paste_masks(inst.pred_masks[keep][:, 0], outs[0], out_h, out_w, self.mask_threshold))
        if sem_seg is not None:  # logits of the padded image: crop to the resized image, resize to the input
            h, w = torch._shape_as_tensor(x)[1], torch._shape_as_tensor(x)[2]
            logits = sem_seg[:, :, :h, :w]
            logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
            outs.append(logits[0].argmax(dim=0))
        return tuple(outs)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class _Settings:
    min_size: int
    max_size: int
    model_format: str


def _lazy_settings(cfg) -> _Settings:
    from .errors import dotted_get

    aug = dotted_get(cfg, "dataloader.test.mapper.augmentations")
    first = aug[0] if aug else None
    min_size = first.get("short_edge_length", 800) if first is not None else 0
    if isinstance(min_size, (list, tuple)) or type(min_size).__name__ == "ListConfig":
        min_size = list(min_size)[-1]
    max_size = first.get("max_size", 1333) if first is not None else 0
    fmt = dotted_get(cfg, "model.input_format") or dotted_get(cfg, "dataloader.test.mapper.image_format") or "BGR"
    return _Settings(int(min_size), int(max_size), str(fmt))


def build_detector(config_file: str, opts: Sequence[str] = (), *, load_weights: bool = True,
                   unsafe_yaml: bool = False) -> Tuple[nn.Module, _Settings]:
    """The eval-mode detector of a yaml (yacs) or ``.py`` (LazyConfig) config and its input settings.

    yaml: ``d2_backbones.get_cfg()`` + file + ``KEY VALUE`` overrides, ``build_model``, ``MODEL.WEIGHTS``
    loaded through :class:`~d2_backbones.weights.Checkpointer`. ``.py``: ``key=value`` overrides,
    :func:`d2_backbones.lazy.instantiate_model`, ``train.init_checkpoint`` loaded (as ``lazy_train
    --eval-only``), the resize of ``dataloader.test.mapper.augmentations[0]``.
    """
    if config_file.endswith(".py"):
        from detectron2.config import LazyConfig

        from .lazy import instantiate_model
        from .yaml_safety import load_lazy_config

        bad = [o for o in opts if "=" not in o]
        if bad:
            raise ValueError(f"Override {bad[0]!r} is not of the form key=value: Python configs take key=value "
                             f"overrides (e.g. train.init_checkpoint=model_final.pth), yaml configs KEY VALUE.")
        cfg = LazyConfig.apply_overrides(load_lazy_config(config_file), list(opts))
        model = instantiate_model(cfg.model).to("cpu").eval()
        weights = cfg.get("train", {}).get("init_checkpoint", "")
        if load_weights and weights:
            Checkpointer(model, weights_check=cfg.train.get("weights_check", None)).load(weights)
        return model, _lazy_settings(cfg)
    from detectron2.modeling import build_model

    from .yaml_safety import allow_unsafe_yaml

    with allow_unsafe_yaml(unsafe_yaml):
        cfg = setup_cfg(config_file, opts)
    model = build_model(cfg).eval()
    if load_weights and cfg.MODEL.WEIGHTS:
        Checkpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    return model, _Settings(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT)


@contextlib.contextmanager
def _tracing():
    """detectron2's ``patch_builtin_len`` (``len(instances)`` recorded as a size, not a constant: the
    heads split their predictions per image by it) and quiet tracer warnings."""
    from detectron2.export.torchscript_patch import patch_builtin_len

    with warnings.catch_warnings(), patch_builtin_len():
        # the tracer's notes about Python values it records as constants (all of them are sizes of
        # the model's fixed parts, checked on a second image size by the export's own check)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*meshgrid.*")
        # boolean-mask indexing (the kept boxes): its indices come from NonZero, never negative
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        yield


def export_detector_torchscript(wrapper: DetectorExport, sample: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``wrapper`` on ``sample`` (uint8 ``(H, W, 3)``) and save it atomically to ``path``."""
    with torch.no_grad(), _tracing():
        ts = torch.jit.trace(wrapper.eval(), (sample,), strict=False, check_trace=False)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.jit.save(ts, tmp)
    os.replace(tmp, path)
    return ts


def export_detector_onnx(wrapper: DetectorExport, sample: torch.Tensor, path: str, *,
                         opset: int = ONNX_OPSET) -> List[str]:
    """Export ``wrapper`` to ONNX (legacy tracer, dynamic image height and width) atomically at ``path``."""
    names = list(wrapper.names)
    axes: Dict[str, Dict[int, str]] = {"image": {0: "height", 1: "width"}, "boxes": {0: "detections"},
                                       "scores": {0: "detections"}, "classes": {0: "detections"}}
    if "masks" in names:
        axes["masks"] = {0: "detections", 1: "height", 2: "width"}
    if "sem_seg" in names:
        axes["sem_seg"] = {0: "height", 1: "width"}
    tmp = f"{path}.tmp{os.getpid()}"
    with torch.no_grad(), _tracing():
        torch.onnx.export(wrapper.eval(), (sample,), tmp, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=names, dynamic_axes=axes)
    os.replace(tmp, path)
    wrapper.eval()
    return names


# ---------------------------------------------------------------------------------------------- comparison
@dataclass
class DetectionMatch:
    """How two detectors' outputs on one image agree (:func:`match_detections`).

    ``matched`` pairs agree in class, box (max abs coordinate difference <= ``box_tol`` pixels) and score
    (<= ``score_tol``); ``borderline`` detections are unmatched but within ``score_tol`` of the score at
    which the other output was cut (its lowest score when it holds ``max_dets`` detections, else the score
    threshold): near-ties that may fall on either side. The rest are ``unexplained``; up to
    ``max_unmatched`` of them (a fraction of the larger output) are accepted: a near-tie in the RPN's
    top-k or NMS sends another proposal to the box head, and the detections made from it then differ
    as a whole (a few neighbouring detections, not small errors).
    """

    n_ref: int
    n_got: int
    matched: int = 0
    borderline: int = 0
    unexplained: List[str] = field(default_factory=list)
    max_unmatched: float = 0.0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    max_mask_diff: float = 0.0  # max over matched pairs of (pixels that differ) / (pixels in either mask)
    sem_seg_diff: float = 0.0  # fraction of pixels with another class

    @property
    def ok(self) -> bool:
        return self.unmatched <= self.max_unmatched * max(self.n_ref, self.n_got) and not any(
            u.startswith("sem_seg") for u in self.unexplained)

    @property
    def unmatched(self) -> int:
        """Detections that differ: the larger of the unexplained counts of the two outputs."""
        return max(sum(u.startswith(side) for u in self.unexplained) for side in ("eager", "exported"))

    def __str__(self) -> str:
        s = (f"{self.matched}/{max(self.n_ref, self.n_got)} detections matched ({self.n_ref} eager, {self.n_got} "
             f"exported, {self.borderline} borderline); max |d box| {self.max_box_diff:.2e} px, max |d score| "
             f"{self.max_score_diff:.2e}, max mask pixels differing {self.max_mask_diff:.2%}")
        if self.sem_seg_diff:
            s += f", sem_seg pixels differing {self.sem_seg_diff:.2%}"
        if self.unexplained:
            s += (f"; {self.unmatched} unmatched (accepted: {self.max_unmatched:.0%}): "
                  + "; ".join(self.unexplained[:5]))
        return s


def _np(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def match_detections(ref: Mapping, got: Mapping, *, box_tol: float = 0.05, score_tol: float = 1e-4,
                     mask_tol: float = 0.01, mask_px: int = 4, score_thresh: float = 0.0, max_dets: int = 100,
                     max_unmatched: float = 0.2) -> DetectionMatch:
    """Match ``got`` (the exported file's outputs, by name) to ``ref`` (eager) on one image.

    Greedy, highest ``ref`` score first: the unmatched ``got`` detection of the same class with the closest
    box (max coordinate difference), accepted if its box and score are within ``box_tol`` / ``score_tol``, and its mask (if any) differs
    on at most ``mask_tol`` of the pixels in either mask or ``mask_px`` pixels (pixels whose probability is
    within float error of the threshold flip; on a mask of a few pixels one flip is a large fraction). Masks
    of boxes less than 1 px wide or high are not compared: their pasting divides by the box size, so float
    error moves them by whole pixels. Order is not compared (scores that tie within
    float error may swap). ``sem_seg`` maps may differ on at most ``mask_tol`` of the pixels.
    """
    r = {k: _np(v) for k, v in ref.items()}
    g = {k: _np(v) for k, v in got.items()}
    rep = DetectionMatch(len(r["scores"]), len(g["scores"]), max_unmatched=max_unmatched)
    dist = np.abs(r["boxes"][:, None, :].astype(np.float64) - g["boxes"][None, :, :]).max(-1) if len(g["boxes"]) \
        else np.zeros((len(r["boxes"]), 0))
    used = np.zeros(len(g["scores"]), dtype=bool)
    r_unmatched, why = [], {}
    for i in np.argsort(-r["scores"], kind="stable"):
        cand = np.where(~used & (g["classes"] == r["classes"][i]))[0]
        j = cand[np.argmin(dist[i, cand])] if len(cand) else None
        if j is not None:
            box_d = float(np.abs(r["boxes"][i] - g["boxes"][j]).max())
            score_d = float(abs(r["scores"][i] - g["scores"][j]))
            mask_d, mask_ok = 0.0, True
            if "masks" in r and (r["boxes"][i, 2:] - r["boxes"][i, :2]).min() >= 1:
                a, b = r["masks"][i].astype(bool), g["masks"][j].astype(bool)
                union, differ = int((a | b).sum()), int((a ^ b).sum())
                mask_d = differ / max(1, union)
                mask_ok = differ <= max(mask_tol * union, mask_px)
            if box_d <= box_tol and score_d <= score_tol and mask_ok:
                used[j] = True
                rep.matched += 1
                rep.max_box_diff = max(rep.max_box_diff, box_d)
                rep.max_score_diff = max(rep.max_score_diff, score_d)
                rep.max_mask_diff = max(rep.max_mask_diff, mask_d)
                continue
            why[i] = f" (closest: |d box| {box_d:.2e}, |d score| {score_d:.2e}, mask pixels differing {mask_d:.2%})"
        r_unmatched.append(i)

    def cut(scores):  # the score at which an output was cut
        return float(scores.min()) if len(scores) >= max_dets else score_thresh

    for side, idx, other in (("eager", r_unmatched, g), ("exported", np.where(~used)[0], r)):
        src = r if side == "eager" else g
        for i in idx:
            if src["scores"][i] <= cut(other["scores"]) + score_tol:
                rep.borderline += 1
            else:
                rep.unexplained.append(f"{side} #{i} class {int(src['classes'][i])} score {src['scores'][i]:.4f} "
                                       f"box {np.round(src['boxes'][i], 2).tolist()}"
                                       + (why.get(i, "") if side == "eager" else ""))
    if "sem_seg" in r:
        if r["sem_seg"].shape != g["sem_seg"].shape:
            rep.unexplained.append(f"sem_seg shape {g['sem_seg'].shape} != {r['sem_seg'].shape}")
        else:
            rep.sem_seg_diff = float((r["sem_seg"] != g["sem_seg"]).mean())
            if rep.sem_seg_diff > mask_tol:
                rep.unexplained.append(f"sem_seg differs on {rep.sem_seg_diff:.2%} of the pixels")
    return rep


def runner(fmt: str, path: str, names: Sequence[str]) -> Callable[[torch.Tensor], Dict[str, np.ndarray]]:
    """A function running the exported file at ``path`` on a uint8 ``(H, W, 3)`` image -> ``{name: array}``."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda image: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": _np(image)})))
    loaded = torch.jit.load(path)

    def run(image):
        with torch.no_grad():
            return {k: _np(v) for k, v in zip(names, loaded(image))}
    return run


def sample_images(paths: Sequence[str] = ()) -> List[torch.Tensor]:
    """The images the export is checked on: ``paths`` read with PIL (RGB), or, without paths, two
    pictures of the synthetic shapes dataset (:func:`d2_backbones.data.make_shapes`; 256x256 and a 256x192
    crop, so the check also runs a second image size). uint8 ``(H, W, 3)`` tensors."""
    from PIL import Image

    if paths:
        return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in paths]
    import tempfile

    from .data import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        root = make_shapes(os.path.join(tmp, "shapes"), n_train=1, n_val=1, size=256, seed=1)
        imgs = [np.asarray(Image.open(os.path.join(root, s, f"{s}_00000.png")).convert("RGB")) for s in ("train", "val")]
    return [torch.from_numpy(imgs[0].copy()), torch.from_numpy(imgs[1][:, :192].copy())]


@dataclass
class ExportResult:
    path: str
    names: List[str]
    seconds: float
    checks: List[DetectionMatch]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def export_and_check(config_file: str, opts: Sequence[str] = (), *, fmt: str = "onnx", output: str = "export_output",
                     images: Sequence[torch.Tensor] = (), image_format: Optional[str] = None,
                     opset: int = ONNX_OPSET, box_tol: float = 0.05, score_tol: float = 1e-3,
                     max_unmatched: float = 0.2, unsafe_yaml: bool = False) -> ExportResult:
    """Build the detector of ``config_file``, export it to ``output/model.onnx`` or ``model.ts`` and run
    the file and the eager model on each of ``images`` (default :func:`sample_images`), comparing with
    :func:`match_detections`. The images are given in ``image_format`` (default: the model's)."""
    import time

    model, st = build_detector(config_file, opts, unsafe_yaml=unsafe_yaml)
    wrapper = DetectorExport(model, min_size=st.min_size, max_size=st.max_size, model_format=st.model_format,
                             image_format=image_format)
    images = list(images) or sample_images()
    if not images:
        raise ValueError("export_and_check needs at least one image")
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.onnx" if fmt == "onnx" else "model.ts")
    start = time.perf_counter()
    if fmt == "onnx":
        export_detector_onnx(wrapper, images[0], path, opset=opset)
    else:
        export_detector_torchscript(wrapper, images[0], path)
    seconds = time.perf_counter() - start
    run = runner(fmt, path, wrapper.names)
    score_thresh = _score_threshold(model)
    max_dets = _max_detections(model)
    checks = []
    for image in images:
        with torch.no_grad():
            ref = dict(zip(wrapper.names, wrapper(image)))
        checks.append(match_detections(ref, run(image), box_tol=box_tol, score_tol=score_tol,
                                       score_thresh=score_thresh, max_dets=max_dets, max_unmatched=max_unmatched))
    return ExportResult(path, wrapper.names, seconds, checks)


def _score_threshold(model: nn.Module) -> float:
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        predictor = getattr(heads, "box_predictor", None)
        predictor = predictor[-1] if isinstance(predictor, nn.ModuleList) else predictor
        return float(predictor.test_score_thresh)
    return float(getattr(model, "test_score_thresh", 0.0))


def _max_detections(model: nn.Module) -> int:
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        predictor = heads.box_predictor
        predictor = predictor[-1] if isinstance(predictor, nn.ModuleList) else predictor
        return int(predictor.test_topk_per_image)
    return int(getattr(model, "max_detections_per_image", 100))
