#!/usr/bin/env python
"""Export a d2_backbones backbone (+FPN) to TorchScript or ONNX and check it against eager outputs.

Same as ``python -m d2_backbones.export``; the config is built with ``d2_backbones.get_cfg()``
first, so yamls with d2_backbones keys load. Examples::

    python tools/export.py --config-file configs/GhostNet/faster_rcnn_ghostnet_100_FPN_1x.yaml \\
        --format torchscript --export-method scripting --output out/
    python tools/export.py --config-file configs/ResNet/faster_rcnn_R_50_FPN_1x.yaml \\
        --format onnx --height 800 --width 1344 --output out/ MODEL.WEIGHTS model_final.pth

Covered: backbone + FPN of every family (``--bottom-up``: backbone only); full detectors are
not (see the ``d2_backbones.export`` module docstring for the coverage table).
"""
from d2_backbones.export import main

if __name__ == "__main__":
    main()
