"""``python -m d2_backbones.demo``: pictures of a model's detections, drawn with PIL (no OpenCV).

The model is the quickstart's Faster R-CNN R-18-FPN with random weights (nothing is trained or downloaded):
at ``--confidence-threshold 0`` it detects its ``TEST.DETECTIONS_PER_IMAGE`` boxes on any image, and the
same seed builds the same weights again, so the test knows where the boxes are.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIG_DIR, REPO
from d2_backbones.data import make_shapes

QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255)]  # d2_backbones.visualize's first class colours


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Three 128x128 shapes images and their COCO json: (json, image folder)."""
    root = make_shapes(str(tmp_path_factory.mktemp("demo") / "shapes"), n_train=1, n_val=3, size=128, seed=5)
    return os.path.join(root, "annotations", "val.json"), os.path.join(root, "val")


def _args(shapes, out, *extra, detections=2):
    json_file, images = shapes
    return (["--config-file", QUICK, "--input", images, "--output", str(out), "--register-coco", "demo_shapes",
             json_file, images] + [str(e) for e in extra]
            + ["DATASETS.TRAIN", "()", "DATASETS.TEST", "('demo_shapes',)", "INPUT.MIN_SIZE_TEST", "128",
               "INPUT.MAX_SIZE_TEST", "128", "TEST.DETECTIONS_PER_IMAGE", str(detections)])


def _predictions(shapes, files, detections):
    """What the demo's model (same config, same seed) detects on ``files``: [(boxes, classes), ...]."""
    from d2_backbones import demo
    from d2_backbones.predictor import make_predictor

    cfg = demo.setup(demo.argument_parser().parse_args(_args(shapes, "unused", "--confidence-threshold", 0,
                                                             detections=detections)))
    torch.manual_seed(0)
    predictor = make_predictor(cfg)
    out = []
    for f in files:
        inst = predictor(np.asarray(Image.open(f).convert("RGB"))[:, :, ::-1].copy())["instances"]
        out.append((inst.pred_boxes.tensor.tolist(), inst.pred_classes.tolist()))
    return out


def test_demo_draws_one_picture_per_image(shapes, tmp_path):
    from d2_backbones.demo import main

    out = tmp_path / "out"
    torch.manual_seed(0)
    written = main(_args(shapes, out, "--confidence-threshold", 0, detections=1))
    images = sorted(os.listdir(shapes[1]))
    assert sorted(os.listdir(out)) == images  # one picture per image, same file names, no temporaries left
    assert written == [str(out / f) for f in images]
    preds = _predictions(shapes, [os.path.join(shapes[1], f) for f in images], detections=1)
    for name, (boxes, classes) in zip(images, preds):
        src = np.asarray(Image.open(os.path.join(shapes[1], name)).convert("RGB")).astype(int)
        pic = Image.open(out / name)
        assert pic.size == (128, 128)
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's private mode
        dst = np.asarray(pic.convert("RGB")).astype(int)
        assert len(boxes) == 1
        for box, cls in zip(boxes, classes):
            # the box's bottom edge (its label sits at the top) is drawn in its class colour where it was not
            x0, x1, y1 = int(round(box[0])), int(round(box[2])), min(int(box[3]), 127)
            edge = dst[y1, x0:x1 + 1]
            assert (edge != src[y1, x0:x1 + 1]).any(axis=1).mean() > 0.5, (name, box)
            assert ((edge == COLORS[cls]).all(axis=1).mean() > 0.5), (name, box, cls)


def test_demo_refuses_existing_outputs_and_inputs_as_outputs(shapes, tmp_path):
    from d2_backbones.demo import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "val_00001.png").write_bytes(b"previous picture")
    with pytest.raises(SystemExit, match=r"already holds .*val_00001.png.*--overwrite"):
        main(_args(shapes, out))
    assert (out / "val_00001.png").read_bytes() == b"previous picture"
    with pytest.raises(SystemExit, match=r"would overwrite the input"):
        main(_args(shapes, shapes[1], "--overwrite"))
    main(_args(shapes, out, "--overwrite"))
    assert Image.open(out / "val_00001.png").size == (128, 128)


def test_demo_classes_must_match_the_model(shapes, tmp_path):
    from d2_backbones.demo import main

    with pytest.raises(SystemExit, match=r"--classes names 2 classes \(a, b\) but the model has "
                                         r"MODEL.ROI_HEADS.NUM_CLASSES=3. Fix: give exactly 3 names"):
        main(_args(shapes, tmp_path / "out", "--classes", "a,b"))
    assert not (tmp_path / "out").exists()


def test_demo_class_names_from_the_dataset_or_the_flag(shapes):
    from d2_backbones import demo

    cfg = demo.setup(demo.argument_parser().parse_args(_args(shapes, "unused")))
    assert demo.class_names(cfg) == ["circle", "square", "triangle"]
    assert demo.class_names(cfg, "x, y,z") == ["x", "y", "z"]


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "not_an_image"])
def test_demo_bad_inputs_are_named(shapes, tmp_path, case):
    from d2_backbones.demo import main

    json_file, images = shapes
    if case == "missing":
        path, match = tmp_path / "nope.png", r"--input .*nope.png: no such file or folder"
    elif case == "empty":
        path, match = tmp_path / "empty", r"--input .*empty: the folder has no image files"
        path.mkdir()
        (path / "notes.txt").write_text("no pictures here")
    elif case == "unreadable":
        path, match = tmp_path / "broken.jpg", r"--input .*broken.jpg: the image cannot be read"
        path.write_bytes(b"not a jpeg")
    else:
        path, match = tmp_path / "table.csv", r"--input .*table.csv: not an image"
        path.write_text("a,b")
    args = _args(shapes, tmp_path / "out")
    args[args.index("--input") + 1] = str(path)
    with pytest.raises(SystemExit, match=match):
        main(args)


def test_demo_video_without_pyav_says_what_to_install(shapes, tmp_path, monkeypatch):
    from d2_backbones.demo import main

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails, as when PyAV is not installed
    args = _args(shapes, tmp_path / "out")
    args[args.index("--input") + 1] = str(video)
    with pytest.raises(SystemExit, match=r"clip.mp4: videos are read and written with PyAV.*pip install av"):
        main(args)
    assert not os.path.exists(tmp_path / "out" / "clip.mp4")


def test_draw_instances_tints_masks():
    from d2_backbones.visualize import draw_instances

    img = Image.new("RGB", (60, 60), (0, 0, 0))
    mask = np.zeros((60, 60), bool)
    mask[40:45, 10:20] = True
    out = np.asarray(draw_instances(img, [[2, 30, 57, 57]], [1], [0.9], scale=1, masks=[mask], class_names=["a", "b"]))
    assert tuple(out[42, 15]) == (26, 80, 26)  # 0.4 x class 1's colour (64, 200, 64) over black
    assert tuple(out[50, 15]) == (0, 0, 0)  # outside the mask, inside the box


@pytest.mark.slow
def test_demo_command_line(shapes, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "d2_backbones.demo"] + _args(shapes, out, "--confidence-threshold", 0),
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(shapes[1]))
    for f in os.listdir(out):
        assert Image.open(out / f).size == (128, 128)
    assert "2 detections" in r.stderr + r.stdout
    r = subprocess.run([sys.executable, "-m", "d2_backbones.demo", "--config-file", QUICK, "--input",
                        str(tmp_path / "missing.png"), "--output", str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode != 0 and "missing.png: no such file or folder" in r.stderr
