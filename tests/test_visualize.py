"""d2_backbones.visualize without training: curves of a resumed metrics.json, predictions.png layout."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from d2_backbones.data import make_shapes, register_coco_datasets
from d2_backbones.visualize import (curves_figure, draw_instances, draw_predictions, label_position, merge_runs,
                                    plot_curves, predictions_title, read_metrics)

from conftest import CONFIG_DIR, load_cfg

QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
CLASSES = ["circle", "square", "triangle"]


# ------------------------------------------------------------------------------------------ curves
def _resumed_metrics(out_dir):
    """What train_net.py leaves after a run to iteration 319 (eval at 199) and a --resume from the
    checkpoint at 199: the second run logs 219, 239, ... again, with other values, evaluates at 299 and,
    after its last iteration (399), at MAX_ITER (detectron2 logs the final evaluation at iteration 400)."""
    rows = [{"iteration": i, "total_loss": 1.0, "lr": 0.02} for i in range(19, 320, 20)]
    rows[9]["bbox/AP"] = 40.0  # iteration 199
    rows[14]["bbox/AP"] = 11.0  # iteration 299 of the first run: replaced by the second run's evaluation
    rows += [{"iteration": i, "total_loss": 0.5, "lr": 0.02} for i in range(219, 400, 20)]
    rows[-6]["bbox/AP"] = 60.0  # iteration 299 of the second run
    rows.append({"iteration": 400, "bbox/AP": 70.0, "bbox/AP50": 90.0})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def test_merge_runs_keeps_the_later_run(tmp_path):
    rows = _resumed_metrics(str(tmp_path))
    recs = read_metrics(str(tmp_path))
    assert recs == rows
    its = [r["iteration"] for r in recs]
    assert its[15:18] == [319, 219, 239]  # the file doubles back
    merged = merge_runs(recs)
    m_its = [r["iteration"] for r in merged]
    assert all(a < b for a, b in zip(m_its, m_its[1:])), m_its
    assert m_its == list(range(19, 400, 20)) + [400]
    by_it = {r["iteration"]: r for r in merged}
    assert by_it[199]["total_loss"] == 1.0 and by_it[199]["bbox/AP"] == 40.0  # before the resume: first run
    assert all(by_it[i]["total_loss"] == 0.5 for i in range(219, 400, 20))  # from the resume on: second run
    assert by_it[299]["bbox/AP"] == 60.0
    assert by_it[400]["bbox/AP"] == 70.0


def test_merge_runs_drops_what_the_resumed_run_replaced():
    # first run to 319, resumed from 199 but stopped at 259: 279..319 of the first run are another history
    recs = [{"iteration": i, "total_loss": 1.0} for i in (199, 219, 239, 259, 279, 299, 319)]
    recs += [{"iteration": i, "total_loss": 0.5} for i in (219, 239, 259)]
    recs.append({"note": "no iteration"})
    merged = merge_runs(recs)
    assert [(r["iteration"], r["total_loss"]) for r in merged] == [(199, 1.0), (219, 0.5), (239, 0.5), (259, 0.5)]


def test_read_metrics_skips_a_truncated_line(tmp_path):
    (tmp_path / "metrics.json").write_text('{"iteration": 19, "total_loss": 2.0}\n{"iteration": 39, "tot')
    assert read_metrics(str(tmp_path)) == [{"iteration": 19, "total_loss": 2.0}]


def test_curves_do_not_double_back_and_have_axis_labels(tmp_path):
    _resumed_metrics(str(tmp_path))
    fig = curves_figure(read_metrics(str(tmp_path)))
    ax_loss, ax_ap = fig.axes
    assert ax_loss.get_xlabel() == "iteration" and ax_loss.get_ylabel() == "total loss"
    assert ax_ap.get_xlabel() == "iteration" and ax_ap.get_ylabel() == "AP (%)"
    (loss_line,) = ax_loss.get_lines()
    x = list(loss_line.get_xdata())
    assert x == list(range(19, 400, 20))
    assert list(loss_line.get_ydata()) == [1.0] * 10 + [0.5] * 10
    ap_lines = {line.get_label(): line for line in ax_ap.get_lines()}
    assert sorted(ap_lines) == ["bbox/AP"]  # AP50 is not an */AP key
    assert list(ap_lines["bbox/AP"].get_xdata()) == [199, 299, 400]
    assert list(ap_lines["bbox/AP"].get_ydata()) == [40.0, 60.0, 70.0]
    png = plot_curves(str(tmp_path))
    assert png == str(tmp_path / "curves.png")
    with Image.open(png) as im:
        assert im.size == (800, 320)  # figsize (10, 4) at dpi 80


def test_curves_without_evaluation_still_label_both_panels():
    fig = curves_figure([{"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.5}])
    ax_loss, ax_ap = fig.axes
    assert ax_ap.get_lines() == [] and ax_ap.get_ylabel() == "AP (%)" and ax_ap.get_xlabel() == "iteration"
    assert any("no evaluation" in t.get_text() for t in ax_ap.texts)
    assert list(ax_loss.get_lines()[0].get_xdata()) == [19, 39]


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("box", [
    (230, 0, 256, 20),     # top-right corner: no room above, would run past the right edge
    (0, 0, 10, 10),        # top-left corner
    (250, 100, 256, 120),  # thin box at the right edge
    (100, 250, 140, 256),  # bottom edge
    (-5, -5, 300, 300),    # larger than the image
])
def test_label_position_keeps_the_label_inside(box):
    tw, th, W, H = 70, 14, 256, 256
    x, y = label_position((tw, th), box, (W, H))
    assert 0 <= x and x + tw <= W and 0 <= y and y + th <= H, (x, y)


def test_label_position_prefers_above_the_box():
    assert label_position((50, 12), (40, 60, 90, 100), (256, 256)) == (40, 48)
    assert label_position((50, 12), (40, 5, 90, 100), (256, 256)) == (40, 6)  # no room above: inside the top edge


def test_label_position_avoids_labels_already_placed():
    first = label_position((50, 12), (40, 60, 90, 100), (256, 256))
    taken = [(first[0], first[1], first[0] + 49, first[1] + 11)]
    second = label_position((50, 12), (42, 61, 90, 100), (256, 256), taken=taken)
    assert second == (42, 62)  # inside the box's top edge, below the first label
    assert label_position((50, 12), (42, 61, 90, 100), (256, 256)) == (42, 49)  # where it would go otherwise


def test_labels_of_overlapping_boxes_do_not_overlap():
    img = Image.new("RGB", (128, 128), (30, 30, 30))
    boxes = [[40, 40, 80, 80], [41, 41, 80, 80], [40, 42, 81, 79], [120, 0, 128, 8], [118, 1, 128, 9]]
    _, rects = draw_instances(img, boxes, [0, 1, 2, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5], class_names=CLASSES,
                              return_labels=True)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] < 256 and 0 <= a[1] and a[3] < 256, a
        for b in rects[i + 1:]:
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


def _colour_pixels(img, colour):
    a = np.asarray(img)
    return int(np.all(a == np.array(colour, dtype=a.dtype), axis=-1).sum())


def test_draw_instances_labels_inside_and_ground_truth_drawn():
    img = Image.new("RGB", (128, 128), (30, 30, 30))
    boxes = [[100, 0, 128, 12], [120, 60, 128, 70], [0, 0, 30, 30], [40, 40, 80, 80]]
    out, rects = draw_instances(img, boxes, [0, 1, 2, 1], [0.99, 0.9, 0.8, 0.7], gt_boxes=[[10, 90, 50, 120]],
                                class_names=CLASSES, return_labels=True)
    W, H = out.size
    assert (W, H) == (256, 256)
    assert len(rects) == 4
    for x0, y0, x1, y1 in rects:
        assert 0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H, (x0, y0, x1, y1)
    # ground truth: dashed white along the (scaled) box edge, nothing white elsewhere
    a = np.asarray(out)
    top = a[180, 20:100]  # y = 90 * 2, x from 10 * 2 to 50 * 2
    white = np.all(top == 255, axis=-1)
    assert 0.3 < white.mean() < 0.9, white.mean()  # dashed: partly drawn, with gaps
    assert _colour_pixels(out, (255, 255, 255)) == pytest.approx(2 * (80 + 60) * white.mean(), rel=0.3)
    # without ground truth there is no white at all
    assert _colour_pixels(draw_instances(img, boxes, [0, 1, 2, 1], [0.99, 0.9, 0.8, 0.7], class_names=CLASSES),
                          (255, 255, 255)) == 0


def test_predictions_title_states_the_threshold():
    assert "score >= 0.35" in predictions_title(0.35, "shapes_val")
    assert "shapes_val" in predictions_title(0.35, "shapes_val")
    assert "ground truth" in predictions_title(0.5)


# ------------------------------------------------------------------------------------------ predictions.png
@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    root = make_shapes(str(tmp_path_factory.mktemp("vis") / "shapes"), n_train=1, n_val=3, size=96, seed=5)
    register_coco_datasets([("d2b_vis_val", f"{root}/annotations/val.json", f"{root}/val")])
    return "d2b_vis_val"


def test_draw_predictions_writes_title_ground_truth_and_keeps_the_model_mode(tiny_val, tmp_path):
    cfg = load_cfg(QUICK)
    model = build_model(cfg)  # randomly initialised: its scores are ~ 1 / (classes + 1)
    model.train()
    png = str(tmp_path / "predictions.png")
    # a threshold above every score leaves only the ground truth
    assert draw_predictions(cfg, model, tiny_val, png, n=3, score_thresh=1.01) == png
    assert model.training
    with Image.open(png) as im:
        title = im.text["Title"]
        grid = im.convert("RGB")
    assert "score >= 1.01" in title and "d2b_vis_val" in title
    dicts = DatasetCatalog.get(tiny_val)
    tile = 96 * 2
    header = grid.height - tile
    assert grid.width == 3 * tile + 2 * 4 and header > 0  # three tiles in one row, 4 px apart, under the title
    assert np.asarray(grid)[:header].min() < 128  # the title strip has dark text on white
    for i, d in enumerate(dicts):
        x0 = i * (tile + 4)
        cell = grid.crop((x0, header, x0 + tile, header + tile))
        n_white = _colour_pixels(cell, (255, 255, 255))
        # the shapes images have no pure white (objects are 130..255 per channel, random); the dashed
        # ground truth boxes are: at least a third of every box outline
        perimeter = sum(4 * a["bbox"][2] + 4 * a["bbox"][3] for a in d["annotations"])
        assert n_white >= perimeter / 3, (i, n_white, perimeter)
    # with a threshold of 0 the random model's predictions appear (coloured boxes and black label backgrounds)
    png0 = str(tmp_path / "predictions0.png")
    draw_predictions(cfg, model, tiny_val, png0, n=3, score_thresh=0.0)
    with Image.open(png0) as im:
        assert "score >= 0" in im.text["Title"]
        assert _colour_pixels(im.convert("RGB"), (0, 0, 0)) > _colour_pixels(grid, (0, 0, 0)) + 100
