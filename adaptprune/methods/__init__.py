"""Every method of the comparison behind one interface, registered by name (see ``methods.base``)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, get_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


__all__ = ["METHODS", "Method", "MethodContext", "get_method", "register_method"]
