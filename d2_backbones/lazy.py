"""Python-config (LazyConfig) pieces: detectron2's meta-architectures over the families' backbones.

detectron2's Python configs describe a model as a tree of ``LazyCall`` nodes that
:func:`detectron2.config.instantiate` turns into objects. The families take plain keyword
arguments, so a backbone is written directly, e.g.
``L(build_fpn)(bottom_up=L(VoVNet)(spec="V-39-eSE", ...), in_features=[...], top_block="maxpool")``;
this module supplies the rest of a config file, built from detectron2's own classes
(``GeneralizedRCNN``, ``CascadeROIHeads``, ``PanopticFPN``, ``RetinaNet``, ``FCOS`` and their
heads; :class:`FCOS` only casts its predictions to float32 before the losses) with the values of the yaml configs in ``configs/``, so a Python config and the yaml of the
same architecture build the same model (same parameter names, same outputs; tested):

=============================  ==============================================================
piece                          what it returns
=============================  ==============================================================
:func:`fpn`                    ``L(build_fpn)`` over a family's ``LazyCall`` (its outputs set to
                               the FPN's inputs)
:func:`mask_rcnn_fpn`          ``L(GeneralizedRCNN)``: RPN on p2-p6, box + mask heads on p2-p5
:func:`cascade_mask_rcnn_fpn`  the same with ``CascadeROIHeads`` (3 stages, IoU 0.5/0.6/0.7,
                               class-agnostic box regression)
:func:`panoptic_fpn`           ``L(PanopticFPN)``: Mask R-CNN + ``SemSegFPNHead`` on p2-p5
:func:`retinanet`              ``L(RetinaNet)`` on p3-p7
:func:`fcos`                   ``L(FCOS)`` on p3-p7 (P6/P7 from P5: ``top_block_source="on_output"``)
:func:`coco_loaders`           ``dataloader.train`` / ``.test`` / ``.evaluator`` (COCO or any
                               registered dataset; ``panoptic=True`` for Panoptic FPN)
:func:`sgd`, :func:`multistep_lr`  ``optimizer``, ``lr_multiplier``
:func:`train_settings`         ``train`` (output_dir, init_checkpoint, max_iter, amp, ...), the
                               keys of detectron2's ``configs/common/train.py``
=============================  ==============================================================

Each family folder has one ``configs/<Family>/common.py`` that says what is the family's own:
the bottom-up network as a ``LazyCall`` (``bottom_up = L(VoVNet)(spec="V-39-eSE",
norm="FrozenBN", freeze_at=0)``), its feature names (``C2_C5``, ``C3_C5``), the model's input
settings (``inputs``: pixel mean/std, input format; ``image_format`` for the loaders) and the
ImageNet weights to start from (``init_checkpoint``). A config file beside it is then::

    from d2_backbones.lazy import coco_loaders, fpn, mask_rcnn_fpn, multistep_lr, sgd, train_settings

    from .common import C2_C5, bottom_up, image_format, init_checkpoint, inputs

    model = mask_rcnn_fpn(fpn(bottom_up, C2_C5), num_classes=80, **inputs)
    dataloader = coco_loaders(image_format=image_format)
    optimizer = sgd(lr=0.02)
    lr_multiplier = multistep_lr(max_iter=270000, steps=(210000, 250000))
    train = train_settings(max_iter=270000, init_checkpoint=init_checkpoint)

(detectron2's ``LazyConfig.load`` resolves the relative import to the file beside the config,
as in detectron2's own ``configs/common``.)

Every head reads the FPN width through an interpolation (``"${...backbone.out_channels}"``),
so ``model.backbone.out_channels=128`` gives an FPNLite model. The pieces assume the standard
feature names of :func:`~d2_backbones.fpn.build_fpn` (``p<log2 stride>``); the anchor strides and
pooler scales they set are checked against the backbone by :func:`check_model_features`, which
:func:`instantiate_model` (used by ``python -m d2_backbones.lazy_train``) runs before the heads are
built.

Where detectron2's configs say the same, they are used: the models, the loaders, SGD, the schedule and
the training settings start from detectron2's own ``configs/common`` files, read by path
(:func:`detectron2_common`), and this module only sets what differs (the backbone, the head widths
from its ``out_channels``, the values of the yaml configs, :class:`FCOS`) and checks the result.
Nothing here imports ``detectron2.model_zoo``.
"""
import copy
import functools
import logging
import math
import os
from typing import Dict, List, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

import torch

import detectron2
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS

from .errors import ConfigError, argument_keys, config_error, dotted_get
from .fpn import build_fpn, describe_features

__all__ = [
    "BGR_MEAN", "BGR_STD", "RGB_MEAN", "RGB_STD", "RETINANET_ANCHOR_SIZES", "FCOS",
    "fpn", "mask_rcnn_fpn", "cascade_mask_rcnn_fpn", "panoptic_fpn", "retinanet", "fcos",
    "coco_loaders", "sgd", "multistep_lr", "train_settings", "detectron2_common",
    "instantiate_model", "check_model_features", "class_count_keys",
]

logger = logging.getLogger("d2_backbones")

# Input normalisation (0-255 inputs): detectron2's defaults for MSRA/caffe weights (BGR, std 1),
# and the ImageNet mean/std of torchvision/timm weights (RGB).
BGR_MEAN = [103.53, 116.28, 123.675]
BGR_STD = [1.0, 1.0, 1.0]
RGB_MEAN = [123.675, 116.28, 103.53]
RGB_STD = [58.395, 57.12, 57.375]

# RetinaNet anchors: 3 scales per octave, x * 2**(k/3), rounded to 4 decimals as in
# configs/Base-RetinaNet.yaml, so the yaml and the Python configs build identical anchors.
RETINANET_ANCHOR_SIZES = [[round(x * 2 ** (k / 3), 4) for k in range(3)] for x in (32, 64, 128, 256, 512)]


# ---------------------------------------------------------------------------------------------
# detectron2's configs/common, read by path
# ---------------------------------------------------------------------------------------------
def _common_dir() -> str:
    return os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", "common")


@functools.lru_cache(maxsize=None)
def _load_common(path: str, key: str):
    return LazyConfig.load(path, key)


def detectron2_common(rel: str, key: str):
    """A copy of ``key`` of detectron2's ``configs/common/<rel>`` (e.g. ``("models/retinanet.py", "model")``).

    detectron2 installs those files as package data (``detectron2/model_zoo/configs/common``);
    ``LazyConfig.load`` reads them by path and resolves their relative imports by location, so
    ``detectron2.model_zoo`` (which needs ``pkg_resources``) is never imported.
    """
    path = os.path.join(_common_dir(), rel)
    if not os.path.isfile(path):
        raise ConfigError(
            f"detectron2's config file {path} does not exist: this detectron2 installation lacks its configs/common "
            f"files (package data under detectron2/model_zoo/configs), which the Python configs start from. Fix: "
            f"reinstall detectron2 from its source so its package data is installed: pip install "
            f"--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' (or a local copy of the "
            f"source, see the README's Install).")
    return copy.deepcopy(_load_common(path, key))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class FCOS(_D2FCOS):
    """detectron2's :class:`~detectron2.modeling.meta_arch.fcos.FCOS` whose losses and box decoding
    take float32 predictions.

    Under autocast the head's outputs are float16/bfloat16; detectron2 decodes them into boxes of
    that dtype and its GIoU loss (fvcore's ``giou_loss``) then writes float32 intersections into a
    low-precision tensor and fails ("Index put requires the source and destination dtypes match").
    Casting the predictions first is the usual mixed-precision rule (losses in float32); in float32
    nothing changes. Same constructor, parameters and outputs as detectron2's class.
    """

    @staticmethod
    def _float(predictions):
        return [[p.float() for p in level] for level in predictions]

    def forward_training(self, images, features, predictions, gt_instances):
        return super().forward_training(images, features, self._float(predictions), gt_instances)

    def forward_inference(self, images, features, predictions):
        return super().forward_inference(images, features, self._float(predictions))


def fpn(bottom_up, in_features: Sequence[str], *, top_block: str = "maxpool", top_block_source: str = "",
        out_channels: int = 256):
    """``L(build_fpn)`` over a copy of ``bottom_up`` (a ``LazyCall`` of a family) set to output
    exactly ``in_features``.

    ``fpn(bottom_up, C2_C5)`` is the FPN of the R-CNN meta-architectures (p2-p6, P6 a max-pool of
    P5); ``fpn(bottom_up, C3_C5, top_block="p6p7", top_block_source="on_input")`` RetinaNet's (p3-p7,
    P6/P7 from C5; FCOS: ``"on_output"``, from P5). ``out_channels=128`` gives FPNLite.
    """
    bottom_up = copy.deepcopy(bottom_up)
    bottom_up.out_features = list(in_features)
    node = L(build_fpn)(bottom_up=bottom_up, in_features=list(in_features), out_channels=out_channels,
                        top_block=top_block)
    if top_block_source:
        node.top_block_source = top_block_source
    return node


_WIDTH = "${%sbackbone.out_channels}"  # the FPN width, read through an interpolation this many levels up


def _fit(model, backbone, num_classes, pixel_mean, pixel_std, input_format=None):
    """detectron2's model config around ``backbone``: inputs, class count, and every head width read from the
    backbone's ``out_channels`` (detectron2's files write 256)."""
    model.backbone = backbone
    model.pixel_mean, model.pixel_std = list(pixel_mean), list(pixel_std)
    if input_format is not None:
        model.input_format = input_format
    heads = model.get("roi_heads")
    if heads is not None:
        heads.num_classes = num_classes
        model.proposal_generator.head.in_channels = _WIDTH % "..."
        for name, size in (("box_head", 7), ("mask_head", 14)):
            if name in heads:
                heads[name].input_shape = L(ShapeSpec)(channels=_WIDTH % "....", height=size, width=size)
        for head in heads.get("box_heads", []):  # Cascade R-CNN
            head.input_shape = L(ShapeSpec)(channels=_WIDTH % ".....", height=7, width=7)
    else:  # RetinaNet, FCOS: one head on p3-p7
        model.num_classes = num_classes
        model.head.input_shape = [L(ShapeSpec)(channels=_WIDTH % "....") for _ in range(5)]
        model.head.conv_dims = [_WIDTH % "..."] * 4
    return model


def mask_rcnn_fpn(backbone, *, num_classes: int = 80, pixel_mean: Sequence[float] = BGR_MEAN,
                  pixel_std: Sequence[float] = BGR_STD, input_format: str = "BGR"):
    """``L(GeneralizedRCNN)``: Mask R-CNN on an FPN with outputs p2-p6 (C2-C5 inputs, max-pool P6):
    detectron2's ``configs/common/models/mask_rcnn_fpn.py`` (the values of ``configs/Base-RCNN-FPN.yaml``
    with ``MASK_ON: True``) around ``backbone``. ``del model.roi_heads.mask_in_features,
    model.roi_heads.mask_pooler, model.roi_heads.mask_head`` turns it into Faster R-CNN.
    """
    return _fit(detectron2_common("models/mask_rcnn_fpn.py", "model"), backbone, num_classes, pixel_mean,
                pixel_std, input_format)


def cascade_mask_rcnn_fpn(backbone, *, num_classes: int = 80, pixel_mean: Sequence[float] = BGR_MEAN,
                          pixel_std: Sequence[float] = BGR_STD, input_format: str = "BGR"):
    """``L(GeneralizedRCNN)`` with ``CascadeROIHeads``: detectron2's ``configs/common/models/cascade_rcnn.py``
    (three box stages, IoU 0.5, 0.6, 0.7, class-agnostic box regression, one mask head) with the 2000 RPN
    proposals per training image of its ``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``."""
    model = detectron2_common("models/cascade_rcnn.py", "model")
    model.proposal_generator.post_nms_topk = (2000, 1000)
    return _fit(model, backbone, num_classes, pixel_mean, pixel_std, input_format)


def panoptic_fpn(backbone, *, num_classes: int = 80, sem_seg_classes: int = 54, pixel_mean: Sequence[float] = BGR_MEAN,
                 pixel_std: Sequence[float] = BGR_STD, input_format: str = "BGR"):
    """``L(PanopticFPN)``: Mask R-CNN plus ``SemSegFPNHead`` on p2-p5 (128 channels, GN, common stride 4, loss
    weight 0.5; ``sem_seg_classes`` = COCO's 53 stuff classes + 1 "things" class, label 255 ignored):
    detectron2's ``configs/common/models/panoptic_fpn.py``."""
    model = detectron2_common("models/panoptic_fpn.py", "model")
    model.sem_seg_head.num_classes = sem_seg_classes
    return _fit(model, backbone, num_classes, pixel_mean, pixel_std, input_format)


def retinanet(backbone, *, num_classes: int = 80, pixel_mean: Sequence[float] = BGR_MEAN,
              pixel_std: Sequence[float] = BGR_STD, input_format: str = "BGR"):
    """``L(RetinaNet)`` on p3-p7 (C3-C5 inputs, ``top_block="p6p7"``): detectron2's
    ``configs/common/models/retinanet.py`` with the anchors (:data:`RETINANET_ANCHOR_SIZES`) and the
    smooth-L1 beta 0 of ``configs/Base-RetinaNet.yaml``."""
    model = detectron2_common("models/retinanet.py", "model")
    model.anchor_generator.sizes = RETINANET_ANCHOR_SIZES
    model.smooth_l1_beta = 0.0
    return _fit(model, backbone, num_classes, pixel_mean, pixel_std, input_format)


def fcos(backbone, *, num_classes: int = 80, pixel_mean: Sequence[float] = BGR_MEAN,
         pixel_std: Sequence[float] = BGR_STD):
    """``L(FCOS)`` on p3-p7: detectron2's ``configs/common/models/fcos.py`` (GN head with a centerness
    branch, score threshold 0.2, NMS 0.6) with :class:`FCOS` (float32 losses under autocast); P6/P7 from
    P5 is the backbone's ``top_block_source="on_output"``. FCOS takes no ``input_format``: set the data
    loader's ``image_format`` to what the weights expect."""
    model = detectron2_common("models/fcos.py", "model")
    model._target_ = FCOS
    return _fit(model, backbone, num_classes, pixel_mean, pixel_std)


# ---------------------------------------------------------------------------------------------
# data, optimizer, schedule, training settings
# ---------------------------------------------------------------------------------------------
def coco_loaders(*, train: str = "coco_2017_train", test: str = "coco_2017_val", image_format: str = "BGR",
                 use_instance_mask: bool = True, panoptic: bool = False,
                 min_size_train: Sequence[int] = (640, 672, 704, 736, 768, 800), max_size_train: int = 1333,
                 min_size_test: int = 800, max_size_test: int = 1333, total_batch_size: int = 16,
                 num_workers: int = 4) -> DictConfig:
    """``dataloader`` with ``train``, ``test`` and ``evaluator``: detectron2's ``configs/common/data/coco.py``
    (its loaders and ``DatasetMapper``, shortest edge sampled from ``min_size_train``, horizontal flip) with
    the given values. Any registered dataset name works (``dataloader.train.dataset.names=my_train``).
    ``panoptic=True``: the ``coco_2017_*_panoptic_separated`` datasets (semantic maps read by the mapper),
    images without instances kept, and COCO + semantic + panoptic evaluation."""
    if panoptic:
        train = train if train != "coco_2017_train" else "coco_2017_train_panoptic_separated"
        test = test if test != "coco_2017_val" else "coco_2017_val_panoptic_separated"
    loader = detectron2_common("data/coco.py", "dataloader")
    loader.train.dataset.update(names=train, filter_empty=not panoptic)
    loader.train.mapper.update(image_format=image_format, use_instance_mask=use_instance_mask)
    loader.train.mapper.augmentations[0].update(short_edge_length=list(min_size_train), max_size=max_size_train)
    loader.train.update(total_batch_size=total_batch_size, num_workers=num_workers)
    loader.test.dataset.names = test
    loader.test.mapper.augmentations[0].update(short_edge_length=min_size_test, max_size=max_size_test)
    loader.test.num_workers = num_workers
    if panoptic:
        names = "${....test.dataset.names}"  # evaluator.evaluators[i] -> dataloader
        loader.evaluator = L(DatasetEvaluators)(evaluators=[
            L(COCOEvaluator)(dataset_name=names), L(SemSegEvaluator)(dataset_name=names),
            L(COCOPanopticEvaluator)(dataset_name=names)])
    return loader


def sgd(lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4, weight_decay_norm: float = 0.0):
    """``optimizer``: detectron2's ``configs/common/optim.py`` ``SGD`` (parameter groups without weight decay
    on norms), as ``SOLVER.BASE_LR`` / ``MOMENTUM`` / ``WEIGHT_DECAY`` / ``WEIGHT_DECAY_NORM``.
    ``optimizer.params.model`` is set to the model by the trainer."""
    optimizer = detectron2_common("optim.py", "SGD")
    optimizer.update(lr=lr, momentum=momentum, weight_decay=weight_decay)
    optimizer.params.weight_decay_norm = weight_decay_norm
    return optimizer


def multistep_lr(max_iter: int, steps: Sequence[int], warmup_iters: int = 1000, warmup_factor: float = 0.001,
                 gamma: float = 0.1):
    """``lr_multiplier``: detectron2's ``configs/common/coco_schedule.py`` scheduler (linear warm-up, then
    the LR times ``gamma`` at each of ``steps``) with the yaml's ``SOLVER.STEPS``, ``WARMUP_ITERS``,
    ``WARMUP_FACTOR``, ``GAMMA``.

    detectron2's LR hook scales it to ``train.max_iter`` (milestones and warm-up are fractions of
    ``max_iter``), so shortening ``train.max_iter`` shortens the whole schedule.
    """
    schedule = detectron2_common("coco_schedule.py", "lr_multiplier_1x")
    schedule.scheduler.update(values=[gamma ** i for i in range(len(steps) + 1)],
                              milestones=list(steps) + [max_iter])
    schedule.update(warmup_length=warmup_iters / max_iter, warmup_factor=warmup_factor)
    return schedule


def train_settings(*, max_iter: int, init_checkpoint: str = "", output_dir: str = "./output",
                   device: str = "cuda", amp: bool = False, eval_period: int = 5000, checkpoint_period: int = 5000,
                   max_to_keep: int = 100, log_period: int = 20, seed: int = -1) -> Dict:
    """``train``: detectron2's ``configs/common/train.py`` (so detectron2's own
    ``tools/lazyconfig_train_net.py`` runs these configs too) with the given values, plus ``amp.precision``
    and ``seed``.

    ``amp.enabled=True``: detectron2's ``AMPTrainer`` (float16 with a grad scaler) on CUDA; with
    ``python -m d2_backbones.lazy_train`` on CPU, bfloat16 autocast. ``amp.precision``
    (``"float16"``/``"bfloat16"``) overrides the dtype.
    """
    train = detectron2_common("train.py", "train")
    train.update(output_dir=output_dir, init_checkpoint=init_checkpoint, max_iter=max_iter, eval_period=eval_period,
                 log_period=log_period, device=device, seed=seed,
                 checkpointer=dict(period=checkpoint_period, max_to_keep=max_to_keep))
    train["amp"] = dict(enabled=amp, precision=None)
    return train


# ---------------------------------------------------------------------------------------------
# building with checks
# ---------------------------------------------------------------------------------------------
def _as_list(v) -> List:
    return list(v) if isinstance(v, (list, tuple, ListConfig)) else [v]


def _arg_keys(node, prefix: str) -> Dict[str, str]:
    return {str(k): f"{prefix}.{k}" for k in node if k != "_target_"} if isinstance(node, (Mapping, DictConfig)) \
        else {}


def _is_call(node) -> bool:
    return isinstance(node, (Mapping, DictConfig)) and "_target_" in node


# (config key under the model, what it is) -> checked against the backbone's features
_FEATURE_KEYS = ("head_in_features", "proposal_generator.in_features", "roi_heads.in_features",
                 "roi_heads.box_in_features", "roi_heads.mask_in_features", "roi_heads.keypoint_in_features")
# strides/scales that must equal those of the features a head reads
_STRIDE_KEYS = (("anchor_generator.strides", "head_in_features", False),
                ("proposal_generator.anchor_generator.strides", "proposal_generator.in_features", False),
                ("roi_heads.box_pooler.scales", "roi_heads.box_in_features", True),
                ("roi_heads.mask_pooler.scales", "roi_heads.mask_in_features", True),
                ("roi_heads.keypoint_pooler.scales", "roi_heads.keypoint_in_features", True))


def check_model_features(model_cfg, shapes: Mapping[str, ShapeSpec], prefix: str = "model") -> None:
    """Fail with the key, the value and the fix when a head of ``model_cfg`` (a Python config)
    does not fit the backbone whose ``output_shape()`` is ``shapes``.

    Checked: the feature names the heads read (``head_in_features``, ``proposal_generator.in_features``,
    ``roi_heads.{box,mask,keypoint}_in_features``, ``sem_seg_head.input_shape``) exist; anchor
    strides and pooler scales match those features' strides; ``sem_seg_head.input_shape``
    gives their strides and channels. (yaml configs get the same check from the registered builders.)
    """
    produced = describe_features(shapes)
    for key in _FEATURE_KEYS:
        wanted = dotted_get(model_cfg, key)
        if wanted is None:
            continue
        missing = [f for f in _as_list(wanted) if f not in shapes]
        if missing:
            raise config_error(f"{prefix}.{key}", list(_as_list(wanted)),
                               problem=f"contains {missing[0]!r}, which the backbone does not produce",
                               fix=f"use features it produces: {produced}; or change {prefix}.backbone "
                                   f"(in_features, top_block) so it produces them")
    for key, features_key, inverse in _STRIDE_KEYS:
        given, features = dotted_get(model_cfg, key), dotted_get(model_cfg, features_key)
        if given is None or features is None:
            continue
        want = [shapes[f].stride for f in _as_list(features)]
        got = [float(v) for v in _as_list(given)]
        expected = [1.0 / s for s in want] if inverse else [float(s) for s in want]
        if len(got) != len(expected) or any(not math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, expected)):
            raise config_error(f"{prefix}.{key}", [float(v) for v in _as_list(given)],
                               problem=f"does not match the strides {want} of {prefix}.{features_key}="
                                       f"{list(_as_list(features))}",
                               fix=f"set it to {expected}")
    sem = dotted_get(model_cfg, "sem_seg_head.input_shape")
    if sem is not None:
        for f in sem:
            if f not in shapes:
                raise config_error(f"{prefix}.sem_seg_head.input_shape", list(sem),
                                   problem=f"contains {f!r}, which the backbone does not produce",
                                   fix=f"use features it produces: {produced}")
            spec = sem[f]
            for field in ("stride", "channels"):
                v = dotted_get(spec, field) if _is_call(spec) else getattr(spec, field, None)
                if v is not None and int(v) != getattr(shapes[f], field):
                    raise config_error(f"{prefix}.sem_seg_head.input_shape.{f}.{field}", v,
                                       problem=f"differs from the backbone's {f} ({produced})",
                                       fix=f"set it to {getattr(shapes[f], field)}")


def class_count_keys(cfg) -> List[str]:
    """The keys holding a model's number of (foreground) classes: ``model.num_classes``
    (RetinaNet, FCOS) and/or ``model.roi_heads.num_classes`` (R-CNN, Cascade, Panoptic FPN);
    the heads read them through interpolations."""
    return [k for k in ("model.num_classes", "model.roi_heads.num_classes") if dotted_get(cfg, k) is not None]


def instantiate_model(model_cfg, prefix: str = "model") -> torch.nn.Module:
    """Build a model from its Python config, like ``instantiate(model_cfg)``, with checks.

    The backbone is built first (an error of a family class names the config key, e.g.
    ``model.backbone.bottom_up.depth``), then :func:`check_model_features` compares what the
    heads read with what the backbone produces, and only then the rest is built around that
    backbone. The backbone's arguments arrive as plain Python lists and dicts (``instantiate``
    alone passes omegaconf containers). ``model_cfg`` is not modified.
    """
    cfg = copy.deepcopy(model_cfg)
    if isinstance(cfg, DictConfig):
        OmegaConf.resolve(cfg)  # the heads' "${...backbone.out_channels}" become numbers
    bb = cfg.get("backbone")
    if not _is_call(bb):
        return instantiate(cfg)
    if isinstance(bb, DictConfig):  # the family classes get list/dict arguments, as from Python
        bb = OmegaConf.to_container(bb)
    bottom_up = bb.get("bottom_up")
    if _is_call(bottom_up):
        with argument_keys(_arg_keys(bottom_up, f"{prefix}.backbone.bottom_up")):
            bb["bottom_up"] = instantiate(bottom_up)
    with argument_keys(_arg_keys(bb, f"{prefix}.backbone")):
        backbone = instantiate(bb)
    if not hasattr(backbone, "output_shape"):
        raise ConfigError(f"{prefix}.backbone built a {type(backbone).__name__}, not a detectron2 Backbone "
                          f"(no output_shape()).")
    check_model_features(cfg, backbone.output_shape(), prefix)
    cfg["backbone"] = backbone  # the heads are built around it (detectron2's instantiate passes it through)
    return instantiate(cfg)
