"""detectron2's ``tools/analyze_model.py`` for this package's configs: ``python -m d2_backbones.analyze_model``.

Same flags and tasks as detectron2's tool (``--config-file``, ``--tasks flop activation parameter structure``,
``-n/--num-inputs``, trailing overrides), the same counting (detectron2's ``FlopCountAnalysis``,
``activation_count_operators``, ``parameter_count_table``), for yaml and Python configs::

    python -m d2_backbones.analyze_model --config-file configs/VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml \\
        --tasks flop parameter -n 10 MODEL.DEVICE cpu DATASETS.TEST "('shapes_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3
    python -m d2_backbones.analyze_model --config-file configs/VoVNet/mask_rcnn_V_39_eSE_FPN_3x.py \\
        --tasks structure parameter

Why detectron2's own tool cannot read a yaml of this package: it builds the config with detectron2's
``get_cfg()`` and never imports ``d2_backbones``, so the yaml's ``MODEL.VOVNET.*`` / ``MODEL.FPN.TOP_BLOCK``
keys are "Non-existent config key"s and ``build_d2b_*`` backbones are not registered. Here the config is built
as ``train_net`` builds it (:func:`d2_backbones.get_cfg`, then the file, then ``KEY VALUE`` overrides; yaml read
safely, ``--unsafe-yaml`` to opt out). A Python config imports the package itself, so detectron2's tool reads
it (with its datasets: those of detectron2's catalog); flop and activation counting of a VoVNet model work
there too once ``d2_backbones`` is imported (:mod:`d2_backbones.analyze`). This tool adds what ``train_net``
has: ``shapes_val`` generated and registered on first use, ``--register-coco NAME JSON IMAGE_ROOT`` for a COCO
json, ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` loaded through :class:`~d2_backbones.weights.Checkpointer`
(safe reading, load checks), and a clear error for a device this machine lacks.

``flop`` and ``activation`` run the model on the first ``-n`` images of the test dataset
(``DATASETS.TEST[0]`` / ``dataloader.test``): a detector's count depends on the image size and, in the heads,
on the number of boxes. :func:`main` returns what it logs (for scripts and tests).
"""
import argparse
import logging
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger

from . import engine
from .analyze import install_scope_names
from .config import get_cfg
from .errors import dotted_get
from .model_zoo import resolve_config_file
from .preflight import check_yacs_overrides
from .weights import Checkpointer
from .yaml_safety import allow_unsafe_yaml, load_lazy_config

__all__ = ["TASKS", "argument_parser", "setup", "build_model", "analysis_inputs", "main"]

TASKS = ("flop", "activation", "parameter", "structure")
logger = logging.getLogger("d2_backbones")


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` with detectron2's tool's ``--tasks`` and ``-n``, plus
    ``--register-coco`` and ``--unsafe-yaml`` as ``train_net`` has them."""
    parser = default_argument_parser(epilog=__doc__.split("::")[1].split("Why")[0])
    parser.add_argument("--tasks", choices=TASKS, required=True, nargs="+", help="what to report")
    parser.add_argument("-n", "--num-inputs", default=100, type=int,
                        help="number of test images for flop/activation counting (both depend on the image)")
    parser.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset (repeatable); use NAME in DATASETS.TEST")
    parser.add_argument("--unsafe-yaml", action="store_true",
                        help="read yaml configs with Python tags (they run code when read): only files you trust")
    return parser


def _is_yacs(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def setup(args):
    """The config ``args`` name with its overrides: a yacs ``CfgNode`` for a yaml (``d2_backbones.get_cfg()``,
    ``DATALOADER.NUM_WORKERS 0``, the file, the overrides), a LazyConfig for a Python config (``key=value``
    overrides). The device is checked; the datasets the config names are registered (shapes, ``--register-coco``)."""
    path = resolve_config_file(args.config_file, yacs=False)
    if _is_yacs(path):
        check_yacs_overrides(args.opts, get_cfg)
        cfg = get_cfg()
        with allow_unsafe_yaml(args.unsafe_yaml):
            cfg.merge_from_file(path)
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.merge_from_list(args.opts)
        cfg.freeze()
    else:
        bad = [o for o in args.opts if "=" not in o]
        if bad:
            raise SystemExit(f"Override {bad[0]!r} is not of the form key=value (a Python config takes key=value, "
                             f"e.g. train.device=cpu; 'KEY VALUE' pairs are for yaml configs).")
        cfg = LazyConfig.apply_overrides(load_lazy_config(path, unsafe=args.unsafe_yaml), args.opts)
    engine.check_device(cfg)
    engine.register_datasets(cfg, args)
    return cfg


def build_model(cfg) -> torch.nn.Module:
    """The config's model in eval mode with its weights (``MODEL.WEIGHTS`` / ``train.init_checkpoint``, when set)
    loaded through :class:`~d2_backbones.weights.Checkpointer`."""
    if isinstance(cfg, CfgNode):
        from detectron2.modeling import build_model as build

        model, weights = build(cfg), cfg.MODEL.WEIGHTS
    else:
        from .lazy import instantiate_model

        model = instantiate_model(cfg.model).to(dotted_get(cfg, "train.device") or "cuda")
        weights = dotted_get(cfg, "train.init_checkpoint")
    if weights:
        Checkpointer(model, cfg=cfg if isinstance(cfg, CfgNode) else None).load(weights)
    return model.eval()


def analysis_inputs(cfg, n: int) -> List[list]:
    """The first ``n`` batches of the config's test loader (one image each, in the model's input format)."""
    keys = engine.keys_of(cfg)
    engine.check_datasets(cfg, eval_only=True)
    if isinstance(cfg, CfgNode):
        from detectron2.data import build_detection_test_loader

        if not cfg.DATASETS.TEST:
            raise SystemExit("flop/activation counting runs the model on test images, but DATASETS.TEST is empty. "
                             "Fix: add DATASETS.TEST \"('shapes_val',)\" (or a --register-coco dataset).")
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    else:
        loader = instantiate(cfg.dataloader.test)
    out = []
    for batch in loader:
        if len(out) >= n:
            break
        out.append(batch)
    if not out:
        raise SystemExit(f"The test dataset ({keys.test_sets}) has no images.")
    return out


def count_flops(model, inputs: Sequence[list]) -> Dict[str, object]:
    """detectron2's ``FlopCountAnalysis`` over ``inputs``: the per-module table of the first one, GFLOPs per
    operator (mean over the inputs), and the total GFLOPs of each input."""
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import flop_count_table

    by_op, totals, table = Counter(), [], ""
    for i, data in enumerate(inputs):
        flops = FlopCountAnalysis(model, data)
        if i:
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op.update(flops.by_operator())
        totals.append(flops.total() / 1e9)
        if i == 0:
            table = flop_count_table(flops)
    return {"table": table, "gflops_by_operator": {k: v / len(inputs) / 1e9 for k, v in by_op.items()},
            "gflops": totals}


def count_activations(model, inputs: Sequence[list]) -> Dict[str, object]:
    """detectron2's ``activation_count_operators`` over ``inputs`` (millions, per operator and per input)."""
    from detectron2.utils.analysis import activation_count_operators

    by_op, totals = Counter(), []
    for data in inputs:
        counts = activation_count_operators(model, data)
        by_op.update(counts)
        totals.append(sum(counts.values()))
    return {"mactivations_by_operator": {k: v / len(inputs) for k, v in by_op.items()}, "mactivations": totals}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the tasks of ``argv`` (the command line); returns ``{task: result}`` after logging each."""
    install_scope_names()  # done by `import d2_backbones` too; this module may be imported alone
    args = argument_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="d2_backbones", abbrev_name="d2b")
    cfg = setup(args)
    model = build_model(cfg)
    results: Dict[str, object] = {}
    inputs = None
    for task in dict.fromkeys(args.tasks):
        if task in ("flop", "activation") and inputs is None:
            inputs = analysis_inputs(cfg, args.num_inputs)
        if task == "flop":
            r = results["flop"] = count_flops(model, inputs)
            g = np.array(r["gflops"])
            logger.info(f"Flops table computed from one input sample:\n{r['table']}")
            logger.info(f"Average GFlops for each type of operator: {r['gflops_by_operator']}")
            logger.info(f"Total GFlops: {g.mean():.1f}±{g.std():.1f} over {len(g)} image(s)")
        elif task == "activation":
            r = results["activation"] = count_activations(model, inputs)
            a = np.array(r["mactivations"])
            logger.info(f"(Million) activations for each type of operator: {r['mactivations_by_operator']}")
            logger.info(f"Total (million) activations: {a.mean():.1f}±{a.std():.1f} over {len(a)} image(s)")
        elif task == "parameter":
            from detectron2.utils.analysis import parameter_count_table

            results["parameter"] = parameter_count_table(model, max_depth=5)
            logger.info(f"Parameter count:\n{results['parameter']}")
        else:
            results["structure"] = str(model)
            logger.info(f"Model structure:\n{results['structure']}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
