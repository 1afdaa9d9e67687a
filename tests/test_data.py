"""Datasets checked on arrival: every defect of a --register-coco dataset is reported before the model is built.

Each defect runs on a small copy of the synthetic shapes dataset with that one defect, twice: through the
trainer's ``setup()`` in process (fast tier) and through ``python train_net.py --register-coco NAME JSON
IMAGE_ROOT ...`` in a fresh process (slow tier: exit code, stderr, no model built).
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from d2_backbones import ConfigError
from d2_backbones.data import make_shapes

from conftest import CONFIG_DIR, REPO

TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")


@pytest.fixture
def shapes(tmp_path):
    """A fresh 8-image dataset: (json path, image root, parsed json)."""
    root = make_shapes(str(tmp_path / "shapes"), n_train=8, n_val=1, size=64, seed=3)
    json_file = os.path.join(root, "annotations", "train.json")
    with open(json_file) as f:
        return json_file, os.path.join(root, "train"), json.load(f)


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def _train_net(name, json_file, image_root, out, *extra, timeout=600):
    cmd = [sys.executable, TRAIN_NET, "--config-file", QUICK, "--register-coco", name, json_file, image_root,
           *extra, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), "DATASETS.TRAIN", f"('{name}',)",
           "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    return p, p.stdout + p.stderr


def _assert_failed_before_model(p, log):
    assert p.returncode != 0, log[-3000:]
    assert "Built backbone" not in log, log[-3000:]  # the check ran in setup, not in the data loader
    assert "ConfigError" in p.stderr, p.stderr[-3000:]


# ------------------------------------------------------------------------------------------ errors
# Each defect: (name, make) where make(shapes, tmp_path) -> (json_file, image_root, [expected message parts]).
def _invalid_json(shapes, tmp_path):
    json_file, image_root, data = shapes
    text = json.dumps(data, indent=1)
    pos = text.index('"annotations": [') + len('"annotations"')
    text = text[:pos] + text[pos + 1:]  # drop the ':' -> the parser stops at the '[' (pos + 1 before the cut)
    bad = str(tmp_path / "broken.json")
    with open(bad, "w") as f:
        f.write(text)
    line, col = text[:pos].count("\n") + 1, pos - text.rfind("\n", 0, pos) + 1
    return bad, image_root, ["Dataset '{name}'", bad, f"line {line}, column {col}"]


def _missing_images(shapes, tmp_path):
    json_file, image_root, data = shapes
    names = [im["file_name"] for im in data["images"]]
    for n in names[1:7]:
        os.remove(os.path.join(image_root, n))
    return json_file, image_root, [
        f"6 of 8 image files are missing under IMAGE_ROOT {image_root}: {', '.join(names[1:6])}, ...",
        "--skip-image-check", ("not", names[6])]


def _wrong_image_root(shapes, tmp_path):
    json_file, _, data = shapes
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    return json_file, str(empty), ["8 of 8 image files are missing", "IMAGE_ROOT is probably wrong"]


def _unknown_category(shapes, tmp_path):
    json_file, image_root, data = shapes
    ann = data["annotations"][3]
    ann["category_id"] = 9
    bad = str(tmp_path / "cats.json")
    _write(bad, data)
    return bad, image_root, [f"annotation id {ann['id']} has category_id 9", "not in 'categories' (ids 1, 2, 3)"]


def _duplicate_image_ids(shapes, tmp_path):
    json_file, image_root, data = shapes
    first, second = data["images"][0], data["images"][1]
    second["id"] = first["id"]
    bad = str(tmp_path / "dup.json")
    _write(bad, data)
    return bad, image_root, ["1 image id(s) are used by more than one image",
                             f"id {first['id']}: {first['file_name']}, {second['file_name']}", bad]


def _annotation_of_missing_image(shapes, tmp_path):
    json_file, image_root, data = shapes
    ann = data["annotations"][2]
    ann["image_id"] = 4242
    bad = str(tmp_path / "orphan.json")
    _write(bad, data)
    return bad, image_root, ["1 annotation(s) point to image ids that are not in 'images' (1 id(s): 4242)",
                             f"annotation id {ann['id']} has image_id 4242", bad]


def _string_image_ids(shapes, tmp_path):
    json_file, image_root, data = shapes
    for im in data["images"]:
        im["id"] = f"img{im['id']}"
    for a in data["annotations"]:
        a["image_id"] = f"img{a['image_id']}"
    bad = str(tmp_path / "strings.json")
    _write(bad, data)
    return bad, image_root, ["8 of 8 images have an 'id' that is not an integer: 'img1', 'img2'",
                             f"annotation id {data['annotations'][0]['id']} has image_id 'img", bad]


def _string_category_ids(shapes, tmp_path):
    json_file, image_root, data = shapes
    for c in data["categories"]:
        c["id"] = str(c["id"])
    for a in data["annotations"]:
        a["category_id"] = str(a["category_id"])
    bad = str(tmp_path / "catstrings.json")
    _write(bad, data)
    return bad, image_root, ["3 categories have an 'id' that is not an integer: '1', '2', '3'", bad]


def _empty_annotations(shapes, tmp_path):
    json_file, image_root, data = shapes
    data["annotations"] = []
    bad = str(tmp_path / "empty.json")
    _write(bad, data)
    return bad, image_root, ["'annotations' is an empty list", "leave out the 'annotations' key", bad]


def _write_png16(path, value=1000):
    from PIL import Image

    Image.fromarray(np.full((64, 64), value, dtype=np.uint16)).save(path)  # PIL mode I;16: 16-bit grayscale


def _sixteen_bit_png(shapes, tmp_path):
    json_file, image_root, data = shapes
    names = [im["file_name"] for im in data["images"][2:4]]
    for n in names:
        _write_png16(os.path.join(image_root, n))
    return json_file, image_root, [f"2 of 8 images have more than 8 bits per channel: {names[0]} (16-bit grayscale "
                                   f"PNG), {names[1]}", "all-white image", "convert them to 8 bits per channel"]


DEFECTS = {"invalid_json": _invalid_json, "missing_images": _missing_images,
           "wrong_image_root": _wrong_image_root, "unknown_category": _unknown_category,
           "duplicate_image_ids": _duplicate_image_ids, "annotation_of_missing_image": _annotation_of_missing_image,
           "string_image_ids": _string_image_ids, "string_category_ids": _string_category_ids,
           "empty_annotations": _empty_annotations, "sixteen_bit_png": _sixteen_bit_png}


def _assert_message(message, expected, name):
    for part in expected:
        if isinstance(part, tuple):  # ("not", text)
            assert part[1] not in message, (part[1], message)
        else:
            assert part.format(name=name) in message, (part.format(name=name), message)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defect_is_refused_by_setup_before_the_model(defect, shapes, tmp_path):
    """In process (development loop): the trainer's setup() raises ConfigError with the whole message."""
    from d2_backbones.train import argument_parser, setup

    name = f"{defect}_setup_train"
    json_file, image_root, expected = DEFECTS[defect](shapes, tmp_path)
    args = argument_parser().parse_args(
        ["--config-file", QUICK, "--register-coco", name, json_file, image_root, "DATASETS.TRAIN", f"('{name}',)",
         "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(ConfigError) as e:
        setup(args)
    _assert_message(str(e.value), expected, name)


@pytest.mark.slow
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defect_stops_train_net_before_the_model(defect, shapes, tmp_path):
    """The same defects through ``python train_net.py --register-coco`` in a fresh process: exit code, the
    exception line on stderr, and no model built."""
    name = f"{defect}_train"
    json_file, image_root, expected = DEFECTS[defect](shapes, tmp_path)
    p, log = _train_net(name, json_file, image_root, tmp_path / "out")
    _assert_failed_before_model(p, log)
    _assert_message(p.stderr.strip().splitlines()[-1] if defect == "invalid_json" else p.stderr, expected, name)


@pytest.mark.slow
def test_bad_boxes_give_one_warning_before_the_model_and_training_goes_on(shapes, tmp_path):
    json_file, image_root, data = shapes
    anns = data["annotations"]
    anns[0]["bbox"][2] = 0  # width 0
    anns[1]["bbox"][3] = -4  # negative height
    anns[2]["bbox"][:2] = [70, 10]  # entirely right of the 64-pixel image
    anns[3]["bbox"][0] = -9.5  # partly left of it
    anns[4]["bbox"][0] = -0.5  # within the tolerance: not reported
    bad = str(tmp_path / "boxes.json")
    _write(bad, data)
    p, log = _train_net("boxes_train", bad, image_root, tmp_path / "out")
    assert p.returncode == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if "lie outside their image" in line]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "WARNING" in w and "Dataset 'boxes_train'" in w
    assert f"4 of {len(anns)} boxes have width or height <= 0 or lie outside their image" in w, w
    assert f"1 with width or height 0 (annotation ids {anns[0]['id']})" in w
    assert f"1 with a negative width or height (annotation ids {anns[1]['id']})" in w
    assert f"1 entirely outside their image (annotation ids {anns[2]['id']})" in w
    assert f"outside their image (annotation ids {anns[3]['id']})" in w
    assert log.index(w) < log.index("Built backbone")


# ------------------------------------------------------------------------------------------ in process
def test_skip_image_check_flag_skips_only_the_disk_part(shapes, tmp_path):
    from d2_backbones.train import argument_parser, setup

    json_file, image_root, data = shapes
    os.remove(os.path.join(image_root, data["images"][0]["file_name"]))
    base = ["--config-file", QUICK, "--register-coco", "skip_img_train", json_file, image_root]
    opts = ["DATASETS.TRAIN", "('skip_img_train',)", "DATASETS.TEST", "()"]
    with pytest.raises(ConfigError, match="1 of 8 image files are missing"):
        setup(argument_parser().parse_args(base + opts + ["OUTPUT_DIR", str(tmp_path / "a")]))
    args = argument_parser().parse_args(base + ["--skip-image-check"] + opts + ["OUTPUT_DIR", str(tmp_path / "b")])
    assert setup(args).DATASETS.TRAIN == ("skip_img_train",)
    # the other checks still run with the flag
    data["annotations"][0]["category_id"] = 7
    _write(json_file, data)
    with pytest.raises(ConfigError, match=r"annotation id \d+ has category_id 7"):
        setup(argument_parser().parse_args(
            ["--config-file", QUICK, "--register-coco", "skip_img_train2", json_file, image_root,
             "--skip-image-check", "DATASETS.TRAIN", "('skip_img_train2',)", "DATASETS.TEST", "()",
             "OUTPUT_DIR", str(tmp_path / "c")]))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_clean_dataset_passes_without_warnings(tmp_path):
    from d2_backbones.data import check_coco_dataset

    root = make_shapes(str(tmp_path / "clean"), n_train=20, n_val=1, size=64, seed=5)
    # detectron2's setup_logger (run by other tests) stops propagation to the root logger: listen on ours
    log, rec = logging.getLogger("d2_backbones"), _Records()
    level = log.level
    log.addHandler(rec)
    log.setLevel(logging.INFO)
    try:
        classes = check_coco_dataset("clean", os.path.join(root, "annotations", "train.json"),
                                     os.path.join(root, "train"))
    finally:
        log.removeHandler(rec)
        log.setLevel(level)
    assert classes == ["circle", "square", "triangle"]
    assert not [r.getMessage() for r in rec.records if r.levelno >= logging.WARNING]
    assert any("20 images" in r.getMessage() and "(image files checked)" in r.getMessage() for r in rec.records)


def test_detectron2_treats_flagged_boxes_as_the_warning_says(shapes, tmp_path):
    """Pins what the warning tells the user: detectron2's training mapper drops boxes of width 0 and boxes
    entirely outside, mirrors negative sizes, clips boxes partly outside."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper
    from d2_backbones.data import register_coco_datasets

    json_file, image_root, data = shapes
    im = data["images"][0]
    data["annotations"] = [dict(id=i + 1, image_id=im["id"], category_id=1, iscrowd=0, area=100.0, bbox=b)
                           for i, b in enumerate([[10, 10, 20, 20], [10, 10, 0, 20], [10, 10, -5, 20],
                                                  [70, 10, 5, 5], [-9, 30, 20, 10]])]
    _write(json_file, data)
    register_coco_datasets([("mapper_probe", json_file, image_root)])
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (64,), 64, "none"
    d = next(r for r in DatasetCatalog.get("mapper_probe") if r["image_id"] == im["id"])
    boxes = DatasetMapper(cfg, is_train=True)(d)["instances"].gt_boxes.tensor.numpy()
    np.testing.assert_allclose(boxes, [[10, 10, 30, 30], [5, 10, 10, 30], [0, 30, 11, 40]])


@pytest.mark.slow
def test_data_does_not_import_the_trainer():
    code = ("import sys, d2_backbones.data; "
            "print(sorted(m for m in sys.modules if m.startswith('d2_backbones.')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = p.stdout.strip().splitlines()[-1]
    assert "'d2_backbones.data'" in loaded and "'d2_backbones.train'" not in loaded, loaded


# ------------------------------------------------------------------------------------------ reading images in training
def _truncate_to_jpeg(png_path, jpg_path, keep=0.5):
    """Re-encode ``png_path`` as a JPEG at ``jpg_path`` and cut it to ``keep`` of its bytes: PIL opens the header,
    then decoding fails with ``OSError: image file is truncated``."""
    from PIL import Image

    Image.open(png_path).convert("RGB").save(jpg_path, quality=90)
    with open(jpg_path, "rb") as f:
        blob = f.read()
    with open(jpg_path, "wb") as f:
        f.write(blob[:int(len(blob) * keep)])


def _one_image_dataset(shapes, tmp_path, kind):
    """The first image only, made ``kind`` ("truncated" JPEG or 16-bit "png16"): (json, image root, file path)."""
    json_file, image_root, data = shapes
    im = data["images"][0]
    if kind == "truncated":
        name = os.path.splitext(im["file_name"])[0] + ".jpg"
        _truncate_to_jpeg(os.path.join(image_root, im["file_name"]), os.path.join(image_root, name))
        im["file_name"] = name
    else:
        _write_png16(os.path.join(image_root, im["file_name"]))
    data["images"] = [im]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == im["id"]]
    bad = str(tmp_path / f"{kind}.json")
    _write(bad, data)
    return bad, image_root, os.path.join(image_root, im["file_name"])


@pytest.mark.parametrize("kind", ["truncated", "png16"])
def test_checked_mapper_names_the_image_it_cannot_use(kind, shapes, tmp_path):
    """detectron2's DatasetMapper raises a bare ``OSError: image file is truncated`` (no file name) and reads a
    16-bit grayscale PNG as an all-white image; the package's mapper names the file in both cases."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper
    from d2_backbones.data import CheckedDatasetMapper, ImageReadError

    json_file, image_root, path = _one_image_dataset(shapes, tmp_path, kind)
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    record = {"file_name": path, "image_id": 1, "height": 64, "width": 64, "annotations": []}
    if kind == "truncated":
        with pytest.raises(OSError, match="image file is truncated") as e:
            DatasetMapper(cfg, is_train=True)(dict(record))
        assert path not in str(e.value)
    else:  # what the check prevents: every pixel white
        assert DatasetMapper(cfg, is_train=True)(dict(record))["image"].min() == 255
    with pytest.raises(ImageReadError) as e:
        CheckedDatasetMapper(cfg, is_train=True)(dict(record))
    msg = str(e.value)
    assert f"Image {path} (image_id 1)" in msg and "Fix:" in msg, msg
    assert ("image file is truncated" if kind == "truncated" else "more than 8 bits per channel (PIL mode I;16)") \
        in msg, msg


def test_both_trainers_use_the_checked_mapper():
    from detectron2.config import LazyConfig
    from d2_backbones.data import CheckedDatasetMapper, use_checked_mapper
    from d2_backbones.train import Trainer
    from detectron2.engine import DefaultTrainer

    assert Trainer.build_train_loader.__func__ is not DefaultTrainer.build_train_loader.__func__
    assert Trainer.build_test_loader.__func__ is not DefaultTrainer.build_test_loader.__func__
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "ResNet", "mask_rcnn_R_50_FPN_1x.py"))
    assert use_checked_mapper(cfg.dataloader) == ["dataloader.train.mapper", "dataloader.test.mapper"]
    assert cfg.dataloader.train.mapper._target_ is CheckedDatasetMapper
    assert cfg.dataloader.test.mapper._target_ is CheckedDatasetMapper
    assert use_checked_mapper(cfg.dataloader) == []  # already replaced; other mappers are left alone


@pytest.mark.slow
@pytest.mark.parametrize("kind,workers", [("truncated", 0), ("truncated", 2), ("png16", 0)])
def test_train_net_stops_naming_an_image_it_cannot_read(kind, workers, shapes, tmp_path):
    """A truncated JPEG met during training (after the checks on arrival, which only look for the file) and a
    16-bit PNG with --skip-image-check stop train_net naming the file, with and without data-loader workers."""
    json_file, image_root, path = _one_image_dataset(shapes, tmp_path, kind)
    extra = ["--skip-image-check"] if kind == "png16" else []
    p, log = _train_net(f"{kind}_{workers}_train", json_file, image_root, tmp_path / "out", *extra,
                        "DATALOADER.NUM_WORKERS", str(workers), "INPUT.MIN_SIZE_TRAIN", "(64,)",
                        "INPUT.MAX_SIZE_TRAIN", "64")
    assert p.returncode != 0, log[-3000:]
    assert "ImageReadError" in p.stderr and f"Image {path} (image_id " in p.stderr, p.stderr[-3000:]
    assert ("image file is truncated" if kind == "truncated" else "more than 8 bits per channel") in p.stderr
