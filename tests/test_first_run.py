"""First-run messages (``d2_backbones.preflight``): a newcomer's mistakes refused before the model is built.

In process through both trainers' ``setup()`` (fast), and through ``train_net.py`` in a fresh process where the
behaviour is the process's (slow): no CUDA, ``--num-gpus`` above the machine, ``key=value`` overrides, a zero
checkpoint period, an input size that cannot fit in memory, the effective batch after auto-scaling, a divergence
from scratch.
"""
import logging
import math
import os
import re
import resource
import subprocess
import sys
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from detectron2.data import MetadataCatalog

from d2_backbones import ConfigError
from d2_backbones.preflight import (check_num_processes, check_values, divergence_cause, is_out_of_memory,
                                    out_of_memory_error)
from d2_backbones.data import make_shapes
from d2_backbones.train import argument_parser, check_opts, setup

from conftest import CONFIG_DIR, REPO

TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
SHIPPED = os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_18_FPN_1x.yaml")  # MODEL.DEVICE: detectron2's "cuda"
LAZY = os.path.join(CONFIG_DIR, "GhostNet", "fcos_ghostnet_100_FPN_1x.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"))  # the quickstart's default size
    return str(root)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("first_run") / "tiny"), n_train=4, n_val=2, size=64)


def _tiny_specs(root):
    return [(f"first_run_{s}", os.path.join(root, "annotations", f"{s}.json"), os.path.join(root, s))
            for s in ("train", "val")]


@pytest.fixture(scope="module")
def tiny(tiny_root):
    """Registered in this process under names of this module (the shapes_* names belong to other modules' roots)."""
    from d2_backbones.train import register_coco_datasets

    register_coco_datasets(_tiny_specs(tiny_root))
    return ["DATASETS.TRAIN", "('first_run_train',)", "DATASETS.TEST", "('first_run_val',)", "MODEL.DEVICE", "cpu"]


def _args(*argv):
    return argument_parser().parse_args([str(a) for a in argv])


def _lazy_args(*opts, eval_only=False):
    return Namespace(config_file=LAZY, opts=list(opts), resume=False, eval_only=eval_only, num_gpus=1, num_machines=1,
                     machine_rank=0, dist_url="auto", register_coco=[], num_classes=None, skip_image_check=False)


def _lazy_setup(*opts, **kw):
    from d2_backbones.lazy_train import setup as lazy_setup

    return lazy_setup(_lazy_args(*opts, **kw))


_LAZY_TINY = ["train.device=cpu", "dataloader.train.dataset.names=first_run_train",
              "dataloader.test.dataset.names=first_run_val", "model.num_classes=3"]


# ============================================================================================== 1. no CUDA
def test_no_cuda_names_the_cpu_setting_in_both_trainers(tmp_path, monkeypatch):
    """A shipped config keeps detectron2's MODEL.DEVICE "cuda": refused at setup, naming the CPU override."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"MODEL.DEVICE='cuda' but CUDA is not available on this machine .*Fix: "
                                          r"add MODEL.DEVICE cpu to the overrides"):
        setup(_args("--config-file", SHIPPED, "OUTPUT_DIR", tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"train.device='cuda' but CUDA is not available.*add train.device=cpu"):
        _lazy_setup(f"train.output_dir={tmp_path / 'b'}")
    assert not (tmp_path / "a").exists()  # refused before the logger or anything else writes


# ============================================================================================== 2. --num-gpus
def test_num_gpus_against_the_machine(monkeypatch):
    monkeypatch.delenv("D2B_ALLOW_OVERSUBSCRIBE", raising=False)
    with pytest.raises(ConfigError, match=r"--num-gpus 8 but CUDA is not available, so 8 CPU training processes would "
                                          r"share this machine's 2 CPU core\(s\).*Fix: --num-gpus 2 or fewer"):
        check_num_processes(8, cuda_devices=0, cpu_count=2)
    monkeypatch.setenv("D2B_ALLOW_OVERSUBSCRIBE", "1")  # the opt-out: started anyway, and said so
    assert check_num_processes(8, cuda_devices=0, cpu_count=2).startswith("--num-gpus 8: CUDA is not available; "
                                                                         "starting 8 CPU processes (gloo) on 2 CPU")
    monkeypatch.delenv("D2B_ALLOW_OVERSUBSCRIBE")
    line = check_num_processes(2, cuda_devices=0, cpu_count=2)
    assert line.startswith("--num-gpus 2: CUDA is not available; starting 2 CPU processes (gloo) on 2 CPU cores"), line
    assert check_num_processes(1, cuda_devices=0, cpu_count=2) is None
    with pytest.raises(ConfigError, match=r"--num-gpus 4 but this machine has 2 CUDA device\(s\).*Fix: --num-gpus 2 "
                                          r"or fewer"):
        check_num_processes(4, cuda_devices=2, cpu_count=64)
    assert check_num_processes(2, cuda_devices=2, cpu_count=1) is None  # one process per GPU: no CPU limit


# ============================================================================================== 3. dataset files
def test_registered_dataset_without_files_names_the_path_and_register_coco(tmp_path, monkeypatch):
    """detectron2 registers coco_2017_* by name with paths under $DETECTRON2_DATASETS; without the files the run
    stops at setup (not with a FileNotFoundError after the model is built)."""
    monkeypatch.chdir(tmp_path)  # no datasets/ here
    train, val = (MetadataCatalog.get(n) for n in ("coco_2017_train", "coco_2017_val"))
    with pytest.raises(ConfigError) as e:
        setup(_args("--config-file", SHIPPED, "OUTPUT_DIR", tmp_path / "a", "MODEL.DEVICE", "cpu"))
    msg = str(e.value)
    assert msg.startswith(f"Dataset 'coco_2017_train' (DATASETS.TRAIN) is registered with json_file="
                          f"{train.json_file!r}, image_root={train.image_root!r}, which does not exist"), msg
    assert "$DETECTRON2_DATASETS" in msg and "--register-coco my_coco_2017_train JSON IMAGE_ROOT" in msg, msg
    # --eval-only reads the test set only
    with pytest.raises(ConfigError, match=rf"Dataset 'coco_2017_val' \(DATASETS.TEST\) is registered with json_file="
                                          rf"{re.escape(repr(val.json_file))}"):
        setup(_args("--config-file", SHIPPED, "--eval-only", "OUTPUT_DIR", tmp_path / "b", "MODEL.DEVICE", "cpu"))
    # lazy_train: the same check and message with its keys, the train datasets first as in train_net
    with pytest.raises(ConfigError, match=r"Dataset 'coco_2017_train' \(dataloader.train.dataset.names\) is "
                                          r"registered with json_file=.*--register-coco my_coco_2017_train JSON "
                                          r"IMAGE_ROOT"):
        _lazy_setup(f"train.output_dir={tmp_path / 'c'}", "train.device=cpu")
    with pytest.raises(ConfigError, match=r"Dataset 'coco_2017_val' \(dataloader.test.dataset.names\) is registered "
                                          r"with json_file=.*--register-coco my_coco_2017_val JSON IMAGE_ROOT"):
        _lazy_setup(f"train.output_dir={tmp_path / 'd'}", "train.device=cpu", eval_only=True)


# ============================================================================================== 4. key=value
@pytest.mark.parametrize("override,spelled", [("model.backbone.depth=50", "MODEL.RESNETS.DEPTH 50"),
                                              ("train.max_iter=100", "SOLVER.MAX_ITER 100"),
                                              ("SOLVER.BASE_LR=0.01", "SOLVER.BASE_LR 0.01")])
def test_key_value_overrides_name_the_yacs_form_and_lazy_train(override, spelled):
    with pytest.raises(SystemExit) as e:
        check_opts([override])
    msg = str(e.value)
    assert f"Override {override!r} is key=value" in msg and f"KEY VALUE pairs after the flags: {spelled}." in msg, msg
    assert f"python -m d2_backbones.lazy_train --config-file CONFIG.py {override}" in msg, msg
    with pytest.raises(SystemExit, match=re.escape(spelled)):  # also among valid pairs
        check_opts(["OUTPUT_DIR", "out", override, "x"])
    check_opts(["OUTPUT_DIR", "out=1"])  # a value with '=' is a value


# ============================================================================================== 5. solver values
@pytest.mark.parametrize("key,value,valid", [
    ("SOLVER.CHECKPOINT_PERIOD", 0, "an integer >= 1"), ("TEST.EVAL_PERIOD", -1, "an integer >= 0"),
    ("SOLVER.MAX_ITER", 0, "an integer >= 1"), ("SOLVER.IMS_PER_BATCH", 0, "an integer >= 1"),
    ("SOLVER.BASE_LR", 0.0, "a finite number > 0"), ("SOLVER.BASE_LR", -0.02, "a finite number > 0"),
    ("SOLVER.WARMUP_ITERS", -1, "an integer >= 0")])
def test_absurd_solver_values_are_refused_at_setup(tiny, tmp_path, key, value, valid):
    with pytest.raises(ConfigError) as e:
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path, *tiny, key, value))
    assert f"\n  {key}={value!r} is invalid; valid: {valid}. Fix: " in str(e.value), str(e.value)


def test_solver_values_one_line_per_key_steps_and_eval_only(tiny, tmp_path, caplog):
    with pytest.raises(ConfigError) as e:
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path / "a", *tiny, "SOLVER.CHECKPOINT_PERIOD", 0,
                    "SOLVER.MAX_ITER", -5))
    lines = str(e.value).splitlines()
    assert [ln.split("=")[0].strip() for ln in lines[1:]] == ["SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD"], lines
    with pytest.raises(ConfigError, match=r"SOLVER.STEPS=\(300, 200\) is invalid; valid: increasing integers > 0"):
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path / "b", *tiny, "SOLVER.STEPS", "(300, 200)"))
    with pytest.raises(ConfigError, match=r"SOLVER.STEPS=\(450, 600\) contains SOLVER.MAX_ITER=600"):
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path / "c", *tiny, "SOLVER.STEPS", "(450, 600)"))
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH=12 is not divisible by SOLVER.REFERENCE_WORLD_SIZE=8"):
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path / "d", *tiny, "SOLVER.IMS_PER_BATCH", 12,
                    "SOLVER.REFERENCE_WORLD_SIZE", 8))
    log = logging.getLogger("d2_backbones")  # setup_logger stops its propagation: listen to it directly
    log.addHandler(caplog.handler)
    try:
        setup(_args("--config-file", QUICK, "OUTPUT_DIR", tmp_path / "e", *tiny, "SOLVER.MAX_ITER", 5,
                    "INPUT.MAX_SIZE_TRAIN", 5000))
    finally:
        log.removeHandler(caplog.handler)
    text = caplog.text
    assert "beyond SOLVER.MAX_ITER" not in text  # steps past MAX_ITER: detectron2 warns about those itself
    assert "INPUT.MAX_SIZE_TRAIN=5000: images with a side above 4000 px" in text, text
    args = _args("--config-file", QUICK, "--eval-only", "OUTPUT_DIR", tmp_path / "f", *tiny,
                 "SOLVER.CHECKPOINT_PERIOD", 0)
    assert setup(args).SOLVER.CHECKPOINT_PERIOD == 0  # evaluation does not train: no solver check


@pytest.mark.parametrize("override,valid", [("train.checkpointer.period=0", "an integer >= 1"),
                                            ("train.eval_period=-1", "an integer >= 0"),
                                            ("train.max_iter=0", "an integer >= 1"),
                                            ("optimizer.lr=0", "a finite number > 0"),
                                            ("dataloader.train.total_batch_size=0", "an integer >= 1")])
def test_lazy_train_refuses_the_same_values(tiny, tmp_path, override, valid):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        _lazy_setup(f"train.output_dir={tmp_path}", *_LAZY_TINY, override)
    assert f"\n  {key}={int(value)!r} is invalid; valid: {valid}. Fix: " in str(e.value), str(e.value)


def test_check_values_refuses_non_finite_and_non_integer():
    with pytest.raises(ConfigError) as e:
        check_values([("optimizer.lr", math.inf, "lr", "x"), ("train.max_iter", 2.5, "int>=1", "y"),
                      ("train.eval_period", None, "int>=0", "z")])
    assert str(e.value).splitlines()[1:] == ["  optimizer.lr=inf is invalid; valid: a finite number > 0. Fix: x.",
                                             "  train.max_iter=2.5 is invalid; valid: an integer >= 1. Fix: y."]


# ============================================================================================== 6. out of memory
def test_out_of_memory_is_recognised_and_names_the_keys():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 120000000000 bytes."))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    err = out_of_memory_error(MemoryError(), {"INPUT.MIN_SIZE_TRAIN": (100000,), "SOLVER.IMS_PER_BATCH": 8}, "lower")
    assert isinstance(err, MemoryError)
    assert str(err) == ("Out of memory while training (a training step, or an evaluation run by the training loop) "
                        "(MemoryError). The memory of a step grows with the input size and the batch: "
                        "INPUT.MIN_SIZE_TRAIN=(100000,), SOLVER.IMS_PER_BATCH=8. Fix: lower.")


# ============================================================================================== 8. divergence
def test_divergence_names_weights_that_did_not_load_first():
    partial = SimpleNamespace(incomplete_load="backbone.bottom_up: 0/53 parameters loaded")
    text = divergence_cause(partial, "MODEL.WEIGHTS", "r50.pkl")
    assert text.startswith("The weights did not load completely (backbone.bottom_up: 0/53 parameters loaded; the "
                           "weights check was set to warn): the parts of the model that MODEL.WEIGHTS='r50.pkl' did "
                           "not fill started from random values"), text
    assert divergence_cause(SimpleNamespace(), "train.init_checkpoint", "").startswith(
        "train.init_checkpoint is empty: the whole model trained from random initialisation")
    assert divergence_cause(SimpleNamespace(incomplete_load=None), "MODEL.WEIGHTS", "r50.pkl") == ""


# ============================================================================================== subprocesses
def _limit_memory():
    """At most 12 GiB of address space: an allocation for a 100000-px image fails at once instead of paging."""
    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))


def _train_net(args, data_root, env=None, timeout=600):
    e = dict(os.environ, D2B_DATASETS=data_root, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run([sys.executable, TRAIN_NET] + [str(a) for a in args], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=REPO, preexec_fn=_limit_memory)
    p.log = p.stdout + p.stderr
    p.last = next((ln for ln in reversed(p.stderr.strip().splitlines()) if ln.strip()), "")
    return p


@pytest.mark.slow
def test_train_net_refusals_before_anything_is_built(data_root, tmp_path):
    """No CUDA with a shipped config, more CPU processes than cores, key=value, CHECKPOINT_PERIOD 0."""
    out = tmp_path / "o"
    p = _train_net(["--config-file", SHIPPED, "OUTPUT_DIR", out], data_root, env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode != 0 and "ConfigError: MODEL.DEVICE='cuda' but CUDA is not available" in p.last, p.log[-3000:]
    assert "MODEL.DEVICE cpu" in p.last and "NVIDIA driver" not in p.log
    n = (os.cpu_count() or 1) + 1
    p = _train_net(["--config-file", QUICK, "--num-gpus", n, "OUTPUT_DIR", out], data_root,
                   env={"CUDA_VISIBLE_DEVICES": "", "D2B_ALLOW_OVERSUBSCRIBE": ""})
    assert p.returncode != 0 and f"--num-gpus {n} but CUDA is not available, so {n} CPU training processes" in p.last
    assert "World size" not in p.log and not out.exists(), p.log[-3000:]  # nothing spawned
    p = _train_net(["--config-file", QUICK, "model.backbone.depth=50"], data_root)
    assert p.returncode != 0 and "KEY VALUE pairs after the flags: MODEL.RESNETS.DEPTH 50." in p.stderr, p.log[-3000:]
    assert "python -m d2_backbones.lazy_train" in p.stderr
    p = _train_net(["--config-file", QUICK, "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", 0], data_root)
    assert p.returncode != 0 and "SOLVER.CHECKPOINT_PERIOD=0 is invalid; valid: an integer >= 1" in p.stderr, p.log
    assert "Built backbone" not in p.log and "ZeroDivisionError" not in p.log


@pytest.mark.slow
def test_train_net_out_of_memory_names_the_input_size_keys(data_root, tmp_path):
    p = _train_net(["--config-file", QUICK, "OUTPUT_DIR", tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2,
                    "INPUT.MIN_SIZE_TRAIN", "(100000,)", "INPUT.MAX_SIZE_TRAIN", 100000, "TEST.EVAL_PERIOD", 0,
                    "DATASETS.TEST", "()"], data_root)
    assert p.returncode != 0
    assert p.last.startswith("MemoryError: Out of memory while training (a training step"), p.log[-3000:]
    assert "INPUT.MIN_SIZE_TRAIN=(100000,), INPUT.MAX_SIZE_TRAIN=100000, SOLVER.IMS_PER_BATCH=2, INPUT.MIN_SIZE_TEST=" \
           in p.last and "Fix: lower INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN" in p.last, p.last
    assert "INPUT.MAX_SIZE_TRAIN=100000: images with a side above 4000 px" in p.log  # warned at start


@pytest.mark.slow
def test_train_net_logs_the_auto_scaled_batch_once(data_root, tmp_path):
    """A config written for 8 processes run in one: the effective line has detectron2's scaled values."""
    p = _train_net(["--config-file", QUICK, "OUTPUT_DIR", tmp_path, "SOLVER.REFERENCE_WORLD_SIZE", 8,
                    "SOLVER.IMS_PER_BATCH", 16, "SOLVER.BASE_LR", 0.02, "SOLVER.MAX_ITER", 1, "SOLVER.STEPS", "()",
                    "SOLVER.WARMUP_ITERS", 0, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64,
                    "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()"], data_root)
    assert p.returncode == 0, p.log[-3000:]
    assert "Auto-scaling the config to batch_size=2, learning_rate=0.0025, max_iter=8" in p.log, p.log[-3000:]
    lines = [ln for ln in p.log.splitlines() if "Effective batch:" in ln]
    assert len(lines) == 1, lines
    assert "SOLVER.IMS_PER_BATCH=2 images per iteration over 1 process(es) (2 each), SOLVER.BASE_LR=0.0025, " \
           "MAX_ITER=8, device=cpu (auto-scaled from the config's IMS_PER_BATCH=16, BASE_LR=0.02, MAX_ITER=1 " \
           "written for SOLVER.REFERENCE_WORLD_SIZE=8" in lines[0], lines


@pytest.mark.slow
def test_train_net_divergence_says_first_what_did_not_load(data_root, tmp_path):
    """From scratch, and with weights that filled one tensor of the backbone (MODEL.WEIGHTS_CHECK warn)."""
    diverge = ["SOLVER.MAX_ITER", 6, "SOLVER.BASE_LR", 1e6, "SOLVER.WARMUP_ITERS", 0, "SOLVER.IMS_PER_BATCH", 2,
               "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()"]
    p = _train_net(["--config-file", QUICK, "OUTPUT_DIR", tmp_path / "a", *diverge], data_root)
    assert p.returncode != 0
    assert p.last.startswith("FloatingPointError: Training diverged: MODEL.WEIGHTS is empty: the whole model trained "
                             "from random initialisation"), p.log[-3000:]
    assert "Fix: lower SOLVER.BASE_LR (now 1000000.0)" in p.last
    stem = str(tmp_path / "stem.pth")
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.randn(64, 3, 7, 7)}}, stem)
    p = _train_net(["--config-file", QUICK, "OUTPUT_DIR", tmp_path / "b", "MODEL.WEIGHTS", stem,
                    "MODEL.WEIGHTS_CHECK", "warn", *diverge], data_root)
    assert p.returncode != 0
    assert p.last.startswith("FloatingPointError: Training diverged: The weights did not load completely ("), p.last
    assert f"the weights check was set to warn): the parts of the model that MODEL.WEIGHTS={stem!r} did not fill " \
           f"started from random values" in p.last and "Fix: lower SOLVER.BASE_LR" in p.last, p.last


@pytest.mark.slow
def test_lazy_train_out_of_memory_and_divergence_from_scratch(tiny_root, tmp_path):
    """The same two messages through lazy_train's do_train, with its keys (RetinaNet: FCOS's box loss asserts on
    NaN boxes before detectron2's non-finite loss check)."""
    config = os.path.join(CONFIG_DIR, "GhostNet", "retinanet_ghostnet_100_FPN_1x.py")
    register = [a for spec in _tiny_specs(tiny_root) for a in ("--register-coco", *spec)]
    common = ["train.device=cpu", "train.max_iter=4", "train.eval_period=0", "train.checkpointer.period=100",
              "train.init_checkpoint=", "model.num_classes=3", "dataloader.train.dataset.names=first_run_train",
              "dataloader.test.dataset.names=first_run_val", "dataloader.train.total_batch_size=2",
              "dataloader.train.num_workers=0"]
    size = "dataloader.train.mapper.augmentations.0."
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")

    def run(*opts):
        p = subprocess.run([sys.executable, "-m", "d2_backbones.lazy_train", "--config-file", config, *register,
                            *common, f"train.output_dir={tmp_path / str(len(opts))}", *opts], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path), timeout=600, preexec_fn=_limit_memory)
        assert p.returncode != 0
        return p.stderr[p.stderr.rindex("\n", 0, p.stderr.rindex("Error: ")) + 1:]  # the final error, all its lines

    last = run(f"{size}short_edge_length=[100000]", f"{size}max_size=100000")
    assert last.startswith("MemoryError: Out of memory while training (a training step"), last[-3000:]
    assert f"{size}short_edge_length=[100000], {size}max_size=100000, dataloader.test.mapper.augmentations.0." \
           in last and "dataloader.train.total_batch_size=2. Fix: lower the resize augmentation's sizes" in last, last
    last = run(f"{size}short_edge_length=[64]", f"{size}max_size=64", "optimizer.lr=1e6",
               "lr_multiplier.warmup_length=0")
    assert last.startswith("FloatingPointError: Training diverged: train.init_checkpoint is empty: the whole model "
                           "trained from random initialisation"), last
    assert "Fix: lower optimizer.lr (now 1000000.0)" in last, last
