"""The formats torch wrote before 1.6.

* **legacy** (``_use_new_zipfile_serialization=False``): a sequence of pickles — magic
  number, protocol version, system info, the object (storages as 6-tuple persistent
  ids), the sorted storage keys — then each storage as an 8-byte little-endian element
  count followed by its bytes.
* **tar** (before 0.4): a tar archive with ``storages``, ``tensors`` and ``pickle``.

Both load through the same allow-listed unpickler as zip checkpoints.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import tarfile
from typing import Any

from . import _fastserial as _native
from . import _format
from . import location as _location
from ._torch_io import (
    CheckpointError,
    _brief,
    _is_path,
    _Opened,
    _path_target,
    _storage_parts,
    _StorageType,
    _TorchInfo,
    _unpickler_class,
    _unpickling_error,
    _validate_sparse_tensors,
    _writable_view,
    _ZipLoader,
)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": sys.byteorder == "little",
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


class _NotACheckpointUnseekable(CheckpointError, AttributeError):
    """Bytes that are no checkpoint, read whole from a stream that cannot seek: a
    CheckpointError, and the AttributeError torch.load raises for such a stream."""


_UNSEEKABLE_HINT = (
    ". You can only torch.load from a file that is seekable. Please pre-load the data "
    "into a buffer like io.BytesIO and try to load from it instead."
)


def _container_source(container_type) -> tuple:
    """``(source file, source)`` of a module class, which torch's legacy save records so
    that a load can warn when the class has changed since; ``(None, None)`` with
    torch's warning when the source cannot be found."""
    import warnings

    from torch._sources import get_source_lines_and_file

    try:
        lines, _, source_file = get_source_lines_and_file(container_type)
        return source_file, "".join(lines)
    except Exception:  # noqa: BLE001 - the source is optional, as in torch
        warnings.warn(
            f"Couldn't retrieve source code for container of type {container_type.__name__}. "
            "It won't be checked for correctness upon loading.",
            stacklevel=3,
        )
        return None, None


def _check_container_source(torch, container_type, source_file, original_source) -> None:
    """torch's check on a legacy load with weights_only=False: a SourceChangeWarning
    when the class's source differs from the one saved (with
    ``torch.nn.Module.dump_patches``, the reverse patch is written as torch writes it)."""
    import difflib
    import warnings

    from torch._sources import get_source_lines_and_file

    try:
        current = "".join(get_source_lines_and_file(container_type)[0])
    except Exception:  # noqa: BLE001 - the source is optional, as in torch
        warnings.warn(
            f"Couldn't retrieve source code for container of type {container_type.__name__}. "
            "It won't be checked for correctness upon loading.",
            stacklevel=4,
        )
        return
    if original_source == current:
        return
    if getattr(container_type, "dump_patches", False):
        file_name = container_type.__name__ + ".patch"
        lines = "\n".join(
            difflib.unified_diff(
                current.split("\n"),
                original_source.split("\n"),
                source_file,
                source_file,
                lineterm="",
            )
        )
        try:
            with open(file_name, "a+") as fh:
                size = fh.seek(0, 2)
                fh.seek(0)
                if size == 0:
                    fh.write(lines)
                elif size != len(lines) or fh.read() != lines:
                    raise OSError
            msg = f"Saved a reverse patch to {file_name}. Run `patch -p0 < {file_name}` to revert your changes."
        except OSError:
            msg = (
                f"Tried to save a patch, but couldn't create a writable file {file_name}. "
                "Make sure it doesn't exist and your working directory is writable."
            )
    else:
        msg = (
            "you can retrieve the original source code by accessing the object's source "
            "attribute or set `torch.nn.Module.dump_patches = True` and use the patch tool "
            "to revert the changes."
        )
    msg = f"source code of class '{torch.typename(container_type)}' has changed. {msg}"
    warnings.warn(msg, torch.serialization.SourceChangeWarning, stacklevel=4)


class _LegacyLoader(_ZipLoader):
    """Unpickles legacy streams; shares find_class and the rebuild functions with the
    zip loader, but storages are created eagerly and filled after the pickle."""

    def __init__(
        self, opened: _Opened, map_location, pickle_module, weights_only, pickle_load_args
    ):
        self.info = _TorchInfo.get()
        self.archive = None
        self.file = opened.display
        self.map_location = map_location
        self.restore_location = self._user_callable(_location.restore_location_fn(map_location))
        self.is_meta = False
        self.pickle_module = pickle_module
        self.weights_only = weights_only
        self.mmap = False
        self.verify = False
        self.pickle_load_args = pickle_load_args
        self.mapping = None
        self.staging = False
        self.swap = False
        self.storages: dict[Any, Any] = {}
        self.factory = None
        self.stream_size = None
        self.unseekable = opened.unseekable
        # key -> (cpu storage to fill, storage that tensors use, dtype)
        self.to_fill: dict[Any, tuple] = {}

    def _next_pickle(self, stream):
        """The stream's next pickle, scanned natively first; the stream is left just
        past it."""
        start = stream.tell()
        data, end, scan = scan_next_pickle(stream, self.file, refuse_unsafe=self.weights_only)
        stream.seek(start + end)
        # torch's rules for BUILD, SETITEM and APPEND, as in a zip checkpoint.
        self.builds_like_torch = self.weights_only and (
            scan["builds"] > 0 or scan["untyped_mutations"] > 0
        )
        return _format.pickle_stream(data[:end])

    def unpickle(self, stream, persistent_load=None):
        pickled = self._next_pickle(stream)
        unpickler = _unpickler_class(self.pickle_module, torch_build=self.builds_like_torch)(
            pickled, loader=self, **self.pickle_load_args
        )
        if persistent_load is not None:
            unpickler.persistent_load = persistent_load
        try:
            return unpickler.load()
        except (CheckpointError, pickle.UnpicklingError, RecursionError, MemoryError):
            raise
        except EOFError as e:
            if e is self.user_error:  # from map_location: unchanged
                raise
            raise CheckpointError(f"{self.file}: the legacy checkpoint ends early: {e}") from e
        except Exception as e:
            if self.weights_only:
                wrapped = self.unpickling_failure(e, "in a legacy pickle")
                if wrapped is None:
                    raise
                raise wrapped from e
            if e is self.user_error or not isinstance(e, _LEGACY_DATA_ERRORS):
                # What the user's map_location and torch itself raise (RuntimeError)
                # passes through, as from torch.load; only the pickle's own faults
                # are wrapped.
                raise
            if isinstance(e, UnicodeDecodeError):
                # A wrong `encoding=` for Python 2 strings, as from torch.load.
                raise
            raise CheckpointError(
                f"{self.file}: damaged legacy checkpoint: {type(e).__name__}: {e}"
            ) from e

    def legacy_persistent_load(self, saved_id):
        info = self.info
        parsed = _format.legacy_storage_id(saved_id, self.file)
        if not isinstance(parsed, _format.LegacyStorageId):
            module = parsed[1]
            if len(module) == 4 and module[3] is not None:
                _check_container_source(self.info.torch, *module[1:])
            return module[1]
        storage_type, root_key, location, numel, view_metadata = parsed
        if storage_type is info.UntypedStorage:
            dtype = info.uint8
        elif type(storage_type) is _StorageType:
            dtype = storage_type.dtype
        else:
            raise _unpickling_error(f"{self.file}: {_brief(storage_type)} is not a storage type")
        itemsize = info.itemsize.get(dtype, 1)
        if root_key not in self.storages:
            if self.stream_size is not None and numel * itemsize > self.stream_size:
                raise CheckpointError(
                    f"{self.file}: storage {_brief(root_key)} declares {numel} elements "
                    f"({numel * itemsize} bytes), more than the whole {self.stream_size}-byte file"
                )
            # Zeroed: the bytes follow the pickle, so code the pickle runs on a tensor
            # (torch.Size(t)) reads zeros here, never old heap memory.
            cpu = info.torch.zeros(numel * itemsize, dtype=info.uint8).untyped_storage()
            restored = self.restore_location(cpu, location)
            typed = info.TypedStorage(wrap_storage=restored, dtype=dtype, _internal=True)
            self.storages[root_key] = typed
            self.to_fill[root_key] = (cpu, restored, dtype)
        typed = self.storages[root_key]
        if typed.dtype != dtype:
            # A storage without data met again under another dtype, as torch.load
            # treats it: the same bytes when the lengths agree, else an empty storage.
            untyped = typed._untyped_storage
            if untyped.nbytes() == numel * itemsize:
                typed = info.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
            else:
                typed = info.TypedStorage(device=untyped.device, dtype=dtype, _internal=True)
        if view_metadata is None:
            return typed
        view_key = view_metadata[0]
        if view_key not in self.storages:
            start, end = _format.storage_view_bytes(
                view_metadata, itemsize, typed._untyped_storage.nbytes(), self.file
            )
            self.storages[view_key] = info.TypedStorage(
                wrap_storage=typed._untyped_storage[start:end], dtype=dtype, _internal=True
            )
        return self.storages[view_key]

    def load_stream(self, f):
        self.stream_size = _stream_size(f)
        start = f.tell()
        # Not a checkpoint: from a stream that cannot seek (read whole here), the
        # error is also the AttributeError torch.load raises for such streams.
        not_checkpoint = _NotACheckpointUnseekable if self.unseekable else CheckpointError
        hint = _UNSEEKABLE_HINT if self.unseekable else ""
        try:
            magic = self.unpickle(f)
        except (CheckpointError, pickle.UnpicklingError, EOFError) + _LEGACY_DATA_ERRORS:
            # Not even the magic number unpickles: this is not a checkpoint at all.
            # (Anything else -- a custom pickle_module's own exception -- passes
            # through, as from torch.load.)
            try:
                f.seek(start)
                head = f.read(16)
            except (OSError, ValueError):
                head = b""
            raise not_checkpoint(
                f"{self.file}: not a checkpoint: neither a torch zip archive nor a legacy "
                f"torch pickle stream (the data starts with {head!r}){hint}"
            ) from None
        if magic != MAGIC_NUMBER:
            raise not_checkpoint(
                f"{self.file}: not a torch checkpoint (invalid magic number; corrupt file?){hint}"
            )
        version = self.unpickle(f)
        if version != PROTOCOL_VERSION:
            raise CheckpointError(f"{self.file}: invalid legacy protocol version {version!r}")
        self.unpickle(f)  # system info
        result = self.unpickle(f, self.legacy_persistent_load)
        keys = self.unpickle(f)
        if not isinstance(keys, list):
            raise CheckpointError(f"{self.file}: the storage key list is missing or malformed")
        filled = set()
        for key in keys:
            if not isinstance(key, (str, bytes, int)) or key not in self.to_fill:
                raise CheckpointError(
                    f"{self.file}: storage {_brief(key)} is listed but never used"
                )
            cpu, restored, dtype = self.to_fill[key]
            self._fill(f, key, cpu, self.info.itemsize.get(dtype, 1))
            filled.add(key)
            if restored is not cpu:
                restored.copy_(cpu)
        missing = [key for key in self.to_fill if key not in filled]
        if missing:
            raise CheckpointError(
                f"{self.file}: storage {_brief(missing[0])} is used by the pickle but its data "
                "is not in the file (missing from the storage key list)"
            )
        _validate_sparse_tensors(self.info.torch, self.weights_only, self.file)
        return result

    def _fill(self, f, key, storage, itemsize: int) -> None:
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{self.file}: storage {key!r}: the file ends before its data")
        (count,) = struct.unpack("<q", header)
        nbytes = storage.nbytes()
        if count * itemsize != nbytes:
            raise CheckpointError(
                f"{self.file}: storage {key!r} holds {count} elements of {itemsize} bytes "
                f"but the pickle declares {nbytes} bytes"
            )
        if nbytes == 0:
            return
        view = _writable_view(storage)
        got = f.readinto(view)
        if got != nbytes:
            raise CheckpointError(
                f"{self.file}: storage {key!r}: the file ends after {got} of its {nbytes} bytes"
            )


def scan_next_pickle(stream, label: str, refuse_unsafe: bool) -> tuple[bytes, int, dict]:
    """Scans the pickle that starts at the stream's position (legacy files hold pickles
    back to back) before Python's unpickler can allocate for it: every length and memo
    index is bounded, and with ``refuse_unsafe`` the opcodes a weights-only load refuses
    raise UnpicklingError. The window read grows until the whole pickle fits. Returns
    the bytes read, the pickle's length and the scan; the stream position is
    unspecified."""
    start = stream.tell()
    window = 1 << 16
    while True:
        stream.seek(start)
        data = stream.read(window)
        try:
            scan = _native.scan_pickle(data, label)
            break
        except CheckpointError:
            if len(data) < window:  # the scan saw the whole rest of the stream
                raise
            window *= 8
    if refuse_unsafe and scan["unsafe_opcodes"]:
        raise _unpickling_error(
            f"{label}: weights-only load refuses pickle opcodes {', '.join(scan['unsafe_opcodes'])}"
        )
    return data, scan["end"], scan


#: Exceptions a damaged legacy pickle makes Python's unpickler raise.
_LEGACY_DATA_ERRORS = (
    ValueError,
    TypeError,
    UnicodeDecodeError,
    KeyError,
    IndexError,
    struct.error,
)


def _stream_size(f):
    """The stream's total size when it can tell (files and BytesIO), else None."""
    try:
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
        return end
    except (AttributeError, OSError, ValueError):
        return None


def load_legacy(opened: _Opened, map_location, pickle_module, weights_only, pickle_load_args):
    loader = _LegacyLoader(opened, map_location, pickle_module, weights_only, pickle_load_args)
    return loader.load_stream(opened.stream)


def tar_member(tar: tarfile.TarFile, name: str, display: str) -> io.BytesIO:
    """A member of a legacy tar checkpoint, in memory, or CheckpointError naming it."""
    try:
        fh = tar.extractfile(name)
    except KeyError:
        fh = None
    if fh is None:
        raise CheckpointError(f"{display}: record '{name}' is missing from the tar archive")
    return io.BytesIO(fh.read())


def tar_tensor_geometry(stream) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(size, stride, storage offset) of one record of a tar checkpoint's ``tensors``
    member: int32 ndim, 4 padding bytes, ndim int64 sizes, ndim int64 strides, int64
    offset, all little-endian."""
    (ndim,) = struct.unpack("<i", stream.read(4))
    stream.read(4)
    size = struct.unpack(f"<{ndim}q", stream.read(8 * ndim))
    stride = struct.unpack(f"<{ndim}q", stream.read(8 * ndim))
    (offset,) = struct.unpack("<q", stream.read(8))
    return size, stride, offset


def load_tar(opened: _Opened, map_location, pickle_module, weights_only, pickle_load_args):
    if weights_only:
        raise RuntimeError(
            f"{opened.display}: cannot use weights_only=True with files saved in the legacy "
            ".tar format; load with weights_only=False only if you trust the file."
        )
    loader = _LegacyLoader(opened, map_location, pickle_module, weights_only, pickle_load_args)
    info = loader.info
    torch = info.torch
    objects: dict[Any, Any] = {}
    try:
        tar = tarfile.open(fileobj=opened.stream, mode="r:", format=tarfile.PAX_FORMAT)
    except tarfile.TarError as e:
        raise CheckpointError(f"{opened.display}: unreadable tar checkpoint: {e}") from e
    with tar:

        def member(name: str):
            return tar_member(tar, name, opened.display)

        storages = member("storages")
        for _ in range(loader.unpickle(storages)):
            key, location, storage_type = loader.unpickle(storages)
            dtype = storage_type.dtype
            (count,) = struct.unpack("<q", storages.read(8))
            nbytes = count * info.itemsize.get(dtype, 1)
            cpu = info.UntypedStorage(nbytes)
            if nbytes and storages.readinto(_writable_view(cpu)) != nbytes:
                raise CheckpointError(f"{opened.display}: storage {key!r} is truncated")
            restored = loader.restore_location(cpu, _format.decode(location))
            objects[key] = info.TypedStorage(wrap_storage=restored, dtype=dtype, _internal=True)
        for target, root_key, offset, numel in loader.unpickle(storages):
            root = objects[root_key]
            size = info.itemsize.get(root.dtype, 1)
            objects[target] = info.TypedStorage(
                wrap_storage=root._untyped_storage[offset * size : (offset + numel) * size],
                dtype=root.dtype,
                _internal=True,
            )
        tensors = member("tensors")
        for _ in range(loader.unpickle(tensors)):
            key, storage_id, _tensor_type = loader.unpickle(tensors)
            storage = objects[storage_id]
            size, stride, offset = tar_tensor_geometry(tensors)
            objects[key] = torch.empty((0,), dtype=storage.dtype).set_(
                storage._untyped_storage, offset, size, stride
            )

        def persistent_load(saved_id):
            if isinstance(saved_id, tuple):
                return saved_id[0]
            return objects[int(saved_id)]

        return loader.unpickle(member("pickle"), persistent_load)


# --------------------------------------------------------------------------- legacy save


def save_legacy(obj, f, pickle_module, pickle_protocol, fsync: bool = True) -> None:
    """Writes the pre-1.6 format, which ``torch.load`` still reads."""
    info = _TorchInfo.get()
    torch = info.torch
    serialized: dict[str, tuple[Any, Any]] = {}
    dtype_by_ptr: dict[int, Any] = {}
    containers: set = set()

    def persistent_id(o):
        if isinstance(o, type) and issubclass(o, torch.nn.Module):
            if o in containers:
                return None
            containers.add(o)
            return ("module", o, *_container_source(o))
        if isinstance(o, info.TypedStorage) or type(o) in info.storage_classes:
            storage, dtype, storage_type, numel = _storage_parts(o)
            ptr = storage.data_ptr()
            if ptr != 0 and dtype_by_ptr.setdefault(ptr, dtype) != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as different types"
                )
            key = str(storage._cdata)
            serialized.setdefault(key, (storage, dtype))
            return ("storage", storage_type, key, _location.location_tag(storage), numel, None)
        return None

    class LegacyPickler(pickle_module.Pickler):  # type: ignore[misc,name-defined]
        def persistent_id(self, o):
            return persistent_id(o)

    body = io.BytesIO()
    pickle_module.dump(MAGIC_NUMBER, body, protocol=pickle_protocol)
    pickle_module.dump(PROTOCOL_VERSION, body, protocol=pickle_protocol)
    pickle_module.dump(_SYS_INFO, body, protocol=pickle_protocol)
    LegacyPickler(body, protocol=pickle_protocol).dump(obj)
    keys = sorted(serialized)
    pickle_module.dump(keys, body, protocol=pickle_protocol)

    def chunks():
        yield body.getbuffer()
        for key in keys:
            storage, dtype = serialized[key]
            itemsize = info.itemsize.get(dtype, 1)
            cpu = storage if storage.device.type == "cpu" else storage.cpu()
            yield struct.pack("<q", cpu.nbytes() // itemsize)
            if cpu.nbytes():
                data = torch.empty((0,), dtype=torch.uint8).set_(cpu)
                yield memoryview(data.numpy()).cast("B")

    if _is_path(f):
        _write_atomically(os.fspath(f), chunks(), fsync)
    else:
        for chunk in chunks():
            f.write(chunk)
        if hasattr(f, "flush"):
            f.flush()


def _write_atomically(path: str, chunks, fsync: bool) -> None:
    """Temp file beside ``path`` (beside a symlink's target), fsync, rename: the same
    guarantee as zip saves."""
    path, _, atomic = _path_target(path, zip_format=False)
    if not atomic:
        with open(path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        return
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(
        directory, f".{os.path.basename(path)}{_native.TEMP_MARKER}{os.getpid()}-legacy"
    )
    try:
        with open(temp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(temp, path)
        if fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        try:
            os.remove(temp)
        except FileNotFoundError:
            pass
        raise
