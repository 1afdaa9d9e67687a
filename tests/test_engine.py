"""The setup core both trainers share (``d2_backbones.engine``), the one dotted-key reader, the Python configs
read from detectron2's ``configs/common``, and the Python-config quickstart.

Each shared step is run through a yacs config (``train_net``) and a Python config (``lazy_train``) side by side:
the behaviour is the same and the messages differ only by the key names.
"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from detectron2.config import LazyConfig, get_cfg as d2_get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model

import d2_backbones
from d2_backbones import ConfigError, engine, lazy
from d2_backbones.errors import dotted_get
from d2_backbones.data import make_shapes

from conftest import CONFIG_DIR, REPO

QUICK_YAML = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes_short.yaml")
QUICK_PY = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes_short.py")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("engine") / "tiny"), n_train=4, n_val=2, size=64)


@pytest.fixture(scope="module")
def json_only(tiny_root):
    """Registered with detectron2's own function: metadata with json_file, no thing_classes until loaded."""
    for split in ("train", "val"):
        name = f"engine_json_{split}"
        register_coco_instances(name, {}, os.path.join(tiny_root, "annotations", f"{split}.json"),
                                os.path.join(tiny_root, split))
        assert MetadataCatalog.get(name).get("thing_classes") is None
    return "engine_json_train", "engine_json_val"


def _yacs(train=("engine_json_train",), test=("engine_json_val",), **over):
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(QUICK_YAML)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


def _lazy(train="engine_json_train", test="engine_json_val", *overrides):
    cfg = LazyConfig.load(QUICK_PY)
    return LazyConfig.apply_overrides(cfg, [f"dataloader.train.dataset.names={train}",
                                            f"dataloader.test.dataset.names={test}", *overrides])


def _message(fn, *args, **kw):
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- dotted_get
def test_dotted_get_reads_cfgnode_dictconfig_dicts_and_lists():
    yacs = d2_get_cfg()
    assert dotted_get(yacs, "MODEL.ROI_HEADS.NUM_CLASSES") == 80
    assert dotted_get(yacs, "MODEL.NO_SUCH.KEY") is None and dotted_get(yacs, "MODEL.DEVICE.x", "d") == "d"
    lazy_cfg = OmegaConf.create({"train": {"amp": {"enabled": True}, "width": "${.depth}", "depth": 5},
                                 "augs": [{"max_size": 128}]})
    assert dotted_get(lazy_cfg, "train.amp.enabled") is True
    assert dotted_get(lazy_cfg, "train.width") == 5  # interpolations resolve
    assert dotted_get(lazy_cfg, "augs.0.max_size") == 128 and dotted_get(lazy_cfg, "augs.1.max_size") is None
    assert dotted_get({"a": {"b": None}}, "a.b", "default") is None  # a present None is a value
    assert dotted_get({"a": 1}, "a.b", "default") == "default"


def test_the_trainers_read_keys_through_dotted_get_only():
    """No private dotted getter is left in the modules that now share errors.dotted_get."""
    for name in ("lazy.py", "lazy_train.py", "engine.py", "preflight.py", "train.py"):
        text = open(os.path.join(REPO, "d2_backbones", name), encoding="utf-8").read()
        assert "def _get(" not in text and "for part in dotted.split" not in text, name


# ---------------------------------------------------------------------------------------------- class count
def test_both_trainers_take_the_class_count_from_the_json(json_only):
    """A dataset registered with only its json_file (no thing_classes): both trainers read the categories from
    the JSON, refuse a wrong count with the same message, and set it with --num-classes auto."""
    yacs = _yacs()
    yacs.MODEL.ROI_HEADS.NUM_CLASSES = 80
    lazy_cfg = _lazy(*json_only, "model.roi_heads.num_classes=80")
    expected = "Dataset 'engine_json_train' has 3 classes (thing_classes=['circle', 'square', 'triangle']) but {k}=80."
    msg_yacs = _message(engine.check_num_classes, yacs)
    msg_lazy = _message(engine.check_num_classes, lazy_cfg)
    assert msg_yacs.startswith(expected.format(k="MODEL.ROI_HEADS.NUM_CLASSES")), msg_yacs
    assert msg_lazy.startswith(expected.format(k="model.roi_heads.num_classes")), msg_lazy
    assert "set MODEL.ROI_HEADS.NUM_CLASSES 3 (detectron2 counts foreground" in msg_yacs
    assert "add model.roi_heads.num_classes=3 to the overrides (detectron2 counts foreground" in msg_lazy
    assert msg_yacs.endswith("or pass --num-classes auto.") and msg_lazy.endswith("or pass --num-classes auto.")
    engine.check_num_classes(yacs, "auto")
    engine.check_num_classes(lazy_cfg, "auto")
    assert yacs.MODEL.ROI_HEADS.NUM_CLASSES == 3 and lazy_cfg.model.roi_heads.num_classes == 3
    assert lazy_cfg.model.roi_heads.box_predictor.num_classes == 3  # the interpolation follows


def test_num_classes_flag_is_checked_alike(json_only):
    for cfg in (_yacs(), _lazy(*json_only)):
        msg = _message(engine.check_num_classes, cfg, "three")
        assert msg == ("--num-classes='three' is not supported. Valid values: 'auto' or an integer. Fix: pass "
                       "--num-classes auto (the datasets' count) or the number of foreground classes.")


# ---------------------------------------------------------------------------------------------- datasets
def test_unregistered_dataset_same_message_in_both_trainers():
    yacs = _yacs(train=("engine_nope",))
    lazy_cfg = _lazy("engine_nope")
    msg_yacs = _message(engine.check_num_classes, yacs)
    msg_lazy = _message(engine.check_num_classes, lazy_cfg)
    assert msg_yacs.startswith("Dataset 'engine_nope' (in DATASETS.TRAIN) is not registered in this process")
    assert msg_lazy == msg_yacs.replace("DATASETS.TRAIN", "dataloader.train.dataset.names")
    assert "--register-coco engine_nope JSON IMAGE_ROOT" in msg_lazy


# ---------------------------------------------------------------------------------------------- device, precision
def test_device_message_same_in_both_trainers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg_yacs = _message(engine.check_device, _yacs(**{"MODEL.DEVICE": "cuda"}))
    msg_lazy = _message(engine.check_device, _lazy("shapes_train", "shapes_val", "train.device=cuda"))
    assert msg_yacs.startswith("MODEL.DEVICE='cuda' but CUDA is not available on this machine")
    assert "Fix: add MODEL.DEVICE cpu to the overrides" in msg_yacs
    assert msg_lazy == msg_yacs.replace("MODEL.DEVICE cpu", "train.device=cpu").replace("MODEL.DEVICE",
                                                                                         "train.device")


def test_precision_of_each_trainer_checked_at_setup():
    """train_net: float16 AMP needs CUDA; lazy_train: bfloat16 on CPU, float16 on CUDA, a bad name refused with
    the valid values and the fix (before any model is built)."""
    assert engine.check_precision(_yacs()) is None and engine.check_precision(_lazy()) is None
    msg = _message(engine.check_precision, _yacs(**{"SOLVER.AMP.ENABLED": True}))
    assert msg.startswith("SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda") and "train.amp.enabled=True" in msg
    assert engine.check_precision(_lazy("a", "b", "train.amp.enabled=True")) is torch.bfloat16
    assert engine.check_precision(_lazy("a", "b", "train.amp.enabled=True", "train.device=cuda")) is torch.float16
    msg = _message(engine.check_precision, _lazy("a", "b", "train.amp.enabled=True", "train.amp.precision=fp8"))
    assert msg == ("train.amp.precision='fp8' is not supported. Valid values: 'float16', 'bfloat16'. Fix: set "
                   "train.amp.precision to one of them, or to None (float16 on CUDA, bfloat16 on CPU).")


def test_lazy_train_refuses_a_bad_precision_before_building(tmp_path, json_only):
    from d2_backbones.lazy_train import setup

    train, test = json_only  # not the shapes names: those belong to other modules' dataset roots
    args = Namespace(config_file=QUICK_PY, opts=[f"train.output_dir={tmp_path / 'o'}", "train.amp.enabled=True",
                                                 "train.amp.precision=half", f"dataloader.train.dataset.names={train}",
                                                 f"dataloader.test.dataset.names={test}"],
                     resume=False, eval_only=False, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
                     register_coco=[], num_classes=None, skip_image_check=False)
    with pytest.raises(ConfigError, match=r"train.amp.precision='half' is not supported"):
        setup(args)


# ---------------------------------------------------------------------------------------------- in the run
class _Checkpointer:
    incomplete_load = None

    def last_complete(self):
        return None


@pytest.mark.parametrize("raised", [FloatingPointError("Loss became infinite or NaN at iteration=3!"),
                                    RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_training_errors_same_wording_in_both_trainers(raised):
    messages = []
    for cfg in (_yacs(**{"MODEL.WEIGHTS": ""}), _lazy("a", "b", "train.init_checkpoint=")):
        with pytest.raises((FloatingPointError, MemoryError)) as e:
            with engine.training_errors(cfg, _Checkpointer()):
                raise raised
        messages.append(str(e.value))
    yacs_msg, lazy_msg = messages
    if isinstance(raised, FloatingPointError):
        for msg, weights, lr in ((yacs_msg, "MODEL.WEIGHTS", "SOLVER.BASE_LR (now 0.02)"),
                                 (lazy_msg, "train.init_checkpoint", "optimizer.lr (now 0.02)")):
            assert msg.startswith(f"Training diverged: {weights} is empty: the whole model trained from random"), msg
            assert "The last complete checkpoint is none (no checkpoint was written before the divergence)." in msg
            assert f"Fix: lower {lr} or lengthen" in msg, msg
    else:
        assert yacs_msg.startswith("Out of memory while training") and lazy_msg.startswith("Out of memory")
        assert "INPUT.MIN_SIZE_TRAIN=(128,)" in yacs_msg
        assert "dataloader.train.mapper.augmentations.0.short_edge_length=[128]" in lazy_msg
        assert "dataloader.train.total_batch_size=8" in lazy_msg and "SOLVER.IMS_PER_BATCH=8" in yacs_msg


def _metrics(out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        for it in range(0, 40, 10):
            f.write(json.dumps({"iteration": it, "total_loss": 2.0 - it / 40}) + "\n")
        f.write(json.dumps({"iteration": 39, "bbox/AP": 12.5}) + "\n")


def test_both_trainers_write_the_same_pictures(tiny_root, tmp_path):
    """engine.write_pictures, which train_net and lazy_train call after training: curves.png and predictions.png
    (the test images at the configs' evaluation size and format) for a yacs and a Python config alike."""
    from d2_backbones.data import register_coco_datasets

    register_coco_datasets([("engine_pic_val", os.path.join(tiny_root, "annotations", "val.json"),
                             os.path.join(tiny_root, "val"))])
    yacs = _yacs(train=(), test=("engine_pic_val",), **{"MODEL.DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path / "y")})
    lazy_cfg = _lazy("engine_pic_val", "engine_pic_val", f"train.output_dir={tmp_path / 'l'}")
    assert engine.evaluation_input(yacs) == engine.evaluation_input(lazy_cfg) == (128, 128, "RGB")
    torch.manual_seed(0)
    sizes = {}
    for name, cfg, model in (("y", yacs, build_model(yacs)), ("l", lazy_cfg, lazy.instantiate_model(lazy_cfg.model))):
        _metrics(str(tmp_path / name))
        written = engine.write_pictures(cfg, model)
        assert [os.path.basename(p) for p in written] == ["curves.png", "predictions.png"], written
        for p in written:
            with Image.open(p) as im:
                sizes[(name, os.path.basename(p))] = im.size
                if p.endswith("predictions.png"):
                    assert "score >= 0.5" in im.text.get("Title", ""), im.text
    assert sizes[("y", "predictions.png")] == sizes[("l", "predictions.png")]  # same 2 tiles of 128 px
    assert sizes[("y", "curves.png")] == sizes[("l", "curves.png")]


# ---------------------------------------------------------------------------------------------- configs/common
def test_python_configs_start_from_detectron2s_common_files(tmp_path, monkeypatch):
    """lazy.py reads detectron2's configs/common by path: a value changed there shows in every piece built
    from it; a missing file names its path and the fix."""
    copy_dir = tmp_path / "common"
    shutil.copytree(lazy._common_dir(), copy_dir)
    coco = copy_dir / "data" / "coco.py"
    coco.write_text(coco.read_text().replace('sample_style="choice"', 'sample_style="range"'))
    optim = copy_dir / "optim.py"
    optim.write_text(optim.read_text().replace("weight_decay_norm=0.0\n", "weight_decay_norm=0.0, bias_lr_factor=2.0\n"))
    monkeypatch.setattr(lazy, "_common_dir", lambda: str(copy_dir))
    assert lazy.coco_loaders().train.mapper.augmentations[0].sample_style == "range"
    assert lazy.sgd().params.bias_lr_factor == 2.0
    os.remove(copy_dir / "models" / "retinanet.py")
    msg = _message(lazy.retinanet, lazy.fpn(lazy.detectron2_common("models/mask_rcnn_fpn.py", "model").backbone
                                            .bottom_up, ["res3", "res4", "res5"]))
    path = os.path.join(str(copy_dir), "models", "retinanet.py")
    assert msg.startswith(f"detectron2's config file {path} does not exist"), msg
    assert "Fix: reinstall detectron2 from its source" in msg


def test_lazy_pieces_keep_only_what_differs_from_detectron2():
    """The model pieces are detectron2's files with the backbone, head widths and the yaml values set."""
    backbone = {"out_channels": 7}  # stands for L(build_fpn)(...)
    model = lazy.retinanet(backbone, num_classes=3)
    assert model.backbone == backbone and model.num_classes == 3
    assert model.anchor_generator.sizes == lazy.RETINANET_ANCHOR_SIZES and model.smooth_l1_beta == 0.0
    assert list(model.head.conv_dims) == [7] * 4 and [s.channels for s in model.head.input_shape] == [7] * 5
    assert lazy.fcos(backbone)._target_ is lazy.FCOS and "input_format" not in lazy.fcos(backbone)
    cascade = lazy.cascade_mask_rcnn_fpn(backbone)
    assert [h.input_shape.channels for h in cascade.roi_heads.box_heads] == [7] * 3
    assert cascade.proposal_generator.head.in_channels == 7 and cascade.roi_heads.mask_head.input_shape.channels == 7
    train = lazy.train_settings(max_iter=10, seed=3)
    assert set(lazy.detectron2_common("train.py", "train")) <= set(train)  # detectron2's keys, plus ours
    assert train.amp.precision is None and train.seed == 3


# ---------------------------------------------------------------------------------------------- quickstart
def test_python_quickstart_is_the_yaml_quickstart():
    """Same model (parameter names and count), data, size, batch, workers, schedule and evaluations."""
    yacs = d2_backbones.get_cfg()
    yacs.merge_from_file(QUICK_YAML)
    cfg = LazyConfig.load(QUICK_PY)
    torch.manual_seed(0)
    y, p = build_model(yacs), lazy.instantiate_model(cfg.model)
    assert {k: v.shape for k, v in y.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
    d = cfg.dataloader
    assert (d.train.dataset.names, d.test.dataset.names) == (yacs.DATASETS.TRAIN[0], yacs.DATASETS.TEST[0])
    assert d.train.mapper.augmentations[0].short_edge_length == list(yacs.INPUT.MIN_SIZE_TRAIN)
    assert d.test.mapper.augmentations[0].short_edge_length == yacs.INPUT.MIN_SIZE_TEST
    assert d.train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert d.train.num_workers == d.test.num_workers == yacs.DATALOADER.NUM_WORKERS  # no 4-worker warning
    assert cfg.train.max_iter == yacs.SOLVER.MAX_ITER and cfg.train.eval_period == yacs.TEST.EVAL_PERIOD
    assert cfg.lr_multiplier.scheduler.milestones == list(yacs.SOLVER.STEPS) + [yacs.SOLVER.MAX_ITER]
    assert cfg.lr_multiplier.warmup_length * cfg.train.max_iter == yacs.SOLVER.WARMUP_ITERS
    assert cfg.optimizer.lr == yacs.SOLVER.BASE_LR and cfg.train.seed == yacs.SEED
    assert cfg.train.device == "cpu"


@pytest.mark.slow
def test_python_quickstart_trains_and_writes_the_pictures(tmp_path):
    """python -m d2_backbones.lazy_train on the quickstart config, shortened to 100 iterations (the schedule
    scales with train.max_iter): finite losses, checkpoints, metrics with AP, curves.png and predictions.png."""
    root = tmp_path / "datasets"
    make_shapes(str(root / "shapes"))
    out = tmp_path / "out"
    env = dict(os.environ, D2B_DATASETS=str(root), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "d2_backbones.lazy_train", "--config-file", QUICK_PY,
                        f"train.output_dir={out}", "train.max_iter=100", "train.eval_period=50"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=1200)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert "worker processes in total" not in p.stdout + p.stderr  # no worker-count warning on 2 cores
    rows = [json.loads(line) for line in open(out / "metrics.json") if line.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses), losses
    aps = [r["bbox/AP"] for r in rows if "bbox/AP" in r]
    assert len(aps) == 2 and all(math.isfinite(v) for v in aps), aps
    assert (out / "model_final.pth").is_file()
    assert sorted(os.path.basename(f) for f in glob.glob(str(out / "model_*.pth"))) == [
        "model_0000099.pth", "model_final.pth"]
    for name in ("curves.png", "predictions.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100, (name, im.size)
    log = open(out / "log.txt").read()
    assert f"Wrote {out / 'curves.png'}" in log and f"Wrote {out / 'predictions.png'}" in log
