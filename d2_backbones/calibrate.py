"""int8 calibration of the backbone + FPN (+ RPN head), for ``TEST.PRECISION int8``: ``python -m d2_backbones.calibrate``.

One command, once per trained checkpoint::

    python -m d2_backbones.calibrate --config-file configs/ResNet/mask_rcnn_R_50_FPN_1x.yaml \\
        MODEL.WEIGHTS output/model_final.pth [--num-images 200]

It builds the model of the config, loads ``MODEL.WEIGHTS``, folds the norms, exports the backbone + FPN to
ONNX, feeds it ``--num-images`` images of the config's ``DATASETS.TRAIN`` (spread evenly over the datasets,
resized and normalised exactly as the predictors do), and quantizes it with ONNX Runtime's static
quantization: QDQ format, per-channel int8 weights, uint8 activations, min/max ranges
(``onnxruntime.quantization.quantize_static``). The result is written atomically beside the weights, named
after them and two hashes (of the config's backbone-related keys and of the weights file's bytes), e.g.
``model_final.int8-<config hash>-<weights hash>.onnx``; the predictors and ``train_net --eval-only`` find it
there with ``TEST.RUNTIME onnxruntime`` (or ``openvino``) ``TEST.PRECISION int8``. A change of weights or of
those keys changes the name, so a stale calibration is never used: the predictors say to run this command
again. ``--register-coco NAME JSON IMAGE_ROOT`` registers a COCO-format training set as ``train_net`` does.

Mask R-CNN: the mask head's convolutions (four 3x3 convolutions on 14x14 maps of every detection: at 100
detections as many multiply-adds as the backbone) are quantized the same way, on the pooled features of the
boxes the float model detects on the first images (up to 512 boxes), and written beside the first file as
``<same name>.mask_head.onnx``. ``TEST.RUNTIME openvino`` runs it in int8 (measured twice as fast as bf16 on a
CPU with VNNI); ONNX Runtime's int8 kernels were slower there than bfloat16 in PyTorch, so it keeps the latter.
"""
import argparse
import copy
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .runtime import (calibration_path, config_hash, cpu_isa, detector_graph, export_backbone, export_mask_head,
                      mask_calibration_path, mask_head_hash, precision_note, require, weights_hash)

__all__ = ["model_inputs", "quantize_backbone", "mask_head_inputs", "quantize_mask_head", "training_images", "main"]

logger = logging.getLogger("d2_backbones")


def _test_tensor(img: np.ndarray, aug) -> torch.Tensor:
    """An HxWx3 image resized by ``aug`` (the test-time ResizeShortestEdge) as the predictors' CxHxW float tensor."""
    resized = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))


def _test_resize(cfg):
    from detectron2.data import transforms as T

    return T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)


def model_inputs(model, cfg, images: Sequence[np.ndarray]) -> List[np.ndarray]:
    """What ``model.backbone`` receives for each image (HxWx3 uint8 in ``cfg.INPUT.FORMAT``), as the predictors
    prepare it: resized to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, normalised, padded."""
    aug = _test_resize(cfg)
    with torch.no_grad():
        return [model.preprocess_image([{"image": _test_tensor(img, aug)}]).tensor.numpy() for img in images]


class _Reader:
    """onnxruntime's calibration data reader over a list of inputs."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]):
        self.name, self.inputs = name, list(inputs)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return {self.name: self.inputs.pop(0)} if self.inputs else None

    def rewind(self):  # noqa: D401 - part of onnxruntime's reader protocol in some versions
        pass


def _quantize(src: str, reader, path: str, meta: Dict[str, str]) -> str:
    """Quantize the float ONNX model ``src`` on ``reader``'s inputs (static QDQ, per-channel int8 weights, uint8
    activations, min/max ranges) and write it atomically to ``path`` with ``meta`` as ONNX metadata."""
    onnx = require("onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = src[:-len(".onnx")] + ".pre.onnx"
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        src = pre
    except Exception as e:  # noqa: BLE001 - the pre-processing only helps; quantize without it
        logger.info(f"quantization pre-processing skipped ({type(e).__name__}: {e})")
    quantized = src[:-len(".onnx")] + ".int8.onnx"
    quantize_static(src, quantized, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    q = onnx.load(quantized)
    for k, v in meta.items():
        entry = q.metadata_props.add()
        entry.key, entry.value = k, str(v)
    directory = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        onnx.save(q, partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # mkstemp's file is private; the weights beside it are not
        os.replace(partial, path)  # never a half-written file under the final name
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _reader(name: str, inputs: Sequence[np.ndarray]):
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader

    return type("Reader", (_Reader, CalibrationDataReader), {})(name, inputs)


def quantize_backbone(model, inputs: Sequence[np.ndarray], path: str, meta: Dict[str, str]) -> str:
    """Export the backbone + FPN (+ RPN head: :func:`~d2_backbones.runtime.detector_graph`) of a folded copy of
    ``model``, quantize it on ``inputs`` and write it atomically to ``path`` with ``meta`` as ONNX metadata.
    Returns ``path``."""
    from .inference import optimize_for_inference

    reader = _reader("images", inputs)
    graph = detector_graph(optimize_for_inference(copy.deepcopy(model).eval()))
    with tempfile.TemporaryDirectory(prefix="d2b_calibrate_") as tmp:
        fp32 = os.path.join(tmp, "backbone_fpn.onnx")
        export_backbone(graph, fp32)
        return _quantize(fp32, reader, path, meta)


def mask_head_inputs(model, cfg, images: Sequence[np.ndarray], max_rois: int = 512,
                     per_image: int = 16) -> List[np.ndarray]:
    """What the mask head's convolutions receive on ``images`` (the pooled features of the detected boxes, up to
    ``per_image`` per image, the highest scores first), run through ``model`` in float32 until ``max_rois``
    boxes are collected. Empty when the model has no mask head with ``layers``."""
    mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    if mask_head is None or not callable(getattr(type(mask_head), "layers", None)):
        return []
    got: List[np.ndarray] = []
    hook = mask_head.register_forward_pre_hook(
        lambda module, args: got.append(args[0][:per_image].detach().float().numpy().copy()) if len(args[0]) else None)
    aug = _test_resize(cfg)
    try:
        with torch.no_grad():
            for img in images:
                if sum(len(g) for g in got) >= max_rois:
                    break
                model([{"image": _test_tensor(img, aug), "height": img.shape[0], "width": img.shape[1]}])
    finally:
        hook.remove()
    return got


def quantize_mask_head(model, inputs: Sequence[np.ndarray], path: str, meta: Dict[str, str]) -> str:
    """Export the mask head's convolutions (:func:`~d2_backbones.runtime.export_mask_head`) of ``model`` with a
    dynamic number of boxes, quantize them on ``inputs`` (:func:`mask_head_inputs`) and write the result
    atomically to ``path`` (:func:`~d2_backbones.runtime.mask_calibration_path`). Returns ``path``."""
    reader = _reader("rois", inputs)
    with tempfile.TemporaryDirectory(prefix="d2b_calibrate_") as tmp:
        fp32 = os.path.join(tmp, "mask_head.onnx")
        export_mask_head(copy.deepcopy(model.roi_heads.mask_head).eval(), fp32)
        return _quantize(fp32, reader, path, meta)


def training_images(cfg, num_images: int) -> List[str]:
    """``num_images`` image files of ``cfg.DATASETS.TRAIN``, spread evenly over the datasets' records."""
    from detectron2.data import DatasetCatalog

    if not cfg.DATASETS.TRAIN:
        raise SystemExit("DATASETS.TRAIN is empty: calibration reads images of the training set. Fix: set "
                         "DATASETS.TRAIN (or --register-coco NAME JSON IMAGE_ROOT DATASETS.TRAIN \"('NAME',)\").")
    files = [r["file_name"] for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    if not files:
        raise SystemExit(f"DATASETS.TRAIN={list(cfg.DATASETS.TRAIN)} holds no images to calibrate with.")
    step = max(1, len(files) // max(1, num_images))
    return files[::step][:num_images]


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m d2_backbones.calibrate",
                                     description="int8 calibration of the backbone + FPN for TEST.PRECISION int8.")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--num-images", type=int, default=200, help="training images to calibrate on (default 200)")
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"), help="register a COCO-format dataset (repeatable)")
    parser.add_argument("--unsafe-yaml", action="store_true", help="read a yaml config with Python tags")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images {args.num_images}: calibrate on at least 1 image (a few hundred is usual)")

    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model

    from .data import register_coco_datasets, register_shapes, SHAPES_DATASETS
    from .export import setup_cfg
    from .model_zoo import resolve_config_file
    from .weights import Checkpointer
    from .yaml_safety import allow_unsafe_yaml

    with allow_unsafe_yaml(args.unsafe_yaml):
        cfg = setup_cfg(resolve_config_file(args.config_file, yacs=True), args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit("MODEL.WEIGHTS is empty: an int8 calibration belongs to trained weights. Fix: add "
                         "MODEL.WEIGHTS path/to/model_final.pth after the flags.")
    register_coco_datasets(args.register_coco)
    if set(cfg.DATASETS.TRAIN) & set(SHAPES_DATASETS):
        register_shapes()
    note = precision_note("int8", cpu_isa())
    if note:
        logger.warning(note)
    files = training_images(cfg, args.num_images)
    model = build_model(cfg)
    Checkpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    model.eval()
    images = [read_image(f, format=cfg.INPUT.FORMAT) for f in files]
    inputs = model_inputs(model, cfg, images)
    path = calibration_path(cfg)
    meta = {"d2b_hash": os.path.basename(path).split(".int8-")[1][:-len(".onnx")],
            "d2b_config_hash": config_hash(cfg), "d2b_weights_hash": weights_hash(cfg.MODEL.WEIGHTS),
            "d2b_images": str(len(files)), "d2b_datasets": ",".join(cfg.DATASETS.TRAIN),
            "d2b_method": "onnxruntime quantize_static QDQ per-channel int8 weights, uint8 activations, MinMax"}
    quantize_backbone(model, inputs, path, meta)
    print(f"Wrote {path} (calibrated on {len(files)} images of {', '.join(cfg.DATASETS.TRAIN)}). Use it with: "
          f"TEST.RUNTIME onnxruntime TEST.PRECISION int8 MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}")
    rois = mask_head_inputs(model, cfg, images)
    if rois:  # Mask R-CNN: the mask head's convolutions too (used by TEST.RUNTIME openvino)
        mask_path = mask_calibration_path(path)
        quantize_mask_head(model, rois, mask_path, dict(meta, d2b_mask_head_hash=mask_head_hash(cfg),
                                                        d2b_rois=str(sum(len(r) for r in rois))))
        print(f"Wrote {mask_path} (the mask head, calibrated on {sum(len(r) for r in rois)} detected boxes); "
              f"TEST.RUNTIME openvino TEST.PRECISION int8 runs it.")
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
