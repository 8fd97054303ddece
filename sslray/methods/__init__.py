"""Methods are data: a teacher kind plus named, weighted loss terms.

``TERMS`` maps a term name to its function, its typed settings and the views it needs; ``METHOD_PRESETS``
maps a method name to a plain dict that ``MethodConfig`` is built from (user YAML is merged on top).
Presets compose with ``+``: ``method.name: unimatch+meanteacher`` merges the dicts left to right. An
ablation switches a term off with ``method.terms.<term>.weight: 0`` (a zero-weight term is not computed,
and the forward passes that only it needed are skipped).

The total loss is ``sum(weight_t * L_t) / global_div``; UniMatch's
``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` is weights ``x=1, u_s1=0.25, u_s2=0.25, u_fp=0.5`` with
``global_div=2``.
"""
from __future__ import annotations

from typing import Any

# the registry is free of torch (config validation and the light commands read it); the method code is imported
# on first use of build_method / Method (PEP 562 below) and, per term, when a trial builds its method
from sslray.methods.registry import FAMILIES, METHOD_DOCS, METHOD_PRESETS, TERMS, list_methods, list_terms
from sslray.methods.spec import Family, NonFiniteLossError, Term, TermConfig

__all__ = ["FAMILIES", "METHOD_DOCS", "METHOD_PRESETS", "TERMS", "Family", "Method", "NonFiniteLossError", "Term",
           "TermConfig", "build_method", "list_methods", "list_terms"]


def __getattr__(name: str) -> Any:
    if name in ("Method", "build_method"):
        from sslray.methods import method

        return getattr(method, name)
    raise AttributeError(f"module 'sslray.methods' has no attribute {name!r}")
