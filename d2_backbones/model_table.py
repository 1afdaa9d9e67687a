"""Model table: parameters, GMACs and CPU latency of every backbone variant, as markdown.

Run ``python -m d2_backbones.model_table [--out FILE] [--latency-runs N] [--threads T]
[--variants NAME ...] [--no-large]``. The README's table between
``<!-- model-table-start -->`` and ``<!-- model-table-end -->`` is this tool's output.

Every variant is built through the *registered* builders (``build_d2b_<family>_backbone`` and
``build_d2b_<family>_fpn_backbone``) from :func:`d2_backbones.get_cfg` plus a few overrides
(:data:`VARIANTS`), with these common settings:

* ``NORM = "BN"`` and ``FREEZE_AT = 0``, so BatchNorm affine weights count as parameters
  (the convention of timm, torchvision and the reference tables; with FrozenBN they are
  buffers and the trainable count is lower);
* FPN: detectron2's Faster/Mask R-CNN neck, ``MODEL.FPN.OUT_CHANNELS = 256``, all four stages
  as inputs, max-pool P6 (``TOP_BLOCK = "maxpool"``). The repository's "FPNLite" configs use
  128 channels instead;
* GhostNet ``stage5`` is taken after the final 1x1 conv (``FINAL_CONV = True``, 960 ch at x1.0),
  so the "backbone" is timm's body (stem + blocks 0-9) without ``conv_head``/classifier.

Columns:

* **Params** - parameters of the backbone and of backbone + FPN.
* **GMACs** - fvcore's :class:`fvcore.nn.FlopCountAnalysis`, divided by 1e9. fvcore counts
  one fused multiply-add as one "flop", so its totals are MACs. Besides convolutions and
  linear layers it also counts BatchNorm (one per element in eval mode), upsampling and
  adaptive pooling, which makes its numbers a little larger than conv/linear-only MAC counts
  (0.2-0.6% for ResNet and VoVNet, 5-10% for GhostNet, whose thin layers each have a
  BatchNorm). The "conv GMACs 224" column is the convolution + linear part alone, comparable
  with the MACs papers and timm quote. Ops it has no counter for (element-wise add/mul,
  max-pool, mean, hard-sigmoid, ...) are skipped and listed in the table's footnote; ops fvcore
  ignores by design (ReLU and other activations, views) are not listed. VoVNet's module names
  contain "/" (vovnet-detectron2's checkpoint names), which fvcore's per-module attribution
  cannot parse; this tool attributes such ops to the parent module (totals are exact).
  "224" is a 1x3x224x224 input to the backbone; "800x1333" a 1x3x800x1333 input to the
  backbone; the backbone + FPN column uses 800x1344, the size detectron2 pads 800x1333 to
  (the FPN needs sides divisible by 32).
* **CPU ms** - latency of the backbone alone at 1x3x224x224: ``eval()``, ``torch.no_grad()``,
  fp32, batch 1, ``--warmup`` untimed runs, then the median of ``--latency-runs`` timed runs
  with ``torch.set_num_threads(--threads)``. The footnote records the CPU, the torch version
  and the thread count. Latency depends on the machine and on other load; compare rows of
  one run, not runs of different machines.

Example (fast, a subset)::

    python -m d2_backbones.model_table --variants R-18 V-19-slim-dw-eSE GhostNet-1.0 \\
        --latency-runs 10 --out table.md
"""
import argparse
import collections
import logging
import os
import platform
import statistics
import sys
import time
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import get_cfg
from .errors import ConfigError
from .families import FAMILIES, Family

__all__ = ["VARIANTS", "LARGE_VARIANTS", "variant_family", "variant_cfg", "build_variant", "measure_variant",
           "format_table", "cpu_name", "main"]

# name -> (family, config overrides), from every family's ``variants`` in FAMILIES. ResNets use
# pytorch style (STRIDE_IN_1X1 False, stride on the 3x3 as torchvision/timm/mmdet; parameters do
# not depend on it, but caffe style (detectron2's default, stride on the 1x1) has fewer MACs:
# R-50 3.86 instead of 4.09 G at 224).
class _Variants(Mapping):
    """A live view: a family registered later (d2_backbones.register_family) appears too."""

    def _table(self) -> Dict[str, Tuple[str, List]]:
        return {name: (fam.name, list(overrides)) for fam in FAMILIES.values()
                for name, overrides in fam.variants.items()}

    def __getitem__(self, name: str) -> Tuple[str, List]:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


VARIANTS: Mapping[str, Tuple[str, List]] = _Variants()

# Variants whose 800x1333 flop counting takes longest on a small CPU; --no-large skips them.
LARGE_VARIANTS = ("R-152", "X-101-32x8d", "V-99-eSE")

SIZE_224 = (224, 224)
SIZE_DET = (800, 1333)
SIZE_DET_PADDED = (800, 1344)  # 800x1333 padded to a multiple of 32, as detectron2's ImageList does


def variant_family(name: str) -> Family:
    """The :class:`~d2_backbones.families.Family` of variant ``name``."""
    if name not in VARIANTS:
        raise ConfigError(
            f"Unknown model-table variant {name!r}. Valid values: {', '.join(VARIANTS)}. "
            f"Fix: pass names from that list to --variants.")
    return FAMILIES[VARIANTS[name][0]]


def variant_cfg(name: str, fpn: bool):
    """The config of variant ``name`` (see :data:`VARIANTS`), for the backbone or backbone+FPN builder."""
    fam = variant_family(name)
    feats = list(fam.stage_names)
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.NAME", fam.builder_names[1 if fpn else 0],
        "MODEL.BACKBONE.FREEZE_AT", 0,
        fam.arg_keys["norm"], "BN",
        fam.out_features_key, feats,
        "MODEL.FPN.IN_FEATURES", feats,
        "MODEL.FPN.OUT_CHANNELS", 256,
        "MODEL.FPN.TOP_BLOCK", "maxpool",
    ] + list(VARIANTS[name][1]))
    return cfg


def build_variant(name: str, fpn: bool) -> nn.Module:
    """Build variant ``name`` through the registry, in eval mode."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = variant_cfg(name, fpn)
    return build_backbone(cfg, ShapeSpec(channels=3)).eval()


def _flop_count_analysis(model: nn.Module, inputs):
    """fvcore's FlopCountAnalysis, tolerant of module names that contain "/".

    VoVNet keeps vovnet-detectron2's checkpoint names (``stem_1/conv``), and the JIT tracer
    joins module scopes with "/", so fvcore cannot map such a scope back to a module and
    raises ``KeyError`` while attributing counts. Unknown scopes are attributed to their
    longest known dotted prefix instead (always including the root, so ``total()`` is exact;
    only the per-module breakdown of those few layers moves to their parent).
    """
    from fvcore.nn import FlopCountAnalysis

    class _Analysis(FlopCountAnalysis):
        def _get_all_ancestors(self, module_name):
            try:
                return super()._get_all_ancestors(module_name)
            except KeyError:
                parts = module_name.split(".")
                while parts and ".".join(parts) not in self._aliases:
                    parts.pop()
                return super()._get_all_ancestors(".".join(parts)) if parts else {""}

    return _Analysis(model, inputs)


def count_gmacs(model: nn.Module, size: Tuple[int, int], by_operator: bool = False):
    """fvcore MACs (in G) of ``model`` on a 1x3xHxW input, and the Counter of skipped ops.

    With ``by_operator`` a third value is returned: ``{operator: GMACs}`` (``conv``,
    ``batch_norm``, ``linear``, ``upsample_nearest2d``, ...).
    """
    with torch.no_grad():
        fca = _flop_count_analysis(model, (torch.zeros(1, 3, *size),))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        total = fca.total()
        skipped = collections.Counter(fca.unsupported_ops())
        ops = {k: v / 1e9 for k, v in fca.by_operator().items()}
    return (total / 1e9, skipped, ops) if by_operator else (total / 1e9, skipped)


def cpu_latency_ms(model: nn.Module, size: Tuple[int, int] = SIZE_224, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time (ms) of ``model(x)`` for a 1x3xHxW input, eval + no_grad, after ``warmup`` runs."""
    model.eval()
    x = torch.randn(1, 3, *size)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_variant(name: str, *, latency_runs: int = 30, warmup: int = 5, det_size: bool = True) -> Dict:
    """All numbers of one row (see the module docstring); GMACs at 800x1333 are None without ``det_size``."""
    torch.manual_seed(0)
    backbone = build_variant(name, fpn=False)
    fpn = build_variant(name, fpn=True)
    row: Dict = {"name": name, "family": VARIANTS[name][0], "params": _params(backbone),
                 "params_fpn": _params(fpn), "skipped": collections.Counter()}
    row["gmacs_224"], skipped, ops = count_gmacs(backbone, SIZE_224, by_operator=True)
    row["gmacs_224_conv"] = ops.get("conv", 0.0) + ops.get("linear", 0.0) + ops.get("addmm", 0.0)
    row["skipped"].update(skipped)
    row["gmacs_det"] = row["gmacs_det_fpn"] = None
    if det_size:
        row["gmacs_det"], skipped = count_gmacs(backbone, SIZE_DET)
        row["skipped"].update(skipped)
        row["gmacs_det_fpn"], skipped = count_gmacs(fpn, SIZE_DET_PADDED)
        row["skipped"].update(skipped)
    row["latency_ms"] = cpu_latency_ms(backbone, SIZE_224, runs=latency_runs, warmup=warmup) \
        if latency_runs > 0 else None
    return row


def cpu_name() -> str:
    """The CPU model name (for the table's caption)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(v: Optional[float], digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(rows: Sequence[Dict], *, threads: int, latency_runs: int, warmup: int,
                 seconds: Optional[float] = None) -> str:
    """Markdown table + footnotes for ``rows`` from :func:`measure_variant`."""
    lines = [
        "| Variant | Backbone params | + FPN params | GMACs 224 | conv GMACs 224 | GMACs 800x1333 "
        "| GMACs 800x1344 with FPN | CPU ms 224 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['params_fpn']:,} | {_fmt(r['gmacs_224'], 3)} "
                     f"| {_fmt(r['gmacs_224_conv'], 3)} | {_fmt(r['gmacs_det'], 2)} "
                     f"| {_fmt(r['gmacs_det_fpn'], 2)} | {_fmt(r['latency_ms'], 1)} |")
    skipped = collections.Counter()
    for r in rows:
        skipped.update(r["skipped"])
    ops = ", ".join(f"`{op}`" for op in sorted(skipped)) or "none"
    lines += [
        "",
        "Backbones built by the registered `build_d2b_*` builders with NORM \"BN\" and FREEZE_AT 0 (BatchNorm "
        "affine weights counted as parameters); FPN: 256 channels, all four stages as inputs, max-pool P6. "
        "GMACs: fvcore `FlopCountAnalysis` / 1e9, batch 1 (fvcore counts one multiply-add as one flop, so "
        "these are MACs; it also counts BatchNorm, upsampling and pooling, not only convolutions; "
        "\"conv GMACs\" is its convolution + linear part, the number papers and timm quote). "
        "The FPN column uses 800x1344, the padded size detectron2 feeds for 800x1333 images.",
        "",
        f"Ops fvcore skipped (no counter; they are not in the totals): {ops}.",
        "",
        f"CPU latency: backbone only, 1x3x224x224, fp32, `eval()` + `no_grad()`, {warmup} warm-up runs, "
        f"median of {latency_runs} runs, torch.set_num_threads({threads}); {cpu_name()}, "
        f"torch {torch.__version__}. Machine-dependent: compare rows, not machines.",
    ]
    if seconds is not None:
        lines += ["", f"Generated by `python -m d2_backbones.model_table` in {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m d2_backbones.model_table", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="write the markdown table to this file (default: stdout only)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"variants to measure (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--latency-runs", type=int, default=30, help="timed runs per backbone (0 = skip latency)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the latency runs")
    parser.add_argument("--no-det-size", action="store_true",
                        help="skip the 800x1333 GMACs (the slowest part) for every variant")
    parser.add_argument("--no-large", action="store_true",
                        help=f"skip the 800x1333 GMACs of {', '.join(LARGE_VARIANTS)} only")
    args = parser.parse_args(argv)

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    logging.getLogger("d2_backbones").setLevel(logging.WARNING)

    t0 = time.time()
    rows = []
    for name in args.variants:
        t = time.time()
        det = not args.no_det_size and not (args.no_large and name in LARGE_VARIANTS)
        rows.append(measure_variant(name, latency_runs=args.latency_runs, warmup=args.warmup, det_size=det))
        print(f"{name}: {time.time() - t:.1f} s", file=sys.stderr)
    table = format_table(rows, threads=args.threads, latency_runs=args.latency_runs, warmup=args.warmup,
                         seconds=time.time() - t0)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
