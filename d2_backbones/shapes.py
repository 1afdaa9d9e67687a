"""The synthetic shapes dataset; it lives in :mod:`d2_backbones.data` (kept so old imports work)."""
from .data import CATEGORIES, default_root, make_shapes, register_shapes  # noqa: F401

__all__ = ["CATEGORIES", "make_shapes", "register_shapes", "default_root"]
