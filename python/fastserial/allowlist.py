"""The ``weights_only`` policy: which globals a safe load may import, decided here only.

Every front end (``fastserial.load``, ``fastserial.numpy``, ``fastserial.open``,
``fastserial inspect`` and :func:`fastserial.get_unsafe_globals_in_checkpoint`) asks
:func:`verdict` about each global of a pickle, so they accept and refuse the same files.

The policy is torch's. When torch is installed, the allow-list is the one of the
installed torch (``torch._weights_only_unpickler``) and the user's additions are
torch's own state: :func:`add_safe_globals` here and
``torch.serialization.add_safe_globals`` write the same list, so a framework that
configures torch configures fastserial too. Without torch, the names below (the
newest supported torch's allow-list) and a list of fastserial's own apply.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any, Callable, NamedTuple, Union

__all__ = [
    "add_safe_globals",
    "get_safe_globals",
    "clear_safe_globals",
    "safe_globals",
    "Verdict",
    "verdict",
    "is_allowed_object",
    "refusal_hint",
    "BLOCKED_MODULES",
    "DEFAULT_ALLOWED_NAMES",
]

SafeGlobal = Union[Callable, "tuple[Callable, str]"]

#: Modules never importable by a safe load, even when a user allow-lists them
#: (torch's ``_blocklisted_modules``).
BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


def _storage_names() -> list[str]:
    scalar = (
        "BFloat16",
        "Bool",
        "Byte",
        "Char",
        "ComplexDouble",
        "ComplexFloat",
        "Double",
        "Float",
        "Half",
        "Int",
        "Long",
        "Short",
    )
    names = [f"torch.{t}Storage" for t in scalar]
    names += [f"torch.{t}Storage" for t in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")]
    names += [f"torch.cuda.{t}Storage" for t in scalar if not t.startswith("Complex")]
    names += ["torch.cuda.ComplexDoubleStorage", "torch.cuda.ComplexFloatStorage"]
    return names


def _tensor_class_names() -> list[str]:
    dense = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
    sparse = ("BFloat16", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
    return (
        [f"torch.{t}Tensor" for t in dense]
        + [f"torch.cuda.{t}Tensor" for t in dense]
        + [f"torch.sparse.{t}Tensor" for t in sparse]
        + [f"torch.cuda.sparse.{t}Tensor" for t in sparse]
    )


#: torch 2.15's default allow-list, by name: what applies when torch is not installed.
DEFAULT_ALLOWED_NAMES = frozenset(
    [
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
    ]
    + [
        f"torch._utils.{fn}"
        for fn in (
            "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_device_tensor_from_numpy",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_wrapper_subclass",
        )
    ]
    + [
        f"torch.{dt}"
        for dt in (
            "bcomplex32",
            "bfloat16",
            "bits16",
            "bits1x8",
            "bits2x4",
            "bits4x2",
            "bits8",
            "bool",
            "complex128",
            "complex32",
            "complex64",
            "float16",
            "float32",
            "float4_e2m1fn_x2",
            "float64",
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
            "int16",
            "int32",
            "int64",
            "int8",
            "qint32",
            "qint8",
            "quint2x4",
            "quint4x2",
            "quint8",
            "uint16",
            "uint32",
            "uint64",
            "uint8",
            "per_channel_affine",
            "per_channel_affine_float_qparams",
            "per_channel_symmetric",
            "per_tensor_affine",
            "per_tensor_symmetric",
        )
    ]
    + [f"torch.{p}int{b}" for p in ("", "u") for b in range(1, 8)]
    + _storage_names()
    + _tensor_class_names()
)


class Verdict(NamedTuple):
    """What the policy says of one global."""

    allowed: bool
    #: Its module can never be allowed (``os``, ``sys``, ...).
    blocked: bool
    #: The object torch's allow-list (or the user's addition) maps the name to, when
    #: known: front ends that build torch objects use it, the others only the verdict.
    obj: Any = None


def _torch_serialization_state():
    """torch's weights-only module when torch is imported, else None. A front end
    that runs without torch (numpy, inspect) does not import it just to ask."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        import torch._weights_only_unpickler as wou
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return wou


def _torch_installed() -> bool:
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def _user_globals_by_name(entries) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in entries:
        name, obj = _name_of(entry)
        found[name] = obj
    return found


def verdict(module: str, name: str) -> Verdict:
    """Whether a weights-only load may import ``module.name`` (already mapped from
    Python 2 names): the installed torch's allow-list and the user's additions."""
    full = f"{module}.{name}"
    wou = _torch_serialization_state()
    blocklist = getattr(wou, "_blocklisted_modules", BLOCKED_MODULES) if wou else BLOCKED_MODULES
    if module in blocklist or module.split(".")[0] in BLOCKED_MODULES:
        return Verdict(False, True)
    if wou is not None:
        obj = wou._get_allowed_globals().get(full)
        if obj is not None:
            return Verdict(True, False, obj)
        user = _torch_user_globals(wou)
    else:
        if full in DEFAULT_ALLOWED_NAMES:
            return Verdict(True, False)
        with _lock:
            user = _user_globals_by_name(_own)
    obj = user.get(full)
    if obj is not None:
        return Verdict(True, False, obj)
    return Verdict(False, False)


def is_allowed_object(obj) -> bool:
    """Whether ``obj`` is one of the objects the allow-list maps names to (torch's
    test for what BUILD may act on)."""
    wou = _torch_serialization_state()
    if wou is not None:
        return any(obj is v for v in wou._get_allowed_globals().values()) or any(
            obj is v for v in _torch_user_globals(wou).values()
        )
    with _lock:
        return any(obj is v for v in _user_globals_by_name(_own).values())


def _torch_user_globals(wou) -> dict[str, Any]:
    getter = getattr(wou, "_get_user_allowed_globals", None)
    if getter is not None:
        return getter()
    return _user_globals_by_name(getattr(wou, "_marked_safe_globals_list", ()))


# --------------------------------------------------------------------------- the user's list

_lock = threading.Lock()
#: The user's additions when torch is not installed (otherwise torch holds them).
_own: list = []


def _name_of(entry) -> tuple[str, Any]:
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise ValueError(
                f"Expected tuple of length 2 (global, str of callable full path), but got "
                f"tuple of length: {len(entry)}"
            )
        obj, name = entry
        if type(name) is not str:
            raise TypeError(
                f"Expected second item in tuple to be str of callable full path, but got: "
                f"{type(name)}"
            )
        return name, obj
    return f"{entry.__module__}.{entry.__qualname__}", entry


def _torch_serialization():
    if not _torch_installed():
        return None
    import torch.serialization

    return torch.serialization


def add_safe_globals(globals_: list) -> None:
    """Allows these globals (objects, or ``(object, "module.name")``) in safe loads.

    With torch installed this is ``torch.serialization.add_safe_globals``: the same
    list serves ``torch.load`` and every fastserial front end."""
    entries = list(globals_)
    for e in entries:
        _name_of(e)  # validate before changing anything
    ts = _torch_serialization()
    if ts is not None:
        ts.add_safe_globals(entries)
        return
    with _lock:
        for e in entries:
            if e not in _own:
                _own.append(e)


def get_safe_globals() -> list:
    """The globals the user has allowed (``torch.serialization.get_safe_globals``)."""
    ts = _torch_serialization()
    if ts is not None:
        return ts.get_safe_globals()
    with _lock:
        return list(_own)


def clear_safe_globals() -> None:
    """Forgets every user-allowed global (``torch.serialization.clear_safe_globals``)."""
    ts = _torch_serialization()
    if ts is not None:
        ts.clear_safe_globals()
        return
    with _lock:
        _own.clear()


def _remove_safe_globals(globals_: list) -> None:
    ts = _torch_serialization()
    if ts is not None:
        import torch._weights_only_unpickler as wou

        wou._remove_safe_globals(globals_)
        return
    with _lock:
        for e in globals_:
            if e in _own:
                _own.remove(e)


class safe_globals:
    """Context manager that allows ``globals_`` inside its block only; with torch
    installed it behaves as ``torch.serialization.safe_globals`` (the globals are
    removed on exit)."""

    def __init__(self, globals_: list) -> None:
        self.globals = list(globals_)

    def __enter__(self) -> safe_globals:
        add_safe_globals(self.globals)
        return self

    def __exit__(self, *exc) -> None:
        _remove_safe_globals(self.globals)


def refusal_hint(full: str) -> str:
    """What a refusal tells the user to do."""
    return (
        f"If you trust this checkpoint, allow it with "
        f"torch.serialization.add_safe_globals([{full}]) (or fastserial.add_safe_globals, "
        "the same list) or the safe_globals([...]) context manager, or load with "
        "weights_only=False (which runs arbitrary code from the file)."
    )
