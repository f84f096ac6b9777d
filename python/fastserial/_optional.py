"""Optional dependencies: one clear message, naming the extra to install, when one
is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(ImportError):
    """An optional package fastserial needs for this call is not installed."""


#: module -> the fastserial extra that installs it
_EXTRAS = {"torch": "torch", "safetensors": "safetensors"}


def require(module: str, purpose: str) -> ModuleType:
    """Imports ``module`` or raises :class:`MissingDependencyError` saying what needs
    it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top, top)
        raise MissingDependencyError(
            f"{purpose} needs the '{top}' package, which is not installed: "
            f'pip install "fastserial[{extra}]" (or pip install {top})'
        ) from e
