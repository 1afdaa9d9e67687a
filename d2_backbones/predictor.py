"""detectron2's ``DefaultPredictor`` whose weights go through the package's checkpointer.

:class:`Predictor` has ``DefaultPredictor``'s constructor and call (BGR/RGB image in,
``{"instances": ...}`` out) and loads ``cfg.MODEL.WEIGHTS`` with
:class:`~d2_backbones.weights.Checkpointer` instead of ``DetectionCheckpointer``: a ``.pkl`` is
read without running code, and weights made for another architecture stop the load (see
:mod:`d2_backbones.weights.checks`) instead of leaving a randomly initialised backbone behind
hundreds of "Skip loading parameter" lines. :class:`~d2_backbones.OptimizedPredictor` is this
plus :func:`~d2_backbones.optimize_for_inference` and the runtime switch (``TEST.RUNTIME``,
``TEST.PRECISION``: :mod:`d2_backbones.runtime`); :func:`make_predictor` picks the one a cfg asks for.

Example::

    predictor = d2_backbones.Predictor(cfg)
    outputs = predictor(read_image("input.jpg", format="BGR"))  # detectron2.data.detection_utils.read_image

Both predictors live here; :mod:`d2_backbones.inference` holds the folding they use.
"""
import logging

from detectron2.engine import DefaultPredictor

from .build import check_head_features
from .runtime import check_runtime, find_calibration, is_switched, prepare_model
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
        if is_switched(cfg) and type(self) is Predictor:
            logger.warning(f"Predictor runs PyTorch fp32 as detectron2's DefaultPredictor; TEST.RUNTIME="
                           f"{cfg.TEST.RUNTIME!r} / TEST.PRECISION={cfg.TEST.PRECISION!r} are used by "
                           f"OptimizedPredictor and make_predictor(cfg).")


class OptimizedPredictor(Predictor):
    """detectron2's :class:`DefaultPredictor` with checked loading (:class:`Predictor`),
    :func:`optimize_for_inference` applied, and the runtime ``TEST.RUNTIME`` / ``TEST.PRECISION`` ask for.

    Same constructor and call as ``DefaultPredictor`` (build, load ``cfg.MODEL.WEIGHTS`` through
    :class:`~d2_backbones.weights.Checkpointer`, eval; then fold and, with ``TEST.RUNTIME onnxruntime`` /
    ``openvino`` or ``TEST.PRECISION bf16`` / ``int8``, run the backbone + FPN there: see
    :mod:`d2_backbones.runtime`). Example::

        predictor = OptimizedPredictor(cfg)
        outputs = predictor(read_image("input.jpg", format="BGR"))  # {"instances": Instances(...)}
    """

    def __init__(self, cfg):
        check_runtime(cfg)  # before building: values, packages, the int8 calibration
        if cfg.TEST.PRECISION == "int8":
            find_calibration(cfg)
        super().__init__(cfg)
        self.model = prepare_model(self.model, self.cfg)


def make_predictor(cfg) -> Predictor:
    """The predictor ``cfg`` asks for: :class:`OptimizedPredictor` with ``TEST.OPTIMIZE_FOR_INFERENCE`` or a
    runtime / precision other than PyTorch fp32 (``TEST.RUNTIME``, ``TEST.PRECISION``), else :class:`Predictor`.
    Tools that predict (the demo) build their predictor here."""
    return OptimizedPredictor(cfg) if cfg.TEST.OPTIMIZE_FOR_INFERENCE or is_switched(cfg) else Predictor(cfg)
