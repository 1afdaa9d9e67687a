"""The weights layer end to end, through the real entry points: train_net.py, the predictors, the converter, export.

``train_net.py`` and ``python -m`` runs are real subprocesses from the repository root on the synthetic
shapes dataset (a few iterations each); the predictors and ``Checkpointer`` run in this process. The
parts one by one are tested in ``test_weights.py``.
"""
import contextlib
import glob
import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from detectron2.modeling import build_model

import d2_backbones
from d2_backbones import Checkpointer, WeightsMismatchError
from d2_backbones.convert import main as convert_main
from d2_backbones.data import make_shapes
from d2_backbones.train import argument_parser, setup
from d2_backbones.weights import UnsafeCheckpointError, state_nbytes

from conftest import CONFIG_DIR, REPO, captured_logs, load_cfg, summary, warnings_in

TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
GHOSTNET_130 = os.path.join(CONFIG_DIR, "GhostNet", "faster_rcnn_ghostnet_130_FPN_1x.yaml")
VOVNET_39 = os.path.join(CONFIG_DIR, "VoVNet", "faster_rcnn_V_39_eSE_FPN_3x.yaml")
# train only, small batches, no optimized copy of the model for the (empty) final evaluation
SHORT = ["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 2, "TEST.OPTIMIZE_FOR_INFERENCE", False]
KILL_ENV = "D2B_TEST_SIGKILL_WRITING"  # weights/write.py: the process SIGKILLs itself halfway through that file
# a WARNING of the loading side in a train_net log (detectron2's others, e.g. about SOLVER.STEPS, do not count)
LOAD_WARNING = re.compile(r"^WARNING \[[^\]]* (fvcore\.common\.checkpoint|d2\.checkpoint\S*|d2b\S*|d2_backbones\S*)\]",
                          re.MULTILINE)
FULL_BOTTOM_UP = re.compile(r"backbone\.bottom_up: (\d+)/\1 parameters(, (\d+)/\3 buffers)? loaded")


# ---------------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"))
    return str(root)


def _env(data_root=None, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    for k in ("CUDA_VISIBLE_DEVICES", KILL_ENV):
        env.pop(k, None)
    if data_root:
        env["D2B_DATASETS"] = data_root
    env.update(extra)
    return env


def start(args, data_root=None, *, env=None, umask=None, output=subprocess.PIPE):
    """Start ``python ARGS`` from the repository root."""
    return subprocess.Popen([sys.executable] + [str(a) for a in args], stdout=output, stderr=output, text=True,
                            cwd=REPO, env=_env(data_root, **(env or {})),
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def finish(proc, timeout=900):
    """Wait for a started run; returns ``.returncode``, ``.stdout``, ``.stderr`` and ``.log`` (both)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr, log=stdout + stderr)


def python(args, data_root=None, **kwargs):
    return finish(start(args, data_root, **kwargs))


def train_net_args(out, *opts, flags=()):
    return [TRAIN_NET, "--config-file", QUICK, *flags, "OUTPUT_DIR", out, *SHORT, *opts]


def train_net(out, *opts, data_root, flags=(), check=True, **kwargs):
    """``train_net.py`` on the quickstart config into ``out`` (training only, unless ``opts`` say otherwise)."""
    p = python(train_net_args(out, *opts, flags=flags), data_root, **kwargs)
    if check:
        assert p.returncode == 0, f"train_net failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """OUTPUT_DIR of a finished 2-iteration run under umask 022: model_000000{0,1}.pth, model_final.pth."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    train_net(out, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1, data_root=data_root, umask=0o022)
    return out


def copy_of(run, tmp_path):
    """A copy of a run's OUTPUT_DIR to continue (the fixture's stays as it was made)."""
    return shutil.copytree(run, str(tmp_path / "run"))


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------- output directory
def checkpoints(out):
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "*.pth")))


def temporaries(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".tmp"))


def tag(out):
    path = os.path.join(out, "last_checkpoint")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def read(path):
    """A checkpoint read the safe way (the package writes plain tensors and containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def non_finite(path):
    return [k for k, v in read(path)["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]


def removal_lines(log):
    return [line for line in log.splitlines() if "temporary file(s) left by an interrupted run" in line]


# ---------------------------------------------------------------------------------------------- loading in process
def assert_loads_cleanly(cfg, path):
    """``Checkpointer(model, cfg=cfg).load(path)`` raises nothing, logs no WARNING and loads the whole backbone."""
    model = build_model(cfg)
    with captured_logs() as logs:
        Checkpointer(model, cfg=cfg).load(path)
    assert warnings_in(logs) == []
    assert FULL_BOTTOM_UP.search(summary(logs)), summary(logs)


def cfg_value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, tuple) else cfg


# ---------------------------------------------------------------------------------------------- malicious files
class _Payload:
    """Unpickling this calls ``fn(*args)``: what a malicious checkpoint carries."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# name -> (callable, its arguments for a marker path); each creates the marker file when it runs
PAYLOADS = {
    "os.system": (os.system, lambda m: (f"touch {shlex.quote(m)}",)),
    "subprocess.call": (subprocess.call, lambda m: (["touch", m],)),
    "builtins.eval": (eval, lambda m: (f"open({m!r}, 'w').close()",)),
    "torch.save": (torch.save, lambda m: ({}, m)),  # torch's own globals are no safer
}


def evil_file(directory, payload, suffix=".pkl"):
    """A checkpoint-looking file whose unpickling creates ``directory/ran``.

    Returns ``.path``, ``.marker`` and ``.name``, the global the pickle asks for (e.g. ``posix.system``).
    """
    os.makedirs(directory, exist_ok=True)
    fn, args = PAYLOADS[payload]
    marker = os.path.join(directory, "ran")
    path = os.path.join(directory, "weights" + suffix)
    weight = np.zeros((4, 3, 7, 7), np.float32)
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": weight}, "__author__": "model zoo",
                         "extra": _Payload(fn, args(marker))}, f)
    else:
        torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.from_numpy(weight)},
                    "extra": _Payload(fn, args(marker))}, path)
    return SimpleNamespace(path=path, marker=marker, name=f"{fn.__module__}.{fn.__name__}")


def assert_refused(text, evil, name_the_global=True):
    assert f"{evil.path}: refused" in text, text
    if name_the_global:
        assert re.search(rf"\b{re.escape(evil.name)}\b", text), text


# ---------------------------------------------------------------------------------------------- converted weights
def convert(src, dst):
    """``python -m d2_backbones.convert SRC DST`` run in this process (the same ``main``); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert convert_main([str(src), str(dst)]) == 0
    return printed.getvalue()


def _random_resnet18():
    import torchvision
    return torchvision.models.resnet18()


def _random_timm(name):
    return pytest.importorskip("timm").create_model(name, pretrained=False)


# family -> (random source weights, the config that family's weights are used with)
SOURCES = {
    "resnet": (_random_resnet18, QUICK),                              # torchvision resnet18
    "ghostnet": (lambda: _random_timm("ghostnet_100"), GHOSTNET_130),  # timm, width 1.0
    "vovnet": (lambda: _random_timm("ese_vovnet39b"), VOVNET_39),      # timm, eSE in the last module of a stage
    "vovnet-d2": (lambda: d2_backbones.VoVNet("V-39-eSE", norm="FrozenBN"), VOVNET_39),  # vovnet-detectron2's names
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family's random source weights, converted once.

    family -> ``.source``, ``.pth``, ``.yaml`` (written beside it), ``.overrides`` (the printed line),
    ``.config`` (the family's config), ``.meta`` (the file's metadata).
    """
    root = tmp_path_factory.mktemp("converted")
    result = {}
    for family, (make, config) in SOURCES.items():
        src, dst = root / f"{family}_source.pth", root / f"{family}.pth"
        torch.save(make().state_dict(), src)
        printed = convert(src, dst)
        result[family] = SimpleNamespace(source=str(src), pth=str(dst), yaml=str(dst.with_suffix(".yaml")),
                                         overrides=last_line(printed).strip(), config=config,
                                         meta=read(str(dst))["d2_backbones"])
    return result


# ============================================================================================== 1. code-running pickles
@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_run_code_when_read_unsafely(tmp_path, payload):
    """Control: the files are live - plain pickle (detectron2's .pkl reader) and weights_only=False run them."""
    def plain_pickle(path):
        with open(path, "rb") as f:
            return pickle.load(f)

    for suffix, unsafe_read in ((".pkl", plain_pickle), (".pth", lambda p: torch.load(p, weights_only=False))):
        evil = evil_file(str(tmp_path / suffix[1:]), payload, suffix)
        assert not os.path.exists(evil.marker)
        unsafe_read(evil.path)
        assert os.path.exists(evil.marker), (payload, suffix)


@pytest.mark.slow
def test_command_lines_refuse_code_running_files(data_root, tmp_path):
    """train_net (training, --eval-only), export and the converter stop on code-running files before they run."""
    evil = {"train": evil_file(str(tmp_path / "train"), "os.system"),
            "eval-only": evil_file(str(tmp_path / "eval"), "subprocess.call"),
            "export": evil_file(str(tmp_path / "export"), "builtins.eval"),
            "convert .pkl": evil_file(str(tmp_path / "convert_pkl"), "os.system"),
            "convert .pth": evil_file(str(tmp_path / "convert_pth"), "torch.save", ".pth")}
    out = {entry: os.path.join(os.path.dirname(e.path), "out") for entry, e in evil.items()}
    commands = {
        "train": train_net_args(out["train"], "MODEL.WEIGHTS", evil["train"].path, "SOLVER.MAX_ITER", 1),
        "eval-only": train_net_args(out["eval-only"], "MODEL.WEIGHTS", evil["eval-only"].path, flags=["--eval-only"]),
        "export": ["-m", "d2_backbones.export", "--config-file", QUICK, "--output", out["export"],
                   "MODEL.WEIGHTS", evil["export"].path],
        **{entry: ["-m", "d2_backbones.convert", evil[entry].path, out[entry] + ".pth"]
           for entry in ("convert .pkl", "convert .pth")},
    }
    started = {entry: start(cmd, data_root) for entry, cmd in commands.items()}  # independent: side by side
    done = {entry: finish(proc) for entry, proc in started.items()}
    for entry, p in done.items():
        e = evil[entry]
        error = last_line(p.stderr)
        assert p.returncode != 0, (entry, p.log[-3000:])
        if entry == "convert .pkl":  # not even read: .pkl files need no conversion
            assert error.startswith(f"error: {e.path}: ") and "need no conversion - set MODEL.WEIGHTS" in error, error
        else:
            assert_refused(error, e, name_the_global=True)
        assert not os.path.exists(e.marker), entry
        produced = glob.glob(out[entry] + ".*") + [f for f in glob.glob(os.path.join(out[entry], "*"))
                                                   if f.endswith((".pth", ".ts", ".onnx"))]
        assert produced == [], (entry, produced)


@pytest.mark.parametrize("payload,suffix", [(p, ".pkl") for p in PAYLOADS] + [("os.system", ".pth")])
@pytest.mark.parametrize("predictor", ["Predictor", "OptimizedPredictor"])
def test_predictors_refuse_code_running_files(tmp_path, predictor, payload, suffix):
    """d2_backbones.Predictor / OptimizedPredictor given a code-running weights file refuse it without running it."""
    evil = evil_file(str(tmp_path), payload, suffix)
    with pytest.raises(UnsafeCheckpointError) as e:
        getattr(d2_backbones, predictor)(load_cfg(QUICK, ["MODEL.WEIGHTS", evil.path]))
    assert not os.path.exists(evil.marker)
    assert_refused(str(e.value), evil, name_the_global=True)


def test_code_running_pth_refusal_names_the_global(tmp_path):
    """A code-running .pth is refused like a .pkl: the message names the global the file asks for."""
    evil = evil_file(str(tmp_path), "os.system", ".pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        d2_backbones.Predictor(load_cfg(QUICK, ["MODEL.WEIGHTS", evil.path]))
    assert_refused(str(e.value), evil)


@pytest.mark.parametrize("layout,saved", [
    ("detectron2", "protocol 2"),
    ("caffe2", "protocol 2"),  # Detectron's files are Python 2 pickles
    ("detectron2", "protocol 5"),
    ("detectron2", "torch.save"),
])
def test_model_zoo_files_of_numpy_arrays_still_load(tmp_path, layout, saved):
    """A real detectron2 or Detectron/Caffe2 model-zoo file of numpy arrays loads; the tensors equal its arrays."""
    model = build_model(load_cfg(QUICK))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    c2_names = {"conv1_w": "backbone.bottom_up.stem.conv1.weight",
                "res_conv1_bn_s": "backbone.bottom_up.stem.conv1.norm.weight",
                "res_conv1_bn_b": "backbone.bottom_up.stem.conv1.norm.bias",
                "res2_0_branch2a_w": "backbone.bottom_up.res2.0.conv1.weight"}
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(shapes[name]).astype(np.float32) for name in c2_names.values()}
    if layout == "detectron2":
        data = {"model": arrays, "__author__": "test"}
    else:  # Caffe2 names, matched by detectron2's heuristics; optimizer momenta are dropped
        data = {"blobs": {**{c2: arrays[d2] for c2, d2 in c2_names.items()},
                          "conv1_w_momentum": np.ones(shapes["backbone.bottom_up.stem.conv1.weight"], np.float32)}}
    path = str(tmp_path / ("R-18.pth" if saved == "torch.save" else "R-18.pkl"))
    if saved == "torch.save":
        torch.save(data, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=int(saved.split()[-1]))
    with captured_logs() as logs:
        Checkpointer(model, weights_check="warn").load(path)  # 4 tensors: a partial file loads only with 'warn'
    state = model.state_dict()
    for name, array in arrays.items():
        assert torch.equal(state[name], torch.from_numpy(array)), name
    n_params = len(list(model.backbone.bottom_up.parameters()))
    assert f"backbone.bottom_up: {len(arrays)}/{n_params} parameters" in summary(logs)


# ============================================================================================== 2. divergence
def fine_tune_at_lr_1e6(out, checkpoint_period, data_root):
    """From a run's model_final.pth into the same OUTPUT_DIR (--overwrite: the run moves to previous_run_*/, the
    weights are read from there) at SOLVER.BASE_LR 1e6 (no warmup): the first step stays finite, the second
    overflows. Returns the failed run's last line of stderr."""
    p = train_net(out, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "SOLVER.MAX_ITER", 6,
                  "SOLVER.BASE_LR", 1e6, "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", checkpoint_period,
                  data_root=data_root, check=False, flags=["--overwrite"])
    assert p.returncode != 0
    error = last_line(p.stderr)
    assert error.startswith("FloatingPointError: Training diverged:"), p.stderr[-3000:]
    assert "lower SOLVER.BASE_LR (now 1000000.0)" in error
    return error


@pytest.mark.slow
def test_divergence_tags_no_non_finite_checkpoint_and_resume_finishes(trained, data_root, tmp_path):
    """A far too high SOLVER.BASE_LR: nothing non-finite is written, the error names the checkpoint and the fix."""
    out = copy_of(trained, tmp_path)
    assert tag(out) == "model_final.pth"
    error = fine_tune_at_lr_1e6(out, 2, data_root)  # the save after the overflowing step (iteration 1) is refused
    assert "model_0000001.pth was not written. The last complete checkpoint is none" in error
    assert tag(out) is None and checkpoints(out) == []  # nothing non-finite written or tagged
    (previous,) = glob.glob(os.path.join(out, "previous_run_*"))  # the run it started from: moved, untouched
    assert tag(previous) == "model_final.pth"
    assert {name: non_finite(os.path.join(previous, name)) for name in checkpoints(previous)} == {
        name: [] for name in ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]}
    r = train_net(previous, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1, data_root=data_root,
                  flags=["--resume"])
    assert "-> model_final.pth; resuming at iter 2" in r.log
    final = os.path.join(previous, "model_final.pth")
    assert read(final)["iteration"] == 2 and non_finite(final) == []


@pytest.mark.slow
def test_divergence_caught_by_the_loss_check_names_the_last_checkpoint(trained, data_root, tmp_path):
    """Divergence caught by detectron2's own NaN check (no save in between): the error names checkpoint and fix."""
    out = copy_of(trained, tmp_path)
    error = fine_tune_at_lr_1e6(out, 100, data_root)  # no save before detectron2 sees the NaN
    assert "The last complete checkpoint is none (no checkpoint was written before the divergence)" in error
    assert tag(out) is None and checkpoints(out) == []
    (previous,) = glob.glob(os.path.join(out, "previous_run_*"))  # the run it started from: moved, untouched
    assert tag(previous) == "model_final.pth" and checkpoints(previous) == checkpoints(trained)
    assert all(non_finite(os.path.join(previous, name)) == [] for name in checkpoints(previous))


@pytest.mark.slow
def test_lowered_base_lr_takes_effect_on_resume(trained, data_root, tmp_path):
    """A user following the divergence advice (lower SOLVER.BASE_LR, then --resume) trains at the lower LR."""
    out = copy_of(trained, tmp_path)  # trained at the quickstart's SOLVER.BASE_LR 0.02
    train_net(out, "SOLVER.MAX_ITER", 3, "SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 0, data_root=data_root,
              flags=["--resume"])
    with open(os.path.join(out, "metrics.json")) as f:
        lrs = [rec["lr"] for rec in map(json.loads, filter(str.strip, f)) if rec.get("iteration") == 2]
    assert lrs == [pytest.approx(0.01)], lrs


# ============================================================================================== 3. killed while saving
@pytest.mark.slow
def test_killed_while_writing_model_final_then_resume_writes_it(data_root, tmp_path):
    """SIGKILL halfway through model_final.pth: no file under that name; --resume writes it, removes the temporary."""
    out = str(tmp_path / "run")
    opts = ["SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 2]  # the period divides MAX_ITER: iter 1 is saved first
    p = train_net(out, *opts, data_root=data_root, check=False, env={KILL_ENV: "model_final.pth"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.log[-3000:])
    assert checkpoints(out) == ["model_0000001.pth"] and tag(out) == "model_0000001.pth"
    left = temporaries(out)
    assert len(left) == 1 and re.fullmatch(r"model_final\.pth\.d2b-[0-9a-f]{8}\.tmp", left[0]), left
    r = train_net(out, *opts, data_root=data_root, flags=["--resume"])
    removed = removal_lines(r.log)
    assert len(removed) == 1 and left[0] in removed[0], removed
    assert temporaries(out) == [] and tag(out) == "model_final.pth"
    final, periodic = read(os.path.join(out, "model_final.pth")), read(os.path.join(out, "model_0000001.pth"))
    assert final["iteration"] == 1 and final["model"].keys() == periodic["model"].keys()
    assert all(torch.equal(final["model"][k], periodic["model"][k]) for k in final["model"])


@pytest.mark.slow
def test_external_sigkill_during_a_save_leaves_complete_files_and_resume_cleans_up(data_root, tmp_path):
    """SIGKILL from outside while a checkpoint is written: final names hold complete files; --resume cleans up."""
    out = str(tmp_path / "run")
    proc = start(train_net_args(out, "SOLVER.MAX_ITER", 1000, "SOLVER.CHECKPOINT_PERIOD", 1), data_root,
                 output=subprocess.DEVNULL)
    caught = False
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and not caught:
            # once a checkpoint is complete, catch the next one while it is written (it takes some tenths of a
            # second), at a random point of it
            writing = [n for n in temporaries(out) if n.startswith("model_")] if tag(out) else []
            if writing:
                time.sleep(random.uniform(0, 0.05))
                caught = os.path.exists(os.path.join(out, writing[0]))
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert caught, "no checkpoint write was caught in progress"
    assert proc.returncode == -signal.SIGKILL
    left = temporaries(out)
    assert [n for n in left if n.startswith("model_")], "the kill missed the write"
    for name in checkpoints(out):
        assert "model" in read(os.path.join(out, name)), name
    last = tag(out)
    assert last in checkpoints(out)
    it = read(os.path.join(out, last))["iteration"]
    r = train_net(out, "SOLVER.MAX_ITER", it + 2, "SOLVER.CHECKPOINT_PERIOD", 1, data_root=data_root,
                  flags=["--resume"])
    assert f"-> {last}; resuming at iter {it + 1}" in r.log
    removed = removal_lines(r.log)
    assert len(removed) == 1 and all(n in removed[0] for n in left), (left, removed)
    assert temporaries(out) == [] and tag(out) == "model_final.pth"


# ============================================================================================== 4./5. output files
@pytest.mark.slow
def test_checkpoints_get_the_umask_permissions_of_other_outputs(trained):
    """A run under umask 022 writes its checkpoints and last_checkpoint 0644, like config.yaml and metrics.json."""
    assert checkpoints(trained) == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    names = ["config.yaml", "metrics.json", "last_checkpoint"] + checkpoints(trained)
    modes = {n: oct(stat.S_IMODE(os.stat(os.path.join(trained, n)).st_mode)) for n in names}
    assert modes == {n: oct(0o644) for n in names}


@pytest.mark.slow
def test_max_to_keep_holds_across_resumes(trained, data_root, tmp_path):
    """SOLVER.MAX_TO_KEEP 2 keeps two periodic checkpoints in the directory, also after --resume."""
    out = copy_of(trained, tmp_path)  # its run kept model_0000000.pth and model_0000001.pth
    train_net(out, "SOLVER.MAX_TO_KEEP", 2, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.MAX_ITER", 4, data_root=data_root,
              flags=["--resume"])
    assert checkpoints(out) == ["model_0000002.pth", "model_0000003.pth", "model_final.pth"]


# ============================================================================================== 6. full disk
@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_bytes)`` -> a new tmpfs directory of that size (needs root); unmounted at teardown."""
    mounted = []

    def mount(size_bytes):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"a full disk is simulated with a small tmpfs, and mounting one needs root: {r.stderr.strip()}")
        mounted.append(d)
        return str(d)

    try:
        yield mount
    finally:
        for d in mounted:
            if subprocess.run(["umount", str(d)]).returncode != 0:
                subprocess.run(["umount", "-l", str(d)])


@pytest.mark.slow
@pytest.mark.parametrize("room", [0, 1], ids=["no_checkpoint_fits", "one_checkpoint_fits"])
def test_full_disk_names_the_file_its_size_and_the_last_complete_checkpoint(data_root, small_disk, room):
    """OUTPUT_DIR on a nearly full disk: a free-space warning at start, then a one-line ENOSPC error, no half file."""
    checkpoint = 2 * state_nbytes(build_model(load_cfg(QUICK)).state_dict())  # the model and SGD's momentum
    out = small_disk(2 * 2 ** 20 if room == 0 else int(1.5 * checkpoint))  # config.yaml and the log always fit
    p = train_net(out, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1, data_root=data_root, check=False)
    assert p.returncode != 0
    error = last_line(p.stderr)
    complete = ["model_0000000.pth"] if room else []
    last = os.path.join(out, complete[0]) if room else f"none (no checkpoint in {out})"
    assert f"No space left on device while writing {os.path.join(out, f'model_{room:07d}.pth')} (" in error, error
    assert error.endswith(f"MB); the last complete checkpoint is {last}"), error
    warning = re.search(r"has \d+ MB free; a checkpoint needs about \d+ MB, so fewer than three fit", p.log)
    assert warning and warning.start() < p.log.index("Starting training from iteration"), p.log[-3000:]
    assert checkpoints(out) == complete and temporaries(out) == []
    assert tag(out) == (complete[0] if room else None)
    for name in complete:
        assert non_finite(os.path.join(out, name)) == []  # reads back complete


# ============================================================================================== 7. wrong weights
@pytest.mark.parametrize("predictor", ["Predictor", "OptimizedPredictor"])
def test_predictors_refuse_ghostnet_weights_of_another_width(converted, predictor):
    """timm ghostnet_100 weights with a width-1.3 config: the predictors stop, naming the key, values and override."""
    cfg = load_cfg(GHOSTNET_130, ["MODEL.WEIGHTS", converted["ghostnet"].pth])
    with pytest.raises(WeightsMismatchError) as e:
        getattr(d2_backbones, predictor)(cfg)
    assert "MODEL.GHOSTNET.WIDTH: the weights need 1.0, the config has 1.3" in str(e.value)
    assert "Fix: add these overrides: MODEL.GHOSTNET.WIDTH 1.0" in str(e.value)


@pytest.mark.parametrize("predictor", ["Predictor", "OptimizedPredictor"])
def test_predictors_refuse_timm_vovnet_weights_without_last_ese_placement(converted, predictor):
    """timm ese_vovnet39b weights with the V-39-eSE config (eSE everywhere): stop, naming MODEL.VOVNET.ESE_PLACEMENT."""
    cfg = load_cfg(VOVNET_39, ["MODEL.WEIGHTS", converted["vovnet"].pth])
    with pytest.raises(WeightsMismatchError) as e:
        getattr(d2_backbones, predictor)(cfg)
    assert "MODEL.VOVNET.ESE_PLACEMENT: the weights need 'last'" in str(e.value)
    assert "Fix: add these overrides: MODEL.VOVNET.ESE_PLACEMENT last" in str(e.value)


def test_weights_check_warn_loads_mismatched_vovnet_weights_with_a_warning(converted):
    """MODEL.WEIGHTS_CHECK warn (experts): the same VoVNet weights load, with a WARNING naming the key."""
    c = converted["vovnet"]
    with captured_logs() as logs:
        predictor = d2_backbones.Predictor(load_cfg(VOVNET_39, ["MODEL.WEIGHTS", c.pth, "MODEL.WEIGHTS_CHECK", "warn"]))
    warned = warnings_in(logs)
    assert any("MODEL.VOVNET.ESE_PLACEMENT" in w and "loading anyway" in w for w in warned), warned
    weights, state = read(c.pth)["model"], predictor.model.state_dict()
    shared = [k for k, v in weights.items() if k in state and state[k].shape == v.shape]
    assert len(shared) > 100 and all(torch.equal(state[k], weights[k]) for k in shared)


def test_converted_vovnet_detectron2_weights_load_into_the_shipped_config(converted):
    """Converted vovnet-detectron2 weights (eSE everywhere, as the shipped config builds) load with no override."""
    with captured_logs() as logs:
        d2_backbones.Predictor(load_cfg(VOVNET_39, ["MODEL.WEIGHTS", converted["vovnet-d2"].pth]))
    assert warnings_in(logs) == [] and FULL_BOTTOM_UP.search(summary(logs))


# ============================================================================================== 8. converter output
@pytest.mark.parametrize("family", ["resnet", "ghostnet", "vovnet"])
def test_converter_yaml_and_printed_overrides_are_usable_as_is(converted, family, data_root, tmp_path, monkeypatch):
    """The .yaml beside converted weights merges into the family config, the printed line passes setup(); both load."""
    c = converted[family]
    assert c.overrides.startswith(f"MODEL.WEIGHTS {c.pth} ")
    assert 'MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]"' in c.overrides  # lists quoted for the shell
    cfg = load_cfg(c.config)
    cfg.merge_from_file(c.yaml)
    assert {k: cfg_value(cfg, k) for k in c.meta["config"]} == c.meta["config"]
    assert_loads_cleanly(cfg, c.pth)
    monkeypatch.setenv("D2B_DATASETS", data_root)
    args = argument_parser().parse_args(["--config-file", c.config, "OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu",
                                         "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]  # no dataset registration here
                                        + shlex.split(c.overrides))
    cfg = setup(args)
    assert cfg.MODEL.WEIGHTS == c.pth
    assert {k: cfg_value(cfg, k) for k in c.meta["config"]} == c.meta["config"]
    assert_loads_cleanly(cfg, c.pth)


@pytest.mark.slow
def test_printed_overrides_pasted_on_train_net_train_from_the_weights(converted, data_root, tmp_path):
    """python -m d2_backbones.convert, its printed line pasted on a train_net command line: all loaded, no WARNING."""
    dst = str(tmp_path / "r18.pth")
    p = python(["-m", "d2_backbones.convert", converted["resnet"].source, dst])
    assert p.returncode == 0, p.log[-3000:]
    r = train_net(str(tmp_path / "run"), "SOLVER.MAX_ITER", 1, *shlex.split(last_line(p.stdout)), data_root=data_root)
    assert f"Loading from {dst}" in r.log and FULL_BOTTOM_UP.search(r.log), r.log[-3000:]
    assert not LOAD_WARNING.search(r.log), LOAD_WARNING.findall(r.log)


def test_printed_overrides_survive_a_path_with_a_space(converted, tmp_path):
    """A user converting into a folder with a space in its name can still paste the printed line."""
    dst = tmp_path / "my weights" / "r18.pth"
    dst.parent.mkdir()
    words = shlex.split(last_line(convert(converted["resnet"].source, dst)))
    assert words[:2] == ["MODEL.WEIGHTS", str(dst)], words[:3]


# ============================================================================================== 9. load summary
def test_empty_checkpoint_summary_reports_nothing_loaded(tmp_path):
    """A weights file without tensors: the summary says 0 parameters, 0 buffers of backbone.bottom_up loaded."""
    path = str(tmp_path / "empty.pth")
    torch.save({"model": {}}, path)
    with captured_logs() as logs:
        predictor = d2_backbones.Predictor(load_cfg(QUICK, ["MODEL.WEIGHTS", path]))
    bottom_up = predictor.model.backbone.bottom_up
    n_params = len(list(bottom_up.parameters()))
    n_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bottom_up.modules())
    assert n_params and n_norms
    # running_mean and running_var of each norm; num_batches_tracked is not a weight and not counted
    assert f"backbone.bottom_up: 0/{n_params} parameters, 0/{2 * n_norms} buffers (initialised)" in summary(logs)
