"""Starting the trainers on the launchers clusters use: torchrun (two "nodes" on loopback, elastic restarts), SLURM's
srun (a faked environment), and the same parameters as one process. Fast tier: the node-list and environment readers,
the refusals, the rendezvous errors, the elastic claim of the output directory. Slow tier: real processes on
127.0.0.1, each run bounded by a timeout."""
import argparse
import datetime
import fcntl
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from d2_backbones.data import make_shapes
from d2_backbones.launch import (DistEnv, DistributedSetupError, _rendezvous, check_launch_flags, distributed_env,
                                 elastic_restart, expand_nodelist, first_host, slurm_port, tasks_per_node,
                                 timeout_from_env)
from d2_backbones.rundir import LOCK_NAME, _release, claim_output_dir

from conftest import CONFIG_DIR, REPO, captured_logs
from test_train_net import _env, _free_port, _metrics

QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")
QUICK_PY = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes_short.py")
LAUNCH_VARS = re.compile(r"^(SLURM_.*|TORCHELASTIC_.*|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
                         r"MASTER_ADDR|MASTER_PORT|D2B_LAUNCHER|D2B_RDZV_TIMEOUT|D2B_DIST_TIMEOUT)$")


# ------------------------------------------------------------------------------------------ SLURM's lists (fast)
@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[09-11]", ["n09", "n10", "n11"]),
    ("rack[1-2]-gpu[0-1]", ["rack1-gpu0", "rack1-gpu1", "rack2-gpu0", "rack2-gpu1"]),
    ("a[3],b-1,c[1-2]", ["a3", "b-1", "c1", "c2"]),
])
def test_nodelist_expansion_and_first_host(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


def test_first_host_of_a_huge_range_is_read_without_expanding_it():
    assert first_host("big[000001-999999],x") == "big000001"


@pytest.mark.parametrize("bad", ["", "node[a-b]", "node[1-]"])
def test_unreadable_nodelist_names_the_variable_and_master_addr(bad):
    with pytest.raises(DistributedSetupError, match=r"SLURM_JOB_NODELIST=.* is not a SLURM node list .*MASTER_ADDR"):
        first_host(bad)


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(DistributedSetupError, match=r"SLURM_STEP_TASKS_PER_NODE='x2' is not a SLURM task count"):
        tasks_per_node("x2")


def test_timeouts_from_the_environment():
    assert timeout_from_env("D2B_RDZV_TIMEOUT", 600, {}) == datetime.timedelta(seconds=600)
    assert timeout_from_env("D2B_RDZV_TIMEOUT", 600, {"D2B_RDZV_TIMEOUT": "2.5"}).total_seconds() == 2.5
    for bad in ("0", "-3", "soon", "inf"):
        with pytest.raises(DistributedSetupError, match=rf"D2B_RDZV_TIMEOUT='{bad}' is not valid. Valid values: a "
                                                        r"number of seconds > 0"):
            timeout_from_env("D2B_RDZV_TIMEOUT", 600, {"D2B_RDZV_TIMEOUT": bad})


# ------------------------------------------------------------------------------------------ environments (fast)
def _args(**kw):
    base = dict(num_gpus=1, num_machines=1, machine_rank=0, resume=False, overwrite=False, eval_only=False)
    return argparse.Namespace(**{**base, **kw})


TORCHRUN = {"TORCHELASTIC_RUN_ID": "job7", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "0"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_no_launcher_in_the_environment_means_detectron2_launch():
    assert distributed_env(_args(), {}) is None
    assert distributed_env(_args(), {**TORCHRUN, "D2B_LAUNCHER": "launch"}) is None  # the opt-out
    with pytest.raises(DistributedSetupError, match=r"D2B_LAUNCHER='mpi' is not valid. Valid values: 'auto'"):
        distributed_env(_args(), {"D2B_LAUNCHER": "mpi"})


def test_torchrun_environment():
    d = distributed_env(_args(), TORCHRUN)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("torchrun", 3, 4, 1, 2)
    assert (d.master_addr, d.master_port, d.run_id, d.restart_count) == ("10.0.0.1", 29500, "job7", 0)


def test_torchrun_refuses_the_launch_flags_with_the_reason():
    d = distributed_env(_args(), TORCHRUN)
    with pytest.raises(DistributedSetupError, match=r"--num-gpus 2 with torchrun: torchrun already started this "
                                                    r"process as rank 3 of 4 \(2 per node\).*Fix: leave out "
                                                    r"--num-gpus.*torchrun --nnodes N --nproc-per-node K"):
        check_launch_flags(_args(num_gpus=2), d)
    with pytest.raises(DistributedSetupError, match=r"--num-machines 2 --machine-rank 1 with torchrun"):
        check_launch_flags(_args(num_machines=2, machine_rank=1), d)
    check_launch_flags(_args(), d)  # the defaults are fine


@pytest.mark.parametrize("change,message", [
    ({"RANK": "4"}, r"RANK=4 but WORLD_SIZE=4: ranks go from 0 to 3"),
    ({"WORLD_SIZE": "3", "RANK": "0"}, r"WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2"),
    ({"RANK": "x"}, r"RANK='x' is not valid. Valid values: an integer >= 0"),
    ({"MASTER_PORT": None}, r"MASTER_PORT is not: every process needs the address of rank 0"),
])
def test_inconsistent_torch_variables_are_named(change, message):
    env = {k: v for k, v in {**TORCHRUN, **change}.items() if v is not None}
    with pytest.raises(DistributedSetupError, match=message):
        distributed_env(_args(), env)


def test_other_launcher_needs_the_local_sizes():
    env = {k: v for k, v in TORCHRUN.items() if not k.startswith(("TORCHELASTIC", "LOCAL"))}
    with pytest.raises(DistributedSetupError, match=r"LOCAL_RANK and LOCAL_WORLD_SIZE are not"):
        distributed_env(_args(), env)
    d = distributed_env(_args(), {**env, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert d.launcher == "env" and d.restart_count == 0


def test_slurm_environment():
    d = distributed_env(_args(), SLURM)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert (d.master_addr, d.master_port) == ("gpu07", slurm_port("123456"))
    assert 20000 <= d.master_port < 40000
    d = distributed_env(_args(), {**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234",
                                  "SLURM_STEP_NODELIST": "gpu[08-09]"})
    assert (d.master_addr, d.master_port) == ("head", 1234)
    d = distributed_env(_args(), {**SLURM, "SLURM_STEP_NODELIST": "gpu[08-09]"})  # the step's nodes first
    assert d.master_addr == "gpu08"


def test_slurm_with_launch_flags_or_one_task_is_detectron2_launch():
    # detectron2's recipe: one task per node, --num-gpus processes spawned by launch
    assert distributed_env(_args(num_gpus=8, num_machines=2), SLURM) is None
    assert distributed_env(_args(), {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    # srun's step count wins over the allocation's
    assert distributed_env(_args(), {**SLURM, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None


@pytest.mark.parametrize("change,message", [
    ({"SLURM_STEP_TASKS_PER_NODE": "4,3", "SLURM_NTASKS": "7"}, r"SLURM_STEP_TASKS_PER_NODE='4,3': the nodes run "
                                                                 r"different numbers of tasks.*--ntasks-per-node"),
    ({"SLURM_NODEID": "0"}, r"SLURM_PROCID=5 on SLURM_NODEID=0 .*--distribution=block"),
    ({"SLURM_JOB_NODELIST": None}, r"neither MASTER_ADDR nor SLURM_JOB_NODELIST.*export MASTER_ADDR"),
    ({"SLURM_JOB_ID": None}, r"MASTER_PORT is not set and SLURM_JOB_ID is not a job number"),
    ({"SLURM_PROCID": "8"}, r"SLURM_PROCID=8 but SLURM_NTASKS=8"),
])
def test_slurm_inconsistencies_are_named(change, message):
    env = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(DistributedSetupError, match=message):
        distributed_env(_args(), env)


# ------------------------------------------------------------------------------------------ rendezvous (fast)
def test_port_in_use_is_named_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        d = DistEnv("slurm", 0, 2, 0, 2, "127.0.0.1", s.getsockname()[1],
                    names={"world_size": "SLURM_NTASKS", "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"})
        t = time.monotonic()
        with pytest.raises(DistributedSetupError, match=r"Rank 0 cannot listen on 127.0.0.1:\d+ \(MASTER_ADDR, "
                                                        r"MASTER_PORT\): the port is in use.*Fix: set MASTER_PORT"):
            _rendezvous(d, datetime.timedelta(seconds=30))
        assert time.monotonic() - t < 5  # not after the timeout


def test_processes_with_different_world_sizes_are_named():
    """Rank 0 started for 2 processes, rank 1 for 3: rank 0 names the disagreement as soon as rank 1 has joined;
    rank 1 waits for a rank 2 that never comes and names it when its time is up."""
    port, errors = _free_port(), {}
    names = {"world_size": "WORLD_SIZE", "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}

    def join(rank, world, seconds):
        try:
            _rendezvous(DistEnv("env", rank, world, rank, world, "127.0.0.1", port, names=names),
                        datetime.timedelta(seconds=seconds))
        except DistributedSetupError as e:
            errors[rank] = e  # (keeps rank 0's store alive until both have answered)

    threads = [threading.Thread(target=join, args=args) for args in ((0, 2, 20), (1, 3, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert re.search(r"The processes disagree on the world size: rank 0 has WORLD_SIZE=2, rank\(s\) \[1\] have \[3\]",
                     str(errors.get(0))), errors
    assert re.search(r"Rank 1 waited D2B_RDZV_TIMEOUT=1 s at 127.0.0.1:\d+ .* for the 3 processes of WORLD_SIZE=3; 2 "
                     r"came, rank\(s\) \[2\] did not", str(errors.get(1))), errors


# ------------------------------------------------------------------------------------------ elastic restarts (fast)
def test_elastic_restart_resumes_and_never_moves_the_run_aside():
    args = _args(overwrite=True)
    assert elastic_restart(args, distributed_env(args, TORCHRUN)) == 0 and not args.resume and args.overwrite
    d = distributed_env(args, {**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"})
    assert elastic_restart(args, d) == 2 and args.resume and not args.overwrite and args.elastic_restart == 2
    ev = _args(eval_only=True)
    assert elastic_restart(ev, d) == 2 and not ev.resume  # an evaluation reads what it was told to


def test_elastic_restart_claims_a_previous_run_waiting_for_the_stopped_attempts_lock(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        f.write('{"iteration": 3}\n')
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000003.pth")
    # a fresh run is refused ...
    with pytest.raises(Exception, match=r"holds a previous run \(last_checkpoint -> model_0000003.pth"):
        claim_output_dir(out, _args())
    _release(out)
    # ... a restarted one continues it, once the stopped attempt's process has released the lock
    fd = os.open(os.path.join(out, LOCK_NAME), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    released = threading.Event()

    def release():  # the stopped attempt's process goes away (its lock with it)
        released.set()
        os.close(fd)

    args = _args(overwrite=True)
    elastic_restart(args, distributed_env(args, {**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0",
                                                 "TORCHELASTIC_RESTART_COUNT": "1"}))
    threading.Timer(0.5, release).start()
    t = time.monotonic()
    claim = claim_output_dir(out, args)
    try:
        # the claim waited for the lock (it cannot return before the release), and not for its whole limit
        assert released.is_set() and time.monotonic() - t < 30
        assert claim.lock and claim.restart == 1 and not claim.moved
        import logging
        with captured_logs(["d2_backbones"]) as records:  # whatever an earlier setup() did to propagation
            claim.log(logging.getLogger("d2_backbones"))
        assert "Elastic restart 1 (TORCHELASTIC_RESTART_COUNT=1): the run continues from the last complete " \
               "checkpoint in OUTPUT_DIR, as with --resume." in [r.getMessage() for r in records]
        assert sorted(os.listdir(out)) == sorted([LOCK_NAME, "metrics.json", "last_checkpoint"])  # nothing moved
    finally:
        _release(out)


# ------------------------------------------------------------------------------------------ processes (slow)
def _clean_env(root, threads=1, **extra):
    """The test environment without any launcher's variables (the suite may itself run under SLURM or torchrun)."""
    env = {k: v for k, v in _env(root, threads).items() if not LAUNCH_VARS.match(k)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four 64x64 images: every global batch of 4 is the whole dataset, whichever order the sampler draws and however
    it deals the images to the processes (detectron2's TrainingSampler gives rank r the indices r, r+W, ...)."""
    return make_shapes(str(tmp_path_factory.mktemp("tiny") / "tiny"), n_train=4, n_val=1, size=64, seed=3)


def _data(tiny):
    return ["--register-coco", "tiny_train", f"{tiny}/annotations/train.json", f"{tiny}/train"]


# Deterministic given the data: no flips, one size, FrozenBN (no batch statistics), and every anchor and proposal
# sampled (detectron2 samples a random subset per process otherwise), with the same number of proposals on every image
# (the box losses are normalised by the process's count). SOLVER.CHECKPOINT_PERIOD 1 keeps the first step's weights.
YACS_SAME = ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 4,
             "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.MAX_TO_KEEP", 0, "TEST.EVAL_PERIOD", 0,
             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.RANDOM_FLIP", "none",
             "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 4096,
             "MODEL.RPN.POST_NMS_TOPK_TRAIN", 16, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", False,
             "TEST.OPTIMIZE_FOR_INFERENCE", False, "SEED", 42]
LAZY_SAME = ["dataloader.train.dataset.names=tiny_train", "dataloader.test.dataset.names=tiny_train",
             "dataloader.train.total_batch_size=4", "train.max_iter=3", "train.checkpointer.period=1",
             "train.checkpointer.max_to_keep=0", "train.eval_period=0",
             "dataloader.train.mapper.augmentations=[]", "model.backbone.bottom_up.norm=FrozenBN",
             "model.proposal_generator.batch_size_per_image=4096", "model.proposal_generator.post_nms_topk=[16,100]",
             "model.roi_heads.proposal_append_gt=False", "train.seed=42"]


def _py(module):
    return [sys.executable, "-m", f"d2_backbones.{module}"]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run"] + [str(a) for a in args]


def _start(cmd, env, log):
    with open(log, "w") as f:
        return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _stop(procs):
    """SIGTERM first: torchrun then stops its workers (each in a session of its own), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _finish(procs, logs, timeout=300):
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        _stop(procs)
    texts = [open(log).read() for log in logs]
    return codes, texts


def _run(cmd, env, log, timeout=300):
    codes, texts = _finish([_start(cmd, env, log)], [log], timeout)
    assert codes == [0], texts[0][-5000:]
    return texts[0]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_parameters(reference_dir, run_dir):
    """The run's parameters after 1 and 3 steps equal the reference's, within float tolerance, while they moved
    between those steps by far more than the tolerance."""
    ref, got = _weights(os.path.join(reference_dir, "model_final.pth")), _weights(os.path.join(run_dir, "model_final.pth"))
    first = _weights(os.path.join(reference_dir, "model_0000000.pth"))
    assert sorted(ref) == sorted(got)
    floats = [k for k in ref if ref[k].is_floating_point()]
    moved = max((ref[k] - first[k]).abs().max().item() for k in floats)
    diff = {k: (ref[k] - got[k]).abs().max().item() for k in floats}
    worst = max(diff, key=diff.get)
    assert moved > 1e-3, moved
    assert diff[worst] < 1e-5, (worst, diff[worst], moved)
    step0 = _weights(os.path.join(run_dir, "model_0000000.pth"))
    assert max((first[k] - step0[k]).abs().max().item() for k in floats) < 1e-5


@pytest.fixture(scope="module")
def yacs_reference(tiny, tmp_path_factory):
    """One process, the whole batch of 4: the parameters the multi-process runs must reach."""
    out = str(tmp_path_factory.mktemp("ref") / "yacs")
    _run(_py("train_net") + ["--config-file", QUICK] + _data(tiny) + ["OUTPUT_DIR", out] + YACS_SAME,
         _clean_env(tiny, threads=2), out + ".log")
    return out


@pytest.mark.slow
def test_two_torchrun_nodes_train_the_quickstart_to_the_one_process_parameters(tiny, yacs_reference, tmp_path):
    """Two torchrun commands (--nnodes 2, one process each, c10d rendezvous on loopback) train the quickstart with
    the global batch split in two, end with one model_final.pth, and reach the parameters of one process."""
    out, port = str(tmp_path / "nodes"), _free_port()
    rdzv = ["--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-conf", "join_timeout=120", "--max-restarts", 0]
    train = ["-m", "d2_backbones.train_net", "--config-file", QUICK] + _data(tiny) + ["OUTPUT_DIR", out] + YACS_SAME
    logs = [str(tmp_path / f"node{r}.log") for r in (0, 1)]
    procs = [_start(_torchrun(*rdzv, "--node-rank", r, *train), _clean_env(tiny), logs[r]) for r in (0, 1)]
    codes, texts = _finish(procs, logs)
    assert codes == [0, 0], "\n".join(t[-4000:] for t in texts)
    both = "\n".join(texts)
    assert "Started by torchrun: rank 0 of 2, local rank 0 of 1" in both
    assert "Started by torchrun: rank 1 of 2, local rank 0 of 1" in both
    assert "Rank of current process: 0. World size: 2" in both
    assert "Effective batch: SOLVER.IMS_PER_BATCH=4 images per iteration over 2 process(es) (2 each)" in both
    assert both.count("Saving checkpoint to") == 4  # rank 0 only: iterations 0, 1, 2 and the final
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "*.pth"))) == [
        "model_0000000.pth", "model_0000001.pth", "model_0000002.pth", "model_final.pth"]
    _assert_same_parameters(yacs_reference, out)


# srun on one node, for the tests: starts SLURM_NTASKS tasks of the command with the variables srun gives each task
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >> "$SRUN_RECORD"; shift; done
echo "$@" >> "$SRUN_RECORD"
[[ -n "${SRUN_DRY:-}" ]] && exit 0
pids=()
for ((r = 0; r < SLURM_NTASKS; r++)); do
    SLURM_PROCID=$r SLURM_LOCALID=$r SLURM_NODEID=0 SLURM_STEP_TASKS_PER_NODE=$SLURM_NTASKS "$@" > "$SRUN_RECORD.$r" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""
SLURM_SCRIPT = os.path.join(REPO, "scripts", "slurm_train.sh")


def _fake_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    return str(bin_dir)


def test_slurm_script_builds_the_srun_line(tmp_path):
    env = _clean_env(str(tmp_path), PATH=_fake_srun(tmp_path) + os.pathsep + os.environ["PATH"], SLURM_JOB_ID=123456,
                     SRUN_RECORD=tmp_path / "record", SRUN_DRY=1)
    for restart, extra in (("0", []), ("1", ["--resume"])):
        (tmp_path / "record").write_text("")
        p = subprocess.run(["bash", SLURM_SCRIPT, "CONFIG.yaml", "OUTPUT_DIR", "out"], capture_output=True, text=True,
                           env={**env, "SLURM_RESTART_COUNT": restart}, timeout=30)
        assert p.returncode == 0, p.stderr
        flags_and_cmd = (tmp_path / "record").read_text().splitlines()
        assert flags_and_cmd == ["--kill-on-bad-exit=1", "--distribution=block", " ".join(
            ["python", "-m", "d2_backbones.train_net", "--config-file", "CONFIG.yaml"] + extra + ["OUTPUT_DIR", "out"])]
    p = subprocess.run(["bash", SLURM_SCRIPT], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode != 0 and "usage: sbatch scripts/slurm_train.sh CONFIG" in p.stderr


@pytest.mark.slow
def test_slurm_tasks_train_to_the_one_process_parameters(tiny, yacs_reference, tmp_path):
    """scripts/slurm_train.sh with srun's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST;
    no torchrun): two tasks train, ranks and rank 0's address from SLURM_*, and reach the one-process parameters."""
    out, record = str(tmp_path / "slurm"), tmp_path / "srun"
    env = _clean_env(tiny, PATH=_fake_srun(tmp_path) + os.pathsep + os.environ["PATH"], PYTHON=sys.executable,
                     SRUN_RECORD=record, SLURM_NTASKS=2, SLURM_JOB_NODELIST="localhost", SLURM_NNODES=1,
                     SLURM_JOB_ID=4242, MASTER_PORT=_free_port(), D2B_RDZV_TIMEOUT=120)
    p = subprocess.run(["bash", SLURM_SCRIPT, QUICK] + _data(tiny) + ["OUTPUT_DIR", out] + [str(o) for o in YACS_SAME],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    texts = [open(f"{record}.{r}").read() for r in (0, 1)]
    assert p.returncode == 0, "\n".join(t[-4000:] for t in texts)
    assert "Started by slurm: rank 0 of 2, local rank 0 of 2" in texts[0] and "rank 0 at localhost:" in texts[0]
    assert "Started by slurm: rank 1 of 2, local rank 1 of 2" in texts[1]
    with open(os.path.join(out, "log.txt.rank1")) as f:
        assert "Rank of current process: 1. World size: 2" in f.read()
    _assert_same_parameters(yacs_reference, out)


@pytest.mark.slow
def test_lazy_train_two_torchrun_processes_reach_the_one_process_parameters(tiny, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "two")
    train = ["--config-file", QUICK_PY] + _data(tiny)
    _run(_py("lazy_train") + train + [f"train.output_dir={ref}"] + LAZY_SAME, _clean_env(tiny, threads=2),
         ref + ".log")
    text = _run(_torchrun("--standalone", "--nproc-per-node", 2, "-m", "d2_backbones.lazy_train", *train,
                          f"train.output_dir={out}", *LAZY_SAME), _clean_env(tiny), out + ".log")
    assert "Started by torchrun: rank 0 of 2, local rank 0 of 2" in text and "local rank 1 of 2" in text
    assert text.count("Saving checkpoint to") == 4
    _assert_same_parameters(ref, out)


@pytest.mark.slow
def test_elastic_restart_after_sigkill_resumes_from_the_last_checkpoint(tiny, tmp_path):
    """torchrun --max-restarts 1: rank 0 killed with SIGKILL mid-run; torchrun restarts both workers, which resume
    from the last complete checkpoint (the stopped attempt's lock released, its output directory not refused) and
    finish the schedule."""
    out, max_iter = str(tmp_path / "elastic"), 20
    opts = ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.MAX_TO_KEEP", 0, "TEST.EVAL_PERIOD", 0,
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64]
    cmd = _torchrun("--standalone", "--nproc-per-node", 2, "--max-restarts", 1, "-m", "d2_backbones.train_net",
                    "--config-file", QUICK, *_data(tiny), "OUTPUT_DIR", out, *opts)
    log = str(tmp_path / "elastic.log")
    p = _start(cmd, _clean_env(tiny), log)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not os.path.exists(os.path.join(out, "model_0000003.pth")):
            assert p.poll() is None, open(log).read()[-4000:]
            time.sleep(0.1)
        with open(os.path.join(out, LOCK_NAME)) as f:
            rank0 = json.load(f)["pid"]  # the lock file records its holder: rank 0
        os.kill(rank0, signal.SIGKILL)
        while os.path.exists(f"/proc/{rank0}") and open(f"/proc/{rank0}/stat").read().split()[2] != "Z":
            time.sleep(0.05)
        with open(os.path.join(out, "last_checkpoint")) as f:
            last = f.read().strip()  # what the killed attempt completed last
        assert not os.path.exists(os.path.join(out, "model_final.pth"))  # killed mid-run
    except BaseException:
        _stop([p])
        raise
    codes, (text,) = _finish([p], [log], timeout=240)
    assert codes == [0], text[-5000:]
    it = int(re.fullmatch(r"model_(\d{7})\.pth", last).group(1))
    assert "Elastic restart 1 (TORCHELASTIC_RESTART_COUNT=1): the run continues from the last complete checkpoint" \
           in text, text[-4000:]
    assert f"-> {last}; resuming at iter {it + 1}" in text, text[-4000:]
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert final["iteration"] == max_iter - 1
    assert max(r["iteration"] for r in _metrics(out)) == max_iter - 1
    assert "is in use by another run" not in text and "holds a previous run" not in text


@pytest.mark.slow
def test_missing_peer_ends_with_a_clear_error_in_bounded_time(tiny, tmp_path):
    """Rank 0 of two SLURM tasks alone stops after D2B_RDZV_TIMEOUT naming the missing rank and the variables;
    one torchrun node of two stops after its join_timeout. Neither hangs."""
    out, port = str(tmp_path / "alone"), _free_port()
    cmd = _py("train_net") + ["--config-file", QUICK] + _data(tiny) + ["OUTPUT_DIR", out]
    env = _clean_env(tiny, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2, SLURM_JOB_NODELIST="localhost",
                     MASTER_PORT=port, D2B_RDZV_TIMEOUT=3)
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t < 120
    assert re.search(r"DistributedSetupError: Rank 0 waited D2B_RDZV_TIMEOUT=3 s at localhost:\d+ \(the first host of "
                     r"SLURM_JOB_NODELIST, MASTER_PORT\) for the 2 processes of SLURM_NTASKS=2; 1 came, rank\(s\) "
                     r"\[1\] did not\. Fix: start every process", p.stderr), p.stderr[-3000:]
    # torchrun's own rendezvous: bounded by --rdzv-conf join_timeout
    t = time.monotonic()
    p = subprocess.run(_torchrun("--nnodes", 2, "--node-rank", 0, "--nproc-per-node", 1, "--rdzv-backend", "c10d",
                                 "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-conf", "join_timeout=3",
                                 "-m", "d2_backbones.train_net", "--config-file", QUICK),
                       capture_output=True, text=True, env=_clean_env(tiny), cwd=REPO, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t < 120 and "RendezvousTimeoutError" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_num_gpus_under_torchrun_is_refused_with_the_reason(tiny, tmp_path):
    p = subprocess.run(_torchrun("--standalone", "--nproc-per-node", 1, "-m", "d2_backbones.train_net",
                                 "--config-file", QUICK, "--num-gpus", 2, "OUTPUT_DIR", str(tmp_path / "x")),
                       capture_output=True, text=True, env=_clean_env(tiny), cwd=REPO, timeout=120)
    assert p.returncode != 0
    assert "--num-gpus 2 with torchrun: torchrun already started this process as rank 0 of 1" in p.stderr, \
        p.stderr[-3000:]
    assert not os.path.exists(tmp_path / "x")  # refused before anything was set up


_BARRIER = """
import os, sys, time, torch
from d2_backbones.launch import distributed_env, init_distributed
from d2_backbones.weights import Checkpointer, PeriodicCheckpointer
d = distributed_env()
init_distributed(d)
cp = Checkpointer(torch.nn.Linear(2, 2), sys.argv[1])
cp.prepare_save_dir()  # rank 0 creates the directory (as the trainers do)
save = cp.save
cp.save = lambda name, **kw: (time.sleep(2), save(name, **kw))  # a slow disk on rank 0 (the only one that writes)
hook = PeriodicCheckpointer(cp, 1, max_iter=10, synchronize=sys.argv[2] == "1")
hook.step(0)
print(f"rank {d.rank} sees the checkpoint: {os.path.exists(os.path.join(sys.argv[1], 'model_0000000.pth'))}")
"""


@pytest.mark.slow
def test_every_rank_waits_for_the_checkpoint_rank_0_writes(tmp_path):
    """PeriodicCheckpointer(synchronize=True), as both trainers register it in every process: the other ranks go on
    only once rank 0's file is complete (without it, rank 1 runs ahead of a slow write). Started by another
    launcher's variables (RANK, WORLD_SIZE, LOCAL_*, MASTER_*), which take the same rendezvous as srun's."""
    for sync in ("1", "0"):
        out, port = str(tmp_path / f"sync{sync}"), _free_port()
        logs = [str(tmp_path / f"sync{sync}_{r}.log") for r in (0, 1)]
        procs = [_start([sys.executable, "-c", _BARRIER, out, sync],
                        _clean_env(str(tmp_path), RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, LOCAL_WORLD_SIZE=2,
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, D2B_RDZV_TIMEOUT=60), logs[r])
                 for r in (0, 1)]
        codes, texts = _finish(procs, logs, timeout=120)
        assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
        assert "rank 0 sees the checkpoint: True" in texts[0]
        assert f"rank 1 sees the checkpoint: {sync == '1'}" in texts[1], texts[1][-2000:]
