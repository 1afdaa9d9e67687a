"""Datasets of ``train_net.py``: COCO-format registration with checks on arrival, and the synthetic shapes.

:func:`register_coco_datasets` registers ``[(name, json, image_root), ...]`` with detectron2's
``register_coco_instances`` (inside ``main``, so every spawned worker has them). Same name + same
files twice is harmless; a different file or a clash with a built-in name is an error.

Before registering, :func:`check_coco_dataset` reads the JSON once and checks what detectron2 would
otherwise only trip over once the model is built and the data loader starts (or never report):

* the file is not valid JSON -> error naming the file, the dataset and the line/column;
* an annotation's ``category_id`` is not in ``categories`` -> error naming the annotation and the id;
* image files missing under ``IMAGE_ROOT`` -> error with the count and the first five names
  (``check_images=False``, i.e. ``train_net.py --skip-image-check``, skips this disk part);
* entries detectron2 cannot read (an image without ``id``/``file_name``/``width``/``height``, a
  ``bbox`` that is not four numbers, empty ``categories``) -> error naming the first ids;
* ids detectron2 would mishandle: image, category or annotation ``image_id`` values that are not
  integers, duplicate image ids (pycocotools keeps one image per id: the boxes of the others train on
  its pixels), annotations whose ``image_id`` is not in ``images`` (dropped without a word), duplicate
  annotation ids, an empty ``annotations`` list (a file without the key is an image list for
  predictions only) -> error naming the ids;
* images with more than 8 bits per channel (16-bit grayscale PNG: 26 header bytes per ``.png``; TIFF
  headers), which detectron2's ``read_image`` turns white -> error naming the files (disk part);
* boxes with width or height <= 0, or reaching outside their image -> one WARNING with the counts
  and the first annotation ids. detectron2 keeps them in the dataset dicts and its training
  ``DatasetMapper`` fixes them silently: the transforms map a box through its corners and take
  their min/max (``Transform.apply_box``), so a negative width or height becomes the mirrored box
  ``[x + w, x]``; every box is then clipped to the image (``transform_instance_annotations``,
  ``Boxes.clip``) and those left empty are dropped (``filter_empty_instances``): width or height
  0 and boxes entirely outside are not trained on, boxes partly outside train clipped.
  ``COCOEvaluator`` reads the JSON as written: ground truth with width or height <= 0 can never be
  matched (IoU 0), which lowers recall/AP.

While training and evaluating, :class:`CheckedDatasetMapper` (detectron2's ``DatasetMapper``) refuses an
image with more than 8 bits per channel and re-raises a decoding failure (a truncated JPEG) naming the
file, with any number of data-loader workers.

The synthetic dataset: :func:`make_shapes` writes real files - PNG images of circles, squares and
triangles, and a COCO json per split with boxes, polygon masks and categories - deterministically
from a seed, so training on it exercises exactly the path user data takes
(``register_coco_instances``, the dataset mapper, ``COCOEvaluator``). :func:`register_shapes`
generates it on first use and registers ``shapes_train`` / ``shapes_val``.

Example::

    >>> import tempfile
    >>> root = make_shapes(os.path.join(tempfile.mkdtemp(), "shapes_demo"), n_train=8, n_val=2)
    >>> sorted(os.listdir(root))
    ['annotations', 'manifest.json', 'train', 'val']
"""
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

from .errors import ConfigError, is_int

__all__ = ["register_coco_datasets", "check_coco_dataset", "check_coco_data", "coco_classes", "register_used_shapes",
           "SHAPES_DATASETS", "CATEGORIES", "make_shapes", "register_shapes", "default_root", "CheckedDatasetMapper",
           "ImageReadError", "use_checked_mapper"]

logger = logging.getLogger("d2_backbones")

SHAPES_DATASETS = ("shapes_train", "shapes_val")

# How far (pixels) a box may reach past the image border before it counts as outside: COCO's own
# boxes overshoot by rounding (x + w = width + 0.01).
BOX_TOLERANCE = 1.0
_SHOW = 5  # examples named per problem


# ---------------------------------------------------------------------------------------------- COCO
def _read_json(name: str, json_file: str):
    try:
        with open(json_file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        line_start = e.doc.rfind("\n", 0, e.pos) + 1
        line_end = e.doc.find("\n", e.pos)
        line_end = len(e.doc) if line_end < 0 else line_end
        near = e.doc[max(line_start, e.pos - 30):min(line_end, e.pos + 30)]
        raise ConfigError(
            f"Dataset {name!r}: {json_file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
            f"(character {e.pos}), near {near!r}. Fix the file (python -m json.tool FILE shows the same "
            f"position).") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"Dataset {name!r}: {json_file} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          f"a COCO annotation file is JSON.") from None


def _ids(items: Sequence, n: int = _SHOW) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


def _sorted(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=str)


def coco_classes(json_file: str) -> List[str]:
    """The ``categories`` names of a COCO json, ordered by id (detectron2's ``thing_classes`` order)."""
    with open(json_file, encoding="utf-8") as f:
        cats = json.load(f).get("categories", [])
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def check_coco_dataset(name: str, json_file: str, image_root: str, check_images: bool = True) -> List[str]:
    """Check a COCO-format dataset on arrival; returns its class names (ordered by category id).

    Raises :class:`~d2_backbones.ConfigError` for what would stop detectron2 later (invalid JSON,
    unknown category ids, missing image files, malformed entries); logs one WARNING for boxes that
    detectron2 silently drops or clips (see the module doc). ``check_images=False`` skips the
    disk part (one directory listing per image folder).
    """
    t0 = time.perf_counter()
    data = _read_json(name, json_file)
    classes = check_coco_data(name, data, json_file, image_root, check_images)
    logger.info(f"Dataset {name!r} ({json_file}): {len(data['images'])} images, {len(data.get('annotations', []))} "
                f"annotations, {len(classes)} categories checked in {time.perf_counter() - t0:.2f} s (image files "
                f"{'checked' if check_images else 'not checked: --skip-image-check'})")
    return classes


def check_coco_data(name: str, data, json_file: str, image_root: str, check_images: bool = True) -> List[str]:
    """:func:`check_coco_dataset` on the already parsed ``data`` of ``json_file``."""
    where = f"Dataset {name!r} ({json_file})"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level is a JSON {type(data).__name__}, not an object with 'images', "
                          f"'annotations' and 'categories'.")
    cats, images, anns = data.get("categories"), data.get("images"), data.get("annotations", [])
    for key, value in (("categories", cats), ("images", images), ("annotations", anns)):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' is {'missing' if value is None else type(value).__name__}; "
                              f"a COCO instances file has a list there.")
    problems = []

    # categories
    try:
        cat_ids = {c["id"] for c in cats}
        classes = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: every entry of 'categories' needs an 'id' and a 'name' ({e!r}).") from None
    if not cat_ids:
        problems.append("'categories' is empty: detectron2 needs the list of classes.")
    not_int = [c["id"] for c in cats if not is_int(c["id"])]
    if not_int:
        problems.append(f"{len(not_int)} categor{'y has' if len(not_int) == 1 else 'ies have'} an 'id' that is not an "
                        f"integer: {_ids([repr(i) for i in not_int])} (detectron2 maps integer category ids to "
                        f"contiguous class indices). Fix: use integer ids, in the annotations' category_id too.")

    # images
    sizes: Dict = {}
    files, incomplete = [], []
    for im in images:
        try:
            files.append(im["file_name"])
            w, h = im["width"], im["height"]
            if w > 0 and h > 0:
                sizes[im["id"]] = (w, h)
            else:
                incomplete.append(im.get("id"))
        except (KeyError, TypeError):
            incomplete.append(im.get("id") if isinstance(im, dict) else im)
    if incomplete:
        problems.append(f"{len(incomplete)} of {len(images)} images lack 'id', 'file_name' or a positive "
                        f"'width'/'height' (detectron2 reads all four): image ids {_ids(incomplete)}.")
    image_ids = [im.get("id") for im in images if isinstance(im, dict) and "id" in im]
    not_int = [i for i in image_ids if not is_int(i)]
    if not_int:
        problems.append(f"{len(not_int)} of {len(images)} images have an 'id' that is not an integer: "
                        f"{_ids([repr(i) for i in not_int])} (COCO image ids are integers; detectron2 finds no "
                        f"annotated image otherwise). Fix: number the images with integers, in the annotations' "
                        f"image_id too.")
    seen, duplicate = {}, {}
    for im in images:
        if isinstance(im, dict) and is_int(im.get("id")):
            if im["id"] in seen:
                duplicate.setdefault(im["id"], [seen[im["id"]]]).append(im.get("file_name"))
            else:
                seen[im["id"]] = im.get("file_name")
    if duplicate:
        shown = "; ".join(f"id {i}: {', '.join(map(str, fs))}" for i, fs in list(duplicate.items())[:_SHOW])
        problems.append(f"{len(duplicate)} image id(s) are used by more than one image ({shown}"
                        f"{'; ...' if len(duplicate) > _SHOW else ''}): pycocotools keeps one image per id, so the "
                        f"others are dropped and their boxes are trained on the kept image's pixels. Fix: give every "
                        f"image its own id.")

    # annotations
    if "annotations" in data and not anns:
        problems.append("'annotations' is an empty list: there is nothing to train on (detectron2 stops with "
                        "\"No valid data found\" once the model is built) or to evaluate against. Fix: add the "
                        "annotations; for images without labels (predictions only, like COCO test-dev) leave out the "
                        "'annotations' key and use the dataset in DATASETS.TEST only.")
    ann_image_not_int, ann_image_unknown, ann_ids, ann_dup = [], [], set(), []
    known_images = set(seen)
    for a in anns:
        if not isinstance(a, dict):
            continue
        iid = a.get("image_id")
        if not is_int(iid):
            ann_image_not_int.append((a.get("id"), iid))
        elif iid not in known_images:
            ann_image_unknown.append((a.get("id"), iid))
        try:
            if a.get("id") in ann_ids:
                ann_dup.append(a.get("id"))
            ann_ids.add(a.get("id"))
        except TypeError:  # unhashable id
            ann_dup.append(repr(a.get("id")))
    if ann_image_not_int:
        shown = ", ".join(f"annotation id {i} has image_id {v!r}" for i, v in ann_image_not_int[:_SHOW])
        problems.append(f"{len(ann_image_not_int)} annotation(s) have an 'image_id' that is not an integer: {shown}"
                        f"{', ...' if len(ann_image_not_int) > _SHOW else ''}. Fix: use the integer 'id' of the "
                        f"image.")
    if ann_image_unknown:
        shown = ", ".join(f"annotation id {i} has image_id {v!r}" for i, v in ann_image_unknown[:_SHOW])
        missing_ids = _sorted({v for _, v in ann_image_unknown})
        problems.append(f"{len(ann_image_unknown)} annotation(s) point to image ids that are not in 'images' "
                        f"({len(missing_ids)} id(s): {_ids(missing_ids)}): {shown}"
                        f"{', ...' if len(ann_image_unknown) > _SHOW else ''}. detectron2 drops them without a "
                        f"word. Fix: add the images or correct the image_id.")
    if ann_dup and "minival" not in os.path.basename(str(json_file)):  # detectron2 accepts them there, as we do
        problems.append(f"{len(ann_dup)} annotation id(s) are used more than once: {_ids(_sorted(set(ann_dup)))} "
                        f"(detectron2's load_coco_json requires unique annotation ids). Fix: renumber the "
                        f"annotations.")
    bad_cat, malformed, zero, negative, partly, outside = [], [], [], [], [], []
    lo = -BOX_TOLERANCE
    for a in anns:
        if not isinstance(a, dict):
            malformed.append(repr(a)[:40])
            continue
        try:
            known = a.get("category_id") in cat_ids
        except TypeError:  # unhashable
            known = False
        if not known:
            bad_cat.append((a.get("id"), a.get("category_id")))
        try:
            x, y, w, h = a["bbox"]
            if x != x or y != y or w != w or h != h:
                raise ValueError("NaN")  # json reads NaN; counted as malformed
            if not (w > 0 and h > 0):
                (zero if w == 0 or h == 0 else negative).append(a.get("id"))
                continue
            x1, y1 = x + w, y + h
            size = sizes.get(a.get("image_id"))
            if size is not None and (x < lo or y < lo or x1 > size[0] + BOX_TOLERANCE
                                     or y1 > size[1] + BOX_TOLERANCE):
                (outside if x >= size[0] or y >= size[1] or x1 <= 0 or y1 <= 0 else partly).append(a.get("id"))
        except (KeyError, TypeError, ValueError):
            malformed.append(a.get("id"))
    if bad_cat:
        shown = ", ".join(f"annotation id {i} has category_id {c!r}" for i, c in bad_cat[:_SHOW])
        problems.append(
            f"{len(bad_cat)} annotation(s) have a category_id that is not in 'categories' (ids "
            f"{_ids(_sorted(cat_ids), 10)}): {shown}{', ...' if len(bad_cat) > _SHOW else ''}. Fix: add "
            f"the category to 'categories' or correct the annotation.")
    if malformed:
        problems.append(f"{len(malformed)} annotation(s) have no 'bbox' of four finite numbers [x, y, width, "
                        f"height]: annotation ids {_ids(malformed)}.")

    # image files (the disk part)
    if check_images:
        missing = _missing_files(image_root, files)
        if missing:
            hint = (f" None was found: IMAGE_ROOT is probably wrong (expected e.g. "
                    f"{os.path.join(image_root, files[0])})." if len(missing) == len(files) else "")
            problems.append(
                f"{len(missing)} of {len(files)} image files are missing under IMAGE_ROOT {image_root}: "
                f"{_ids(missing)}.{hint} Each 'file_name' is relative to IMAGE_ROOT; --skip-image-check skips "
                f"this disk check.")
        deep = _high_bit_depth(image_root, files)
        if deep:
            problems.append(
                f"{len(deep)} of {len(files)} images have more than 8 bits per channel: "
                f"{_ids([f'{fn} ({what})' for fn, what in deep])}. detectron2's read_image turns them into an "
                f"all-white image. Fix: convert them to 8 bits per channel, scaling their values to 0-255 (e.g. "
                f"numpy: (a * 255.0 / a.max()).astype('uint8')); --skip-image-check skips this disk check.")

    if problems:
        raise ConfigError(f"{where} cannot be used (IMAGE_ROOT {image_root}):\n  - " + "\n  - ".join(problems))
    n_bad = len(zero) + len(negative) + len(outside) + len(partly)
    if n_bad:
        parts = []
        if zero:
            parts.append(f"{len(zero)} with width or height 0 (annotation ids {_ids(zero)}): not trained on "
                         f"(detectron2's DatasetMapper drops empty boxes)")
        if negative:
            parts.append(f"{len(negative)} with a negative width or height (annotation ids {_ids(negative)}): "
                         f"trained as the mirrored box [x + w, x] (the mapper's transforms take the corners' "
                         f"min/max)")
        if outside:
            parts.append(f"{len(outside)} entirely outside their image (annotation ids {_ids(outside)}): not "
                         f"trained on (clipped to nothing, then dropped)")
        if partly:
            parts.append(f"{len(partly)} reaching more than {BOX_TOLERANCE:g} pixel outside their image "
                         f"(annotation ids {_ids(partly)}): trained clipped to the image")
        logger.warning(
            f"{where}: {n_bad} of {len(anns)} boxes have width or height <= 0 or lie outside their image: "
            f"{'; '.join(parts)}. COCO evaluation reads the JSON as written, where boxes with width or height "
            f"<= 0 can never be matched. Fix the boxes if they are mistakes.")
    return classes


def _missing_files(image_root: str, files: Sequence[str]) -> List[str]:
    """``files`` (relative to ``image_root``) that do not exist; one listing per folder, not one stat per file."""
    listings: Dict[str, set] = {}
    missing = []
    for fn in files:
        path = os.path.join(image_root, fn)
        folder, base = os.path.split(path)
        names = listings.get(folder)
        if names is None:
            try:
                names = listings[folder] = set(os.listdir(folder))
            except OSError:
                names = listings[folder] = set()
        if base not in names and not os.path.isfile(path):
            missing.append(fn)
    return missing


# PNG: signature, then the IHDR chunk (length, "IHDR", width, height, bit depth, colour type).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL modes of images with more than 8 bits per channel, which detectron2's read_image clips to white
# (PIL reads 16-bit RGB/RGBA PNGs as 8-bit RGB/RGBA, keeping the high byte: those are fine).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _high_bit_depth(image_root: str, files: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(file_name, description)]`` of the images detectron2 would read as white: 16-bit grayscale PNGs
    (26 header bytes read per ``.png``) and TIFFs of a >8-bit mode (PIL reads the header). JPEG is 8-bit.
    Unreadable files are left to the missing-file check and to the training reader."""
    out = []
    for fn in files:
        ext = os.path.splitext(fn)[1].lower()
        path = os.path.join(image_root, fn)
        try:
            if ext == ".png":
                with open(path, "rb") as f:
                    head = f.read(26)
                # bit depth 16, colour type 0 (grayscale)
                if len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" \
                        and head[24:26] == b"\x10\x00":
                    out.append((fn, "16-bit grayscale PNG"))
            elif ext in (".tif", ".tiff"):
                with Image.open(path) as im:
                    if im.mode in HIGH_BIT_DEPTH_MODES:
                        out.append((fn, f"TIFF, PIL mode {im.mode}"))
        except (OSError, SyntaxError, ValueError):
            continue
    return out


class ImageReadError(RuntimeError):
    """An image of a dataset that the training/evaluation reader cannot use; the message names the file."""


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` whose failures name the image file (any ``DATALOADER.NUM_WORKERS``).

    * an image with more than 8 bits per channel (PIL mode ``I;16``/``I``/``F``: a 16-bit grayscale PNG,
      a 16/32-bit TIFF), which ``read_image`` would turn into an all-white image, is refused by name
      (its header is read first: one extra ``Image.open`` without decoding);
    * an image that fails to decode (``OSError: image file is truncated``, an unknown format, ...) or any
      other error while mapping it is re-raised as :class:`ImageReadError` naming the file and image id.

    train_net's ``Trainer`` uses it for its train and test loaders; ``lazy_train`` puts it in place of
    detectron2's ``DatasetMapper`` in ``dataloader.train/test.mapper`` (:func:`use_checked_mapper`).
    """

    def __call__(self, dataset_dict):
        file_name = dataset_dict.get("file_name", "?")
        where = f"Image {file_name} (image_id {dataset_dict.get('image_id', '?')})"
        try:
            with PathManager.open(file_name, "rb") as f, Image.open(f) as im:
                mode = im.mode
            if mode in HIGH_BIT_DEPTH_MODES:
                raise ImageReadError(
                    f"{where} has more than 8 bits per channel (PIL mode {mode}); detectron2's read_image would "
                    f"turn it into an all-white image. Fix: convert it to 8 bits per channel, scaling its values "
                    f"to 0-255 (e.g. numpy: (a * 255.0 / a.max()).astype('uint8')).")
            return super().__call__(dataset_dict)
        except (ImageReadError, MemoryError):  # out of memory is no fault of the file: the trainer names the sizes
            raise
        except Exception as e:
            if str(file_name) in str(e):  # detectron2's own message names it (e.g. a size mismatch)
                raise
            if isinstance(e, (OSError, SyntaxError, EOFError, Image.DecompressionBombError)):
                what = (f"cannot be read: {type(e).__name__}: {e}. Fix: re-encode or replace the file, or remove "
                        f"the image and its annotations from the dataset (PIL's Image.open(path).load() shows the "
                        f"same error)")
            else:
                what = f"failed in the dataset mapper: {type(e).__name__}: {e}"
            raise ImageReadError(f"{where} {what}.") from e


_D2_MAPPER_NAMES = ("detectron2.data.DatasetMapper", "detectron2.data.dataset_mapper.DatasetMapper")


def use_checked_mapper(dataloader) -> List[str]:
    """In a LazyConfig ``dataloader``, replace detectron2's ``DatasetMapper`` of ``train``/``test`` (their
    ``mapper._target_``) by :class:`CheckedDatasetMapper`; returns the keys replaced. Other mappers are kept."""
    replaced = []
    for split in ("train", "test"):
        loader = dataloader.get(split) if dataloader is not None else None
        mapper = loader.get("mapper") if loader is not None and hasattr(loader, "get") else None
        target = mapper.get("_target_") if mapper is not None and hasattr(mapper, "get") else None
        if target is DatasetMapper or (isinstance(target, str) and target in _D2_MAPPER_NAMES):
            mapper._target_ = CheckedDatasetMapper
            replaced.append(f"dataloader.{split}.mapper")
    return replaced


def register_coco_datasets(specs: Sequence[Sequence[str]], check: bool = True, check_images: bool = True) -> None:
    """Register ``[(name, json, image_root), ...]`` as COCO instance datasets (idempotent, see module doc).

    ``check``: run :func:`check_coco_dataset` first (``check_images``: including the image files).
    """
    for name, json_file, image_root in specs:
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if not os.path.isfile(json_file):
            raise ConfigError(f"--register-coco {name}: JSON file {json_file!r} does not exist.")
        if not os.path.isdir(image_root):
            raise ConfigError(f"--register-coco {name}: IMAGE_ROOT {image_root!r} is not a directory.")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            old = (meta.get("json_file"), meta.get("image_root"))
            if old == (json_file, image_root):
                continue
            if meta.get("json_file") is None or not getattr(meta, "_d2b_registered", False):
                raise ConfigError(
                    f"--register-coco {name}: {name!r} is already a registered dataset (a built-in of detectron2 "
                    f"or registered by other code). Fix: choose another NAME, e.g. 'my_{name}'.")
            raise ConfigError(
                f"--register-coco {name}: {name!r} is already registered with JSON {old[0]!r} and IMAGE_ROOT "
                f"{old[1]!r}, not {json_file!r} / {image_root!r}. Fix: use a different NAME for different files.")
        classes = (check_coco_dataset(name, json_file, image_root, check_images=check_images) if check
                   else coco_classes(json_file))
        register_coco_instances(name, {"thing_classes": classes}, json_file, image_root)
        MetadataCatalog.get(name)._d2b_registered = True


def register_used_shapes(cfg) -> None:
    """Generate and register the shapes datasets if ``DATASETS.TRAIN``/``TEST`` use them."""
    used = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if used & set(SHAPES_DATASETS):
        register_shapes()


# ---------------------------------------------------------------------------------------------- shapes
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
_VERSION = 1


def default_root() -> str:
    """``$D2B_DATASETS/shapes`` if set, else ``./datasets/shapes`` (relative to the working directory)."""
    return os.path.join(os.environ.get("D2B_DATASETS", "datasets"), "shapes")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    n = {"circle": 24, "square": 4, "triangle": 3}[kind]
    start = angle + (math.pi / 4 if kind == "square" else -math.pi / 2)
    return [(cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n))
            for i in range(n)]


def _area(poly: List[Tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]))) / 2


def _make_image(rng: random.Random, size: int) -> Tuple[Image.Image, List[Dict]]:
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 12)):  # clutter: thin lines that are not objects
        pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(pts, fill=tuple(rng.randint(0, 120) for _ in range(3)), width=1)
    anns, boxes = [], []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            kind = rng.choice(["circle", "square", "triangle"])
            r = rng.uniform(size * 0.08, size * 0.22)
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            poly = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi) if kind != "circle" else 0.0)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            box = (min(xs), min(ys), max(xs), max(ys))
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        color = tuple(rng.randint(130, 255) for _ in range(3))
        draw.polygon(poly, fill=color)
        anns.append({"category_id": next(c["id"] for c in CATEGORIES if c["name"] == kind),
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                     "segmentation": [[round(v, 2) for p in poly for v in p]],
                     "area": _area(poly), "iscrowd": 0})
    return img, anns


def make_shapes(root: Optional[str] = None, n_train: int = 300, n_val: int = 50, size: int = 128,
                seed: int = 0) -> str:
    """Write the dataset under ``root`` (skipped if an identical one is already there); returns ``root``."""
    root = os.path.abspath(root or default_root())
    manifest = {"version": _VERSION, "n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    mpath = os.path.join(root, "manifest.json")
    if _read_manifest(mpath) == manifest:
        return root
    # Build in a private sibling directory and rename it into place, so concurrent processes
    # (several workers, or two launches on one machine) never see or write a half-made dataset.
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=parent)
    try:
        _write_splits(tmp, manifest)
        if os.path.isdir(root):
            if _read_manifest(mpath) == manifest:
                return root  # another process finished first
            shutil.rmtree(root)
        os.rename(tmp, root)
    except OSError:
        if _read_manifest(mpath) != manifest:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _read_manifest(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_splits(root: str, manifest: Dict) -> None:
    rng = random.Random(manifest["seed"])
    size = manifest["size"]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann_id = 1
    for split, n in (("train", manifest["n_train"]), ("val", manifest["n_val"])):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, anns = _make_image(rng, size)
            fname = f"{split}_{i:05d}.png"
            img.save(os.path.join(root, split, fname))
            images.append({"id": i + 1, "file_name": fname, "height": size, "width": size})
            for a in anns:
                annotations.append(dict(a, id=ann_id, image_id=i + 1))
                ann_id += 1
        with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def register_shapes(root: Optional[str] = None, **kwargs) -> str:
    """Generate (if needed) and register ``shapes_train`` and ``shapes_val``; idempotent."""
    root = make_shapes(root, **kwargs)
    register_coco_datasets([(f"shapes_{s}", os.path.join(root, "annotations", f"{s}.json"), os.path.join(root, s))
                            for s in ("train", "val")])
    return root
