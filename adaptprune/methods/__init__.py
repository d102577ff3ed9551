"""Every method of the comparison behind one interface, registered by name (see ``methods.base``)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def get_method(name: str) -> Method:
    """The method registered as ``name``; unknown names suggest the nearest one."""
    if name not in METHODS:
        near = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown method '{name}'{hint}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodContext", "get_method", "register_method"]
