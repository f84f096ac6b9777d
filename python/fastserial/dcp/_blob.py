"""A shard blob: one complete, uncompressed ``torch.save`` zip of one tensor.

DCP's shard files are sequences of such blobs (torch's ``FileSystemWriter`` calls
``torch.save(tensor, stream)`` once per item). This module frames a blob without
assembling it in memory (:class:`TensorFrame`, over the native archive writer's
``BlobFrame``: the bytes before the tensor data and the bytes after it, so the data
itself goes straight from the tensor to the file), and describes one from the native
archive reader and the strict decoder (:func:`describe_blob`). The framing is byte for
byte the one torch (and ``fastserial.save``) writes, except ``.data/serialization_id``.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from .. import _fastserial as _native
from .._fastserial import CheckpointError

#: Tensor data is placed at multiples of this in shard files (page and O_DIRECT size).
DATA_ALIGNMENT = 4096
#: The top folder torch gives an archive written to a stream.
PREFIX = "archive"


def crc32(data) -> int:
    """CRC32 of a buffer, computed with the GIL released."""
    if len(data) < 4096:
        return zlib.crc32(data)
    return _native.crc32(data)


def tensor_bytes(t) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy. The view is a
    buffer export of the tensor's memory: it keeps that memory alive and cannot reach
    past it."""
    import torch

    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------- data.pkl


class _StorageRef:
    """Stands for a storage while pickling: becomes torch's persistent id."""

    __slots__ = ("storage_type", "key", "numel")

    def __init__(self, storage_type, key: str, numel: int) -> None:
        self.storage_type = storage_type
        self.key = key
        self.numel = numel


_REDUCE_CACHE: dict = {}


def tensor_reduce(dtype, size, key: str):
    """What ``Tensor.__reduce_ex__(2)`` gives for a contiguous CPU tensor of ``dtype`` and
    ``size`` whose storage is record ``key`` (torch's ``_rebuild_tensor_v2`` with a typed
    storage, or ``_rebuild_tensor_v3`` with an untyped one for the newer dtypes)."""
    import torch

    cached = _REDUCE_CACHE.get(dtype)
    if cached is None:
        fn, args = torch.empty(0, dtype=dtype).__reduce_ex__(2)
        storage = args[0]
        if isinstance(storage, torch.storage.TypedStorage):
            cached = (fn, getattr(torch, storage._pickle_storage_type()), 1, len(args))
        else:
            cached = (fn, type(storage), torch.empty(0, dtype=dtype).element_size(), len(args))
        _REDUCE_CACHE[dtype] = cached
    fn, storage_type, numel_scale, nargs = cached
    size = tuple(int(s) for s in size)
    stride = []
    step = 1
    for s in reversed(size):
        stride.append(step)
        step *= max(s, 1)
    numel = 1
    for s in size:
        numel *= s
    ref = _StorageRef(storage_type, key, numel * numel_scale)
    args = (ref, 0, size, tuple(reversed(stride)), False, collections.OrderedDict())
    if nargs == 7:  # _rebuild_tensor_v3 carries the dtype
        args = args + (dtype,)
    return fn, args


class TensorPickler(pickle.Pickler):
    """torch's pickler for a save (``torch.serialization._save``): storages become
    ``("storage", type, key, location, numel)`` persistent ids. Tensors to be written
    later are passed as :class:`TensorStandIn` and pickled with :func:`tensor_reduce`;
    real storages (of real tensors) are collected in :attr:`storages`."""

    def __init__(self, file, protocol: int = 2) -> None:
        super().__init__(file, protocol)
        self.storages: dict[str, Any] = {}
        self._ids: dict[int, str] = {}
        self._keys = 0

    def next_key(self) -> str:
        key = str(self._keys)
        self._keys += 1
        return key

    def reducer_override(self, obj):
        if isinstance(obj, TensorStandIn):
            if obj.key is None:
                obj.key = self.next_key()
            return tensor_reduce(obj.dtype, obj.size, obj.key)
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        import torch

        if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj):
            from torch.serialization import location_tag, normalize_storage_type

            if isinstance(obj, torch.storage.TypedStorage):
                storage = obj._untyped_storage
                storage_type = getattr(torch, obj._pickle_storage_type())
                numel = obj._size()
            else:
                storage = obj
                storage_type = normalize_storage_type(type(obj))
                numel = storage.nbytes()
            key = self._ids.get(storage._cdata)
            if key is None:
                key = self._ids[storage._cdata] = self.next_key()
                self.storages[key] = storage
            return ("storage", storage_type, key, location_tag(storage), numel)
        return None


class TensorStandIn:
    """A tensor to be pickled before its data exists (its record is written later)."""

    __slots__ = ("dtype", "size", "key")

    def __init__(self, dtype, size) -> None:
        self.dtype = dtype
        self.size = tuple(size)
        self.key: Optional[str] = None


def tensor_pickle(dtype, size) -> bytes:
    buf = io.BytesIO()
    TensorPickler(buf).dump(TensorStandIn(dtype, size))
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def format_records() -> list[tuple[str, bytes]]:
    """The records torch writes between ``data.pkl`` and the storages (those of the
    installed torch, as ``fastserial.save`` writes them)."""
    from .._torch_io import _torch_writes_format_records

    records = []
    if _torch_writes_format_records():
        records += [(".format_version", b"1"), (".storage_alignment", b"64")]
    records.append(("byteorder", sys.byteorder.encode()))
    return records


class TensorFrame:
    """The zip around one tensor's data, as ``torch.save`` (and ``fastserial.save``)
    writes it, framed by fastserial's archive writer: ``head`` (``data.pkl``, the
    format records, the local header of ``data/0``), then ``nbytes`` of data, then
    :meth:`tail` (the data descriptor, ``version``, ``.data/serialization_id``, the
    directory)."""

    __slots__ = ("_frame", "head", "length", "nbytes")

    def __init__(self, dtype, size, nbytes: int) -> None:
        before = [("data.pkl", tensor_pickle(dtype, size)), *format_records()]
        self._frame = _native.BlobFrame(PREFIX, before, "data/0", nbytes, [("version", b"3\n")])
        self.head = self._frame.head
        self.length = self._frame.length
        self.nbytes = nbytes

    def tail(self, data_crc: int) -> bytes:
        """Everything after the data, once its CRC is known."""
        return self._frame.tail(data_crc)


def aligned_blob_offset(cursor: int, head_len: int) -> int:
    """The first offset at or after ``cursor`` that puts data (after ``head_len`` bytes of
    framing) on a :data:`DATA_ALIGNMENT` boundary of the shard file."""
    return cursor + (-(cursor + head_len) % DATA_ALIGNMENT)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorRecord:
    """Where one blob's tensor lies: element (i0, ..., ik) is at byte ``data_start +
    (storage_offset + sum(i_d * stride_d)) * itemsize`` of the blob."""

    dtype: Any
    size: tuple
    stride: tuple
    storage_offset: int
    data_start: int
    data_len: int
    crc: int
    itemsize: int


def describe_blob(archive, display: str) -> Optional[TensorRecord]:
    """Where a blob's tensor lies, read by fastserial's own decoder (the archive reader
    and the pickle decoder every front end uses, with the weights-only allow-list),
    without reading the tensor's data. None for a valid blob that is not one dense,
    stored, native-endian tensor: the caller loads it whole with ``fastserial.load``.
    A blob that is no valid checkpoint, or calls a global the allow-list refuses,
    raises ``CheckpointError``. Takes ownership of ``archive``."""
    import torch

    from .._torch_io import _Opened
    from ..numpy import TensorInfo, structure_of

    try:
        s = structure_of(_Opened("zip", display, archive=archive), mode="strict")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{display}: the blob does not load safely: {e}") from e
    try:
        t = s.root
        if (
            type(t) is not TensorInfo
            or t.problem is not None
            or t.conj
            or t.neg
            or s.byteorder != sys.byteorder
        ):
            return None
        storage = t.storage
        if storage.record is None or storage.parent is not None:
            return None
        offset, size, crc, compressed = archive.info(storage.record)
        dtype = getattr(torch, t.dtype.name, None)
        if compressed or not isinstance(dtype, torch.dtype) or size != storage.nbytes:
            return None
        return TensorRecord(
            dtype=dtype,
            size=t.shape,
            stride=t.stride,
            storage_offset=t.storage_offset,
            data_start=offset,
            data_len=size,
            crc=crc,
            itemsize=t.dtype.itemsize,
        )
    finally:
        s.close()
