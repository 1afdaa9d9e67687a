"""Pictures of a training run: loss/AP curves from ``metrics.json`` and predictions on val images.

Both trainers (``train_net`` and ``lazy_train``, through :func:`d2_backbones.engine.write_pictures`) write
both into the output directory after training:

* ``curves.png``: total loss (left) and every ``*/AP`` metric (right) against iteration. A run continued
  with ``--resume`` appends to the same ``metrics.json``, so the file holds the first run's rows past the
  checkpoint and the resumed run's rows again from there (``..., 299, 319, 219, 239, ...``):
  :func:`merge_runs` keeps one row per iteration, the later run's, so the curves never double back.
* ``predictions.png``: the first val images, each with the model's boxes (solid, class colour, label
  ``class score``) above the given score threshold and the ground truth boxes (thin, dashed, white)
  drawn over them; the title strip states the threshold and the legend. Labels stay inside the image.

:func:`draw_instances` draws one image from plain boxes (no model needed).
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["read_metrics", "merge_runs", "curves_figure", "plot_curves", "draw_predictions", "draw_instances",
           "label_position", "predictions_title"]


# ---------------------------------------------------------------------------------------------- curves
def read_metrics(output_dir: str) -> List[Dict]:
    """The records of ``OUTPUT_DIR/metrics.json`` (one json object per line), in file order.

    A line that is not valid json (e.g. cut short when a run was killed while writing it) is skipped.
    """
    path = os.path.join(output_dir, "metrics.json")
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def merge_runs(records: Sequence[Dict]) -> List[Dict]:
    """One record per iteration, iterations strictly increasing; a later run replaces an earlier one.

    Within one run detectron2 writes increasing iterations; a row whose iteration is not above the
    previous row's starts a resumed run. Everything the earlier run(s) logged from that iteration on is
    dropped (those rows belong to a history the resumed run replaces), then the new rows follow.
    Records without an ``iteration`` are ignored.
    """
    out: List[Dict] = []
    for rec in records:
        it = rec.get("iteration")
        if not isinstance(it, (int, float)):
            continue
        while out and out[-1]["iteration"] >= it:
            out.pop()
        out.append(rec)
    return out


def _series(records: Sequence[Dict], key: str) -> Tuple[List[float], List[float]]:
    pts = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_figure(records: Sequence[Dict]):
    """The matplotlib figure of :func:`plot_curves` for ``records`` (merged with :func:`merge_runs` first).

    A plain ``Figure`` (no pyplot): no display or backend needed, nothing to close.
    """
    from matplotlib.figure import Figure

    recs = merge_runs(records)
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_ap = fig.subplots(1, 2)
    x, y = _series(recs, "total_loss")
    if x:
        ax_loss.plot(x, y, label="total_loss")
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("total loss")
    ax_loss.grid(alpha=0.3)
    for key in sorted({k for r in recs for k in r if k.endswith("/AP")}):
        x, y = _series(recs, key)
        if x:
            ax_ap.plot(x, y, marker="o", label=key)
    if ax_ap.lines:
        ax_ap.legend()
    else:
        ax_ap.text(0.5, 0.5, "no evaluation logged (TEST.EVAL_PERIOD)", ha="center", va="center",
                   transform=ax_ap.transAxes)
    ax_ap.set_title("validation AP")
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("AP (%)")
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(output_dir: str, out_png: Optional[str] = None) -> str:
    """Plot total loss and every ``*/AP`` metric of ``OUTPUT_DIR/metrics.json`` against iteration."""
    out_png = out_png or os.path.join(output_dir, "curves.png")
    curves_figure(read_metrics(output_dir)).savefig(out_png, dpi=80)
    return out_png


# ---------------------------------------------------------------------------------------------- predictions
_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]
_GT_COLOR = (255, 255, 255)
_HEADER_BG = (255, 255, 255)
_TEXT = (0, 0, 0)


def predictions_title(score_thresh: float, dataset_name: str = "") -> str:
    """The title line of ``predictions.png``."""
    where = f" on {dataset_name}" if dataset_name else ""
    return f"Predictions{where} with score >= {score_thresh:g} (solid, label: class score); ground truth dashed white"


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def label_position(text_size: Tuple[int, int], box: Sequence[float], image_size: Tuple[int, int],
                   taken: Sequence[Sequence[float]] = ()) -> Tuple[int, int]:
    """Top-left corner for a label of ``text_size`` (w, h) naming ``box`` (x0, y0, x1, y1) in an image of
    ``image_size`` (w, h), so that the whole label lies inside the image: just above the box, or inside
    its top edge when there is no room above, moved left/up as needed. ``taken``: rectangles (x0, y0, x1,
    y1) of labels already placed; the label moves down by its height until it overlaps none of them
    (the first place is used if none is free)."""
    tw, th = text_size
    W, H = image_size
    bx, by = int(round(box[0])), int(round(box[1]))
    x = max(0, min(bx, W - tw))
    first = by - th if by - th >= 0 else by + 1
    candidates = [first] + ([by + 1] if first != by + 1 else []) + [by + 1 + k * th for k in range(1, 6)]
    placed = []
    for y in candidates:
        y = max(0, min(y, H - th))
        if y in placed:
            continue
        placed.append(y)
        if not any(x < r[2] + 1 and r[0] < x + tw and y < r[3] + 1 and r[1] < y + th for r in taken):
            return x, y
    return x, placed[0]


def _dashed_rectangle(draw, box, color, width: int = 1, dash: int = 4, gap: int = 3) -> None:
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        if length <= 0:
            continue
        t = 0.0
        while t < length:
            e = min(t + dash, length)
            draw.line([(ax + (bx - ax) * t / length, ay + (by - ay) * t / length),
                       (ax + (bx - ax) * e / length, ay + (by - ay) * e / length)], fill=color, width=width)
            t += dash + gap


def draw_instances(image, boxes, classes, scores, gt_boxes=(), class_names: Optional[Sequence[str]] = None,
                   scale: int = 2, font_size: int = 11, return_labels: bool = False, masks=None,
                   mask_alpha: float = 0.4):
    """Draw predicted ``boxes`` (x0, y0, x1, y1; solid, class colour, label ``class score``) and
    ``gt_boxes`` (thin dashed white, drawn over the predictions so that they show on a matching one) on a
    copy of the PIL ``image`` scaled up ``scale`` times. Labels come last, inside the image, placed by
    :func:`label_position` in order of score so that they do not hide each other. ``masks`` (one boolean
    H x W array per box, the image's size, e.g. Mask R-CNN's ``pred_masks``) tint their pixels in the box's
    colour (``mask_alpha``) under the boxes.

    Returns the new image, or ``(image, label_rects)`` with ``return_labels``: the (x0, y0, x1, y1) of
    every label's background in the returned image, highest score first.

    >>> from PIL import Image
    >>> out = draw_instances(Image.new("RGB", (40, 30)), [[5, 5, 20, 20]], [0], [0.9], class_names=["a"], scale=1)
    >>> out.size, out.getpixel((12, 20))  # the box's lower edge, in class 0's colour
    ((40, 30), (255, 64, 64))
    """
    from PIL import Image, ImageDraw

    image = image.convert("RGB")
    if masks is not None and len(masks):
        pixels = np.asarray(image).astype(np.float32)
        for mask, cls in zip(masks, classes):
            m = np.asarray(mask, dtype=bool)
            color = np.array(_COLORS[int(cls) % len(_COLORS)], dtype=np.float32)
            pixels[m] = pixels[m] * (1 - mask_alpha) + color * mask_alpha
        image = Image.fromarray(pixels.round().astype(np.uint8))
    image = image.resize((image.width * scale, image.height * scale))
    draw = ImageDraw.Draw(image)
    font = _font(font_size)
    W, H = image.size
    rects = []
    items = sorted(zip([list(map(float, b)) for b in boxes], [int(c) for c in classes], [float(s) for s in scores]),
                   key=lambda t: t[2])  # highest score drawn last, on top
    for box, cls, _score in items:
        color = _COLORS[cls % len(_COLORS)]
        draw.rectangle([v * scale for v in box], outline=color, width=2)
    for box in gt_boxes:  # over the predictions, under the labels
        _dashed_rectangle(draw, [float(v) * scale for v in box], _GT_COLOR, width=1)
    labels = []
    for box, cls, score in reversed(items):  # the highest score gets the first choice of place
        name = class_names[cls] if class_names and 0 <= cls < len(class_names) else str(cls)
        text = f"{name} {score:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 2, b - t + 2
        x, y = label_position((tw, th), [v * scale for v in box], (W, H), taken=rects)
        rects.append((x, y, x + tw - 1, y + th - 1))
        labels.append((rects[-1], text, (l, t), _COLORS[cls % len(_COLORS)]))
    for (x, y, x1, y1), text, (l, t), color in reversed(labels):  # ... and is drawn last, on top
        draw.rectangle([x, y, x1, y1], fill=(0, 0, 0))
        draw.text((x + 1 - l, y + 1 - t), text, fill=color, font=font)
    return (image, rects) if return_labels else image


def _header(width: int, title: str, class_names: Optional[Sequence[str]], font_size: int = 13):
    """A white strip with ``title`` (wrapped to ``width``) and the class colours."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in title.split(" "):
        cand = f"{line} {word}".strip()
        if line and probe.textlength(cand, font=font) > width - 12:
            lines.append(line)
            line = word
        else:
            line = cand
    lines.append(line)
    line_h = font_size + 5
    legend = list(class_names or [])
    h = 6 + line_h * (len(lines) + (1 if legend else 0)) + 4
    img = Image.new("RGB", (width, h), _HEADER_BG)
    draw = ImageDraw.Draw(img)
    y = 6
    for ln in lines:
        draw.text((6, y), ln, fill=_TEXT, font=font)
        y += line_h
    x = 6
    for i, name in enumerate(legend):
        color = _COLORS[i % len(_COLORS)]
        draw.rectangle([x, y + 2, x + 18, y + line_h - 5], outline=color, width=2)
        draw.text((x + 24, y), name, fill=_TEXT, font=font)
        x += 24 + int(probe.textlength(name, font=font)) + 16
    return img


@torch.no_grad()
def draw_predictions(cfg, model, dataset_name: str, out_png: str, n: int = 8, score_thresh: float = 0.5, *,
                     min_size: Optional[int] = None, max_size: Optional[int] = None,
                     image_format: Optional[str] = None) -> str:
    """Run ``model`` on the first ``n`` images of ``dataset_name`` and save them in a grid: predictions with
    score >= ``score_thresh`` and the ground truth (see the module doc); the threshold is in the title
    (drawn, and stored as the PNG's ``Title`` text).

    The images are resized and read as for evaluation: ``cfg`` (a yacs config) gives ``INPUT.MIN_SIZE_TEST``,
    ``INPUT.MAX_SIZE_TEST`` and ``INPUT.FORMAT``; without it (``None``, e.g. for a Python config) ``min_size`` /
    ``max_size`` (``None``: no resize) and ``image_format`` (default ``"BGR"``) say the same.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    dicts = DatasetCatalog.get(dataset_name)[:n]
    if not dicts:
        raise ValueError(f"dataset {dataset_name!r} has no images")
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if cfg is not None:
        min_size, max_size, image_format = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT
    image_format = image_format or "BGR"
    aug = T.ResizeShortestEdge([min_size] * 2, max_size or 10 ** 9) if min_size else T.NoOpTransform()
    was_training = model.training
    model.eval()
    tiles = []
    try:
        for d in dicts:
            img = utils.read_image(d["file_name"], format=image_format)
            h, w = img.shape[:2]
            inp = (aug.get_transform(img) if min_size else aug).apply_image(img)
            tensor = torch.as_tensor(np.ascontiguousarray(inp.astype("float32").transpose(2, 0, 1)))
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
            inst = inst[inst.scores >= score_thresh]
            gt = [BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
                  for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
            rgb = img[:, :, ::-1] if image_format == "BGR" else img
            tiles.append(draw_instances(Image.fromarray(np.ascontiguousarray(rgb)), inst.pred_boxes.tensor.tolist(),
                                        inst.pred_classes.tolist(), inst.scores.tolist(), gt, classes))
    finally:
        model.train(was_training)
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    tw = max(t.width for t in tiles)
    th = max(t.height for t in tiles)
    pad = 4
    width = cols * tw + (cols - 1) * pad
    title = predictions_title(score_thresh, dataset_name)
    header = _header(width, title, classes)
    grid = Image.new("RGB", (width, header.height + rows * th + (rows - 1) * pad), (255, 255, 255))
    grid.paste(header, (0, 0))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(t, (c * (tw + pad), header.height + r * (th + pad)))
    info = PngInfo()
    info.add_text("Title", title)
    grid.save(out_png, pnginfo=info)
    return out_png
