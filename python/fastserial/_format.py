"""What the records of a checkpoint's pickle mean, decided once for every front end.

The torch front end (``fastserial.load``, zip and legacy), the numpy front end
(``fastserial.numpy``) and the metadata readers (``fastserial.open``, ``inspect``,
``verify``) all read persistent ids and tensor views through these functions, so that a
file is accepted or refused alike by all of them, with the same exception type and
message. Nothing here imports torch or numpy: a front end resolves the storage class a
persistent id names (to a torch storage class or a stand-in) and builds what it builds;
this module says what the record holds and whether it is well formed.

Exception types: a record of the wrong shape (a persistent id that is not the tuple
torch writes, a size that is not a tuple of ints) is the pickle's fault and raises
``pickle.UnpicklingError``; well-formed records that disagree with the archive (a view
past the end of its storage) raise ``CheckpointError``.
"""

from __future__ import annotations

import io
import pickle
import reprlib
import struct
from typing import Any, NamedTuple, Optional, Union

from ._fastserial import CheckpointError

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxtuple, _BRIEF.maxlist, _BRIEF.maxdict = 3, 6, 6, 4
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(obj) -> str:
    """A short repr of a value from a file, for error messages: bounded in depth and
    width, so formatting a hostile structure (a deep or DAG-shaped tuple) is cheap."""
    try:
        return _BRIEF.repr(obj)
    except Exception:  # noqa: BLE001 - a repr of the file's object failed
        return f"<{type(obj).__name__}>"


def decode(value):
    """A name torch wrote as ``str`` (Python 3) or ``bytes`` (Python 2 pickles)."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value


class StorageId(NamedTuple):
    """A zip checkpoint's persistent id ``('storage', type, key, location, numel)``:
    the storage's bytes are the record ``data/<key>``."""

    storage_type: Any
    key: str
    location: str
    numel: int


class LegacyStorageId(NamedTuple):
    """A legacy checkpoint's ``('storage', type, root_key, location, numel, view)``;
    ``view`` is None or ``(view_key, offset, size)`` in elements of the root."""

    storage_type: Any
    root_key: Any
    location: str
    numel: int
    view: Optional[tuple]


def storage_id(saved_id, file: str) -> StorageId:
    """Checks a zip checkpoint's persistent id; the storage class is left to the caller."""
    if type(saved_id) is not tuple or len(saved_id) != 5:
        raise pickle.UnpicklingError(
            f"{file}: unexpected persistent id {brief(saved_id)} "
            "(expected ('storage', type, key, location, numel))"
        )
    typename, storage_type, key, location, numel = saved_id
    if decode(typename) != "storage":
        raise pickle.UnpicklingError(
            f"{file}: unknown persistent id type {brief(typename)}, expected 'storage'"
        )
    if not isinstance(key, str):
        raise pickle.UnpicklingError(f"{file}: storage key {brief(key)} is not a string")
    location = decode(location)
    if not isinstance(location, str):
        raise pickle.UnpicklingError(
            f"{file}: storage '{key}' has location {brief(location)}, not a string"
        )
    return StorageId(storage_type, key, location, element_count(numel, key, file))


def legacy_storage_id(saved_id, file: str) -> Union[LegacyStorageId, tuple]:
    """Checks a legacy checkpoint's persistent id: a ``LegacyStorageId``, or
    ``('module', saved_id)`` for a module's class (what torch records for its source)."""
    if type(saved_id) is not tuple or not saved_id:
        raise pickle.UnpicklingError(f"{file}: unexpected persistent id {brief(saved_id)}")
    typename = decode(saved_id[0])
    if typename == "module" and len(saved_id) > 1:
        return ("module", saved_id)
    if typename != "storage" or len(saved_id) != 6:
        raise pickle.UnpicklingError(f"{file}: unknown persistent id type {brief(typename)}")
    storage_type, root_key, location, numel, view = saved_id[1:]
    location = decode(location)
    if not isinstance(location, str):
        raise pickle.UnpicklingError(
            f"{file}: storage {brief(root_key)} has location {brief(location)}, not a string"
        )
    numel = element_count(numel, root_key, file)
    if view is not None:
        if type(view) is not tuple or len(view) != 3:
            raise pickle.UnpicklingError(
                f"{file}: storage {brief(root_key)} has view metadata {brief(view)}, "
                "expected (key, offset, size)"
            )
        if type(view[1]) is not int or type(view[2]) is not int:
            raise pickle.UnpicklingError(
                f"{file}: storage view {brief(view[0])} has offset {brief(view[1])} and "
                f"size {brief(view[2])}, expected integers"
            )
    return LegacyStorageId(storage_type, root_key, location, numel, view)


def element_count(numel, key, file: str) -> int:
    if type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError(
            f"{file}: storage {brief(key)} declares {brief(numel)} elements"
        )
    return numel


def storage_view_bytes(view: tuple, itemsize: int, root_nbytes: int, file: str) -> tuple[int, int]:
    """The byte range ``[start, end)`` of a legacy storage view inside its root."""
    view_key, offset, size = view
    start, end = offset * itemsize, (offset + size) * itemsize
    if offset < 0 or size < 0 or end > root_nbytes:
        raise CheckpointError(f"{file}: storage view {brief(view_key)} lies outside its storage")
    return start, end


def view_geometry(offset, size, stride, fn: str, file: str) -> tuple[int, tuple, tuple]:
    """Checks the arguments a tensor rebuild gives for its view: an int offset, and a
    size and a stride, each a tuple (or list) of ints. Values of the wrong type are the
    pickle's fault (``UnpicklingError``); negative values, or a size and a stride of
    different lengths, describe no view of the storage (``CheckpointError``, a
    ``RuntimeError`` as torch's own refusal of such a view)."""
    size = _ints(size, "size", fn, file)
    stride = _ints(stride, "stride", fn, file)
    if type(offset) is not int:
        raise pickle.UnpicklingError(f"{file}: {fn}: storage offset is {brief(offset)}, not an int")
    if offset < 0 or len(size) != len(stride) or any(v < 0 for v in size + stride):
        raise CheckpointError(
            f"{file}: {fn}: invalid view (offset {offset}, size {size}, stride {stride})"
        )
    return offset, size, stride


def _ints(values, what: str, fn: str, file: str) -> tuple:
    if not isinstance(values, (tuple, list)):
        raise pickle.UnpicklingError(f"{file}: {fn}: {what} is {brief(values)}, not a tuple")
    if not all(type(v) is int for v in values):
        raise pickle.UnpicklingError(f"{file}: {fn}: {what} {brief(tuple(values))} is not all ints")
    return tuple(values)


def view_overrun(offset: int, size: tuple, stride: tuple, itemsize: int, nbytes: int):
    """None when the view (checked by ``view_geometry``) lies inside ``nbytes`` bytes of
    storage, else the message part saying how it does not (an empty view never does)."""
    extent = offset
    for n, s in zip(size, stride):
        if n == 0:
            return None
        extent += (n - 1) * s
    if (extent + 1) * itemsize <= nbytes:
        return None
    return (
        f"tensor view (offset {offset}, size {size}, stride {stride}) reaches past the "
        f"end of its {nbytes}-byte storage"
    )


#: What Python's unpickler (and the functions a pickle may call) raise for a pickle
#: that ends early or calls an allowed function with the wrong arguments.
MALFORMED_PICKLE_ERRORS = (
    AssertionError,  # torch's set_tensor_metadata on metadata that is not a dict
    EOFError,
    ValueError,
    LookupError,  # KeyError, IndexError, and codecs' unknown encodings
    TypeError,
    AttributeError,
    OverflowError,
    struct.error,
)


class WeightsOnlyRuntimeError(pickle.UnpicklingError, RuntimeError):
    """A weights-only load failed because torch raised ``RuntimeError`` while rebuilding
    an object from the pickle's arguments (an unknown qscheme, say): the file is at
    fault, so it is an ``UnpicklingError``, and still the ``RuntimeError`` torch.load
    raises for such a file."""


def unpickling_failure(e: BaseException, file: str, where: str) -> Optional[Exception]:
    """The typed exception a weights-only (or never-executing) load raises for ``e``,
    raised while a pickle ran, or None when ``e`` propagates unchanged: typed refusals
    already, and exceptions no pickle causes. The caller lets what a user callable
    raised (``map_location``) through before asking."""
    if isinstance(e, (CheckpointError, pickle.UnpicklingError, RecursionError, MemoryError)):
        return None
    if isinstance(e, RuntimeError) and type(e).__name__ != "OutOfMemoryError":
        # torch's RuntimeError from a rebuild the pickle called with bad arguments (not
        # torch.OutOfMemoryError: running out of device memory is no fault of the file).
        return WeightsOnlyRuntimeError(f"{file}: weights-only load failed {where}: {e}")
    if isinstance(e, MALFORMED_PICKLE_ERRORS):
        return pickle.UnpicklingError(
            f"{file}: weights-only load failed {where}: {type(e).__name__}: {e}"
        )
    return None


def tensor_bits(metadata, is_complex: bool, file: str) -> tuple[bool, bool]:
    """The ``(conj, neg)`` bits of a tensor rebuild's ``metadata`` argument, as torch's
    ``set_tensor_metadata`` reads it: nothing when it is empty or None; a mapping of
    names to bools otherwise (other names are ignored, as torch ignores them)."""
    if metadata is None:
        return False, False
    if not isinstance(metadata, dict):
        raise pickle.UnpicklingError(f"{file}: tensor metadata is {brief(metadata)}, not a dict")
    bits = []
    for name in ("conj", "neg"):
        value = metadata.get(name, False)
        if type(value) not in (bool, int):
            raise pickle.UnpicklingError(f"{file}: tensor metadata {name!r} is {brief(value)}")
        bits.append(bool(value))
    if bits[0] and not is_complex:
        raise CheckpointError(f"{file}: the conjugate bit is set on a tensor that is not complex")
    return bits[0], bits[1]


def pickle_stream(data) -> io.BufferedReader:
    """The stream an unpickler reads ``data`` from. A BufferedReader gives the C
    unpickler peek(), which makes it much faster than a bare BytesIO; its buffer is
    sized to the pickle (at most 1 MiB), since a fresh 1 MiB buffer costs a mapping
    and its page faults on every load of a small checkpoint."""
    return io.BufferedReader(io.BytesIO(data), buffer_size=min(max(len(data), 8192), 1 << 20))
