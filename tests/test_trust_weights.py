"""Weights that load partially are refused (issue 18): every path, every file kind, an honest summary, the converter.

In process (fast): :class:`~d2_backbones.Checkpointer` on whole models built from shipped configs (quickstart R-18,
V-19-slim-dw, GhostNet 0.5), the predictors, export, detectron2 Caffe2 ``.pkl`` files built here, DCN/GC models,
directories / devices / FIFOs given as weights, the converter. Through ``train_net.py`` and
``python -m d2_backbones.lazy_train`` (slow): train, ``--eval-only``, ``--resume`` after a depth change, the opt-out.
"""
import contextlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from detectron2.modeling import build_model

import d2_backbones
from d2_backbones import Checkpointer, WeightsMismatchError
from d2_backbones.export import build_export_model
from d2_backbones.resnet import build_resnet
from d2_backbones.data import make_shapes
from d2_backbones.weights import CheckpointReadError, load_file
from d2_backbones.weights.cli import main as convert_main

from conftest import CONFIG_DIR, LOAD_LOGGERS, REPO, captured_logs, load_cfg, summary, warnings_in

QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
VOV = os.path.join(CONFIG_DIR, "VoVNet", "faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml")
GHOST = os.path.join(CONFIG_DIR, "GhostNet", "faster_rcnn_ghostnet_050_FPN_1x.yaml")
NO_RES5 = ["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4']", "MODEL.FPN.IN_FEATURES",
           "['res2', 'res3', 'res4']", "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
           "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128]]"]
# name -> (config, overrides)
MODELS = {"R-18": (QUICK, []), "R-34": (QUICK, ["MODEL.RESNETS.DEPTH", 34]), "R-18-no-res5": (QUICK, NO_RES5),
          "V-19-slim-dw": (VOV, []), "GhostNet-0.5": (GHOST, [])}


def cfg_of(name, *opts):
    config, overrides = MODELS[name]
    return load_cfg(config, ["MODEL.DEVICE", "cpu", *overrides, *opts])


def model_of(name, *opts):
    cfg = cfg_of(name, *opts)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> a detector checkpoint of that model as train_net writes it ({"model", "iteration"})."""
    root = tmp_path_factory.mktemp("trust_weights")
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        _, model = model_of(name)
        out[name] = str(root / f"{name}.pth")
        torch.save({"model": model.state_dict(), "iteration": 9}, out[name])
    return out


def logs():
    return captured_logs(LOAD_LOGGERS)


def refused(model, path, cfg=None, **kw):
    """Load must raise; the model's state is untouched (nothing was loaded before the refusal)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as e:
        Checkpointer(model, cfg=cfg, **kw).load(path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return str(e.value)


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("src,dst,shown", [
    ("R-18", "R-34", "res3: 2 in the file, 4 in the model"),
    ("R-34", "R-18", "res3: 4 in the file, 2 in the model"),
])
def test_another_depth_stops_the_load(files, src, dst, shown):
    """A plain detector checkpoint of another depth: one error with counts, first keys, the cause and the fix."""
    cfg, model = model_of(dst)
    msg = refused(model, files[src], cfg)
    n_src = {"R-18": 100, "R-34": 180}
    assert f"{files[src]}: the weights do not fit the model's backbone (backbone.bottom_up): " \
           f"{min(n_src.values())}/{n_src[dst]} of its parameters and buffers" in msg, msg
    assert ("80 of the model's are not in the file (first: backbone.bottom_up.res2.2.conv1.weight" if dst == "R-34"
            else "80 of the file's are not in the model (first: backbone.bottom_up.res2.2.conv1.weight") in msg, msg
    assert "Likely cause: another depth" in msg and shown in msg, msg
    assert f"The file holds a ResNet {src} backbone (MODEL.RESNETS.DEPTH {src[2:]})" in msg, msg
    assert "MODEL.WEIGHTS_CHECK warn (lazy_train: train.weights_check=warn)" in msg


@pytest.mark.parametrize("src,dst,holds", [
    ("V-19-slim-dw", "R-18", "a VoVNet V-19-slim-dw-eSE backbone (MODEL.VOVNET.CONV_BODY V-19-slim-dw-eSE)"),
    ("R-18", "V-19-slim-dw", "a ResNet R-18 backbone (MODEL.RESNETS.DEPTH 18)"),
    ("R-18", "GhostNet-0.5", "a ResNet R-18 backbone"),
    ("GhostNet-0.5", "R-18", "a GhostNet width 0.5 backbone (MODEL.GHOSTNET.WIDTH 0.5)"),
])
def test_another_family_stops_the_load(files, src, dst, holds):
    cfg, model = model_of(dst)
    msg = refused(model, files[src], cfg)
    assert "Likely cause: another backbone family or layout: almost no name is shared" in msg, msg
    assert f"The file holds {holds}" in msg, msg


def test_other_out_features_stop_the_load(files):
    """A model without res5 (OUT_FEATURES up to res4) and a file with it, both ways."""
    cfg, model = model_of("R-18-no-res5")
    msg = refused(model, files["R-18"], cfg)
    assert "25 of the file's are not in the model" in msg and "only in the file: res5" in msg, msg
    assert "another MODEL.RESNETS.OUT_FEATURES" in msg, msg
    cfg, model = model_of("R-18")
    assert "only in the model: res5" in refused(model, files["R-18-no-res5"], cfg)


@pytest.mark.parametrize("name", ["R-18", "V-19-slim-dw", "GhostNet-0.5"])
def test_a_checkpoint_of_the_same_backbone_loads_fully_with_another_class_count(files, name):
    """No false alarm: the same backbone loads without error; a head with another class count is skipped (a line)."""
    cfg, model = model_of(name, "MODEL.ROI_HEADS.NUM_CLASSES", 7)
    with logs() as records:
        cp = Checkpointer(model, cfg=cfg)
        cp.load(files[name])
    assert cp.incomplete_load is None
    assert re.search(r"backbone\.bottom_up: (\d+)/\1 parameters, (\d+)/\2 buffers loaded", summary(records))
    warned = warnings_in(records)
    assert len(warned) == 1 and warned[0].startswith("Skipped 4 checkpoint tensor(s) with another shape: "
                                                     "roi_heads.box_predictor"), warned


@pytest.mark.parametrize("entry", ["Predictor", "OptimizedPredictor", "export", "lazy_train"])
def test_every_entry_point_refuses(files, entry):
    """The same rule through the predictors, export's loader and lazy_train's checkpointer (no cfg)."""
    cfg = cfg_of("R-34", "MODEL.WEIGHTS", files["R-18"])
    with pytest.raises(WeightsMismatchError, match="another depth"):
        if entry == "export":
            build_export_model(cfg)
        elif entry == "lazy_train":  # lazy_train builds Checkpointer(model, dir, weights_check=train.weights_check)
            Checkpointer(build_model(cfg), weights_check=None).resume_or_load(files["R-18"], resume=False)
        else:
            getattr(d2_backbones, entry)(cfg)


def test_resume_after_a_depth_change_names_resume(files, tmp_path):
    """--resume with MODEL.RESNETS.DEPTH changed since the run: refused before the optimizer state is touched."""
    _, r18 = model_of("R-18")
    Checkpointer(r18, str(tmp_path)).save("model_0000009")
    cfg, r34 = model_of("R-34")
    optimizer = torch.optim.SGD(r34.parameters(), lr=0.1)
    with pytest.raises(WeightsMismatchError) as e:
        Checkpointer(r34, str(tmp_path), cfg=cfg, optimizer=optimizer).resume_or_load("", resume=True)
    assert f"{tmp_path / 'model_0000009.pth'}: the weights do not fit" in str(e.value)
    assert "--resume loads the last checkpoint of OUTPUT_DIR, written with another config" in str(e.value)


# ---------------------------------------------------------------------------------------------- opt-out, summary
@pytest.mark.parametrize("how", ["cfg", "kwarg"])
def test_warn_loads_what_fits_says_what_did_not_and_the_summary_is_honest(files, how):
    """R-18 file into VoVNet (FrozenBN) with 'warn': one WARNING, incomplete_load set, 0 buffers loaded (not 38/76)."""
    cfg, model = model_of("V-19-slim-dw", *(["MODEL.WEIGHTS_CHECK", "warn"] if how == "cfg" else []))
    with logs() as records:
        cp = Checkpointer(model, cfg=cfg, **({"weights_check": "warn"} if how == "kwarg" else {}))
        cp.load(files["R-18"])
    warned = [w for w in warnings_in(records) if "do not fit" in w]
    assert len(warned) == 1 and "Weights check 'warn': loading what fits" in warned[0], warnings_in(records)
    assert cp.incomplete_load == "backbone.bottom_up: 0/132 tensors loaded (132 missing, 100 unexpected, " \
                                 "0 of another shape)"
    n_params = len(list(model.backbone.bottom_up.parameters()))
    n_buffers = len([k for k, _ in model.backbone.bottom_up.named_buffers() if "num_batches" not in k])
    assert n_buffers and f"backbone.bottom_up: 0/{n_params} parameters, 0/{n_buffers} buffers (initialised)" in \
        summary(records), summary(records)


def test_weights_check_values_are_validated():
    cfg, model = model_of("R-18", "MODEL.WEIGHTS_CHECK", "off")
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS_CHECK='off' is not one of 'error', 'warn'"):
        Checkpointer(model, cfg=cfg)
    with pytest.raises(ValueError, match=r"train.weights_check in a Python config\)='skip' is not one of"):
        Checkpointer(model, weights_check="skip")


# ---------------------------------------------------------------------------------------------- Caffe2 .pkl, DCN, GC
_C2_BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
_C2_PART = {"weight": "w", "norm.weight": "bn_s", "norm.bias": "bn_b"}


def c2_name(rel):
    """detectron2 ResNet name -> Detectron/Caffe2 name (the MSRA .pkl layout: no running statistics)."""
    m = re.match(r"^stem\.conv1\.(weight|norm\.weight|norm\.bias)$", rel)
    if m:
        return {"weight": "conv1_w", "norm.weight": "res_conv1_bn_s", "norm.bias": "res_conv1_bn_b"}[m.group(1)]
    m = re.match(r"^res(\d)\.(\d+)\.(conv\d|shortcut)\.(weight|norm\.weight|norm\.bias)$", rel)
    return f"res{m.group(1)}_{m.group(2)}_{_C2_BRANCH[m.group(3)]}_{_C2_PART[m.group(4)]}" if m else None


def c2_pkl(path, model):
    # the ImageNet classifier (not a backbone tensor) and the stem conv's bias, as in detectron2's R-50.pkl: the
    # model's conv before a norm has none (detectron2 logs it among the keys not used)
    blobs = {"fc1000_w": np.zeros((1000, 8), np.float32), "fc1000_b": np.zeros((1000,), np.float32),
             "conv1_b": np.zeros((64,), np.float32)}
    for k, v in model.backbone.bottom_up.state_dict().items():
        if c2_name(k):
            blobs[c2_name(k)] = v.numpy().copy()
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return blobs


def test_caffe2_pkl_goes_through_name_matching_then_the_rule(tmp_path):
    """MSRA-style .pkl of R-18 loads fully (running stats initialised, one INFO line); R-34 <-> R-18: refused."""
    torch.manual_seed(1)
    _, r18 = model_of("R-18")
    path = str(tmp_path / "R-18.pkl")
    blobs = c2_pkl(path, r18)
    cfg, model = model_of("R-18")
    with logs() as records:
        Checkpointer(model, cfg=cfg).load(path)
    assert torch.equal(model.backbone.bottom_up.res5[1].conv2.weight, torch.from_numpy(blobs["res5_1_branch2b_w"]))
    n_params = len(list(model.backbone.bottom_up.parameters()))
    assert f"backbone.bottom_up: {n_params}/{n_params} parameters, 0/40 buffers loaded" in summary(records)
    assert any(r.getMessage() == "Not in the weights, initialised as intended: 40 norm running statistics (affine-only "
               "weights such as MSRA's .pkl: mean 0, variance 1)" for r in records)
    assert any(r.getMessage().endswith(": stem.conv1.bias") and r.getMessage().startswith("Not used by the model")
               for r in records)
    # detectron2's tools/convert-torchvision-to-d2.py output: d2 names, the classifier as stem.fc.*, heuristics on
    tv = {k: v.numpy().copy() for k, v in r18.backbone.bottom_up.state_dict().items()}
    tv.update({"stem.fc.weight": np.zeros((1000, 512), np.float32), "stem.fc.bias": np.zeros((1000,), np.float32)})
    tv_path = str(tmp_path / "R-18-torchvision.pkl")
    with open(tv_path, "wb") as f:
        pickle.dump({"model": tv, "__author__": "torchvision", "matching_heuristics": True}, f)
    cfg, model = model_of("R-18")
    with logs() as records:
        Checkpointer(model, cfg=cfg).load(tv_path)
    assert f"backbone.bottom_up: {n_params}/{n_params} parameters, 40/40 buffers loaded" in summary(records)
    assert any(r.getMessage().endswith(": stem.fc.bias, stem.fc.weight") for r in records)
    # the same affine-only weights as a .pth (not a Caffe2 file): running statistics missing are missing tensors
    pth = str(tmp_path / "R-18-no-stats.pth")
    torch.save({"model": {k: v for k, v in r18.state_dict().items() if "running_" not in k}}, pth)
    assert "40 of the model's are not in the file" in refused(model_of("R-18")[1], pth, cfg)
    cfg34, r34 = model_of("R-34")
    assert "another depth" in refused(r34, path, cfg34)
    path34 = str(tmp_path / "R-34.pkl")
    c2_pkl(path34, r34)
    msg = refused(model, path34, cfg)
    assert "of the file's are not in the model (first: backbone.bottom_up.res2.2." in msg and "another depth" in msg


@pytest.mark.parametrize("variant,kind", [
    ({"deform_on_per_stage": (False, True, True, True), "deform_modulated": True},
     "26 deformable-conv offsets (conv2_offset, zero-initialised)"),
    ({"plugins": [{"type": "gc", "position": "after_conv3", "stages": (False, True, True, True), "ratio": 1 / 16}]},
     "104 plugins (GC / SE blocks, after_convN)"),
])
def test_imagenet_weights_load_into_dcn_and_gc_models(tmp_path, variant, kind):
    """Offsets and plugins are absent from ImageNet weights by design: initialised, listed in one INFO line."""
    path = str(tmp_path / "r50.pth")
    torch.save({"model": {"backbone." + k: v for k, v in build_resnet(50, norm="FrozenBN").state_dict().items()}},
               path)
    holder = nn.Module()
    holder.backbone = build_resnet(50, norm="FrozenBN", **variant)
    with logs() as records:
        cp = Checkpointer(holder)
        cp.load(path)
    assert cp.incomplete_load is None
    assert any(r.getMessage() == f"Not in the weights, initialised as intended: {kind}" for r in records), \
        [r.getMessage() for r in records]


# ---------------------------------------------------------------------------------------------- file kinds
def test_a_torch_save_archive_named_pkl_is_read_as_pth(files, tmp_path):
    path = str(tmp_path / "model_final.pkl")
    shutil.copy(files["R-18"], path)
    cfg, model = model_of("R-18")
    with logs() as records:
        Checkpointer(model, cfg=cfg).load(path)
    assert re.search(r"backbone\.bottom_up: (\d+)/\1 parameters, (\d+)/\2 buffers loaded", summary(records))


@contextlib.contextmanager
def at_most(seconds):
    def fail(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_directory_device_and_fifo_are_named_and_never_opened(files, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(files["R-18"], folder / "model_final.pth")
    zero = tmp_path / "zero.pth"
    os.symlink("/dev/zero", zero)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    expected = {str(folder): "is a directory, not a weights file; it was not opened. Fix: give the path of a weights "
                             "file (.pth / .pkl) - this directory holds model_final.pth",
                str(zero): "(a symlink to /dev/zero) is a character device, not a weights file",
                str(fifo): "is a named pipe (FIFO), not a weights file; it was not opened"}
    _, model = model_of("R-18")
    for path, text in expected.items():
        for load in (load_file, Checkpointer(model).load):
            with at_most(20), pytest.raises(CheckpointReadError) as e:
                load(path)
            assert str(e.value).startswith(path) and text in str(e.value), str(e.value)


def test_a_file_of_foreign_names_is_refused(tmp_path):
    """torchvision's resnet18.pth given as MODEL.WEIGHTS loads nothing: refused, naming its format and the converter."""
    import torchvision

    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    cfg, model = model_of("R-18")
    msg = refused(model, path, cfg)
    assert "none of its 122 tensors has a name of this model (first: conv1.weight" in msg, msg
    assert "'torchvision-resnet' format" in msg and "python -m d2_backbones.convert SRC DST" in msg, msg


# ---------------------------------------------------------------------------------------------- converter
def test_converter_says_a_detector_checkpoint_loads_as_it_is(files, tmp_path, capsys):
    dst = tmp_path / "out.pth"
    assert convert_main([files["R-18"], str(dst)]) == 2
    err = capsys.readouterr().err
    assert "is a detectron2 detector checkpoint" in err and "it needs no conversion" in err, err
    assert f"MODEL.WEIGHTS {files['R-18']}" in err and "Nothing was written." in err, err
    assert "Pass --format" not in err
    assert not dst.exists() and not dst.with_suffix(".yaml").exists()


# ---------------------------------------------------------------------------------------------- through the CLIs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"), n_train=8, n_val=3)
    return str(root)


def _env(data_root):
    env = dict(os.environ, D2B_DATASETS=data_root, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


TINY = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
        "TEST.OPTIMIZE_FOR_INFERENCE", False]


def train_net(data_root, *args):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", QUICK] + [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(data_root), cwd=REPO, timeout=900)
    p.log = p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained") / "r18")
    p = train_net(data_root, "OUTPUT_DIR", out, *TINY)
    assert p.returncode == 0, p.log[-4000:]
    return out


@pytest.mark.slow
def test_train_net_refuses_another_depth_on_train_eval_and_resume(trained, data_root, tmp_path):
    final = os.path.join(trained, "model_final.pth")
    depth = ["MODEL.RESNETS.DEPTH", 34]
    runs = {
        "train": ["OUTPUT_DIR", tmp_path / "train", *TINY, *depth, "MODEL.WEIGHTS", final],
        "eval-only": ["--eval-only", "OUTPUT_DIR", tmp_path / "eval", *TINY, *depth, "MODEL.WEIGHTS", final],
    }
    for name in ("eval-only --resume", "train --resume"):
        shutil.copytree(trained, tmp_path / name.replace(" ", "_"))
        flags = ["--eval-only", "--resume"] if name.startswith("eval") else ["--resume"]
        runs[name] = [*flags, "OUTPUT_DIR", tmp_path / name.replace(" ", "_"), *TINY, *depth, "SOLVER.MAX_ITER", 4]
    for name, args in runs.items():
        p = train_net(data_root, *args)
        assert p.returncode != 0, (name, p.log[-3000:])
        assert "WeightsMismatchError" in p.log and "the weights do not fit the model's backbone" in p.log, \
            (name, p.log[-3000:])
        assert "Likely cause: another depth" in p.log, (name, p.log[-3000:])
        assert ("--resume loads the last checkpoint of OUTPUT_DIR" in p.log) == ("--resume" in name), name
        assert "parameter group" not in p.log and "copypaste" not in p.log, name


@pytest.mark.slow
def test_train_net_weights_check_warn_loads_with_the_warning(trained, data_root, tmp_path):
    p = train_net(data_root, "OUTPUT_DIR", tmp_path / "warn", *TINY, "MODEL.RESNETS.DEPTH", 34,
                  "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth"), "MODEL.WEIGHTS_CHECK", "warn")
    assert p.returncode == 0, p.log[-4000:]
    assert "Weights check 'warn': loading what fits" in p.log and "another depth" in p.log, p.log[-4000:]
    assert "backbone.bottom_up: 60/108 parameters, 40/72 buffers loaded" in p.log, p.log[-4000:]


def lazy_train(data_root, out, *overrides):
    shapes = os.path.join(data_root, "shapes")
    cmd = [sys.executable, "-m", "d2_backbones.lazy_train", "--eval-only",
           "--config-file", os.path.join(CONFIG_DIR, "ResNet", "retinanet_R_50_FPN_1x.py"),
           "--register-coco", "trust_val", os.path.join(shapes, "annotations", "val.json"), os.path.join(shapes, "val"),
           "--num-classes", "auto", "train.device=cpu", f"train.output_dir={out}",
           "dataloader.train.dataset.names=trust_val", "dataloader.test.dataset.names=trust_val",
           "dataloader.test.num_workers=0", "dataloader.test.mapper.augmentations.0.short_edge_length=128",
           "dataloader.test.mapper.augmentations.0.max_size=128", *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(data_root), cwd=str(out.parent), timeout=900)
    p.log = p.stdout + p.stderr
    return p


@pytest.mark.slow
def test_lazy_train_refuses_then_warns_with_train_weights_check(trained, data_root, tmp_path):
    """R-18 train_net weights into the R-50 RetinaNet Python config: refused; train.weights_check=warn loads."""
    final = os.path.join(trained, "model_final.pth")
    p = lazy_train(data_root, tmp_path / "a", f"train.init_checkpoint={final}")
    assert p.returncode != 0 and "WeightsMismatchError" in p.log and "another depth" in p.log, p.log[-4000:]
    assert "(lazy_train: train.weights_check=warn)" in p.log
    p = lazy_train(data_root, tmp_path / "b", f"train.init_checkpoint={final}", "train.weights_check=warn")
    assert p.returncode == 0, p.log[-4000:]
    assert "Weights check 'warn': loading what fits" in p.log, p.log[-4000:]
    p = lazy_train(data_root, tmp_path / "c", f"train.init_checkpoint={final}", "train.weights_check=skip")
    assert p.returncode != 0 and "train.weights_check='skip' is not one of 'error', 'warn'" in p.log, \
        p.log[-4000:]
