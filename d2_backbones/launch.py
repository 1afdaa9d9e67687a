"""How the trainers' processes start: detectron2's ``launch``, torchrun (torch elastic), or SLURM's ``srun``.

Both trainers (``train_net``, ``lazy_train``) end their ``invoke_main`` with :func:`launch_main`, which looks at
the environment of the process and picks one way (the first that applies):

============================  ==========================================================================
the environment               what happens
============================  ==========================================================================
``D2B_LAUNCHER=launch``       detectron2's ``launch``, whatever else the environment says.
``TORCHELASTIC_RUN_ID``       **torchrun** started this process: the process group comes from its variables
(set by torchrun)             (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
                              ``MASTER_PORT``: the store of torchrun's agent), nothing is spawned. After an
                              elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the run resumes from the last
                              complete checkpoint, as with ``--resume`` (:func:`elastic_restart`).
``RANK`` and ``WORLD_SIZE``   another launcher that sets torch's variables (a Kubernetes job without
(no torchrun)                 torchrun): the same, rank 0 serving the store at ``MASTER_ADDR:MASTER_PORT``.
``SLURM_PROCID`` and          **srun** started this process as one of ``SLURM_NTASKS`` > 1 tasks
``SLURM_NTASKS``              (``SLURM_STEP_NUM_TASKS`` when set): rank ``SLURM_PROCID``, local rank
                              ``SLURM_LOCALID``, tasks per node from ``SLURM_STEP_TASKS_PER_NODE``, rank 0's
                              address ``MASTER_ADDR`` or the first host of ``SLURM_STEP_NODELIST`` /
                              ``SLURM_JOB_NODELIST`` (:func:`first_host`), the port ``MASTER_PORT`` or
                              :func:`slurm_port`. Not with ``--num-gpus`` > 1 or ``--num-machines`` > 1: then
                              detectron2's ``launch`` spawns the processes (one task per node, detectron2's recipe).
none of these                 detectron2's ``launch`` with ``--num-gpus``, ``--num-machines``, ``--machine-rank``,
                              ``--dist-url`` (one process by default).
============================  ==========================================================================

Checked before anything else: ``--num-gpus``/``--num-machines``/``--machine-rank`` under torchrun or srun (the
launcher already started every process) are refused with the reason; the rank, world size and local sizes must be
integers that fit together (``RANK < WORLD_SIZE``, the same number of processes on every node, a local rank below
it, ranks numbered node after node); with CUDA, no more processes per node than GPUs.

Bounded waits, never a hang: the processes wait ``D2B_RDZV_TIMEOUT`` seconds (default 600, torchrun's
``join_timeout``) for each other at start, then stop naming the ranks that did not come, ``MASTER_ADDR:MASTER_PORT``
and the variables; a port in use is named at once; processes started with different world sizes are named.
torchrun's own rendezvous (a machine missing) is bounded by ``--rdzv-conf join_timeout=SECONDS``.
``D2B_DIST_TIMEOUT`` (seconds, default detectron2's 1800) bounds each collective operation of the run (a process
that stops answering) and detectron2's ``launch``.

Then detectron2's per-node process group is created with the number of processes per node (``comm.get_local_rank()``
and ``comm.get_local_size()`` are right) and, with CUDA, each process takes the GPU of its local rank. Backend: NCCL
when CUDA is available, gloo otherwise (as detectron2's ``launch``).

>>> first_host("node[01-03,07],gpu5")
'node01'
>>> expand_nodelist("node[01-03,07],gpu5")
['node01', 'node02', 'node03', 'node07', 'gpu5']
>>> tasks_per_node("2(x3),1")
[2, 2, 2, 1]
"""
import datetime
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist

from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from .preflight import check_num_processes

__all__ = ["LAUNCHER_ENV", "RDZV_TIMEOUT_ENV", "DIST_TIMEOUT_ENV", "DistributedSetupError", "DistEnv", "expand_nodelist",
           "first_host", "tasks_per_node", "slurm_port", "timeout_from_env", "distributed_env", "check_launch_flags",
           "init_distributed", "elastic_restart", "launch_main"]

LAUNCHER_ENV = "D2B_LAUNCHER"  # "launch": detectron2's launch whatever the environment says (default "auto")
RDZV_TIMEOUT_ENV = "D2B_RDZV_TIMEOUT"  # seconds the processes wait for each other at start (srun, other launchers)
DIST_TIMEOUT_ENV = "D2B_DIST_TIMEOUT"  # seconds a collective operation may wait (and detectron2's launch)
DEFAULT_RDZV_TIMEOUT = 600.0  # torchrun's default join_timeout
DEFAULT_DIST_TIMEOUT = 1800.0  # detectron2's DEFAULT_TIMEOUT (30 minutes)


class DistributedSetupError(RuntimeError):
    """The processes of a run could not be brought together (a missing peer, a port in use, values that disagree)."""


# ---------------------------------------------------------------------------------------------- SLURM's lists
def _split_top(text: str) -> List[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> Iterator[str]:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if not m:
        yield name
        return
    head, tail = name[:m.start()], name[m.end():]
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot read the range {item!r} in {name!r}")
        width = len(lo)  # zero padding: node[01-03] -> node01 node02 node03
        for i in range(int(lo), int(hi if sep else lo) + 1):
            yield from _expand_one(f"{head}{i:0{width}d}{tail}")


def expand_nodelist(nodelist: str) -> List[str]:
    """The host names of a SLURM node list in its compressed form (what ``scontrol show hostnames`` prints).

    >>> expand_nodelist("gpu[1-2]-ib[0-1],login")
    ['gpu1-ib0', 'gpu1-ib1', 'gpu2-ib0', 'gpu2-ib1', 'login']
    """
    return [host for part in _split_top(nodelist) for host in _expand_one(part)]


def first_host(nodelist: str, key: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a SLURM node list (the host of rank 0 with the default block distribution)."""
    try:
        parts = _split_top(nodelist or "")
        if parts:
            return next(_expand_one(parts[0]))
        raise ValueError("it is empty")
    except (ValueError, StopIteration) as e:
        raise DistributedSetupError(
            f"{key}={nodelist!r} is not a SLURM node list ({e}). Valid values: host names and bracketed ranges such "
            f"as 'node[01-03,07],gpu5'. Fix: set MASTER_ADDR to the host of rank 0.") from None


def tasks_per_node(value: str, key: str = "SLURM_STEP_TASKS_PER_NODE") -> List[int]:
    """The tasks on each node from SLURM's compressed count list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out = []
    for part in _split_top(value or ""):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise DistributedSetupError(f"{key}={value!r} is not a SLURM task count list (e.g. '4(x2),3').")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    if not out:
        raise DistributedSetupError(f"{key}={value!r} is not a SLURM task count list (e.g. '4(x2),3').")
    return out


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job without ``MASTER_PORT``: the same for every task of the job, and
    different for jobs sharing a node (20000-39999 by job id)."""
    return 20000 + int(job_id) % 20000


# ---------------------------------------------------------------------------------------------- timeouts
def timeout_from_env(name: str, default: float, env: Optional[Mapping[str, str]] = None) -> datetime.timedelta:
    """``env[name]`` seconds as a ``timedelta`` (``default`` when unset); other values are refused by name.

    >>> timeout_from_env("D2B_RDZV_TIMEOUT", 600, {"D2B_RDZV_TIMEOUT": "30"}).total_seconds()
    30.0
    """
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw in (None, ""):
        return datetime.timedelta(seconds=default)
    try:
        seconds = float(raw)
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError
    except ValueError:
        raise DistributedSetupError(f"{name}={raw!r} is not valid. Valid values: a number of seconds > 0. Fix: set "
                                    f"{name} to e.g. {int(default)} or unset it (default {int(default)}).") from None
    return datetime.timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------- the environment
@dataclass(frozen=True)
class DistEnv:
    """One process of a run started by an outside launcher, as its environment describes it."""

    launcher: str  # "torchrun", "env" (RANK/WORLD_SIZE from another launcher) or "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    run_id: str = ""
    names: Dict[str, str] = field(default_factory=dict)  # field -> the variable(s) it was read from

    def describe(self) -> str:
        where = f"{self.master_addr}:{self.master_port}"
        restart = f", restart {self.restart_count}" if self.restart_count else ""
        return (f"{self.launcher}: rank {self.rank} of {self.world_size}, local rank {self.local_rank} of "
                f"{self.local_world_size} on {socket.gethostname()}, rank 0 at {where}{restart}")


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or not str(raw).strip().lstrip("-").isdigit() or int(raw) < minimum:
        raise DistributedSetupError(
            f"{name}={raw!r} is not valid. Valid values: an integer >= {minimum}. It is set by the launcher "
            f"(torchrun, srun); fix the launch command or unset it.")
    return int(raw)


def _torch_env(env: Mapping[str, str]) -> DistEnv:
    torchrun = bool(env.get("TORCHELASTIC_RUN_ID"))
    launcher = "torchrun" if torchrun else "env"
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise DistributedSetupError(
            f"RANK={rank} and WORLD_SIZE={world} are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not: every process needs the address of rank 0. Fix: start the processes with torchrun, or set "
            f"MASTER_ADDR and MASTER_PORT (the same on every process).")
    if "LOCAL_RANK" in env or "LOCAL_WORLD_SIZE" in env:
        local_rank, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE", 1)
    elif world == 1:
        local_rank, local_world = 0, 1
    else:
        raise DistributedSetupError(
            f"RANK={rank} and WORLD_SIZE={world} are set but LOCAL_RANK and LOCAL_WORLD_SIZE are not (the process's "
            f"index on its node and the number of processes per node; torchrun sets them). Fix: set both, or start "
            f"the processes with torchrun.")
    return DistEnv(launcher, rank, world, local_rank, local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT", 1),
                   restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT") or 0), run_id=env.get("TORCHELASTIC_RUN_ID", ""),
                   names={"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                          "local_world_size": "LOCAL_WORLD_SIZE", "master": "MASTER_ADDR:MASTER_PORT"})


def _slurm_tasks_key(env: Mapping[str, str]) -> str:
    # srun sets the step's task count; SLURM_NTASKS may be the allocation's (inside an sbatch script)
    return "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    tasks = _slurm_tasks_key(env)
    rank, world = _int(env, "SLURM_PROCID"), _int(env, tasks, 1)
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    names = {"rank": "SLURM_PROCID", "world_size": tasks, "local_rank": "SLURM_LOCALID"}
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key):
            counts = tasks_per_node(env[key], key)
            if len(set(counts)) > 1:
                raise DistributedSetupError(
                    f"{key}={env[key]!r}: the nodes run different numbers of tasks; detectron2's per-node process "
                    f"group needs the same number on every node. Fix: sbatch/srun --ntasks-per-node=N (one task per "
                    f"GPU) with --nodes=M and --ntasks=N*M.")
            local_world, names["local_world_size"] = counts[0], key
            break
    else:
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        if world % nodes:
            raise DistributedSetupError(f"SLURM_NTASKS={world} tasks on SLURM_NNODES={nodes} nodes: not the same "
                                        f"number on every node. Fix: srun --ntasks-per-node=N.")
        local_world, names["local_world_size"] = world // nodes, "SLURM_NTASKS/SLURM_NNODES"
    if env.get("MASTER_ADDR"):
        addr, names["master_addr"] = env["MASTER_ADDR"], "MASTER_ADDR"
    else:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
        if key is None:
            raise DistributedSetupError(
                "SLURM_PROCID and SLURM_NTASKS are set but neither MASTER_ADDR nor SLURM_JOB_NODELIST: the address "
                "of rank 0 is unknown. Fix: export MASTER_ADDR=<host of the first task> before srun.")
        addr, names["master_addr"] = first_host(env[key], key), f"the first host of {key}"
    if env.get("MASTER_PORT"):
        port, names["master_port"] = _int(env, "MASTER_PORT", 1), "MASTER_PORT"
    elif (env.get("SLURM_JOB_ID") or "").isdigit():
        port, names["master_port"] = slurm_port(env["SLURM_JOB_ID"]), "derived from SLURM_JOB_ID (MASTER_PORT unset)"
    else:
        raise DistributedSetupError("MASTER_PORT is not set and SLURM_JOB_ID is not a job number: the port of rank "
                                    "0 is unknown. Fix: export MASTER_PORT=<a free port> before srun.")
    names["master"] = "MASTER_ADDR:MASTER_PORT"
    d = DistEnv("slurm", rank, world, local_rank, local_world, addr, port, names=names)
    node = env.get("SLURM_NODEID")
    if node is not None and str(node).isdigit() and rank // max(local_world, 1) != int(node) and rank < world:
        raise DistributedSetupError(
            f"SLURM_PROCID={rank} on SLURM_NODEID={node} with {local_world} tasks per node: the ranks are not "
            f"numbered node after node, which detectron2's per-node process group needs. Fix: srun "
            f"--distribution=block.")
    return d


def distributed_env(args=None, env: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The :class:`DistEnv` of this process when an outside launcher started it, else ``None`` (then
    detectron2's ``launch`` starts the processes from the command line's flags).

    ``args``: the command line's (``num_gpus``, ``num_machines``): under SLURM, ``--num-gpus`` > 1 or
    ``--num-machines`` > 1 mean detectron2's ``launch`` spawns the processes (one task per node), so the
    ``SLURM_*`` variables are not used.
    """
    env = os.environ if env is None else env
    chosen = env.get(LAUNCHER_ENV) or "auto"
    if chosen not in ("auto", "launch"):
        raise DistributedSetupError(f"{LAUNCHER_ENV}={chosen!r} is not valid. Valid values: 'auto' (the launcher "
                                    f"found in the environment), 'launch' (detectron2's launch from --num-gpus etc., "
                                    f"whatever the environment says). Fix: unset it or use one of them.")
    if chosen == "launch":
        return None
    if env.get("TORCHELASTIC_RUN_ID") or ("RANK" in env and "WORLD_SIZE" in env):
        d = _torch_env(env)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if int(getattr(args, "num_gpus", 1) or 1) > 1 or int(getattr(args, "num_machines", 1) or 1) > 1:
            return None
        if _int(env, _slurm_tasks_key(env), 1) == 1:
            return None  # one task: one process, nothing to bring together
        d = _slurm_env(env)
    else:
        return None
    _check(d)
    return d


def _check(d: DistEnv) -> None:
    n = d.names
    if d.rank >= d.world_size:
        raise DistributedSetupError(f"{n['rank']}={d.rank} but {n['world_size']}={d.world_size}: ranks go from 0 to "
                                    f"{d.world_size - 1}. Fix: give every process the same world size and its own "
                                    f"rank.")
    if d.world_size % d.local_world_size:
        raise DistributedSetupError(
            f"{n['world_size']}={d.world_size} is not a multiple of {n['local_world_size']}={d.local_world_size}: "
            f"detectron2's per-node process group needs the same number of processes on every node. Fix: start "
            f"the same number of processes on every node (torchrun --nproc-per-node, srun --ntasks-per-node).")
    if d.local_rank >= d.local_world_size:
        raise DistributedSetupError(f"{n['local_rank']}={d.local_rank} but {n['local_world_size']}="
                                    f"{d.local_world_size}: local ranks go from 0 to {d.local_world_size - 1}.")


def check_launch_flags(args, d: DistEnv) -> None:
    """``--num-gpus``, ``--num-machines``, ``--machine-rank`` make detectron2's ``launch`` start processes; under
    an outside launcher the processes exist already: refused with the launcher's flags to use instead."""
    given = [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag, default in
             (("num_gpus", 1), ("num_machines", 1), ("machine_rank", 0))
             if getattr(args, flag, default) not in (None, default)]
    if not given:
        return
    by = {"torchrun": "torchrun", "env": "the launcher that set RANK and WORLD_SIZE", "slurm": "srun"}[d.launcher]
    use = {"torchrun": "torchrun --nnodes N --nproc-per-node K (one process per GPU)",
           "env": "the launcher's own settings", "slurm": "srun --nodes N --ntasks-per-node K"}[d.launcher]
    raise DistributedSetupError(
        f"{' '.join(given)} with {by}: {by} already started this process as rank {d.rank} of {d.world_size} "
        f"({d.local_world_size} per node), and these flags would make detectron2's launch start more processes "
        f"from each of them. Fix: leave out --num-gpus, --num-machines, --machine-rank and --dist-url, and set the "
        f"number of processes with {use}.")


# ---------------------------------------------------------------------------------------------- the process group
def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _check_gpus(d: DistEnv) -> None:
    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if d.local_world_size > count:
        raise DistributedSetupError(
            f"{d.names['local_world_size']}={d.local_world_size} processes on this node but it has {count} CUDA "
            f"device(s): each process takes the GPU of its local rank. Fix: start at most {count} processes per node "
            f"(torchrun --nproc-per-node, srun --ntasks-per-node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train "
            f"on CPU.")


def _rendezvous(d: DistEnv, timeout: datetime.timedelta, agent_store: bool = False):
    """A TCP store that every process joins within ``timeout`` (served by rank 0, or with ``agent_store`` by
    torchrun's agent), and the world sizes compared. Under torchrun the keys of each attempt are apart: the agent's
    store outlives a restart, and the stopped attempt's addresses left in it would send the new processes to dead
    peers."""
    where = f"{d.master_addr}:{d.master_port} ({d.names.get('master_addr', 'MASTER_ADDR')}, " \
            f"{d.names.get('master_port', 'MASTER_PORT')})"
    secs = int(timeout.total_seconds())
    try:
        store = dist.TCPStore(d.master_addr, d.master_port, d.world_size, d.rank == 0 and not agent_store,
                              timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError, DistStoreError are RuntimeErrors
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text:
            raise DistributedSetupError(
                f"Rank 0 cannot listen on {where}: the port is in use (by another program, another run on this node, "
                f"or a second process started as rank 0). Fix: set MASTER_PORT to a free port, the same for every "
                f"process of the run.") from e
        raise DistributedSetupError(
            f"Rank {d.rank} could not reach rank 0 at {where} within {RDZV_TIMEOUT_ENV}={secs} s: {text.splitlines()[0]} "
            f"Fix: check that rank 0 was started and that every process has the same MASTER_ADDR/MASTER_PORT, or "
            f"raise {RDZV_TIMEOUT_ENV}.") from e
    if d.launcher == "torchrun":
        store = dist.PrefixStore(f"d2b/{d.run_id}/attempt_{d.restart_count}", store)
    store.set(f"d2b/rank/{d.rank}", json.dumps({"world_size": d.world_size, "host": socket.gethostname()}))
    keys = [f"d2b/rank/{r}" for r in range(d.world_size)]
    try:
        store.wait(keys, timeout)
    except (RuntimeError, OSError) as e:
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            shown = missing if len(missing) <= 10 else missing[:10] + ["..."]
            came = f"{d.world_size - len(missing)} came, rank(s) {shown} did not"
        except (RuntimeError, OSError):  # rank 0 (the store) is gone: it stopped, e.g. on an error of its own
            came = "rank 0 stopped answering (see its own error)"
        raise DistributedSetupError(
            f"Rank {d.rank} waited {RDZV_TIMEOUT_ENV}={secs} s at {where} for the {d.world_size} processes of "
            f"{d.names['world_size']}={d.world_size}; {came}. "
            f"Fix: start every process (srun starts {d.names['world_size']} tasks; a python command alone in an sbatch "
            f"script is one process: run it under srun, or set {LAUNCHER_ENV}=launch to start the processes from "
            f"--num-gpus instead), give every process the same world size, or raise {RDZV_TIMEOUT_ENV} when nodes "
            f"start slowly.") from e
    sizes = {r: json.loads(store.get(k).decode())["world_size"] for r, k in enumerate(keys)}
    differ = {r: s for r, s in sizes.items() if s != d.world_size}
    if differ:
        raise DistributedSetupError(
            f"The processes disagree on the world size: rank {d.rank} has {d.names['world_size']}={d.world_size}, "
            f"rank(s) {sorted(differ)} have {sorted(set(differ.values()))}. Fix: start every process with the same "
            f"number of processes.")
    return store


def init_distributed(d: DistEnv, env: Optional[Mapping[str, str]] = None) -> None:
    """Create the process group of ``d`` (bounded in time, see the module docstring), detectron2's local process
    group, and with CUDA take the local rank's GPU."""
    env = os.environ if env is None else env
    rdzv = timeout_from_env(RDZV_TIMEOUT_ENV, DEFAULT_RDZV_TIMEOUT, env)
    coll = timeout_from_env(DIST_TIMEOUT_ENV, DEFAULT_DIST_TIMEOUT, env)
    _check_gpus(d)
    # torch's variables for any code that reads them (srun sets only SLURM_*)
    for name, value in (("RANK", d.rank), ("WORLD_SIZE", d.world_size), ("LOCAL_RANK", d.local_rank),
                        ("LOCAL_WORLD_SIZE", d.local_world_size), ("MASTER_ADDR", d.master_addr),
                        ("MASTER_PORT", d.master_port)):
        os.environ[name] = str(value)
    # torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT (its rendezvous is done); otherwise rank 0 does
    agent_store = d.launcher == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = _rendezvous(d, rdzv, agent_store)
    dist.init_process_group(_backend(), store=store, rank=d.rank, world_size=d.world_size, timeout=coll)
    comm.create_local_process_group(d.local_world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    comm.synchronize()


# ---------------------------------------------------------------------------------------------- elastic restarts
def elastic_restart(args, d: Optional[DistEnv]) -> int:
    """After an elastic restart (torchrun ``--max-restarts``, ``TORCHELASTIC_RESTART_COUNT`` > 0) the run
    continues from the last complete checkpoint of its output directory: ``args.resume`` is set (and
    ``--overwrite`` dropped, which would move the run's own files aside). Returns the restart count."""
    n = d.restart_count if d is not None else 0
    if n > 0 and not getattr(args, "eval_only", False):
        args.resume, args.overwrite = True, False
        args.elastic_restart = n
    return n


# ---------------------------------------------------------------------------------------------- the entry point
def launch_main(main_func: Callable, args, env: Optional[Mapping[str, str]] = None):
    """Run ``main_func(args)`` in the processes this launch asks for (see the module docstring): under torchrun,
    another launcher or srun in this process, in a process group made from the environment; otherwise through
    detectron2's ``launch`` with ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``."""
    env = os.environ if env is None else env
    d = distributed_env(args, env)
    if d is None:
        processes = check_num_processes(args.num_gpus)  # before spawning: more processes than GPUs / CPU cores
        if processes:
            print(processes)
        timeout = timeout_from_env(DIST_TIMEOUT_ENV, DEFAULT_DIST_TIMEOUT, env)
        return d2_launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                         dist_url=args.dist_url, args=(args,), timeout=timeout)
    check_launch_flags(args, d)
    print(f"Started by {d.describe()}", flush=True)
    init_distributed(d, env)
    elastic_restart(args, d)
    result = main_func(args)
    comm.synchronize()  # no process leaves while another still needs the group
    dist.destroy_process_group()
    return result
