"""fvcore's model analyses (flops, activations) for modules whose names contain "/".

fvcore's :class:`~fvcore.nn.jit_analysis.JitModelAnalysis` (under detectron2's ``FlopCountAnalysis``,
``flop_count_operators`` and ``activation_count_operators``, and so under detectron2's
``tools/analyze_model.py``) traces the model with a forward hook on every module that pushes the module's
full name (``backbone.bottom_up.stem.stem_1/conv``) as a JIT scope. The tracer joins nested scopes with
"/", and fvcore reads the module an operator belongs to back as the text after the last "/" of the node's
scope name: ``conv`` here, which names no module, so the analysis stops with ``KeyError: 'Requested module
name is not among the descendants of the analyzed model.'``. VoVNet keeps vovnet-detectron2's module names
(``stem_1/conv``, ``OSA2_1_0/norm``: they are its checkpoints' keys), so every VoVNet model failed.

:func:`install_scope_names` (called on ``import d2_backbones``) wraps ``JitModelAnalysis._analyze``: while
the model is traced, a module name containing "/" is written with ``%2F`` instead of it (so each scope is one
module again), and the statistics are read back under the real names. Module names, parameter names and
state_dict keys never change; an analysis of a model without "/" in its module names runs exactly as before.

    >>> import torch
    >>> from torch import nn
    >>> from fvcore.nn import FlopCountAnalysis
    >>> install_scope_names()
    >>> block = nn.Sequential()
    >>> block.add_module("stem_1/conv", nn.Conv2d(3, 8, 3, padding=1, bias=False))
    >>> flops = FlopCountAnalysis(block, torch.zeros(1, 3, 10, 10))
    >>> flops.total(), flops.by_module()["stem_1/conv"]  # 8 x 3 x 9 multiply-adds at each of 100 pixels
    (21600, 21600)
"""
import functools
from typing import Dict

__all__ = ["install_scope_names", "escape_scope_name"]

_SLASH = "/"  # the tracer's scope separator
_ESCAPED = "%2F"


def escape_scope_name(name: str) -> str:
    """``name`` as one JIT scope: every "/" written ``%2F``."""
    return name.replace(_SLASH, _ESCAPED)


def _escaped_aliases(aliases: Dict) -> Dict:
    """fvcore's aliases (module or name -> canonical name) with every name escaped; the escaped names are
    aliases too (fvcore looks the traced scope names up in this table)."""
    out = {}
    for key, canonical in aliases.items():
        out[key] = escape_scope_name(canonical)
        if isinstance(key, str):
            out[escape_scope_name(key)] = escape_scope_name(canonical)
    return out


def _real_names(stats, real: Dict[str, str]):
    """fvcore's ``Statistics`` with escaped module names replaced by the real ones."""
    name = lambda n: real.get(n, n)  # noqa: E731
    return type(stats)(counts={name(k): v for k, v in stats.counts.items()},
                       unsupported_ops={name(k): v for k, v in stats.unsupported_ops.items()},
                       uncalled_mods={name(n) for n in stats.uncalled_mods})


def _with_scope_names(analyze):
    if getattr(analyze, "_d2b_scope_names", False):
        return analyze

    @functools.wraps(analyze)
    def wrapper(self):
        aliases = self._aliases
        if self._stats is not None or not any(isinstance(k, str) and _SLASH in k for k in aliases):
            return analyze(self)  # nothing to escape: fvcore's own analysis, unchanged
        real = {escape_scope_name(v): v for v in aliases.values()}
        clash = {e for e, v in real.items() if e != v and e in aliases}
        if clash:  # a module literally named like another one's escaped name: leave fvcore's behaviour
            return analyze(self)
        self._aliases = _escaped_aliases(aliases)
        try:
            stats = analyze(self)
        finally:
            self._aliases = aliases
        self._stats = _real_names(stats, real)
        return self._stats

    wrapper._d2b_scope_names = True
    return wrapper


def install_scope_names() -> None:
    """Make fvcore's ``JitModelAnalysis`` (flop and activation counting) work on modules whose names contain
    "/" (see the module doc). Idempotent; analyses of other models are unchanged."""
    from fvcore.nn.jit_analysis import JitModelAnalysis

    JitModelAnalysis._analyze = _with_scope_names(JitModelAnalysis._analyze)
