"""``patch_torch()``: route ``torch.save`` / ``torch.load`` through fastserial.

For code you do not own — training frameworks, model hubs — that calls torch
directly::

    with fastserial.patch_torch():
        trainer.save_checkpoint("ckpt.pt")   # runs fastserial.save

    undo = fastserial.patch_torch()          # or patch for the rest of the process
    ...
    undo()                                   # restores torch's own functions

The patch swaps the *code* of torch's own function objects, so it also reaches
references taken before it (``def save_pretrained(f, save_function=torch.save)``,
``from torch import load``), in whatever order things were imported, and ``undo()``
gives every holder torch's code back, references taken during the patch included.
"""

from __future__ import annotations

import inspect
import threading
from typing import Callable

__all__ = ["patch_torch"]

_lock = threading.Lock()
_depth = 0
_originals: dict = {}
#: function -> its own code, for the functions whose code is swapped while patched
_swapped_code: dict = {}


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


def _trampoline_code(original, name: str):
    """Code with ``original``'s exact signature (its defaults stay on the function
    object) that calls ``fastserial.serialization.<name>`` -- looked up at each call
    -- passing every argument on by name."""
    from . import serialization

    accepted = inspect.signature(getattr(serialization, name)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    params, args = [], []
    star = positional_only = False
    for p in inspect.signature(original).parameters.values():
        default = "=None" if p.default is not p.empty else ""
        if positional_only and p.kind is not p.POSITIONAL_ONLY:
            params.append("/")
            positional_only = False
        if p.kind is p.POSITIONAL_ONLY:
            params.append(p.name + default)
            args.append(p.name)
            positional_only = True
        elif p.kind is p.VAR_POSITIONAL:
            params.append("*" + p.name)
            args.append("*" + p.name)
            star = True
        elif p.kind is p.VAR_KEYWORD:
            params.append("**" + p.name)
            args.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                params.append("*")
                star = True
            params.append(p.name + default)
            if p.name in accepted or takes_any:
                args.append(f"{p.name}={p.name}")
    if positional_only:
        params.append("/")
    source = (
        f"def {original.__name__}({', '.join(params)}):\n"
        f"    from {serialization.__name__} import {name} as _fastserial_target\n"
        f"    return _fastserial_target({', '.join(args)})\n"
    )
    namespace: dict = {}
    exec(compile(source, f"<fastserial.patch_torch: {original.__name__}>", "exec"), namespace)
    return namespace[original.__name__].__code__


def _swap_code(original, name: str) -> bool:
    """Gives ``original`` code that runs fastserial's ``name``; False where that cannot
    be done (not a plain Python function, or one with a closure)."""
    try:
        code = _trampoline_code(original, name)
        own = original.__code__
        original.__code__ = code
    except (AttributeError, TypeError, ValueError, SyntaxError):
        return False
    _swapped_code[original] = own
    return True


class patch_torch:
    """Makes ``torch.save``/``torch.load`` (and ``torch.serialization.save/load``) run
    fastserial's. Use as a context manager, or call it and later call the returned
    object (or its ``undo()``) to restore torch's functions. Nested patches are
    counted: torch's functions come back when the outermost one is undone.

    torch's function objects stay in place and get code that calls fastserial, with
    torch's signature and defaults: every reference to them is patched, including
    defaults captured before the patch (``save_function=torch.save``), and ``undo()``
    restores torch for all of them. Where the code cannot be swapped (a torch whose
    save/load is not a plain function), the names are rebound instead, which reaches
    only code that looks them up at call time: then patch before importing the
    framework."""

    def __init__(self) -> None:
        global _depth
        self._active = True
        with _lock:
            if _depth == 0:
                for module, name, replacement in _patched_functions():
                    original = getattr(module, name)
                    if original is replacement:
                        continue
                    if original in _swapped_code or (
                        str(getattr(original, "__module__", "")).startswith("torch")
                        and _swap_code(original, name)
                    ):
                        continue  # torch's own function object now runs fastserial
                    # Not swappable: rebind the name (references taken before the
                    # patch keep torch's function).
                    _originals[(module, name)] = original
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
                for function, code in _swapped_code.items():
                    function.__code__ = code
                _swapped_code.clear()

    __call__: Callable[[], None] = undo

    def __enter__(self) -> patch_torch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()
