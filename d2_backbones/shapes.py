"""A small synthetic COCO-format dataset (circles, squares, triangles) for the quickstart and tests.

:func:`make_shapes` writes real files - PNG images and a COCO json per split with boxes, polygon
masks and categories - deterministically from a seed, so training on it exercises exactly the path
user data takes (``register_coco_instances``, the dataset mapper, ``COCOEvaluator``).
:func:`register_shapes` generates it on first use and registers ``shapes_train`` / ``shapes_val``.

Example::

    >>> root = make_shapes("shapes_demo", n_train=8, n_val=2)
    >>> sorted(os.listdir(root))
    ['annotations', 'manifest.json', 'train', 'val']
"""
import json
import math
import os
import random
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "make_shapes", "register_shapes", "default_root"]

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
    from .train import register_coco_datasets

    root = make_shapes(root, **kwargs)
    register_coco_datasets([(f"shapes_{s}", os.path.join(root, "annotations", f"{s}.json"), os.path.join(root, s))
                            for s in ("train", "val")])
    return root
