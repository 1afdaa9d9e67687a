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

Both predictors live here; :mod:`d2_backbones.inference` holds the folding they use.
"""
import logging

from detectron2.engine import DefaultPredictor

from .build import check_head_features
from .inference import optimize_for_inference
from .weights import Checkpointer

__all__ = ["Predictor", "OptimizedPredictor", "make_predictor"]

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


class OptimizedPredictor(Predictor):
    """detectron2's :class:`DefaultPredictor` with checked loading (:class:`Predictor`) and
    :func:`optimize_for_inference` applied.

    Same constructor and call as ``DefaultPredictor`` (build, load ``cfg.MODEL.WEIGHTS`` through
    :class:`~d2_backbones.weights.Checkpointer`, eval; then fold). Example::

        predictor = OptimizedPredictor(cfg)
        outputs = predictor(cv2.imread("input.jpg"))  # {"instances": Instances(...)}
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = optimize_for_inference(self.model)


def make_predictor(cfg) -> Predictor:
    """The predictor ``cfg`` asks for: :class:`OptimizedPredictor` with ``TEST.OPTIMIZE_FOR_INFERENCE``,
    else :class:`Predictor`. Tools that predict (the demo) build their predictor here."""
    return OptimizedPredictor(cfg) if cfg.TEST.OPTIMIZE_FOR_INFERENCE else Predictor(cfg)
