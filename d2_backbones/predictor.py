"""detectron2's ``DefaultPredictor`` whose weights go through the package's checkpointer.

:class:`Predictor` has ``DefaultPredictor``'s constructor and call (BGR/RGB image in,
``{"instances": ...}`` out) and loads ``cfg.MODEL.WEIGHTS`` with
:class:`~d2_backbones.weights.Checkpointer` instead of ``DetectionCheckpointer``: a ``.pkl`` is
read without running code, and weights made for another architecture stop the load (see
:mod:`d2_backbones.weights.checks`) instead of leaving a randomly initialised backbone behind
hundreds of "Skip loading parameter" lines. :class:`~d2_backbones.OptimizedPredictor` is this
plus :func:`~d2_backbones.optimize_for_inference`.

Example::

    predictor = d2_backbones.Predictor(cfg)
    outputs = predictor(cv2.imread("input.jpg"))  # {"instances": Instances(...)}
"""
import logging

from detectron2.engine import DefaultPredictor

from .build import check_head_features
from .weights import Checkpointer

__all__ = ["Predictor"]

logger = logging.getLogger("d2_backbones")


class Predictor(DefaultPredictor):
    """``DefaultPredictor`` that loads ``cfg.MODEL.WEIGHTS`` through :class:`~d2_backbones.weights.Checkpointer`."""

    def __init__(self, cfg):
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""  # detectron2's constructor builds and prepares; it loads nothing
        try:
            super().__init__(unloaded)
        except KeyError:  # a head asking for a feature the backbone lacks: say which key and what to change
            check_head_features(cfg)
            raise
        self.cfg = cfg.clone()
        if cfg.MODEL.WEIGHTS:
            Checkpointer(self.model, cfg=self.cfg).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the predictor's model keeps its random initialisation.")
