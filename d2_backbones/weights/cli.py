"""Command line of the weights layer: ``python -m d2_backbones.convert SRC DST``.

::

    python -m d2_backbones.convert SRC DST [--format auto|FORMAT] [--arch ARCH] [--style pytorch|caffe]
                                           [--allow-partial]

Reads ``SRC`` safely (:mod:`~d2_backbones.weights.read`), converts it
(:func:`~d2_backbones.weights.formats.convert_checkpoint`, strict unless ``--allow-partial``) and
writes, each atomically:

* ``DST`` - ``{"model": {backbone.bottom_up.*: tensor}, "__author__", "matching_heuristics": False,
  "d2_backbones": metadata}`` for ``MODEL.WEIGHTS``;
* ``DST`` with the suffix ``.yaml`` (``out.pth`` -> ``out.yaml``) - exactly the config keys the
  weights need, for ``cfg.merge_from_file`` or ``_BASE_``.

It prints what it wrote and dropped, and a paste-able override string (lists quoted for the shell).
A file that loads as it is (a detector checkpoint written by train_net or detectron2, or a file this
converter wrote) is refused with exit code 2, nothing written, and a message naming ``MODEL.WEIGHTS``.

Example::

    $ python -m d2_backbones.convert resnet50-0676ba61.pth r50_tv.pth
    format torchvision-resnet, arch R-50: 265 tensors written to r50_tv.pth
    dropped (2 classifier/profiler/head, 53 num_batches_tracked): fc.bias, fc.weight
    config for these weights written to r50_tv.yaml; as overrides:
      MODEL.RESNETS.DEPTH 50 ... INPUT.FORMAT "'RGB'" MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" ...
"""
import argparse
import os
import shlex
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import yaml

from .checks import overrides_string
from .formats import FORMATS, METADATA_KEY, ConvertError, convert_checkpoint, detect_format, listing
from .read import CheckpointReadError, load_file
from .write import AtomicFile

__all__ = ["main", "config_yaml", "yaml_path_for", "read_checkpoint"]


def yaml_path_for(dst: str) -> str:
    """``out.pth`` -> ``out.yaml`` (the config file written beside converted weights)."""
    return os.path.splitext(dst)[0] + ".yaml"


def config_yaml(config: Mapping[str, Any], source: str = "") -> str:
    """The dotted ``config`` as a nested yaml document detectron2 merges (``VERSION: 2``)."""
    tree: Dict[str, Any] = {}
    for key, value in config.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    head = ("# Config values the converted weights need (written by python -m d2_backbones.convert"
            + (f" from {source}" if source else "") + ").\n# Merge it with cfg.merge_from_file(...) or use it as "
            "_BASE_ of your config.\n")
    return head + yaml.safe_dump({**tree, "VERSION": 2}, sort_keys=False, default_flow_style=None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2_backbones.convert",
                                description="Convert a pretrained checkpoint for d2_backbones.")
    p.add_argument("src", help="checkpoint to read (.pth/.pt/.bin saved by torch.save)")
    p.add_argument("dst", help="file to write (load it with MODEL.WEIGHTS); its .yaml is written beside it")
    p.add_argument("--format", default="auto", choices=("auto",) + tuple(FORMATS))
    p.add_argument("--arch", default=None, help="R-50, R-101-V1d, X-101-32x8d, V-39-eSE, ghostnet_100, 1.3, ...")
    p.add_argument("--style", default=None, choices=("pytorch", "caffe"),
                   help="MMDetection weights only: caffe sets STRIDE_IN_1X1 True, BGR and std 1 (default pytorch)")
    p.add_argument("--allow-partial", action="store_true",
                   help="write the matching tensors even if some do not map or fit (experts)")
    return p


def _read_source(path: str) -> Any:
    if path.endswith(".pkl"):
        raise ConvertError(
            f"{path}: detectron2/Caffe2 .pkl files (e.g. the MSRA ImageNet weights) need no conversion - set "
            f"MODEL.WEIGHTS to the .pkl; d2_backbones' checkpointer reads it safely (numpy arrays only). MSRA weights "
            f"expect the caffe style, BGR input and PIXEL_STD 1.0, as detectron2's own R-50/R-101 configs set.")
    try:
        return load_file(path)
    except ConvertError:
        raise
    except CheckpointReadError as e:  # one error type for the converter's callers
        raise ConvertError(str(e)) from None


read_checkpoint = _read_source

_DETECTRON2_HEADS = ("roi_heads.", "proposal_generator.", "sem_seg_head.", "head.", "backbone.fpn_")


def _refuse_loadable(obj: Any, src: str) -> None:
    """A file that ``MODEL.WEIGHTS`` loads as it is - a detectron2 / train_net detector checkpoint, or one this
    converter wrote - is not converted (nothing is written), with a message saying how to load it."""
    if not isinstance(obj, Mapping):
        return
    if isinstance(obj.get(METADATA_KEY), Mapping):
        raise ConvertError(f"{src} was written by python -m d2_backbones.convert ({obj[METADATA_KEY].get('arch')}): it "
                           f"needs no conversion. Load it as it is: MODEL.WEIGHTS {shlex.quote(src)} (merge the .yaml "
                           f"beside it). Nothing was written.")
    state = obj.get("model")
    if not isinstance(state, Mapping):
        return
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    if not any(k.startswith("backbone.") for k in keys) or not any(k.startswith(_DETECTRON2_HEADS) for k in keys):
        return
    try:
        detect_format(dict(state))  # a format this converter reads (e.g. a vovnet-detectron2 file): convert it
        return
    except ConvertError:
        pass
    heads = sorted({k.split(".")[0] for k in keys if not k.startswith("backbone.")})
    raise ConvertError(
        f"{src} is a detectron2 detector checkpoint ({len(keys)} tensors in detectron2's names: "
        f"{listing([k for k in keys if k.startswith('backbone.')], 1)}, heads {', '.join(heads) or 'none'}), as "
        f"train_net and detectron2 write them: it needs no conversion. Load it as it is: MODEL.WEIGHTS "
        f"{shlex.quote(src)} (train_net, predictors, export) or train.init_checkpoint={shlex.quote(src)} "
        f"(lazy_train), with a config of the same backbone. Nothing was written.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    yaml_dst = yaml_path_for(args.dst)
    try:
        if os.path.abspath(args.src) == os.path.abspath(args.dst):
            raise ConvertError("SRC and DST are the same file.")
        if os.path.abspath(yaml_dst) in (os.path.abspath(args.src), os.path.abspath(args.dst)):
            raise ConvertError(f"DST {args.dst!r}: the config is written to {yaml_dst!r}, which is SRC or DST; give "
                               f"DST another suffix, e.g. .pth.")
        obj = _read_source(args.src)
        if args.format == "auto":
            _refuse_loadable(obj, args.src)
        result = convert_checkpoint(obj, args.format, arch=args.arch, style=args.style,
                                    allow_partial=args.allow_partial, source=args.src)
    except CheckpointReadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = result.pop("report")
    meta = result[METADATA_KEY]
    with AtomicFile(args.dst, "wb") as f:
        torch.save(result, f)
    with AtomicFile(yaml_dst, "w") as f:
        f.write(config_yaml(meta["config"], os.path.basename(args.src)))
    nbt = [k for k in report["dropped"] if k.endswith("num_batches_tracked")]
    other = [k for k in report["dropped"] if not k.endswith("num_batches_tracked")]
    print(f"format {meta['source_format']}, arch {meta['arch']}: {len(result['model'])} tensors written to "
          f"{args.dst}")
    print(f"dropped ({len(other)} classifier/profiler/head, {len(nbt)} num_batches_tracked): {listing(other, 20)}")
    if meta["partial"]:
        print(f"--allow-partial: NOT written: {len(report['unexpected'])} unmapped "
              f"({listing(report['unexpected'])}), {len(report['shape_mismatch'])} shape mismatches "
              f"({listing(report['shape_mismatch'], 5)}); {len(report['missing'])} model parameters stay "
              f"initialised ({listing(report['missing'])})")
    print(f"config for these weights written to {yaml_dst} (merge it, or use it as _BASE_); as overrides:")
    print(f"  MODEL.WEIGHTS {shlex.quote(args.dst)} {overrides_string(meta['config'])}")
    return 0
