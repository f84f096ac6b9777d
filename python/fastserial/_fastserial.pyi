"""Typed stub for fastserial's native module (Rust, PyO3).

Functions and methods that take raw memory addresses are private: the Python layer
passes ``data_ptr()`` of storages it keeps alive for the duration of the call.
"""

import os
from typing import Any, Optional, Sequence, Union

from _typeshed import ReadableBuffer, WriteableBuffer

TEMP_MARKER: str

class CheckpointError(RuntimeError):
    """A checkpoint is malformed, truncated, corrupted or inconsistent."""

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def scan_pickle(data: bytes, file: str = ...) -> dict[str, Any]: ...
def byteswap(data: WriteableBuffer, elem_size: int) -> None: ...
def crc32(data: ReadableBuffer) -> int: ...
def dlpack_dtype(capsule: Any) -> tuple[int, int, int]:
    """(code, bits, lanes) of an unconsumed DLPack 'dltensor' capsule."""

def packed_blocks_alive() -> int:
    """Packed small-tensor blocks mapped now in this process (for tests)."""

class MappedBuffer:
    """A private, copy-on-write mapping of a whole checkpoint (buffer protocol)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

class OwnedBuffer:
    """An owned, 64-byte aligned buffer holding one record (buffer protocol)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

class Archive:
    """An opened checkpoint container."""

    @staticmethod
    def open_path(
        path: Union[str, os.PathLike[str]],
        mmap: bool = False,
        defer_data: bool = False,
        shared: bool = False,
        window: Optional[tuple[int, int]] = None,
    ) -> Archive: ...
    @staticmethod
    def open_fd(
        fd: int,
        display: str,
        mmap: bool = False,
        defer_data: bool = False,
        window: Optional[tuple[int, int]] = None,
    ) -> Archive: ...
    @staticmethod
    def open_buffer(data: ReadableBuffer, display: str) -> Archive: ...
    @property
    def file(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mapping(self) -> Optional[MappedBuffer]: ...
    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def info(self, name: str) -> tuple[int, int, int, bool]: ...
    def read(self, name: str, verify: bool = True) -> bytes: ...
    def read_buffer(self, name: str, swap: int = 0, verify: bool = False) -> OwnedBuffer: ...
    def read_into(
        self, jobs: Sequence[tuple[str, WriteableBuffer, int]], verify: bool = False
    ) -> None: ...
    def release(self, name: str) -> None: ...
    def verify(self, names: Optional[Sequence[str]] = None) -> list[tuple[str, str]]: ...

class BlobFrame:
    """The zip around one record whose data the caller writes itself: ``head``, the
    data, then ``tail(crc)``; byte for byte what ArchiveWriter writes."""

    def __init__(
        self,
        prefix: str,
        before: Sequence[tuple[str, bytes]],
        name: str,
        size: int,
        after: Sequence[tuple[str, bytes]],
    ) -> None: ...
    @property
    def head(self) -> bytes: ...
    @property
    def length(self) -> int: ...
    def tail(self, crc: int) -> bytes: ...

class ArchiveWriter:
    """Streams a checkpoint to a path (atomically replaced) or a file-like object."""

    def __init__(
        self, target: Any, prefix: str, atomic: bool = True, durable: bool = True
    ) -> None: ...
    def write_record(self, name: str, data: ReadableBuffer) -> None: ...
    def write_storages(self, items: Sequence[tuple[str, ReadableBuffer]]) -> None: ...
    def serialization_id(self) -> str: ...
    def finish(self, fsync: bool = True) -> None: ...
    def abort(self) -> None: ...

class PendingStorage:
    """A storage named by a pickle whose memory is created with its first tensor."""

    @property
    def dtype(self) -> Any: ...
    @property
    def nbytes(self) -> int: ...
    def untyped(self, factory: TensorFactory) -> Any: ...

class TensorFactory:
    """The per-tensor hot path of a load (see serialization._ZipLoader)."""

    def __init__(
        self,
        archive: Archive,
        *,
        swap: bool,
        all_cpu: bool,
        verify: bool,
        mapping: Optional[MappedBuffer],
        torch_fns: dict[str, Any],
        sizes: dict[Any, tuple[int, int]],
        fallbacks: dict[str, Any],
        from_dlpack: Optional[Any] = None,
        dlpack_codes: Optional[dict[Any, tuple[int, int]]] = None,
        pack_small: bool = True,
        storages_named: int = ...,
    ) -> None: ...
    @property
    def counts(self) -> tuple[int, int]: ...
    def persistent_load(self, saved_id: Any) -> Any: ...
    def rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: int,
        size: Any,
        stride: Any,
        requires_grad: bool,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> Any: ...
    def rebuild_tensor_v3(
        self,
        storage: Any,
        storage_offset: int,
        size: Any,
        stride: Any,
        requires_grad: bool,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> Any: ...
    def unpickle(
        self,
        data: bytes,
        objects: dict[tuple[str, str], Any],
        natives: dict[tuple[str, str], int],
        ordered_dict: type,
        memo_read: Optional[bytes] = None,
    ) -> tuple[bool, Any]: ...
    def finish(self) -> None: ...

class StorageRef:
    """Stands for a storage inside a reduce tuple while pickling."""

    @property
    def pid(self) -> tuple[Any, ...]: ...

class SaveHelper:
    """The pickler hooks of one save (see serialization._save_helper)."""

    def __init__(
        self, torch_objs: dict[str, Any], fallbacks: dict[str, Any], cpu_shortcut: bool = True
    ) -> None: ...
    def persistent_id(self, obj: Any) -> Any: ...
    def reducer_override(self, obj: Any) -> Any: ...
    def key_for(self, untyped: Any, dtype: Any, pid_type: Any, numel: int) -> str: ...
    def write_plan(self) -> list[Any]: ...
    def write_storages(self, writer: ArchiveWriter, items: Sequence[tuple[str, Any]]) -> None: ...
    def fast_state_dict(self, obj: Any) -> Optional[bytes]: ...
