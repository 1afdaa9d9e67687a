"""``python -m d2_backbones.convert SRC DST``: convert pretrained checkpoints (see :mod:`d2_backbones.weights.cli`).

The weights layer lives in :mod:`d2_backbones.weights`; this module is the command's entry point
and keeps the names it exported before (``read_checkpoint``, ``convert_checkpoint``,
``check_weights_metadata``, ...).
"""
import sys

from .weights.checks import WeightsMismatchError, check_shape_skips, check_weights_metadata
from .weights.cli import main, read_checkpoint
from .weights.formats import FORMATS, METADATA_KEY, PREFIX, ConvertError, convert_checkpoint, detect_format

__all__ = ["FORMATS", "ConvertError", "WeightsMismatchError", "read_checkpoint", "detect_format",
           "convert_checkpoint", "check_weights_metadata", "check_shape_skips", "main", "METADATA_KEY", "PREFIX"]

if __name__ == "__main__":
    sys.exit(main())
