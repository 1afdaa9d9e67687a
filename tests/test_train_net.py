"""train_net.py end to end on CPU: quickstart learning, resume, multi-process, multi-machine, datasets, errors.

Every run is a real ``python train_net.py`` subprocess on the synthetic shapes dataset.
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from detectron2.data import DatasetCatalog

from d2_backbones import ConfigError
from d2_backbones.data import make_shapes
from d2_backbones.engine import check_num_classes
from d2_backbones.train import argument_parser, check_opts, register_coco_datasets, setup

from conftest import CONFIG_DIR, REPO

TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"))  # the quickstart's default size, generated once
    return str(root)


def _env(data_root, threads=2):
    env = dict(os.environ, D2B_DATASETS=data_root, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(args, data_root, timeout=900, threads=2, check=True):
    cmd = [sys.executable, TRAIN_NET] + [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(data_root, threads), timeout=timeout,
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"train_net failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _bbox_ap(text):
    if "No predictions from the model!" in text:  # an untrained model may detect nothing at all
        return 0.0
    m = re.findall(r"copypaste: ([\d.]+|nan),", text)
    if not m:
        return None
    v = float(m[-1])
    return 0.0 if v != v else v  # an untrained model may score nan


# ------------------------------------------------------------------------------------------ quickstart
@pytest.mark.slow
def test_quickstart_short_run_learns_writes_outputs_and_resumes(data_root, tmp_path):
    out = str(tmp_path / "qs")
    common = ["--config-file", QUICK]
    untrained = _run(common + ["--eval-only", "OUTPUT_DIR", out + "_untrained"], data_root)
    ap0 = _bbox_ap(untrained.stdout + untrained.stderr)
    p = _run(common + ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", 160, "SOLVER.STEPS", "(120,)",
                       "SOLVER.CHECKPOINT_PERIOD", 80, "TEST.EVAL_PERIOD", 160], data_root, timeout=1500)
    log = p.stdout + p.stderr
    ap = _bbox_ap(log)
    assert ap0 is not None and ap is not None, log[-3000:]
    assert ap > max(10.0, ap0 + 10.0), (ap0, ap)
    for f in ["metrics.json", "model_final.pth", "predictions.png", "curves.png", "config.yaml", "last_checkpoint"]:
        assert os.path.isfile(os.path.join(out, f)), f
    assert "Built backbone: ResNet-18" in log and "Effective batch" in log and "Per-category bbox AP" in log
    assert "Weights loading summary: MODEL.WEIGHTS is empty" in log
    assert "TEST.OPTIMIZE_FOR_INFERENCE: evaluating a prepared copy" in log  # the quickstart sets it
    recs = _metrics(out)
    losses = [r["total_loss"] for r in recs if "total_loss" in r]
    assert losses[-1] < losses[0]
    # --eval-only with the trained weights reproduces the final evaluation
    ev = _run(common + ["--eval-only", "OUTPUT_DIR", out + "_eval", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")],
              data_root)
    assert _bbox_ap(ev.stdout + ev.stderr) == pytest.approx(ap, abs=0.05)
    assert "optimize_for_inference: folded" in ev.stdout + ev.stderr
    # ... and so does the plain eager model (the optimized evaluation changes nothing but speed)
    ev2 = _run(common + ["--eval-only", "OUTPUT_DIR", out + "_eval2", "MODEL.WEIGHTS",
                         os.path.join(out, "model_final.pth"), "TEST.OPTIMIZE_FOR_INFERENCE", False], data_root)
    assert "optimize_for_inference" not in ev2.stdout + ev2.stderr
    assert _bbox_ap(ev2.stdout + ev2.stderr) == pytest.approx(ap, abs=0.05)
    # --resume continues from the saved iteration
    p2 = _run(common + ["--resume", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 170, "SOLVER.STEPS", "(120,)",
                        "TEST.EVAL_PERIOD", 0], data_root)
    log2 = p2.stdout + p2.stderr
    assert "--resume: found" in log2 and "model_final.pth; resuming at iter 160" in log2, log2[-3000:]
    assert re.search(r"Weights loading summary: .*backbone.bottom_up: (\d+)/\1 parameters, (\d+)/\2 buffers loaded", log2), log2[-3000:]
    assert max(r["iteration"] for r in _metrics(out)) == 170  # detectron2 logs the final record at MAX_ITER


# ------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
def test_two_cpu_processes_train(data_root, tmp_path):
    out = str(tmp_path / "ddp")
    p = _run(["--config-file", QUICK, "--num-gpus", 2, "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
              "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 6, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
              "SOLVER.MAX_TO_KEEP", 1, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()"], data_root, threads=1)
    log = p.stdout + p.stderr
    assert "World size: 2" in log
    # written by rank 0 only; MAX_TO_KEEP=1 leaves the newest periodic checkpoint (iters 1, 3, 5 were saved)
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "*.pth"))) == [
        "model_0000005.pth", "model_final.pth"]
    assert log.count("Saving checkpoint to") == 4
    recs = _metrics(out)
    assert recs and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in recs if "total_loss" in r)
    assert max(r["iteration"] for r in recs) >= 5  # reached the last iteration (0-based 5 of MAX_ITER 6)


@pytest.mark.slow
def test_two_machines_over_loopback(data_root, tmp_path):
    out = str(tmp_path / "mm")
    url = f"tcp://127.0.0.1:{_free_port()}"
    args = ["--config-file", QUICK, "--num-gpus", 1, "--num-machines", 2, "--dist-url", url]
    opts = ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", 4, "SOLVER.IMS_PER_BATCH", 4, "TEST.EVAL_PERIOD", 0,
            "DATASETS.TEST", "()"]
    procs = [subprocess.Popen([sys.executable, TRAIN_NET] + [str(a) for a in args + ["--machine-rank", r] + opts],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(data_root, 1), cwd=REPO) for r in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-3000:] for l in logs)
    assert "Rank of current process: 0. World size: 2" in logs[0]
    with open(os.path.join(out, "log.txt.rank1")) as f:  # detectron2 logs other ranks to files only
        assert "Rank of current process: 1. World size: 2" in f.read()
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


# ------------------------------------------------------------------------------------------ kill + resume
@pytest.mark.slow
def test_sigkill_mid_training_then_resume(data_root, tmp_path):
    out = str(tmp_path / "kill")
    cmd = [sys.executable, TRAIN_NET, "--config-file", QUICK, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 100000,
           "SOLVER.CHECKPOINT_PERIOD", 3, "TEST.EVAL_PERIOD", 0, "SOLVER.IMS_PER_BATCH", 2]
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=_env(data_root, 2), cwd=REPO)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and len(glob.glob(os.path.join(out, "model_*.pth"))) < 2:
            time.sleep(0.2)
        time.sleep(0.5)  # likely in the middle of the next iterations or a save
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    saved = glob.glob(os.path.join(out, "model_*.pth"))
    assert len(saved) >= 2
    for f in saved:  # every file under a final name is complete
        torch.load(f, map_location="cpu", weights_only=False)
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    it = torch.load(os.path.join(out, last), map_location="cpu", weights_only=False)["iteration"]
    r = _run(["--config-file", QUICK, "--resume", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", it + 3,
              "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0, "SOLVER.IMS_PER_BATCH", 2], data_root)
    assert f"{last}; resuming at iter {it + 1}" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ datasets + checks
@pytest.mark.slow
def test_register_coco_with_a_tiny_dataset(data_root, tmp_path):
    tiny = make_shapes(str(tmp_path / "tiny"), n_train=6, n_val=3, size=96, seed=7)
    out = str(tmp_path / "tinyrun")
    p = _run(["--config-file", QUICK, "--register-coco", "tiny_train", f"{tiny}/annotations/train.json",
              f"{tiny}/train", "--register-coco", "tiny_val", f"{tiny}/annotations/val.json", f"{tiny}/val",
              "OUTPUT_DIR", out, "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
              "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "TEST.EVAL_PERIOD", 2], data_root)
    assert "Evaluation results for bbox" in p.stdout + p.stderr
    assert os.path.isfile(os.path.join(out, "inference", "tiny_val", "coco_instances_results.json"))


def test_registration_is_idempotent_and_conflicts_are_clear(tmp_path):
    a = make_shapes(str(tmp_path / "a"), n_train=2, n_val=1, size=64, seed=1)
    b = make_shapes(str(tmp_path / "b"), n_train=2, n_val=1, size=64, seed=2)
    spec = ("d2b_reg_test", f"{a}/annotations/train.json", f"{a}/train")
    register_coco_datasets([spec])
    register_coco_datasets([spec])  # same files: harmless
    assert len(DatasetCatalog.get("d2b_reg_test")) == 2
    with pytest.raises(ConfigError, match=r"already registered with JSON .*a/annotations/train.json.*different NAME"):
        register_coco_datasets([("d2b_reg_test", f"{b}/annotations/train.json", f"{b}/train")])
    with pytest.raises(ConfigError, match=r"'coco_2017_train' is already a registered dataset \(a built-in"):
        register_coco_datasets([("coco_2017_train", f"{a}/annotations/train.json", f"{a}/train")])


def _args(*extra):
    return argument_parser().parse_args(["--config-file", QUICK] + [str(e) for e in extra])


def test_class_count_mismatch_names_each_key(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("D2B_DATASETS", data_root)
    with pytest.raises(ConfigError, match=r"Dataset 'shapes_train' has 3 classes \(thing_classes=\['circle', "
                                          r"'square', 'triangle'\]\) but MODEL.ROI_HEADS.NUM_CLASSES=80.*--num-classes auto"):
        setup(_args("OUTPUT_DIR", tmp_path / "x", "MODEL.ROI_HEADS.NUM_CLASSES", 80))
    cfg = setup(_args("--num-classes", "auto", "OUTPUT_DIR", tmp_path / "y", "MODEL.ROI_HEADS.NUM_CLASSES", 80))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3


def test_retinanet_class_key_is_checked(data_root, monkeypatch):
    from d2_backbones import get_cfg
    monkeypatch.setenv("D2B_DATASETS", data_root)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "ResNet", "retinanet_R_50_FPN_1x.yaml"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("shapes_train",), ()
    from d2_backbones.data import register_shapes
    register_shapes()
    with pytest.raises(ConfigError, match=r"MODEL.RETINANET.NUM_CLASSES=80"):
        check_num_classes(cfg)


def test_config_file_paths_resolve_from_any_directory_or_name_the_closest(data_root, tmp_path, monkeypatch):
    """Outside the checkout the README's ``configs/...`` paths find the shipped configs; a wrong path lists the
    closest shipped names; a Python config names lazy_train. All before anything is built."""
    import d2_backbones

    monkeypatch.setenv("D2B_DATASETS", data_root)
    monkeypatch.chdir(tmp_path)  # no configs/ here
    rel = "quickstart/faster_rcnn_R_18_FPN_shapes.yaml"
    args = argument_parser().parse_args(["--config-file", "configs/" + rel, "OUTPUT_DIR", str(tmp_path / "a")])
    assert setup(args).SOLVER.MAX_ITER == 600
    assert args.config_file == d2_backbones.get_config_file(rel)
    with pytest.raises(ConfigError, match=r"Config file 'configs/quickstart/faster_rcnn_R_18_FPN_shape.yaml' does "
                                          r"not exist \(relative to .*\) and is no config shipped with d2_backbones. "
                                          r"Closest shipped configs: quickstart/faster_rcnn_R_18_FPN_shapes.yaml"):
        setup(argument_parser().parse_args(["--config-file", "configs/quickstart/faster_rcnn_R_18_FPN_shape.yaml"]))
    with pytest.raises(ConfigError, match=r"is a Python \(LazyConfig\) config; train_net reads yaml configs. Fix: "
                                          r"train it with python -m d2_backbones.lazy_train --config-file"):
        setup(argument_parser().parse_args(["--config-file", "GhostNet/fcos_ghostnet_100_FPN_1x.py"]))
    assert not (tmp_path / "output").exists()


def test_amp_on_cpu_is_explained_at_start(data_root, tmp_path, monkeypatch):
    """detectron2's AMPTrainer would stop at its first step; setup names both keys and the bf16 route."""
    monkeypatch.setenv("D2B_DATASETS", data_root)
    with pytest.raises(ConfigError, match=r"SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda .*MODEL.DEVICE='cpu'\. "
                                          r"Fix: set SOLVER.AMP.ENABLED False.*d2_backbones.lazy_train.*"
                                          r"train.amp.enabled=True"):
        setup(_args("OUTPUT_DIR", tmp_path / "a", "SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cpu"))
    # evaluation does not use the AMP trainer: no error
    args = _args("OUTPUT_DIR", tmp_path / "b", "SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cpu")
    args.eval_only = True
    assert setup(args).SOLVER.AMP.ENABLED


def test_unregistered_dataset_is_explained(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("D2B_DATASETS", data_root)
    with pytest.raises(ConfigError, match=r"Dataset 'nope_train'.*not registered in this process.*--register-coco"):
        setup(_args("OUTPUT_DIR", tmp_path / "z", "DATASETS.TRAIN", "('nope_train',)"))


def test_flag_after_overrides_is_explained():
    with pytest.raises(SystemExit, match=r"Found flag '--resume' inside the config overrides.*Put --flags before"):
        check_opts(["OUTPUT_DIR", "output", "--resume"])


@pytest.mark.slow
def test_flag_after_overrides_stops_train_net():
    p = subprocess.run([sys.executable, TRAIN_NET, "--config-file", QUICK, "OUTPUT_DIR", "out", "--eval-only"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0 and "Found flag '--eval-only' inside the config overrides" in p.stderr
