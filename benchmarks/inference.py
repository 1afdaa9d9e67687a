"""Inference speed: reference implementation vs our eager model vs ``optimize_for_inference``, side by side.

One run measures, on this machine and in this process:

* **conv peak** - fp32 GFLOP/s of a large channels_last 3x3 convolution (256 -> 256 channels at
  80x80; the machine's practical ceiling for these networks), timed in every round next to the models
  (the speed of a shared machine drifts); the best of four such convs is also reported at the start and
  the end of the run;
* per variant and input size (batch 1, backbone + FPN as the detectors run them, max-pool P6):

  - **reference**: ResNet - detectron2's own ``build_resnet_fpn_backbone``; GhostNet - timm's
    ``ghostnet_*`` modules (``timm.create_model``, random init) with our taps, under detectron2's
    FPN; VoVNet - our eager model (numerically identical to vovnet-detectron2, whose code is not
    on PyPI), so its reference column equals the eager one;
  - **eager**: our backbone as built (FrozenBN, NCHW);
  - **optimized**: ``d2_backbones.optimize_for_inference`` of the eager model (norms folded,
    channels_last).

  All three share the same weights (random, with non-trivial norm statistics); the script checks
  that their outputs agree (``max |opt - ref| / max |ref|``). Timing: after ``--warmup`` runs each,
  ``--runs`` rounds; in a round every model runs twice back to back (untimed, then timed: as a deployed
  model runs, reusing the memory it just freed), in rotating order, followed by the conv-peak probe.
  Times are medians over rounds; speedups and "% of peak" are computed within each round (the models
  of a round see the same machine speed, which drifts a lot on shared machines) and then their median
  is taken. GFLOP/s = 2 x fvcore MACs /
  time; "% of peak" = that / the conv peak of the same round.
* **training** (one variant per family, ``--train-size``, batch 2, BN, FREEZE_AT 1, backbone only):
  step time (median of ``--train-runs`` forward+backward) and peak memory of one step without and
  with ``with_cp``. Peak memory is the growth of the peak RSS of a fresh process during the step,
  run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed tensor returns to the OS and
  RSS follows live memory (with the default allocator, freed blocks stay in the heap and inflate
  both numbers).

Run (about 20 minutes on 2 cores; ``--update-readme`` rewrites the README table)::

    python benchmarks/inference.py --update-readme

Quick check that everything runs (seconds)::

    python benchmarks/inference.py --variants R-18 GhostNet-0.5 --sizes 64x96 --large-sizes --runs 1 \\
        --warmup 0 --train-variants GhostNet-0.5 --train-size 64
"""
import argparse
import copy
import functools
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_VARIANTS = ["R-18", "R-50", "R-101", "V-19-slim-dw-eSE", "V-39-eSE", "V-57-eSE",
                    "GhostNet-0.5", "GhostNet-1.0", "GhostNet-1.3"]
DEFAULT_TRAIN = ["R-50", "V-39-eSE", "GhostNet-1.0"]
TARGETS = {"R-50": 1.5, "V-39-eSE": 1.5, "GhostNet-1.0": 1.5}  # optimized vs reference at 640x640
README_START, README_END = "<!-- inference-benchmark-start -->", "<!-- inference-benchmark-end -->"


# ---------------------------------------------------------------------------------------------- helpers
def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def conv_probe(c: int = 256, hw: int = 80):
    """A c->c channels_last 3x3 conv at hw x hw: ``(run, flops)``, the unit of the conv peak."""
    conv = nn.Conv2d(c, c, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    return (lambda: conv(x)), 2 * c * c * 9 * hw * hw


def conv_peak(runs: int = 5) -> Tuple[float, str]:
    """Best fp32 GFLOP/s over a few channels_last 3x3 convolutions (and which one)."""
    best, which = 0.0, ""
    with torch.no_grad():
        for c, hw in ((256, 80), (128, 160), (512, 40), (256, 160)):
            run, flops = conv_probe(c, hw)
            for _ in range(2):
                run()
            gflops = flops / (_median_ms(run, max(runs, 3)) * 1e6)
            if gflops > best:
                best, which = gflops, f"{c}->{c} 3x3 at {hw}x{hw}"
    return best, which


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics (so that folding is not a no-op and the equality check means something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return model


def build_ours(name: str):
    """Our backbone + FPN for a model-table variant, FrozenBN as in the detection configs, eval mode."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone
    from d2_backbones.model_table import variant_cfg, variant_family

    cfg = variant_cfg(name, fpn=True)
    cfg.merge_from_list([variant_family(name).arg_keys["norm"], "FrozenBN"])
    torch.manual_seed(0)
    return randomize_norms(build_backbone(cfg, ShapeSpec(channels=3))).eval(), cfg


class _TimmGhostNetTaps(nn.Module):
    """timm's GhostNet modules, run block by block, returning features at our taps (same names)."""

    def __init__(self, timm_model: nn.Module, ours: nn.Module):
        super().__init__()
        self.net = timm_model
        self.taps = dict(ours._taps)  # block index -> feature name
        self.last = max(self.taps)
        self._shapes = ours.output_shape()

    def forward(self, x):
        x = self.net.act1(self.net.bn1(self.net.conv_stem(x)))
        out = {}
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            if i in self.taps:
                out[self.taps[i]] = x
            if i == self.last:
                break
        return out

    def output_shape(self):
        return self._shapes


def build_reference(name: str, ours: nn.Module, cfg) -> Tuple[nn.Module, str]:
    """The reference implementation of ``name`` with our weights, and its label."""
    from d2_backbones.model_table import variant_family

    family = variant_family(name).name
    if family == "resnet":
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

        ref = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).eval()
        ref.load_state_dict(ours.state_dict())  # same parameter names: detectron2's
        return ref, "detectron2 ResNet-FPN"
    if family == "ghostnet":
        import timm

        width = float(re.findall(r"[\d.]+", name)[-1])
        tm = timm.create_model(f"ghostnet_{int(round(width * 100)):03d}", pretrained=False).eval()
        missing, unexpected = tm.load_state_dict(ours.bottom_up.state_dict(), strict=False)  # same names
        missing = [k for k in missing if not k.startswith(("conv_head", "classifier"))
                   and not k.endswith("num_batches_tracked")]
        assert not unexpected and not missing, (missing, unexpected)
        ref = copy.deepcopy(ours)
        ref.bottom_up = _TimmGhostNetTaps(tm, ours.bottom_up)
        return ref, "timm GhostNet + detectron2 FPN"
    labels = {"vovnet": "ours eager (= vovnet-detectron2)",
              "timm": "ours eager (= timm features_only + detectron2 FPN)"}
    return ours, labels.get(family, "ours eager")


def count_gmacs(model: nn.Module, size: Tuple[int, int]) -> float:
    from d2_backbones.model_table import count_gmacs as _count

    return _count(model, size)[0]


def max_rel(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


def paired_rounds(calls: Dict[str, Callable[[], object]], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """ms per call and round, the timing loop of every benchmark here (this one and ``detector.py``): ``warmup``
    untimed calls each, then ``rounds`` rounds in which every call runs twice back to back, untimed then timed
    (as a deployed model runs: it reuses the memory it just freed), in an order rotating from round to round.
    A round takes seconds, so the calls of a round see the same machine speed, which drifts a lot on shared
    machines: compare within rounds."""
    names = list(calls)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for k in names:
        for _ in range(warmup):
            calls[k]()
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            calls[k]()
            t0 = time.perf_counter()
            calls[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def time_rounds(models: Dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int) -> Dict[str, List[float]]:
    """ms per model and round (:func:`paired_rounds`), and the conv probe's speed per round (key ``"peak"``, in
    GFLOP/s: a channels_last 256->256 3x3 conv at 80x80, one more call of each round)."""
    probe, probe_flops = conv_probe()
    calls: Dict[str, Callable[[], object]] = {k: functools.partial(m, x) for k, m in models.items()}
    calls["peak"] = probe
    with torch.no_grad():
        times = paired_rounds(calls, runs, warmup)
    times["peak"] = [probe_flops / (ms * 1e6) for ms in times["peak"]]
    return times


def bench_variant(name: str, size: Tuple[int, int], runs: int, warmup: int) -> Dict:
    from d2_backbones import optimize_for_inference

    eager, cfg = build_ours(name)
    ref, ref_label = build_reference(name, eager, cfg)
    opt = optimize_for_inference(copy.deepcopy(eager))
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out_ref, out_eager, out_opt = ref(x), eager(x), opt(x)
    models = {"eager": eager, "opt": opt}
    if ref is not eager:
        models = {"ref": ref, **models}
    t = time_rounds(models, x, runs, warmup)
    t.setdefault("ref", t["eager"])
    gmacs = count_gmacs(eager, size)
    med = statistics.median
    row = dict(name=name, size=size, ref_label=ref_label, gmacs=gmacs, err_ref=max_rel(out_opt, out_ref),
               err_eager=max_rel(out_opt, out_eager), ref_ms=med(t["ref"]), eager_ms=med(t["eager"]),
               opt_ms=med(t["opt"]), peak=med(t["peak"]))
    # paired within rounds, then the median over rounds
    row["speedup_ref"] = med([a / b for a, b in zip(t["ref"], t["opt"])])
    row["speedup_eager"] = med([a / b for a, b in zip(t["eager"], t["opt"])])
    row["gflops_opt"] = 2 * gmacs / (row["opt_ms"] / 1e3)
    row["peak_frac"] = med([2 * gmacs / (ms / 1e3) / p for ms, p in zip(t["opt"], t["peak"])])
    row["ref_peak_frac"] = med([2 * gmacs / (ms / 1e3) / p for ms, p in zip(t["ref"], t["peak"])])
    return row


# ---------------------------------------------------------------------------------------------- training
def _build_train(name: str, with_cp: bool) -> nn.Module:
    """Variant ``name``'s backbone (any family: the model table's config), BN, FREEZE_AT 1, ``with_cp``."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone
    from d2_backbones.model_table import variant_cfg, variant_family

    torch.manual_seed(0)
    fam = variant_family(name)
    cfg = variant_cfg(name, fpn=False)
    cfg.defrost()
    cfg.merge_from_list(["MODEL.BACKBONE.FREEZE_AT", 1, fam.arg_keys["with_cp"], with_cp])
    return build_backbone(cfg, ShapeSpec(channels=3)).train()


def _loss(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v.float().square().mean() for v in out.values())


def _child_peak(name: str, with_cp: bool, size: int, batch: int) -> None:
    """(in a fresh process) peak RSS growth in KiB of one forward + backward."""
    from with_cp_memory import _status_kib  # benchmarks/ is on sys.path (see the top of this file)

    model = _build_train(name, with_cp)
    x = torch.randn(batch, 3, size, size)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the VmHWM high-water mark
        f.write("5")
    _loss(model(x)).backward()
    print(_status_kib("VmHWM") - base)


def bench_training(name: str, size: int, batch: int, runs: int) -> Dict:
    row = {"name": name, "size": size, "batch": batch}
    for cp in (False, True):
        model = _build_train(name, cp)
        x = torch.randn(batch, 3, size, size)
        _loss(model(x)).backward()  # warm-up

        def step():
            model.zero_grad(set_to_none=True)
            _loss(model(x)).backward()

        row[f"step_ms_{cp}"] = _median_ms(step, runs)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [sys.executable, os.path.abspath(__file__), "--child-peak", name, str(int(cp)), str(size), str(batch)]
        res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        row[f"peak_mib_{cp}"] = int(res.stdout.split()[-1]) / 1024
    row["mem_ratio"] = row["peak_mib_True"] / row["peak_mib_False"]
    row["time_ratio"] = row["step_ms_True"] / row["step_ms_False"]
    return row


# ---------------------------------------------------------------------------------------------- output
def _cpu_name() -> str:
    from d2_backbones.model_table import cpu_name

    return cpu_name()


def format_markdown(rows, train_rows, *, peak, peak_end, peak_which, threads, runs, warmup, seconds,
                    command) -> str:
    lines = [
        f"Measured by `{command}` ({seconds / 60:.0f} min): {_cpu_name()}, {threads} threads, torch "
        f"{torch.__version__}, fp32, batch 1, backbone + FPN (max-pool P6). {warmup} warm-up runs per model, then "
        f"{runs} rounds, each running every model twice back to back (the second run timed) and the conv-peak "
        f"probe (channels_last 256->256 3x3 conv at 80x80); ms are medians over rounds, speedups and % of peak "
        f"medians of per-round ratios. GFLOP/s = 2 x fvcore MACs / time. Best conv at the start of the run: "
        f"{peak:.0f} GFLOP/s ({peak_which}), at the end: {peak_end:.0f}.",
        "",
        "| variant | input | reference | reference ms | eager ms | optimized ms | speedup vs reference | "
        "vs eager | GMACs | optimized GFLOP/s | conv peak GFLOP/s | optimized % of peak | reference % of peak | "
        "max rel. diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = TARGETS.get(r["name"]) if r["size"] == (640, 640) else None
        mark = "" if target is None else (" ✓" if r["speedup_ref"] >= target else f" (target {target}×)")
        lines.append(
            f"| {r['name']} | {r['size'][0]}×{r['size'][1]} | {r['ref_label']} | {r['ref_ms']:.0f} | "
            f"{r['eager_ms']:.0f} | {r['opt_ms']:.0f} | **{r['speedup_ref']:.2f}×**{mark} | "
            f"{r['speedup_eager']:.2f}× | {r['gmacs']:.1f} | {r['gflops_opt']:.0f} | {r['peak']:.0f} | "
            f"{100 * r['peak_frac']:.0f}% | {100 * r['ref_peak_frac']:.0f}% | "
            f"{r['err_ref']:.1e} |")
    if train_rows:
        lines += [
            "",
            "Training step (backbone only, BN, FREEZE_AT 1, forward + backward), without / with `with_cp`:",
            "",
            "| variant | input | step ms | step ms with_cp | time ratio | peak MiB | peak MiB with_cp | memory ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for t in train_rows:
            lines.append(
                f"| {t['name']} | {t['batch']}×3×{t['size']}×{t['size']} | {t['step_ms_False']:.0f} | "
                f"{t['step_ms_True']:.0f} | {t['time_ratio']:.2f}× | {t['peak_mib_False']:.0f} | "
                f"{t['peak_mib_True']:.0f} | **{t['mem_ratio']:.2f}** |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, path: str = os.path.join(REPO, "README.md")) -> None:
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no {README_START} ... {README_END} block to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_START + "\n" + table + README_END + tail)


def _size(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"size {s!r} must look like 640x640 (HxW)")
    return int(m.group(1)), int(m.group(2))


def main(argv: Sequence[str] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME",
                   help=f"model-table variant names (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--sizes", nargs="+", type=_size, default=[(640, 640)], metavar="HxW",
                   help="input sizes for every variant (default: 640x640)")
    p.add_argument("--large-sizes", nargs="*", type=_size, default=[(800, 1344)], metavar="HxW",
                   help="input sizes for --large-variants only (default: 800x1344 = 800x1333 padded to a multiple "
                        "of 32, as detectron2 feeds the FPN)")
    p.add_argument("--large-variants", nargs="*", default=DEFAULT_TRAIN, metavar="NAME",
                   help=f"variants also measured at --large-sizes (default: {' '.join(DEFAULT_TRAIN)})")
    p.add_argument("--runs", type=int, default=8, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model and pass")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--train-variants", nargs="*", default=DEFAULT_TRAIN, metavar="NAME",
                   help="variants for the with_cp training rows (none: skip)")
    p.add_argument("--train-size", type=int, default=640)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-runs", type=int, default=3)
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    p.add_argument("--update-readme", action="store_true", help="replace the README's benchmark table")
    p.add_argument("--child-peak", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_peak:
        name, cp, size, batch = a.child_peak
        return _child_peak(name, bool(int(cp)), int(size), int(batch))

    import logging

    import d2_backbones  # noqa: F401  (registers the backbones)
    from d2_backbones.model_table import VARIANTS

    bad = [v for v in a.variants + list(a.train_variants) + list(a.large_variants) if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; valid: {', '.join(VARIANTS)}")
    logging.getLogger("d2_backbones").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    peak, which = conv_peak(a.runs)
    print(f"{_cpu_name()}, {a.threads} threads, torch {torch.__version__}; conv peak {peak:.0f} GFLOP/s ({which})",
          flush=True)
    rows = []
    plan = [(size, name) for size in a.sizes for name in a.variants]
    plan += [(size, name) for size in a.large_sizes for name in a.large_variants]
    for size, name in plan:
        r = bench_variant(name, size, a.runs, a.warmup)
        rows.append(r)
        print(f"{name:18s} {size[0]}x{size[1]}: ref {r['ref_ms']:7.1f} ms  eager {r['eager_ms']:7.1f} ms  "
              f"opt {r['opt_ms']:7.1f} ms  -> {r['speedup_ref']:.2f}x vs ref, {r['speedup_eager']:.2f}x vs eager; "
              f"{r['gflops_opt']:.0f} GFLOP/s = {100 * r['peak_frac']:.0f}% of peak {r['peak']:.0f}; max rel diff "
              f"{r['err_ref']:.1e}", flush=True)
    train_rows = []
    for name in a.train_variants:
        t = bench_training(name, a.train_size, a.train_batch, a.train_runs)
        train_rows.append(t)
        print(f"{name:18s} train {a.train_batch}x3x{a.train_size}x{a.train_size}: step {t['step_ms_False']:.0f} / "
              f"{t['step_ms_True']:.0f} ms with_cp ({t['time_ratio']:.2f}x), peak {t['peak_mib_False']:.0f} / "
              f"{t['peak_mib_True']:.0f} MiB ({t['mem_ratio']:.2f})", flush=True)
    peak_end, _ = conv_peak(a.runs)
    command = "python benchmarks/inference.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None:
        command = "python benchmarks/inference.py " + " ".join(sys.argv[1:])
    table = format_markdown(rows, train_rows, peak=peak, peak_end=peak_end, peak_which=which, threads=a.threads,
                            runs=a.runs, warmup=a.warmup, seconds=time.time() - t0, command=command.strip())
    print()
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
    if a.update_readme:
        update_readme(table)
    return table


if __name__ == "__main__":
    main()
