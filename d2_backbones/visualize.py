"""Pictures of a training run: loss/AP curves from ``metrics.json`` and predictions on val images.

``train_net.py`` writes both into ``OUTPUT_DIR`` after training (``curves.png``, ``predictions.png``).
"""
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["read_metrics", "plot_curves", "draw_predictions"]


def read_metrics(output_dir: str) -> List[Dict]:
    """The records of ``OUTPUT_DIR/metrics.json`` (one json object per line), in order."""
    path = os.path.join(output_dir, "metrics.json")
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def plot_curves(output_dir: str, out_png: Optional[str] = None) -> str:
    """Plot total loss (and every ``*/AP`` metric, if evaluated) against iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(output_dir)
    out_png = out_png or os.path.join(output_dir, "curves.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    loss = [(r["iteration"], r["total_loss"]) for r in recs if "total_loss" in r]
    if loss:
        axes[0].plot(*zip(*loss), label="total_loss")
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training loss")
    axes[0].legend()
    for key in sorted({k for r in recs for k in r if k.endswith("/AP")}):
        pts = [(r["iteration"], r[key]) for r in recs if key in r]
        axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set_xlabel("iteration")
    axes[1].set_title("validation AP")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


@torch.no_grad()
def draw_predictions(cfg, model, dataset_name: str, out_png: str, n: int = 8, score_thresh: float = 0.5) -> str:
    """Run ``model`` on the first ``n`` images of ``dataset_name`` and save them in a grid with predictions."""
    from PIL import Image, ImageDraw

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    dicts = DatasetCatalog.get(dataset_name)[:n]
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    was_training = model.training
    model.eval()
    tiles = []
    for d in dicts:
        img = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = img.shape[:2]
        inp = aug.get_transform(img).apply_image(img)
        tensor = torch.as_tensor(inp.astype("float32").transpose(2, 0, 1))
        inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        inst = inst[inst.scores >= score_thresh]
        rgb = img[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else img
        tiles.append(_draw(Image.fromarray(np.ascontiguousarray(rgb)), inst, classes, ImageDraw))
    model.train(was_training)
    if not tiles:
        raise ValueError(f"dataset {dataset_name!r} has no images")
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    tw, th = tiles[0].size
    grid = Image.new("RGB", (cols * tw, rows * th), (255, 255, 255))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(t, (c * tw, r * th))
    grid.save(out_png)
    return out_png


_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def _draw(image, instances, classes, ImageDraw, scale: int = 2):
    """Boxes, class names and scores on a (scaled-up) PIL image; no OpenCV needed."""
    image = image.resize((image.width * scale, image.height * scale))
    draw = ImageDraw.Draw(image)
    for box, cls, score in zip(instances.pred_boxes.tensor.tolist(), instances.pred_classes.tolist(),
                               instances.scores.tolist()):
        color = _COLORS[cls % len(_COLORS)]
        x0, y0, x1, y1 = [v * scale for v in box]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        name = classes[cls] if classes and cls < len(classes) else str(cls)
        draw.text((x0 + 2, max(0, y0 - 11)), f"{name} {score:.2f}", fill=color)
    return image
