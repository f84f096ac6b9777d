"""``patch_torch()``: route ``torch.save`` / ``torch.load`` through fastserial.

For code you do not own — training frameworks, model hubs — that calls torch
directly::

    with fastserial.patch_torch():
        trainer.save_checkpoint("ckpt.pt")   # runs fastserial.save

    undo = fastserial.patch_torch()          # or patch for the rest of the process
    ...
    undo()                                   # restores torch's own functions
"""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["patch_torch"]

_lock = threading.Lock()
_depth = 0
_originals: dict = {}


def _patched_functions():
    import torch
    import torch.serialization as ts

    from . import serialization

    return [
        (torch, "save", serialization.save),
        (torch, "load", serialization.load),
        (ts, "save", serialization.save),
        (ts, "load", serialization.load),
    ]


class patch_torch:
    """Replaces ``torch.save``/``torch.load`` (and ``torch.serialization.save/load``)
    with fastserial's. Use as a context manager, or call it and later call the
    returned object (or its ``undo()``) to restore torch's functions. Nested patches
    are counted: torch's functions come back when the outermost one is undone."""

    def __init__(self) -> None:
        global _depth
        self._active = True
        with _lock:
            if _depth == 0:
                for module, name, replacement in _patched_functions():
                    _originals[(module, name)] = getattr(module, name)
                    setattr(module, name, replacement)
            _depth += 1

    def undo(self) -> None:
        """Restores torch's own functions (once all nested patches are undone)."""
        global _depth
        with _lock:
            if not self._active:
                return
            self._active = False
            _depth -= 1
            if _depth == 0:
                for (module, name), original in _originals.items():
                    setattr(module, name, original)
                _originals.clear()

    __call__: Callable[[], None] = undo

    def __enter__(self) -> patch_torch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()
