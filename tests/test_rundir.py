"""An output directory belongs to one run (d2_backbones.rundir): lock, previous runs, pruning, MAX_TO_KEEP, ENOSPC.

In process: the lock against another process (a forked child), a killed holder, the refusal and ``--overwrite``
of a previous run, pruning that never removes the tagged or a newer file, ``MAX_TO_KEEP`` values, event writers
on a full disk. Through ``train_net.py`` and ``python -m d2_backbones.lazy_train`` (slow): two trainers on one
directory, a fresh run over a previous run (refused, ``--overwrite``, then ``--resume``), ``MAX_TO_KEEP -1``,
``MAX_ITER`` lowered below the last checkpoint, ``ENOSPC`` while writing ``metrics.json``.
"""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch

from detectron2.utils.events import EventStorage, JSONWriter

from d2_backbones import ConfigError
from d2_backbones.rundir import (LOCK_NAME, OutputDirInUseError, _release, check_max_to_keep, claim_output_dir,
                                 guard_writers, lock_output_dir, no_space_left, previous_run)
from d2_backbones.data import make_shapes
from d2_backbones.weights import Checkpointer, CheckpointWriteError, PeriodicCheckpointer

from conftest import CONFIG_DIR, REPO

TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
TINY = ["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 2, "TEST.OPTIMIZE_FOR_INFERENCE", False,
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 96]


def _args(**kw):
    return Namespace(**{"resume": False, "eval_only": False, "overwrite": False, **kw})


def _hold_lock_in_child(directory):
    """A forked child process that takes the lock of ``directory`` and sleeps; returns its pid once it holds it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            lock_output_dir(directory)
            os.write(w, b"1")
            time.sleep(300)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------- the lock
def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    d = str(tmp_path / "out")
    pid = _hold_lock_in_child(d)
    try:
        with pytest.raises(OutputDirInUseError) as e:
            claim_output_dir(d, _args())
        msg = str(e.value)
        assert msg.startswith(f"OUTPUT_DIR {d} is in use by another run (pid {pid} on host "), msg
        assert "command line: " in msg and "started " in msg and "choose another OUTPUT_DIR" in msg
        # evaluation does not need the directory to itself
        assert claim_output_dir(d, _args(eval_only=True)).lock is None
    finally:
        _kill(pid)
    assert claim_output_dir(d, _args()).lock == os.path.join(d, LOCK_NAME)  # SIGKILL left no stale lock
    holder = json.load(open(os.path.join(d, LOCK_NAME)))
    assert holder["pid"] == os.getpid()
    _release(d)


def test_a_forked_worker_does_not_keep_the_run_lock(tmp_path):
    """Data-loader workers are forked from the run: when the run is gone, its lock is free, workers or not."""
    d = str(tmp_path / "out")
    lock_output_dir(d)
    worker = os.fork()
    if worker == 0:
        time.sleep(300)
        os._exit(0)
    try:
        _release(d)  # the run ends (as at exit); its forked worker still lives
        pid = _hold_lock_in_child(d)
        _kill(pid)
    finally:
        _kill(worker)


# ---------------------------------------------------------------------------------------------- a previous run
def _previous_run(d):
    os.makedirs(d, exist_ok=True)
    for name in ["model_0000019.pth", "model_0000039.pth", "model_final.pth", "metrics.json", "config.yaml",
                 "log.txt", "notes.md"]:
        open(os.path.join(d, name), "w").write(name)
    open(os.path.join(d, "last_checkpoint"), "w").write("model_0000039.pth")


def test_a_fresh_run_over_a_previous_run_is_refused_and_overwrite_moves_it_aside(tmp_path):
    d = str(tmp_path / "out")
    _previous_run(d)
    with pytest.raises(ConfigError) as e:
        claim_output_dir(d, _args())
    assert str(e.value) == (
        f"OUTPUT_DIR {d} holds a previous run (last_checkpoint -> model_0000039.pth, 3 checkpoint files, "
        f"metrics.json): continue it with --resume, choose another OUTPUT_DIR, or pass --overwrite to move its files "
        f"to {d}/previous_run_<YYYYmmdd-HHMMSS>/")
    assert sorted(os.listdir(d)) == sorted(["model_0000019.pth", "model_0000039.pth", "model_final.pth",
                                            "metrics.json", "config.yaml", "log.txt", "notes.md", "last_checkpoint",
                                            LOCK_NAME])  # nothing moved
    assert claim_output_dir(d, _args(resume=True)).moved == {}  # --resume continues it
    with pytest.raises(ConfigError, match="pass one of them"):
        claim_output_dir(d, _args(resume=True, overwrite=True))
    claim = claim_output_dir(d, _args(overwrite=True))
    (moved_to,) = glob.glob(os.path.join(d, "previous_run_*"))
    assert re.fullmatch(r"previous_run_\d{8}-\d{6}", os.path.basename(moved_to))
    assert sorted(os.listdir(d)) == sorted([LOCK_NAME, "notes.md", os.path.basename(moved_to)])  # not ours: stays
    assert sorted(os.listdir(moved_to)) == ["config.yaml", "last_checkpoint", "log.txt", "metrics.json",
                                            "model_0000019.pth", "model_0000039.pth", "model_final.pth"]
    assert open(os.path.join(moved_to, "model_0000039.pth")).read() == "model_0000039.pth"
    # MODEL.WEIGHTS naming a moved file is read from its new place
    assert claim.moved_path(os.path.join(d, "model_final.pth")) == os.path.join(moved_to, "model_final.pth")
    assert claim.moved_path("detectron2://ImageNetPretrained/MSRA/R-50.pkl") == \
        "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert previous_run(d) is None  # the next fresh run starts
    _release(d)


def test_a_log_or_config_alone_is_no_previous_run(tmp_path):
    """A run that stopped at a config error left log.txt / config.yaml, one that stopped before logging (refused
    weights, an unreadable image at iteration 0) an empty metrics.json: rerunning with the fix is not refused. A
    weights file of the user's kept there is no checkpoint of a run either, and --overwrite leaves it alone."""
    d = str(tmp_path / "out")
    os.makedirs(d)
    for name in ["log.txt", "config.yaml", "imagenet_r50.pth"]:
        open(os.path.join(d, name), "w").write("x")
    open(os.path.join(d, "metrics.json"), "w").close()
    assert previous_run(d) is None
    claim_output_dir(d, _args())
    _release(d)
    open(os.path.join(d, "metrics.json"), "w").write('{"iteration": 19}\n')
    assert previous_run(d) == "metrics.json"
    claim = claim_output_dir(d, _args(overwrite=True))
    _release(d)
    assert sorted(os.path.basename(p) for p in claim.moved) == ["config.yaml", "log.txt", "metrics.json"]
    assert os.path.isfile(os.path.join(d, "imagenet_r50.pth"))


# ---------------------------------------------------------------------------------------------- pruning
def _tiny(tmp_path):
    model = torch.nn.Linear(2, 2)
    return model, Checkpointer(model, str(tmp_path))


def test_pruning_keeps_this_runs_checkpoints_beside_an_older_runs_higher_numbered_ones(tmp_path):
    """Before: the older run's model_0000029/39 were counted as newest and this run's own file deleted right after
    it was written, leaving last_checkpoint naming a deleted file."""
    model, cp = _tiny(tmp_path)
    for it in (29, 39):
        cp.save(f"model_{it:07d}")
    hook = PeriodicCheckpointer(cp, period=1, max_iter=100, max_to_keep=1)
    hook.step(0)
    assert os.path.isfile(os.path.join(tmp_path, cp.last_complete())), cp.last_complete()
    hook.step(1)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == [
        "model_0000001.pth", "model_0000029.pth", "model_0000039.pth"]
    assert cp.last_complete() == "model_0000001.pth"


def test_pruning_never_removes_the_tagged_file_or_a_newer_one(tmp_path):
    model, cp = _tiny(tmp_path)
    for it in range(6):
        cp.save(f"model_{it:07d}")
    with open(os.path.join(tmp_path, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")  # e.g. a save of 3..5 still in flight elsewhere: 2 is the last complete one
    PeriodicCheckpointer(cp, period=1, max_to_keep=1).prune(5)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == [
        f"model_{i:07d}.pth" for i in range(2, 6)]


# ---------------------------------------------------------------------------------------------- MAX_TO_KEEP
def test_max_to_keep_zero_and_minus_one_keep_all_other_negatives_are_refused(tmp_path):
    assert check_max_to_keep(0) is None and check_max_to_keep(-1) is None and check_max_to_keep(3) == 3
    with pytest.raises(ConfigError) as e:
        check_max_to_keep(-2, "SOLVER.MAX_TO_KEEP")
    assert str(e.value) == ("SOLVER.MAX_TO_KEEP=-2 is not valid. Valid values: a positive number of periodic "
                            "checkpoints to keep, or 0 / -1 to keep them all. Fix: set SOLVER.MAX_TO_KEEP 0 to keep "
                            "every checkpoint.")
    model, cp = _tiny(tmp_path)
    hook = PeriodicCheckpointer(cp, period=1, max_iter=100, max_to_keep=-1)  # before: every periodic file deleted
    for it in range(3):
        hook.step(it)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == [f"model_{i:07d}.pth" for i in range(3)]


def test_setup_refuses_a_negative_max_to_keep_before_the_model(tmp_path, monkeypatch):
    from d2_backbones.lazy_train import setup as lazy_setup
    from d2_backbones.train import argument_parser, setup

    monkeypatch.setenv("D2B_DATASETS", str(tmp_path / "datasets"))  # nothing is generated: refused before
    args = argument_parser().parse_args(["--config-file", QUICK, "OUTPUT_DIR", str(tmp_path / "a"), "MODEL.DEVICE",
                                         "cpu", "SOLVER.MAX_TO_KEEP", "-3"])
    with pytest.raises(ConfigError, match=r"^SOLVER.MAX_TO_KEEP=-3 is not valid\. Valid values: .* 0 / -1 to keep"):
        setup(args)
    fcos = os.path.join(CONFIG_DIR, "GhostNet", "fcos_ghostnet_100_FPN_1x.py")
    args = argument_parser().parse_args(["--config-file", fcos, f"train.output_dir={tmp_path / 'b'}",
                                         "train.device=cpu", "train.checkpointer.max_to_keep=-2"])
    with pytest.raises(ConfigError, match=r"^train.checkpointer.max_to_keep=-2 is not valid"):
        lazy_setup(args)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "datasets").exists()


# ---------------------------------------------------------------------------------------------- full disk
class _FullDisk:
    def __init__(self, f):
        self._f, self.name = f, f.name

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_event_writers_and_other_files_on_a_full_disk_name_the_file_and_the_last_checkpoint(tmp_path):
    model, cp = _tiny(tmp_path)
    cp.save("model_0000004")
    writer = JSONWriter(os.path.join(tmp_path, "metrics.json"))
    writer._file_handle = _FullDisk(writer._file_handle)
    (guarded,) = guard_writers([writer], str(tmp_path))
    with EventStorage(5) as storage:
        storage.put_scalar("total_loss", 1.0)
        with pytest.raises(CheckpointWriteError) as e:
            guarded.write()
    assert str(e.value) == (f"No space left on device while writing {tmp_path / 'metrics.json'}; the last complete "
                            f"checkpoint is {tmp_path / 'model_0000004.pth'}")
    assert e.value.errno == errno.ENOSPC
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointWriteError, match=r"while writing .*config.yaml; the last complete checkpoint is "
                                                   r"none \(no checkpoint in .*empty\)$"):
        with no_space_left(str(empty / "config.yaml"), str(empty)):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission denied"):  # other errors pass unchanged
        with no_space_left(str(empty / "config.yaml"), str(empty)):
            raise OSError(errno.EACCES, "Permission denied")


def test_evaluation_outputs_on_a_full_disk_name_the_folder(tmp_path, monkeypatch):
    """train_net's evaluator (COCOEvaluator writes coco_instances_results.json and instances_predictions.pth)."""
    from detectron2.evaluation import COCOEvaluator

    from d2_backbones import get_cfg
    from d2_backbones.train import Trainer, register_coco_datasets

    root = make_shapes(str(tmp_path / "tiny"), n_train=1, n_val=1, size=64, seed=5)
    register_coco_datasets([("rundir_eval_val", f"{root}/annotations/val.json", f"{root}/val")])
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(COCOEvaluator, "evaluate", full)
    evaluator = Trainer.build_evaluator(cfg, "rundir_eval_val")
    with pytest.raises(CheckpointWriteError) as e:
        evaluator.evaluate()
    folder = tmp_path / "out" / "inference" / "rundir_eval_val"
    assert str(e.value) == (f"No space left on device while writing {folder}; the last complete checkpoint is none "
                            f"(no checkpoint in {tmp_path / 'out'})")


# ---------------------------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"))  # the quickstart's default (train_net regenerates any other)
    return str(root)


def _env(data_root):
    env = dict(os.environ, D2B_DATASETS=data_root, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _train_net(out, *opts, data_root, flags=(), check=True, prefix=()):
    cmd = [sys.executable, *prefix, TRAIN_NET, "--config-file", QUICK, *flags, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu",
           *TINY, *opts]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(data_root), timeout=900,
                       cwd=REPO)
    if check:
        assert p.returncode == 0, f"train_net failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _pth(d):
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(d, "*.pth")))


def _iteration(path):
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    """A finished 4-iteration run, a checkpoint every iteration, SOLVER.MAX_TO_KEEP -1."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    _train_net(out, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.MAX_TO_KEEP", -1, data_root=data_root)
    return out


@pytest.mark.slow
def test_train_net_max_to_keep_minus_one_keeps_every_checkpoint(finished_run):
    assert _pth(finished_run) == [f"model_{i:07d}.pth" for i in range(4)] + ["model_final.pth"]


@pytest.mark.slow
def test_train_net_fresh_run_over_a_previous_run_refused_overwrite_then_resume(finished_run, data_root, tmp_path):
    out = shutil.copytree(finished_run, str(tmp_path / "run"))
    opts = ["SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.MAX_TO_KEEP", 1]
    p = _train_net(out, *opts, data_root=data_root, check=False)
    assert p.returncode != 0
    assert _last_line(p.stderr).endswith(
        f"OUTPUT_DIR {out} holds a previous run (last_checkpoint -> model_final.pth, 5 checkpoint files, "
        f"metrics.json): continue it with --resume, choose another OUTPUT_DIR, or pass --overwrite to move its "
        f"files to {out}/previous_run_<YYYYmmdd-HHMMSS>/"), p.stderr[-3000:]
    assert "Building" not in p.stdout + p.stderr and _pth(out) == _pth(finished_run)
    p = _train_net(out, *opts, data_root=data_root, flags=["--overwrite"])
    (old,) = glob.glob(os.path.join(out, "previous_run_*"))
    assert _pth(old) == _pth(finished_run) and os.path.isfile(os.path.join(old, "metrics.json"))
    assert "--overwrite: moved the previous run's" in p.stdout + p.stderr
    # this run's own checkpoints survive its MAX_TO_KEEP 1 beside the older, higher-numbered files
    assert _pth(out) == ["model_0000001.pth", "model_final.pth"]
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"
    assert max(json.loads(line)["iteration"] for line in open(os.path.join(out, "metrics.json"))) == 1
    r = _train_net(out, "SOLVER.MAX_ITER", 3, data_root=data_root, flags=["--resume"])
    assert "-> model_final.pth; resuming at iter 2" in r.stdout + r.stderr


@pytest.mark.slow
def test_train_net_lowered_max_iter_labels_model_final_with_its_iteration(finished_run, data_root, tmp_path):
    """Killed after model_0000003.pth (no final), resumed with MAX_ITER 2: model_final.pth holds iteration 3."""
    out = shutil.copytree(finished_run, str(tmp_path / "run"))
    os.replace(os.path.join(out, "model_final.pth"), os.path.join(out, "model_0000003.pth"))  # the same state
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000003.pth")
    r = _train_net(out, "SOLVER.MAX_ITER", 2, data_root=data_root, flags=["--resume"])
    assert "SOLVER.MAX_ITER=2 is below the checkpoint's iteration 3: nothing is left to train." in r.stdout + r.stderr
    assert _iteration(os.path.join(out, "model_final.pth")) == 3
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    last = torch.load(os.path.join(out, "model_0000003.pth"), map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(final[k], last[k]) for k in last)


@pytest.mark.slow
def test_train_net_two_trainers_on_one_directory(data_root, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, TRAIN_NET, "--config-file", QUICK, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu", *TINY,
           "SOLVER.MAX_ITER", 100000, "SOLVER.CHECKPOINT_PERIOD", 100000]
    first = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_env(data_root), cwd=REPO)
    try:
        deadline, lock, log = time.time() + 300, os.path.join(out, LOCK_NAME), os.path.join(out, "log.txt")
        while not (os.path.exists(lock) and os.path.getsize(lock)):  # the first run holds the lock
            if os.path.exists(log) and "Starting training from iteration" in open(log).read():
                break  # it trains (and took no lock)
            assert first.poll() is None and time.time() < deadline, "the first trainer stopped or did not start"
            time.sleep(0.2)
        second = _train_net(out, "SOLVER.MAX_ITER", 2, data_root=data_root, check=False)
        assert second.returncode != 0
        error = _last_line(second.stderr)
        assert f"OUTPUT_DIR {out} is in use by another run (pid {first.pid} on host " in error, second.stderr[-3000:]
        assert "train_net.py --config-file" in error and "choose another OUTPUT_DIR" in error
        assert first.poll() is None  # the first run goes on
        resumed = _train_net(out, "SOLVER.MAX_ITER", 2, data_root=data_root, flags=["--resume"], check=False)
        assert f"pid {first.pid} on host" in _last_line(resumed.stderr)  # --resume is refused too
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed: no stale lock; --resume continues (or starts) in the same directory
    _train_net(out, "SOLVER.MAX_ITER", 1, data_root=data_root, flags=["--resume"])


_INJECT_ENOSPC = """
import errno, runpy, sys
import detectron2.utils.events as ev

class Full:
    def __init__(self, f):
        self._f, self.name = f, f.name
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self._f, name)

init = ev.JSONWriter.__init__
def full_init(self, json_file, *args, **kwargs):
    init(self, json_file, *args, **kwargs)
    self._file_handle = Full(self._file_handle)
ev.JSONWriter.__init__ = full_init
script = sys.argv[1]
sys.argv = sys.argv[1:]
if script == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_train_net_full_disk_while_writing_metrics_json(data_root, tmp_path):
    out = str(tmp_path / "run")
    p = _train_net(out, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1, data_root=data_root, check=False,
                   prefix=["-c", _INJECT_ENOSPC])
    assert p.returncode != 0
    assert _last_line(p.stderr) == (
        f"d2_backbones.weights.checkpointer.CheckpointWriteError: No space left on device while writing "
        f"{os.path.join(out, 'metrics.json')}; the last complete checkpoint is {os.path.join(out, 'model_final.pth')}"
    ), p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- lazy_train (slow)
def _lazy(out, *opts, data_root, flags=(), prefix=()):
    shapes = os.path.join(data_root, "shapes")
    cmd = [sys.executable, *prefix, "-m", "d2_backbones.lazy_train",
           "--config-file", os.path.join(CONFIG_DIR, "GhostNet", "fcos_ghostnet_100_FPN_1x.py"),
           "--register-coco", "rundir_tiny", os.path.join(shapes, "annotations", "train.json"),
           os.path.join(shapes, "train"), "--num-classes", "auto", *flags,
           "train.device=cpu", f"train.output_dir={out}", "train.log_period=1", "train.eval_period=0",
           "train.init_checkpoint=", "optimizer.lr=0.0001", "model.backbone.bottom_up.norm=BN",
           "dataloader.evaluator=null", "dataloader.train.dataset.names=rundir_tiny",
           "dataloader.test.dataset.names=rundir_tiny", "dataloader.train.total_batch_size=2",
           "dataloader.train.num_workers=0", "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
           "dataloader.train.mapper.augmentations.0.max_size=96", *opts]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(data_root), timeout=900,
                          cwd=str(os.path.dirname(out)))


@pytest.mark.slow
def test_lazy_train_directory_in_use_full_disk_previous_run_and_overwrite(data_root, tmp_path):
    out = str(tmp_path / "lazy")
    holder = _hold_lock_in_child(out)
    try:
        p = _lazy(out, "train.max_iter=1", data_root=data_root)
        assert p.returncode != 0
        assert f"train.output_dir {out} is in use by another run (pid {holder} on host " in _last_line(p.stderr), \
            p.stderr[-3000:]
    finally:
        _kill(holder)
    # a full disk at metrics.json names it; MAX_TO_KEEP -1 kept every periodic checkpoint
    p = _lazy(out, "train.max_iter=2", "train.checkpointer.period=1", "train.checkpointer.max_to_keep=-1",
              "train.log_period=2", data_root=data_root, prefix=["-c", _INJECT_ENOSPC])
    assert p.returncode != 0
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert _last_line(p.stderr) == (
        f"d2_backbones.weights.checkpointer.CheckpointWriteError: No space left on device while writing "
        f"{os.path.join(out, 'metrics.json')}; the last complete checkpoint is {os.path.join(out, last)}"
    ), p.stderr[-3000:]
    assert _pth(out) == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"] and last == "model_final.pth"
    # a fresh run over it is refused; --overwrite moves it aside
    p = _lazy(out, "train.max_iter=1", data_root=data_root)
    assert p.returncode != 0
    metrics = ", metrics.json" if os.path.getsize(os.path.join(out, "metrics.json")) else ""  # the full disk: empty
    assert _last_line(p.stderr).endswith(
        f"train.output_dir {out} holds a previous run (last_checkpoint -> {last}, {len(_pth(out))} checkpoint files"
        f"{metrics}): continue it with --resume, choose another train.output_dir, or pass --overwrite to move its "
        f"files to {out}/previous_run_<YYYYmmdd-HHMMSS>/"), p.stderr[-3000:]
    before = _pth(out)
    p = _lazy(out, "train.max_iter=1", "train.checkpointer.period=1", data_root=data_root, flags=["--overwrite"])
    assert p.returncode == 0, p.stderr[-3000:]
    (old,) = glob.glob(os.path.join(out, "previous_run_*"))
    assert _pth(old) == before and _pth(out) == ["model_0000000.pth", "model_final.pth"]


@pytest.mark.slow
def test_train_net_eval_only_keeps_the_training_runs_config(finished_run, data_root, tmp_path):
    """--eval-only in a training run's directory: detectron2's default_setup would overwrite its config.yaml."""
    out = shutil.copytree(finished_run, str(tmp_path / "run"))
    before = open(os.path.join(out, "config.yaml")).read()
    _train_net(out, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "INPUT.MIN_SIZE_TEST", 96,
               data_root=data_root, flags=["--eval-only"])
    assert open(os.path.join(out, "config.yaml")).read() == before
    evaluated = open(os.path.join(out, "config_eval.yaml")).read()
    assert "MIN_SIZE_TEST: 96" in evaluated and evaluated != before


@pytest.mark.slow
def test_train_net_overwrite_with_two_processes_reads_the_moved_weights_in_every_rank(finished_run, data_root,
                                                                                      tmp_path):
    """--overwrite in a two-process run: rank 0 moves the previous run aside and every rank reads MODEL.WEIGHTS
    from its new place (the other ranks wait for the move and learn where the files went)."""
    out = shutil.copytree(finished_run, str(tmp_path / "run"))
    weights = os.path.join(out, "model_final.pth")
    p = _train_net(out, "SOLVER.MAX_ITER", 1, "MODEL.WEIGHTS", weights, data_root=data_root,
                   flags=["--overwrite", "--num-gpus", 2])
    moved = glob.glob(os.path.join(out, "previous_run_*", "model_final.pth"))
    assert len(moved) == 1, os.listdir(out)
    assert f"it is read from {moved[0]}" in p.stdout + p.stderr
    assert _pth(out) == ["model_final.pth"] and _iteration(os.path.join(out, "model_final.pth")) == 0
    assert not glob.glob(os.path.join(out, "previous_run_*", "log.txt.rank1"))  # rank 1 logged after the move
