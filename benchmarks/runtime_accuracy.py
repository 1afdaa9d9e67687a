"""COCO AP of a trained model on its test set for every runtime and precision (``TEST.RUNTIME`` x ``TEST.PRECISION``).

Each mode is one ``python -m d2_backbones.train_net --eval-only`` run (the path users evaluate with), whose
bbox (and, for Mask R-CNN, segm) AP is read from detectron2's ``copypaste`` lines; int8 modes calibrate first
with ``python -m d2_backbones.calibrate`` (``--num-images`` training images) unless a calibration of the
weights exists. The table compares each mode with PyTorch fp32 (targets: bf16 within 0.5 AP, int8 within 1.0).

Run on the short quickstart (train it first: python train_net.py --config-file
configs/quickstart/faster_rcnn_R_18_FPN_shapes_short.yaml)::

    python benchmarks/runtime_accuracy.py --config-file configs/quickstart/faster_rcnn_R_18_FPN_shapes_short.yaml \\
        --weights output/quickstart_short/model_final.pth
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["torch-fp32", "onnxruntime-fp32", "openvino-fp32", "torch-bf16", "openvino-bf16", "onnxruntime-int8",
         "openvino-int8"]
TOLERANCE = {"fp32": 0.05, "bf16": 0.5, "int8": 1.0}  # AP points below PyTorch fp32


def parse_ap(log: str) -> Dict[str, float]:
    """``{"bbox": AP, "segm": AP}`` from detectron2's ``copypaste:`` lines."""
    aps, task = {}, None
    for line in log.splitlines():
        m = re.search(r"copypaste: Task: (\w+)", line)
        if m:
            task = m.group(1)
            continue
        m = re.search(r"copypaste: (-?[\d.]+(?:,(?:-?[\d.]+|nan))+)\s*$", line)
        if m and task and task not in aps:
            aps[task] = float(m.group(1).split(",")[0])
    return aps


def run(cmd: List[str], env) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    return p.stdout + p.stderr


def main(argv: Sequence[str] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--modes", nargs="+", default=MODES, metavar="RUNTIME-PRECISION")
    p.add_argument("--num-images", type=int, default=200, help="calibration images for the int8 modes")
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    a = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    common = ["MODEL.WEIGHTS", a.weights, "MODEL.DEVICE", "cpu"] + list(a.opts)
    sys.path.insert(0, REPO)
    from d2_backbones.config import get_cfg
    from d2_backbones.runtime import calibration_path, describe_isa

    cfg = get_cfg()
    cfg.merge_from_file(a.config_file)
    cfg.merge_from_list(common)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            runtime, precision = mode.split("-")
            if precision == "int8" and not os.path.isfile(calibration_path(cfg)):
                print(run([sys.executable, "-m", "d2_backbones.calibrate", "--config-file", a.config_file,
                           "--num-images", str(a.num_images)] + common, env).strip().splitlines()[-1], flush=True)
            log = run([sys.executable, "-m", "d2_backbones.train_net", "--config-file", a.config_file, "--eval-only",
                       "TEST.RUNTIME", runtime, "TEST.PRECISION", precision, "OUTPUT_DIR",
                       os.path.join(tmp, mode)] + common, env)
            results[mode] = parse_ap(log)
            print(mode, results[mode], flush=True)
    ref = results.get("torch-fp32", {})
    tasks = sorted({t for r in results.values() for t in r})
    lines = [f"`{a.config_file}` with `{os.path.basename(a.weights)}`, COCO AP on `{', '.join(cfg.DATASETS.TEST)}`; "
             f"int8 calibrated on {a.num_images} images of `{', '.join(cfg.DATASETS.TRAIN)}`; CPU: {describe_isa()}.",
             "", "| runtime | precision | " + " | ".join(f"{t} AP | Δ {t}" for t in tasks) + " |",
             "|---|---|" + "---:|---:|" * len(tasks)]
    for mode, r in results.items():
        runtime, precision = mode.split("-")
        cells = []
        for t in tasks:
            d = r.get(t, float("nan")) - ref.get(t, float("nan"))
            ok = "" if mode == "torch-fp32" else (" ✓" if -d <= TOLERANCE[precision] else " ✗")
            cells.append(f"{r.get(t, float('nan')):.2f} | {d:+.2f}{ok}")
        lines.append(f"| {runtime} | {precision} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
