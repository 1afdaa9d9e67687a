"""Moved: the ResNet key maps live in :mod:`d2_backbones.resnet` (beside the family, as timm keeps
``checkpoint_filter_fn``); this module keeps the old import path working."""
from .resnet import convert_mmdet_resnet, convert_timm_resnet, convert_torchvision_resnet

__all__ = ["convert_torchvision_resnet", "convert_timm_resnet", "convert_mmdet_resnet"]
