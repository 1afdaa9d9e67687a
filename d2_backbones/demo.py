"""Pictures of a model's detections: ``python -m d2_backbones.demo`` (detectron2's ``demo/demo.py``, without OpenCV).

::

    python -m d2_backbones.demo --config-file configs/quickstart/faster_rcnn_R_18_FPN_shapes.yaml \\
        --input img.png photos/ [clip.mp4] --output out/ [--classes circle,square,triangle] \\
        [--confidence-threshold 0.5] [--overwrite] MODEL.WEIGHTS output/quickstart/model_final.pth

* ``--input``: image files, folders (their image files, not recursive, in name order) and videos; a path that
  does not exist, a folder without images or an image that cannot be read is an error naming it.
* ``--output``: a folder; each picture is written under the input's file name (``photos/a.jpg`` ->
  ``out/a.jpg``, same size as the input), a video as ``out/<name>.mp4``. Files are written atomically
  (temporary file, then renamed). An output that exists already is refused unless ``--overwrite``; an input
  is never overwritten, and two inputs with one file name are refused before anything runs.
* Class names: ``--classes a,b,c`` (as many as the model's ``NUM_CLASSES``), else the ``thing_classes`` of
  ``DATASETS.TEST[0]`` (then ``DATASETS.TRAIN[0]``): the shapes datasets, COCO's names for detectron2's COCO
  datasets, or a ``--register-coco NAME JSON IMAGE_ROOT`` dataset's categories; else the class index.
* Drawn with PIL (:func:`d2_backbones.visualize.draw_instances`): boxes, ``class score`` labels, masks tinted.
  Videos need PyAV (``pip install av``); without it a video input is refused naming that command.
* The model: a yaml config (as ``train_net`` reads it: :func:`d2_backbones.get_cfg`, the file, the ``KEY VALUE``
  overrides) and the predictor :func:`d2_backbones.make_predictor` builds for it (its weights through the
  package's checkpointer; ``TEST.OPTIMIZE_FOR_INFERENCE`` and the other predictor keys apply). Python configs
  are refused: the predictor takes a yacs config.

:func:`main` takes the command line as a list and returns the files it wrote.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "argument_parser", "setup", "collect_inputs", "class_names",
           "draw", "write_image", "main"]

logger = logging.getLogger("d2_backbones")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d2_backbones.demo", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a yaml config")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders of images, videos")
    parser.add_argument("--output", required=True, help="folder for the pictures (created if missing)")
    parser.add_argument("--classes", default=None, help="class names, comma-separated, in the model's class order")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw detections with at least this score (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    parser.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset (its categories name the classes when it is in "
                             "DATASETS.TEST)")
    parser.add_argument("--unsafe-yaml", action="store_true",
                        help="read yaml configs with Python tags (they run code when read): only files you trust")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    return parser


# ---------------------------------------------------------------------------------------------- config
def setup(args):
    """The yacs config of ``args`` (file, overrides, score thresholds at ``--confidence-threshold``), its device
    checked and the datasets it names registered."""
    from . import engine
    from .config import get_cfg
    from .model_zoo import resolve_config_file
    from .preflight import check_yacs_overrides
    from .yaml_safety import allow_unsafe_yaml

    path = resolve_config_file(args.config_file, yacs=False)
    if path.endswith(".py"):
        raise ConfigError(f"--config-file {path} is a Python (LazyConfig) config; the demo's predictor "
                          f"(d2_backbones.make_predictor, detectron2's DefaultPredictor) takes a yaml config. Fix: "
                          f"pass the yaml twin of the config (configs/<Family>/<name>.yaml).")
    for tok in args.opts:
        if tok.startswith("--"):
            raise SystemExit(f"Found flag {tok!r} among the config overrides {list(args.opts)}. Put --flags before "
                             f"the KEY VALUE overrides.")
    check_yacs_overrides(args.opts, get_cfg)
    if len(args.opts) % 2:
        raise SystemExit(f"Config overrides must be KEY VALUE pairs; got an odd number of items: {list(args.opts)}")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise SystemExit(f"--confidence-threshold {args.confidence_threshold} is not a score. Valid values: 0 to 1.")
    cfg = get_cfg()
    with allow_unsafe_yaml(args.unsafe_yaml):
        cfg.merge_from_file(path)
    cfg.merge_from_list(list(args.opts))
    t = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = t
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = t
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = t
    engine.check_device(cfg)
    engine.register_datasets(cfg, args)
    cfg.freeze()
    return cfg


def class_names(cfg, classes: Optional[str] = None) -> Optional[List[str]]:
    """The names of the model's classes: ``classes`` (comma-separated; its length must be the model's class
    count), else the first dataset of ``DATASETS.TEST`` / ``DATASETS.TRAIN`` with class names, else ``None``."""
    from . import engine

    keys = engine.class_count_keys(cfg)
    count = int(getattr(cfg.MODEL, keys[0].split(".")[1]).NUM_CLASSES) if keys else None
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        if not all(names):
            raise SystemExit(f"--classes {classes!r} has an empty name. Give the names comma-separated, e.g. "
                             f"--classes cat,dog.")
        if count is not None and len(names) != count:
            raise SystemExit(f"--classes names {len(names)} classes ({', '.join(names)}) but the model has "
                             f"{keys[0]}={count}. Fix: give exactly {count} names, in the model's class order.")
        return names
    for key in ("DATASETS.TEST", "DATASETS.TRAIN"):
        for name in engine.dataset_names(cfg, key):
            found = engine.dataset_classes([(name, key)]).get(name)
            if found:
                if count is not None and len(found) != count:
                    logger.warning(f"Dataset {name!r} ({key}) has {len(found)} classes but {keys[0]}={count}: its "
                                   f"names are not used (labels show class indices). Pass --classes with {count} "
                                   f"names.")
                    return None
                return list(found)
    return None


# ---------------------------------------------------------------------------------------------- inputs
def _kind(path: str) -> Optional[str]:
    ext = os.path.splitext(path)[1].lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def collect_inputs(inputs: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(path, "image" | "video"), ...]`` for the ``--input`` paths: files as given, folders expanded to their
    image files (name order). A missing path, a folder without images or a file of another type is an error."""
    out = []
    for path in inputs:
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if _kind(f) == "image" and os.path.isfile(os.path.join(path, f)))
            if not files:
                raise SystemExit(f"--input {path}: the folder has no image files ({', '.join(IMAGE_EXTENSIONS)}). "
                                 f"Fix: pass a folder with images, or the image files themselves.")
            out += [(os.path.join(path, f), "image") for f in files]
        elif os.path.isfile(path):
            kind = _kind(path)
            if kind is None:
                raise SystemExit(f"--input {path}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or a video "
                                 f"({', '.join(VIDEO_EXTENSIONS)}) by its extension.")
            out.append((path, kind))
        else:
            raise SystemExit(f"--input {path}: no such file or folder (relative to {os.getcwd()}).")
    return out


def _output_paths(items: Sequence[Tuple[str, str]], output: str, overwrite: bool) -> Dict[str, str]:
    """``{input: output file}``; clashes between inputs, outputs that exist (without ``overwrite``) and outputs
    that would replace an input are refused here, before the model is built."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise SystemExit(f"--output {output} is a file; it must be a folder (created if missing).")
    out, by_target = {}, {}
    for path, kind in items:
        name = os.path.basename(path) if kind == "image" else os.path.splitext(os.path.basename(path))[0] + ".mp4"
        target = os.path.join(output, name)
        if target in by_target:
            raise SystemExit(f"--input {by_target[target]} and {path} would both be written to {target}. Fix: run "
                             f"them with different --output folders.")
        by_target[target] = path
        out[path] = target
    inputs = {os.path.realpath(p) for p, _ in items}
    replaced = [t for t in out.values() if os.path.realpath(t) in inputs]
    if replaced:
        raise SystemExit(f"--output {output} would overwrite the input(s) {', '.join(replaced)}. Fix: choose another "
                         f"--output folder.")
    existing = [t for t in out.values() if os.path.exists(t)]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise SystemExit(f"--output {output} already holds {shown}. Fix: pass --overwrite to replace them, or choose "
                         f"another --output folder.")
    return out


def _read_image(path: str) -> np.ndarray:
    """The image as BGR ``uint8`` (H, W, 3), EXIF orientation applied (detectron2's ``read_image``)."""
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL's UnidentifiedImageError, a truncated file, ...
        raise SystemExit(f"--input {path}: the image cannot be read ({type(e).__name__}: {e}). Fix: re-encode or "
                         f"remove the file.") from e


# ---------------------------------------------------------------------------------------------- drawing, writing
def draw(rgb: np.ndarray, instances, names: Optional[Sequence[str]], threshold: float):
    """The PIL picture of ``rgb`` with the ``instances`` (detectron2 ``Instances``) scoring >= ``threshold``."""
    from PIL import Image

    from .visualize import draw_instances

    inst = instances.to("cpu")
    inst = inst[inst.scores >= threshold]
    masks = inst.pred_masks.numpy() if inst.has("pred_masks") else None
    font_size = max(11, min(rgb.shape[:2]) // 50)  # 16 px labels on an 800-pixel side
    return draw_instances(Image.fromarray(np.ascontiguousarray(rgb)), inst.pred_boxes.tensor.tolist(),
                          inst.pred_classes.tolist(), inst.scores.tolist(), class_names=names, scale=1,
                          font_size=font_size, masks=masks)


def _readable(path: str) -> None:
    """The permissions a new file gets (``mkstemp`` makes its file private): read/write as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_image(picture, target: str) -> str:
    """Save the PIL ``picture`` at ``target`` atomically, in the format of its extension."""
    from PIL import Image

    ext = os.path.splitext(target)[1].lower()
    fmt = Image.registered_extensions().get(ext, "PNG")
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".demo-", suffix=ext, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def _run_video(predictor, path: str, target: str, names, threshold: float) -> int:
    """Every frame of ``path`` with its detections, as an H.264 ``.mp4`` at ``target`` (PyAV). Returns the count."""
    try:
        import av
    except ImportError:
        raise SystemExit(f"--input {path}: videos are read and written with PyAV, which is not installed. Fix: "
                         f"pip install av (or pass images).") from None
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".demo-", suffix=".mp4", dir=folder)
    os.close(fd)
    n = 0
    try:
        with av.open(path) as src, av.open(tmp, "w", format="mp4") as dst:
            stream_in = src.streams.video[0]
            rate = stream_in.average_rate or 25
            stream = None
            for frame in src.decode(stream_in):
                rgb = frame.to_ndarray(format="rgb24")
                picture = draw(rgb, predictor(rgb[:, :, ::-1])["instances"], names, threshold)
                if stream is None:
                    stream = dst.add_stream("libx264", rate=rate)
                    stream.width, stream.height = picture.width // 2 * 2, picture.height // 2 * 2
                    stream.pix_fmt = "yuv420p"
                out = av.VideoFrame.from_image(picture.crop((0, 0, stream.width, stream.height)))
                for packet in stream.encode(out):
                    dst.mux(packet)
                n += 1
            if stream is not None:
                for packet in stream.encode():
                    dst.mux(packet)
        if n == 0:
            raise SystemExit(f"--input {path}: the video has no frames.")
        _readable(tmp)
        os.replace(tmp, target)
    except av.error.FFmpegError as e:
        raise SystemExit(f"--input {path}: the video cannot be read ({e}).") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run the demo on the command line ``argv``; returns the files written."""
    from detectron2.utils.logger import setup_logger

    from .predictor import make_predictor

    args = argument_parser().parse_args(argv)
    setup_logger(name="d2_backbones", abbrev_name="d2b")
    items = collect_inputs(args.input)  # every input checked before the model is built
    targets = _output_paths(items, args.output, args.overwrite)
    cfg = setup(args)
    names = class_names(cfg, args.classes)
    predictor = make_predictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path, kind in items:
        t0 = time.perf_counter()
        if kind == "video":
            frames = _run_video(predictor, path, targets[path], names, args.confidence_threshold)
            what = f"{frames} frames"
        else:
            bgr = _read_image(path)
            instances = predictor(bgr)["instances"]
            picture = draw(bgr[:, :, ::-1], instances, names, args.confidence_threshold)
            write_image(picture, targets[path])
            what = f"{int((instances.scores >= args.confidence_threshold).sum())} detections"
        written.append(targets[path])
        logger.info(f"{path}: {what} in {time.perf_counter() - t0:.2f} s -> {targets[path]}")
    return written


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
