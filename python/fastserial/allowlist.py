"""The ``weights_only`` allow-list: which globals a safe load may import.

A safe load imports only what is listed here — torch's tensor and storage rebuild
functions, dtypes, storage types, ``OrderedDict``, ``torch.Size``, ... — plus what
the user adds with :func:`add_safe_globals` or :class:`safe_globals`. Anything else
raises ``pickle.UnpicklingError`` naming the global, before it is imported.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Union

__all__ = [
    "add_safe_globals",
    "get_safe_globals",
    "clear_safe_globals",
    "safe_globals",
    "builtin_safe_globals",
    "user_safe_globals",
    "BLOCKED_MODULES",
]

SafeGlobal = Union[Callable, "tuple[Callable, str]"]

#: Modules never importable by a safe load, even when a user allow-lists them.
BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})

_lock = threading.Lock()
_user: list = []


def _name_of(entry) -> tuple[str, Any]:
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise ValueError(
                f"expected (global, 'module.name') but got a tuple of length {len(entry)}"
            )
        obj, name = entry
        if not isinstance(name, str):
            raise TypeError(f"expected the full path of the global as a str, got {type(name)}")
        return name, obj
    return f"{entry.__module__}.{entry.__qualname__}", entry


def add_safe_globals(globals_: list) -> None:
    """Allows these globals (objects, or ``(object, "module.name")``) in safe loads."""
    entries = list(globals_)
    for e in entries:
        _name_of(e)  # validate before changing anything
    with _lock:
        for e in entries:
            if e not in _user:
                _user.append(e)


def get_safe_globals() -> list:
    """The globals the user has allowed, in the order they were added."""
    with _lock:
        return list(_user)


def clear_safe_globals() -> None:
    """Forgets every user-allowed global."""
    with _lock:
        _user.clear()


def _remove_safe_globals(globals_: list) -> None:
    with _lock:
        for e in globals_:
            if e in _user:
                _user.remove(e)


class safe_globals:
    """Context manager that allows ``globals_`` inside its block only."""

    def __init__(self, globals_: list) -> None:
        self.globals = list(globals_)
        self._added: list = []

    def __enter__(self) -> safe_globals:
        with _lock:
            self._added = [g for g in self.globals if g not in _user]
        add_safe_globals(self._added)
        return self

    def __exit__(self, *exc) -> None:
        _remove_safe_globals(self._added)


def user_safe_globals() -> dict[str, Any]:
    """``"module.name" -> object`` for the user's additions."""
    with _lock:
        return dict(_name_of(e) for e in _user)


_builtin_cache: dict[str, Any] | None = None


def builtin_safe_globals() -> dict[str, Any]:
    """``"module.name" -> object`` for everything a weights-only load allows by default."""
    global _builtin_cache
    if _builtin_cache is not None:
        return _builtin_cache
    import codecs
    import collections

    import torch
    import torch._utils as tu

    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "_codecs.encode": codecs.encode,  # how protocol 2 pickles bytes
        "builtins.bytearray": bytearray,
        "builtins.set": set,
        "builtins.complex": complex,
    }
    for t in torch.storage._dtype_to_storage_type_map():
        allowed[str(t)] = t
    for t in torch.storage._new_dtypes():
        allowed[str(t)] = t
    for bits in range(1, 8):
        for prefix in ("uint", "int"):
            t = getattr(torch, f"{prefix}{bits}", None)
            if t is not None:
                allowed[str(t)] = t
    for tt in torch._tensor_classes:
        allowed[f"{tt.__module__}.{tt.__name__}"] = tt
    for layout in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"):
        if hasattr(torch, layout):
            allowed[f"torch.{layout}"] = getattr(torch, layout)
    for q in (
        torch.per_tensor_affine,
        torch.per_tensor_symmetric,
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    ):
        allowed[str(q)] = q
    for name in (
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_nested_tensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_device_tensor_from_numpy",
    ):
        fn = getattr(tu, name, None)
        if fn is not None:
            allowed[f"torch._utils.{name}"] = fn
    allowed["torch._tensor._rebuild_from_type_v2"] = torch._tensor._rebuild_from_type_v2
    _builtin_cache = allowed
    return allowed
