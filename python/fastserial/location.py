"""Where storages live: torch's ``register_package`` registry, and ``map_location``.

On save, *taggers* name a storage's location (``'cpu'``, ``'cuda:0'``, ...). On load,
*deserializers* move a CPU-materialized storage to the location it was saved from, or
to where ``map_location`` sends it. Entries run in priority order (lower first); the
first non-``None`` answer wins.

The registry is torch's own (``torch.serialization._package_registry``), read at
call time: an entry registered through ``torch.serialization.register_package`` or
:func:`register_package` serves ``torch.load`` and ``fastserial.load`` alike, and
torch's built-in entries (cpu, cuda, mps, meta, privateuse1, hpu, xpu, ...) are the
ones of the installed torch.
"""

from __future__ import annotations

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

#: Priority of torch's built-in cpu entry; user entries that run at or before it may
#: retag or move CPU storages, which turns off the CPU shortcuts of save and load.
_CPU_PRIORITY = 10


def _serialization():
    import torch.serialization

    return torch.serialization


def register_package(priority: int, tagger: Tagger, deserializer: Deserializer) -> None:
    """Registers a tagger and a deserializer for a kind of device, at ``priority``
    (``torch.serialization.register_package``: the registry is torch's).

    ``tagger(storage)`` returns the storage's location string or ``None``;
    ``deserializer(storage, location)`` returns the storage moved there, or ``None``
    when it does not handle that location. Lower priorities run first.
    """
    if not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if not callable(tagger) or not callable(deserializer):
        raise TypeError("tagger and deserializer must be callable")
    _serialization().register_package(priority, tagger, deserializer)


_cpu_state: tuple[int, bool] = (-1, False)


def cpu_overridden() -> bool:
    """True when an entry other than torch's own cpu one runs at or before it."""
    global _cpu_state
    ts = _serialization()
    registry = ts._package_registry
    count, overridden = _cpu_state
    if count != len(registry):  # entries are only ever added
        overridden = any(
            priority <= _CPU_PRIORITY and tagger is not ts._cpu_tag
            for priority, tagger, _ in registry
        )
        _cpu_state = (len(registry), overridden)
    return overridden


def location_tag(storage) -> str:
    """The location string the registry gives ``storage``."""
    if storage.device.type == "cpu" and not cpu_overridden():  # the common case
        return "cpu"
    return _serialization().location_tag(storage)


class UnknownLocationError(RuntimeError):
    """No registered deserializer knows a storage's location tag."""


def default_restore_location(storage, location: str):
    """Moves ``storage`` to ``location`` with the first deserializer that answers."""
    if location == "cpu" and storage.device.type == "cpu" and not cpu_overridden():
        return storage
    for _, _, deserializer in _serialization()._package_registry:
        result = deserializer(storage, location)
        if result is not None:
            return result
    raise UnknownLocationError(
        f"don't know how to restore data location of {type(storage).__name__} "
        f"(tagged with {location!r}); register a deserializer with "
        "torch.serialization.register_package (or fastserial.register_package) or pass "
        "map_location"
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
    import torch

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
