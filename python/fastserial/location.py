"""Where storages live: the ``register_package`` priority registry and ``map_location``.

On save, *taggers* name a storage's location (``'cpu'``, ``'cuda:0'``, ...). On load,
*deserializers* move a CPU-materialized storage to the location it was saved from, or
to where ``map_location`` sends it. Entries run in priority order (lower first); the
first non-``None`` answer wins — the same contract as ``torch.serialization``.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Optional

__all__ = [
    "UnknownLocationError",
    "cpu_overridden",
    "register_package",
    "location_tag",
    "default_restore_location",
    "restore_location_fn",
]

Tagger = Callable[[Any], Optional[str]]
Deserializer = Callable[[Any, str], Any]

_registry: list[tuple[int, Tagger, Deserializer]] = []
_lock = threading.Lock()
#: Priority of the built-in cpu entry; user entries that run before it may retag or
#: move CPU storages, which turns off the CPU shortcuts of save and load.
_CPU_PRIORITY = 10
_builtins_registered = False
_cpu_overridden = False


def register_package(priority: int, tagger: Tagger, deserializer: Deserializer) -> None:
    """Registers a tagger and a deserializer for a kind of device, at ``priority``.

    ``tagger(storage)`` returns the storage's location string or ``None``;
    ``deserializer(storage, location)`` returns the storage moved there, or ``None``
    when it does not handle that location. Lower priorities run first.
    """
    if not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if not callable(tagger) or not callable(deserializer):
        raise TypeError("tagger and deserializer must be callable")
    global _cpu_overridden
    with _lock:
        _registry.append((priority, tagger, deserializer))
        _registry.sort(key=lambda entry: entry[0])
        if _builtins_registered and priority <= _CPU_PRIORITY:
            _cpu_overridden = True


def cpu_overridden() -> bool:
    """True once a user entry runs at or before the built-in cpu one."""
    return _cpu_overridden


def _torch():
    import torch

    return torch


def _cpu_tag(storage):
    if storage.device.type == "cpu":
        return "cpu"
    return None


def _cpu_deserialize(storage, location):
    if location == "cpu":
        return storage
    return None


def _meta_tag(storage):
    if storage.device.type == "meta":
        return "meta"
    return None


def _meta_deserialize(storage, location):
    if location == "meta":
        return _torch().UntypedStorage(storage.nbytes(), device="meta")
    return None


def _mps_tag(storage):
    if storage.device.type == "mps":
        return "mps"
    return None


def _mps_deserialize(storage, location):
    if location.startswith("mps"):
        return storage.mps()
    return None


def _backend_name(backend: str) -> str:
    if backend == "privateuse1":
        return _torch()._C._get_privateuse1_backend_name()
    return backend


def _backend_tag(backend: str, storage):
    name = _backend_name(backend)
    if storage.device.type == name:
        index = storage.device.index
        return name if index is None else f"{name}:{index}"
    return None


def _validate_device(location: str, backend: str):
    """The torch.device for ``location``, or a RuntimeError that says to pass map_location."""
    torch = _torch()
    module = getattr(torch, backend, None)
    advice = (
        "If you are running on a CPU-only machine, please use fastserial.load with "
        "map_location=torch.device('cpu') to map your storages to the CPU."
    )
    if module is None:
        raise RuntimeError(f"The {backend.upper()} device module is not registered. {advice}")
    device = torch.device(location)
    index = device.index if device.index is not None else 0
    if hasattr(module, "is_available") and not module.is_available():
        raise RuntimeError(
            f"Attempting to deserialize object on a {backend.upper()} device but "
            f"torch.{backend}.is_available() is False. {advice}"
        )
    if hasattr(module, "device_count"):
        count = module.device_count()
        if index >= count:
            raise RuntimeError(
                f"Attempting to deserialize object on {backend.upper()} device {index} but "
                f"torch.{backend}.device_count() is {count}. Please use fastserial.load with "
                "map_location to map your storages to an existing device."
            )
    return torch.device(backend, index)


def _backend_deserialize(backend: str, storage, location: str):
    name = _backend_name(backend)
    if location == name or re.match(f"{re.escape(name)}(:|[0-9]+)", location):
        return storage.to(device=_validate_device(location, name))
    return None


def _register_builtins() -> None:
    import functools

    register_package(10, _cpu_tag, _cpu_deserialize)
    register_package(
        20, functools.partial(_backend_tag, "cuda"), functools.partial(_backend_deserialize, "cuda")
    )
    register_package(21, _mps_tag, _mps_deserialize)
    register_package(22, _meta_tag, _meta_deserialize)
    register_package(
        23,
        functools.partial(_backend_tag, "privateuse1"),
        functools.partial(_backend_deserialize, "privateuse1"),
    )
    register_package(
        24, functools.partial(_backend_tag, "hpu"), functools.partial(_backend_deserialize, "hpu")
    )
    register_package(
        25, functools.partial(_backend_tag, "xpu"), functools.partial(_backend_deserialize, "xpu")
    )


_register_builtins()
_builtins_registered = True


def location_tag(storage) -> str:
    """The location string the registry gives ``storage``."""
    if not _cpu_overridden and storage.device.type == "cpu":  # the common case
        return "cpu"
    for _, tagger, _ in _registry:
        location = tagger(storage)
        if location:
            return location
    raise RuntimeError(f"don't know how to determine data location of {type(storage).__name__}")


class UnknownLocationError(RuntimeError):
    """No registered deserializer knows a storage's location tag."""


def default_restore_location(storage, location: str):
    """Moves ``storage`` to ``location`` with the first deserializer that answers."""
    if not _cpu_overridden and location == "cpu" and storage.device.type == "cpu":
        return storage
    for _, _, deserializer in _registry:
        result = deserializer(storage, location)
        if result is not None:
            return result
    raise UnknownLocationError(
        f"don't know how to restore data location of {type(storage).__name__} "
        f"(tagged with {location!r}); register a deserializer with "
        "fastserial.register_package or pass map_location"
    )


def restore_location_fn(map_location) -> Callable[[Any, str], Any]:
    """``(storage, location) -> storage`` implementing torch's ``map_location`` forms."""
    if map_location is None:
        return default_restore_location
    if isinstance(map_location, dict):
        mapping = dict(map_location)
        return lambda storage, location: default_restore_location(
            storage, mapping.get(location, location)
        )
    if isinstance(map_location, (str, bytes)):
        target = map_location.decode() if isinstance(map_location, bytes) else map_location
        return lambda storage, location: default_restore_location(storage, target)
    torch = _torch()
    if isinstance(map_location, torch.device):
        target = str(map_location)
        return lambda storage, location: default_restore_location(storage, target)
    if callable(map_location):

        def restore(storage, location):
            result = map_location(storage, location)
            if result is None:
                result = default_restore_location(storage, location)
            return result

        return restore
    raise TypeError(
        "map_location must be None, a string, a torch.device, a dict or a callable, "
        f"not {type(map_location).__name__}"
    )
