"""Activation memory and step time of one training step with and without ``with_cp``.

Measures, for a backbone in train mode (batch 2, 512x512 by default):

* **saved activations**: bytes of the distinct tensor storages autograd keeps for backward
  (via ``torch.autograd.graph.saved_tensors_hooks``), i.e. the activation memory ``with_cp`` trades away;
* **peak RSS growth** of a fresh process during one forward+backward (activations, gradients, workspace);
* **step time** (median of N forward+backward).

Run:  python benchmarks/with_cp_memory.py [--family resnet] [--size 512] [--batch 2]
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch


def build(family: str, with_cp: bool):
    if family == "resnet":
        from d2_backbones import build_resnet
        return build_resnet(50, norm="BN", freeze_at=1, with_cp=with_cp)
    if family == "vovnet":
        from d2_backbones.vovnet import VoVNet
        return VoVNet("V-39-eSE", norm="BN", freeze_at=1, with_cp=with_cp)
    if family == "ghostnet":
        from d2_backbones.ghostnet import GhostNet
        return GhostNet(width=1.0, norm="BN", freeze_at=1, with_cp=with_cp)
    raise SystemExit(f"unknown family {family!r}")


def saved_bytes(model, x) -> int:
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    return sum(storages.values())


def step_time(model, x, n: int) -> float:
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        out = model(x)
        sum(v.float().square().mean() for v in out.values()).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(family: str, with_cp: bool, size: int, batch: int) -> None:
    """Peak RSS growth of one forward+backward, after the model and input exist (Linux)."""
    torch.manual_seed(0)
    model = build(family, with_cp).train()
    x = torch.randn(batch, 3, size, size)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS high-water mark
        f.write("5")
    out = model(x)
    sum(v.float().square().mean() for v in out.values()).backward()
    print(_status_kib("VmHWM") - base)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="resnet", choices=["resnet", "vovnet", "ghostnet"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--with-cp", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.family, a.with_cp, a.size, a.batch)
    print(f"{a.family}: batch {a.batch} x 3 x {a.size} x {a.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    res = {}
    for cp in (False, True):
        torch.manual_seed(0)
        model = build(a.family, cp).train()
        x = torch.randn(a.batch, 3, a.size, a.size)
        sb = saved_bytes(model, x)
        t = step_time(model, x, a.repeats)
        cmd = [sys.executable, __file__, "--child", "--family", a.family, "--size", str(a.size),
               "--batch", str(a.batch)] + (["--with-cp"] if cp else [])
        rss = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        res[cp] = (sb, rss, t)
        print(f"with_cp={cp!s:5}  saved activations {sb / 2**20:8.1f} MiB   step peak RSS growth {rss / 2**10:8.1f} MiB   "
              f"step {t * 1000:7.0f} ms")
    (s0, r0, t0), (s1, r1, t1) = res[False], res[True]
    print(f"ratio with_cp/without: saved activations {s1 / s0:.3f}, step peak RSS growth {r1 / r0:.3f}, step time {t1 / t0:.2f}x")


if __name__ == "__main__":
    main()
