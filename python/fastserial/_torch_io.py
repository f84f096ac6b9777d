"""The torch front end's machinery: opening a checkpoint, the zip loader (pickle,
allow-list, tensor factory), the pickler hooks and the writing steps of a save.

``serialization`` (the public ``save`` / ``load``) and ``legacy`` (the pre-1.6 and tar
formats) both build on it; it imports neither.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import errno
import gc
import io
import os
import pickle
import sys
import threading
import warnings
from collections import OrderedDict
from enum import Enum
from typing import Any, Optional

from . import _fastserial as _native
from . import _format
from . import allowlist as _safe
from . import location as _location
from ._fastserial import CheckpointError
from ._optional import require as _require

#: Pack small tensors of eager loads into shared blocks (see set_pack_small_tensors).
_pack_small_tensors = True


def set_pack_small_tensors(enabled: bool) -> None:
    """Whether eager loads pack small tensors into shared memory blocks (default: on).

    A CPU tensor of at most 64 KiB that owns its whole storage gets its memory
    from a block of up to 16 MiB shared with its neighbours, instead of an
    allocation of its own. It is made through torch's DLPack import
    (``torch._C._from_dlpack``), and small records are read into the blocks on a
    worker thread while the pickle runs: 20,000 tensors of 1 KiB load in about
    half the time. Each tensor still has its own storage of exactly its size, as
    with ``torch.load``. Two things differ, as they do for
    ``torch.load(mmap=True)``:

    * the storages are not resizable (``resize_`` to a larger size raises);
    * a block is freed when the last tensor over it is freed, so keeping a few
      small tensors of a big checkpoint can keep up to 16 MiB each alive.

    Turn it off to get storages allocated one by one, as ``torch.load`` does. The
    setting is process-wide and read when a load starts.
    """
    global _pack_small_tensors
    _pack_small_tensors = bool(enabled)


def get_pack_small_tensors() -> bool:
    """Whether eager loads pack small tensors into shared blocks (see
    :func:`set_pack_small_tensors`)."""
    return _pack_small_tensors


_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"


# --------------------------------------------------------------------------- endianness


class LoadEndianness(Enum):
    """Byte order assumed for checkpoints that carry no ``byteorder`` record."""

    NATIVE = 1
    LITTLE = 2
    BIG = 3


_default_load_endianness: Optional[LoadEndianness] = None


def _torch_serialization():
    """``torch.serialization`` when torch is imported (its settings are the ones that
    hold), else None: a front end without torch keeps fastserial's own settings."""
    torch = sys.modules.get("torch")
    return getattr(torch, "serialization", None) if torch is not None else None


def get_default_load_endianness() -> Optional[LoadEndianness]:
    """The byte order assumed for files without a ``byteorder`` record (``None``:
    little). With torch imported this is torch's setting
    (``torch.serialization.get_default_load_endianness``)."""
    ts = _torch_serialization()
    if ts is None:
        return _default_load_endianness
    setting = ts.get_default_load_endianness()
    return None if setting is None else LoadEndianness[setting.name]


def set_default_load_endianness(endianness) -> None:
    """Sets the byte order assumed for files without a ``byteorder`` record, on torch
    too when it is imported (either library's ``LoadEndianness`` is accepted)."""
    global _default_load_endianness
    ts = _torch_serialization()
    valid = (LoadEndianness,) + ((ts.LoadEndianness,) if ts is not None else ())
    if endianness is not None and not isinstance(endianness, valid):
        raise TypeError("endianness must be None or a LoadEndianness")
    ours = None if endianness is None else LoadEndianness[endianness.name]
    _default_load_endianness = ours
    if ts is not None:
        ts.set_default_load_endianness(None if ours is None else ts.LoadEndianness[ours.name])


def _assumed_byteorder() -> str:
    setting = get_default_load_endianness()
    if setting is None or setting is LoadEndianness.LITTLE:
        return "little"
    if setting is LoadEndianness.BIG:
        return "big"
    return sys.byteorder


def _default_mmap() -> bool:
    """``mmap=None``: torch's ``torch.utils.serialization.config.load.mmap``."""
    if "torch" not in sys.modules:
        return False
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.5 has no config module
        return False
    return bool(config.load.mmap)


def _mmap_shared() -> bool:
    """Whether mmap loads map the file shared (``torch.serialization.
    set_default_mmap_options(mmap.MAP_SHARED)``): writes to tensors reach the file."""
    import mmap as _mmap

    ts = _torch_serialization()
    getter = getattr(ts, "get_default_mmap_options", None)
    if getter is None:
        return False
    return getter() == getattr(_mmap, "MAP_SHARED", -1)


def set_default_mmap_options(flags: int):
    """``torch.serialization.set_default_mmap_options``: ``mmap.MAP_PRIVATE`` (the
    default; writes to tensors stay in memory) or ``mmap.MAP_SHARED`` (writes reach
    the file). Usable as a context manager on torch versions whose own is one."""
    import torch.serialization

    return torch.serialization.set_default_mmap_options(flags)


def get_default_mmap_options() -> int:
    """``torch.serialization.get_default_mmap_options``."""
    import mmap as _mmap

    import torch.serialization

    getter = getattr(torch.serialization, "get_default_mmap_options", None)
    return getter() if getter is not None else _mmap.MAP_PRIVATE


# --------------------------------------------------------------------------- torch helpers


def _torch():
    return _require("torch", "fastserial.load / fastserial.save (torch objects)")


class _TorchInfo:
    """Per-process lookups into torch, computed once."""

    _instance: Optional[_TorchInfo] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        torch = _torch()
        self.torch = torch
        self.Tensor = torch.Tensor
        self.UntypedStorage = torch.UntypedStorage
        self.TypedStorage = torch.storage.TypedStorage
        self.strided = torch.strided
        self.uint8 = torch.uint8
        self.v3_dtypes = frozenset(torch.storage._new_dtypes())
        self.storage_name_by_dtype = dict(torch.storage._dtype_to_storage_type_map())
        self.dtype_by_storage_name = {v: k for k, v in self.storage_name_by_dtype.items()}
        self.storage_class_by_dtype = {
            dt: getattr(torch, name) for dt, name in self.storage_name_by_dtype.items()
        }
        self.storage_classes = frozenset(torch._storage_classes)
        self.itemsize = {
            dt: dt.itemsize for dt in list(self.storage_name_by_dtype) + list(self.v3_dtypes)
        }
        self.complex_dtypes = frozenset(
            dt for dt in (torch.complex32, torch.complex64, torch.complex128)
        )
        #: dtype -> (element size, byte-swap width), for the native tensor factory
        self.sizes = {dt: (size, self.swap_size(dt)) for dt, size in self.itemsize.items()}
        self.get_tensor_metadata = torch._C._get_tensor_metadata
        self.set_tensor_metadata = torch._utils.set_tensor_metadata
        self.rebuild_tensor_v2 = torch._utils._rebuild_tensor_v2
        self.rebuild_tensor_v3 = torch._utils._rebuild_tensor_v3
        self.empty = torch.empty
        self.empty_strided = torch.empty_strided
        self.frombuffer = torch.frombuffer
        self.from_dlpack, self.dlpack_codes = self._dlpack_codes(torch)
        #: whether this torch's weights-only unpickler refuses SETITEM(S) on anything
        #: but a dict, OrderedDict or Counter (torch >= 2.7; 2.6 runs it on any object)
        self.checks_setitem_target = hasattr(
            torch._weights_only_unpickler.Unpickler, "_check_set_item_target"
        )

    @classmethod
    def get(cls) -> _TorchInfo:
        if cls._instance is None:
            with cls._lock:
                if cls._instance is None:
                    cls._instance = _TorchInfo()
        return cls._instance

    def _dlpack_codes(self, torch):
        """``torch._C._from_dlpack`` and, per dtype, the DLPack (code, bits) this torch
        exports it as: the dtypes whose small tensors an eager load packs into shared
        blocks (see ``rust/src/python/dlpack.rs``). Taken from torch's own
        ``to_dlpack``, so what is passed back is what this torch produces; a dtype
        it cannot export (quantized ones, some torch versions' newer types) is left
        out and loads as before."""
        from_dlpack = getattr(torch._C, "_from_dlpack", None)
        try:
            from torch.utils.dlpack import to_dlpack
        except ImportError:
            return None, {}
        if from_dlpack is None:
            return None, {}
        codes = {}
        for dt, size in self.itemsize.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # quantized and complex32 warn
                    capsule = to_dlpack(torch.empty(1, dtype=dt))
                code, bits, lanes = _native.dlpack_dtype(capsule)
            except Exception:
                continue
            if lanes == 1 and bits == 8 * size:
                codes[dt] = (code, bits)
        return from_dlpack, codes

    def swap_size(self, dtype) -> int:
        """Element size to byte-swap by: complex numbers swap per component."""
        size = self.itemsize.get(dtype, 1)
        return size // 2 if dtype in self.complex_dtypes else size


_brief = _format.brief


def _writable_view(storage) -> memoryview:
    """A writable memoryview over a CPU storage's bytes: a buffer export that native
    code can fill, holding the storage while it is exported."""
    info = _TorchInfo.get()
    t = info.empty((0,), dtype=info.uint8).set_(storage)
    return memoryview(t.numpy()).cast("B")


class _StorageType:
    """What a legacy storage class (``torch.FloatStorage``) unpickles to: its dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"StorageType(dtype={self.dtype})"


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic garbage collector: (un)pickling a big state dict allocates
    hundreds of thousands of tuples, and the collections they trigger cost more than
    the work itself (torch.load pays this too)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- opening files


def _is_path(f) -> bool:
    return isinstance(f, (str, os.PathLike))


def _display_name(f) -> str:
    if _is_path(f):
        return os.fspath(f) if isinstance(os.fspath(f), str) else repr(f)
    name = getattr(f, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(f).__name__}>"


class _Opened:
    """A checkpoint opened for reading: a zip ``Archive`` or a legacy byte stream."""

    def __init__(self, kind: str, display: str, archive=None, stream=None, closer=None):
        self.kind = kind
        self.display = display
        self.archive = archive
        self.stream = stream
        self._closer = closer
        #: the bytes of a stream that was read whole (a TorchScript archive is handed
        #: to torch.jit.load from them)
        self.data = None
        #: read whole from a stream that cannot seek
        self.unseekable = False

    def close(self) -> None:
        self.archive = None
        if self._closer is not None:
            self._closer()
            self._closer = None


def _is_torchscript(archive) -> bool:
    """torch's ``_is_torchscript_zip``: a record named exactly ``constants.pkl``
    (``has`` ignores case, as torch's record lookups do; this test does not)."""
    return archive.has("constants.pkl") and "constants.pkl" in archive.names()


def _sniff(head: bytes) -> str:
    if head[:4] in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return "legacy"


def _open_checkpoint(f, mmap: bool) -> _Opened:
    """Opens a checkpoint. An unmapped file's storage records have their local
    headers read when their data is first needed, all at once: on the loader's
    prefetch thread while the pickle runs, for loads of many small tensors."""
    display = _display_name(f)
    if _is_path(f):
        path = os.fspath(f)
        with open(path, "rb") as fh:
            head = fh.read(512)
        if not head:
            raise CheckpointError(f"{display}: the file is empty, not a checkpoint")
        kind = _sniff(head)
        if kind == "zip":
            archive = _native.Archive.open_path(
                path, mmap=mmap, defer_data=not mmap, shared=mmap and _mmap_shared()
            )
            return _Opened("zip", display, archive=archive)
        fh = open(path, "rb")
        return _Opened(kind, display, stream=fh, closer=fh.close)

    if not hasattr(f, "read"):
        raise TypeError(
            f"expected a path or a file-like object with read(), got {type(f).__name__}"
        )
    if isinstance(f, io.BytesIO):
        start = f.tell()
        view = f.getbuffer()
        head = bytes(view[start : start + 512])
        if not head:
            view.release()
            raise CheckpointError(f"{display}: the buffer is empty, not a checkpoint")
        kind = _sniff(head)
        if kind == "zip":
            try:
                archive = _native.Archive.open_buffer(view[start:], display)
            finally:
                view.release()
            f.seek(0, io.SEEK_END)
            return _Opened("zip", display, archive=archive)
        view.release()
        return _Opened(kind, display, stream=f)

    fileno = None
    # Only plain binary files are read through their descriptor: wrappers such as
    # GzipFile expose the descriptor of the *compressed* file.
    if isinstance(f, (io.BufferedReader, io.BufferedRandom, io.FileIO)) and f.seekable():
        try:
            fileno = f.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            fileno = None
    start = f.tell() if fileno is not None else None
    if fileno is not None:
        head = f.read(512)
        f.seek(start)
        if not head:
            raise CheckpointError(f"{display}: the file is empty, not a checkpoint")
        kind = _sniff(head)
        if kind != "zip":
            # Legacy formats are read from the current position on, so the file is
            # left just past the checkpoint, as torch.load leaves it.
            return _Opened(kind, display, stream=f)
        if start == 0:
            archive = _native.Archive.open_fd(fileno, display, mmap=mmap, defer_data=not mmap)
            f.seek(0, io.SEEK_END)
            return _Opened("zip", display, archive=archive)

    # Any other stream (gzip, sockets, custom readers): read it whole.
    data, start = _read_rest(f, display)
    if not data:
        raise CheckpointError(f"{display}: the stream is empty, not a checkpoint")
    kind = _sniff(bytes(data[:512]))
    if kind == "zip":
        opened = _Opened("zip", display, archive=_native.Archive.open_buffer(data, display))
        opened.data = data
        return opened
    stream = _BytesStream(data)

    def restore_position():
        # torch.load reads a legacy checkpoint from the stream itself and leaves it
        # just past the checkpoint: seekable streams end up there here too.
        try:
            f.seek(start + stream.tell())
        except (AttributeError, OSError, ValueError):
            pass

    closer = restore_position if start is not None else None
    opened = _Opened(kind, display, stream=stream, closer=closer)
    opened.unseekable = start is None
    return opened


def _read_rest(f, display: str):
    """``(bytes, start)``: the rest of stream ``f`` and the position it started at
    (None when the stream cannot tell). Read with ``readinto`` into one buffer when the
    stream has it (sized from the stream's end when it can seek), else with ``read()``."""
    start = size = None
    try:
        if getattr(f, "seekable", lambda: True)():
            start = f.tell()
    except (AttributeError, OSError, ValueError):
        start = None
    if start is not None:
        try:
            size = max(f.seek(0, io.SEEK_END) - start, 0)
        except (AttributeError, OSError, ValueError, TypeError):
            size = None
        try:
            f.seek(start)
        except (AttributeError, OSError, ValueError):
            start = None
    readinto = getattr(f, "readinto", None)
    if readinto is None:
        data = f.read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{display}: read() returned {type(data).__name__}, expected bytes")
        return data, start
    buf = bytearray(size if size else 1 << 20)
    filled = 0
    while True:
        if filled == len(buf) and size is not None:
            # The end the stream reported is reached: check that nothing follows.
            probe = bytearray(1 << 16)
            n = _read_some(readinto, probe, display)
            if not n:
                break
            buf += probe[:n]
            filled += n
            size = None
            continue
        if filled == len(buf):
            buf.extend(bytes(len(buf)))  # size unknown: grow geometrically
        with memoryview(buf) as view, view[filled:] as part:
            n = _read_some(readinto, part, display)
        if not n:
            break
        filled += n
    del buf[filled:]
    return buf, start


class _BytesStream(io.RawIOBase):
    """A seekable read-only stream over a bytes-like object that, unlike
    ``io.BytesIO`` given a bytearray, does not copy it."""

    def __init__(self, data) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        if n:
            with memoryview(b) as out, out.cast("B") as flat:
                flat[:n] = self._view[self._pos : self._pos + n]
            self._pos += n
        return n

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


def _read_some(readinto, into, display: str) -> int:
    n = readinto(into)
    if n is None:
        raise BlockingIOError(f"{display}: the stream has no data ready (non-blocking)")
    return n


# --------------------------------------------------------------------------- load


# The tensor rebuilds the native unpickler runs itself (by version), and the globals
# that call back into the factory it is running in (those pickles take the usual path).
_NATIVE_REBUILDS = {"torch._utils._rebuild_tensor_v2": 2, "torch._utils._rebuild_tensor_v3": 3}
_CALLS_BACK_INTO_FACTORY = frozenset(
    {"torch._utils._rebuild_tensor", "torch._utils._rebuild_qtensor"}
)

#: Globals whose calls never read tensor data: while a pickle uses only these, tensors
#: may be built before their bytes arrive (all bytes are read once, at the end).
_INERT_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch.nn.parameter.Parameter",
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        "_codecs.encode",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
        "torch.UntypedStorage",
        "torch.storage.UntypedStorage",
    }
)

#: Inert globals whose calls may read a tensor passed to them (``torch.Size(t)``
#: reads ``t``'s elements). In a lazy load, where tensors are filled only after the
#: pickle has run, each is called through a ``_LazyGuard``.
_MAY_READ_ARGUMENTS = frozenset(
    {
        "collections.Counter",
        "torch.Size",
        "torch.device",
        "builtins.bytearray",
        "builtins.complex",
        "torch.UntypedStorage",
        "torch.storage.UntypedStorage",
    }
)

_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}


class _Retry(Exception):
    """Internal: a lazily built load found a storage used outside a tensor rebuild,
    or tensor data needed before it is read: the load starts over eagerly."""


def _holds_tensor_data(obj, budget: int = 10_000) -> bool:
    """Whether ``obj`` is or contains (through lists, tuples, sets and dicts) a
    tensor or storage; True too past ``budget`` items, which a caller treats as
    "maybe"."""
    import torch

    readable = (
        torch.Tensor,
        torch.UntypedStorage,
        torch.storage.TypedStorage,
        _native.PendingStorage,
    )
    stack = [obj]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0 or isinstance(item, readable):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return False


class _LazyGuard:
    """A global whose call may read its arguments' data, in a lazy load: called with
    a tensor anywhere in its arguments (whose bytes are not read yet), it ends the
    lazy run, and the load starts over eagerly, every tensor filled before it is
    used. Identity matters to the factory, so the guard is the one stand-in for its
    global for the whole load."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        if _holds_tensor_data(args) or _holds_tensor_data(kwargs):
            raise _Retry()
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self.fn)


WeightsOnlyRuntimeError = _format.WeightsOnlyRuntimeError


def _unpickling_error(msg: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(msg)


class _ZipLoader:
    """One load of one zip checkpoint."""

    def __init__(
        self,
        opened: _Opened,
        map_location,
        pickle_module,
        weights_only: bool,
        mmap: bool,
        verify: bool,
        pickle_load_args: dict,
    ) -> None:
        self.info = _TorchInfo.get()
        self.archive = opened.archive
        self.file = opened.display
        self.map_location = map_location
        self.restore_location = self._user_callable(_location.restore_location_fn(map_location))
        self.is_meta = _is_meta_location(map_location)
        self.pickle_module = pickle_module
        self.weights_only = weights_only
        self.mmap = mmap
        self.verify = verify
        self.pickle_load_args = pickle_load_args
        self.mapping = self.archive.mapping if mmap else None
        self.staging = False  # set when the mapping only stages data for a device
        self.factory = None
        #: persistent ids in the pickle (the scan's count): bounds the prefetch
        self.persistent_ids = 0
        self.builds_like_torch = False
        #: stand-ins for globals that may read tensor data, by id of the global
        self._guards: dict[int, _LazyGuard] = {}
        #: which unpickler ran the pickle (or was running when the load failed):
        #: "native" (unpickle.rs) or "python"
        self.unpickler_used: Optional[str] = None

    #: the last exception a user callable (map_location) raised during this load: it
    #: reaches the caller unchanged, never re-wrapped as a fault of the pickle
    user_error: Optional[BaseException] = None

    def _user_callable(self, fn):
        """``fn``, remembering what it raises in ``user_error``."""

        def call(*args):
            try:
                return fn(*args)
            except BaseException as e:
                self.user_error = e
                raise

        return call

    # -- record helpers

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {what}")

    def unpickling_failure(self, e: Exception, where: str) -> Optional[Exception]:
        """What a weights-only load raises for ``e``, raised while the pickle ran (``where``
        says which pickle), or None when ``e`` propagates unchanged (see
        ``_format.unpickling_failure``)."""
        if not self.weights_only or e is self.user_error:
            return None
        return _format.unpickling_failure(e, self.file, where)

    def _byteorder(self) -> str:
        if self.archive.has("byteorder"):
            value = self.archive.read("byteorder")
            if value not in (b"little", b"big"):
                raise self._fail(
                    f"record '{self.archive.prefix}/byteorder' holds {value[:20]!r}; "
                    "expected b'little' or b'big'"
                )
            return value.decode()
        return _assumed_byteorder()

    def load(self):
        try:
            return self._load()
        finally:
            # The factory holds this loader's bound methods and the garbage collector
            # cannot see inside it: break that cycle on every exit, failures included,
            # or a failed load would keep its file open.
            self.factory = None
            # restore_location's closure holds this loader too: drop the archive now,
            # so that the buffer of an io.BytesIO it was opened on is released when
            # load returns (else closing or resizing the BytesIO raises BufferError
            # until the garbage collector runs), as with torch.load.
            self.archive = None

    def _load(self):
        archive = self.archive
        if not archive.has("data.pkl"):
            if _is_torchscript(archive):
                raise self._fail(
                    "this is a TorchScript archive, not a torch.save checkpoint; use torch.jit.load"
                )
            raise self._fail(f"record '{archive.prefix}/data.pkl' is missing from the archive")
        data = archive.read("data.pkl")  # CRC32 always checked
        scan = _native.scan_pickle(data, f"{self.file}: record '{archive.prefix}/data.pkl'")
        if self.weights_only and scan["unsafe_opcodes"]:
            raise _unpickling_error(
                f"{self.file}: weights-only load refuses pickle opcodes "
                f"{', '.join(scan['unsafe_opcodes'])}"
            )
        self.swap = self._byteorder() != sys.byteorder
        self.persistent_ids = scan["persistent_ids"]
        # A weights-only pickle with BUILD opcodes, or with SETITEM / APPEND on targets
        # the scan cannot show to be dicts and lists, is unpickled with torch's safe
        # unpickler's rules for BUILD, SETITEM and APPEND (set_ on a tensor; items only
        # into dicts and lists), which only a Python-level unpickler can follow (the
        # native unpickler runs only BUILDs it can do exactly as torch does).
        self.builds_like_torch = self.weights_only and (
            scan.get("builds", 0) > 0 or scan.get("untyped_mutations", 0) > 0
        )
        globals_used = {
            "{}.{}".format(*_canonical_global(m, n, scan["protocol"])) for m, n in scan["globals"]
        }
        # Lazy tensors are filled after the pickle has run: a SETITEM or APPEND that may
        # reach a tensor (its target not shown to be a dict or list) would act on
        # unfilled memory, so such a pickle is unpickled eagerly.
        lazy = (
            scan.get("untyped_mutations", 0) == 0
            and not scan["persistent_id_reused"]
            and not _location.cpu_overridden()
            and _cpu_stays_cpu(self.map_location)
            and all(
                g in _INERT_GLOBALS or _is_storage_global(g) or _is_dtype_global(g)
                for g in globals_used
            )
        )
        if lazy:
            try:
                return self._run(data, lazy=True, scan=scan)
            except _Retry:
                pass
        return self._run(data, lazy=False)

    def _native_globals(self, scan: dict, unpickler):
        """What the native unpickler needs to run this pickle: ``(objects, natives)``,
        each global resolved exactly as ``unpickler`` would; None when it cannot run it."""
        if self.pickle_module not in (None, pickle):
            return None
        fix_imports = self.pickle_load_args.get("fix_imports", True)
        objects, natives = {}, {}
        for module, name in scan["globals"]:
            if _canonical_global(module, name, scan["protocol"], fix_imports) != (module, name):
                return None  # renamed Python 2 globals: left to the ordinary unpickler
            full = f"{module}.{name}"
            if full in _NATIVE_REBUILDS:
                natives[(module, name)] = _NATIVE_REBUILDS[full]
            elif full in _CALLS_BACK_INTO_FACTORY:
                return None
            else:
                try:
                    objects[(module, name)] = unpickler.find_class(module, name)
                except Exception:
                    return None  # the ordinary unpickler raises it in context
        return objects, natives

    def _run(self, data: bytes, lazy: bool, scan: Optional[dict] = None):
        self.storages: dict[str, Any] = {}
        self.factory = self._make_factory() if lazy else None
        stream = _format.pickle_stream(data)
        unpickler = _unpickler_class(
            self.pickle_module, torch_build=self.builds_like_torch and not lazy
        )(stream, loader=self, **self.pickle_load_args)
        unpickler.persistent_load = (
            self.factory.persistent_load if self.factory is not None else self.persistent_load
        )
        native = self._native_globals(scan, unpickler) if lazy and scan is not None else None
        try:
            with _gc_paused():
                done = False
                if native is not None:
                    self.unpickler_used = "native"
                    done, result = self.factory.unpickle(
                        data, *native, OrderedDict, scan["memo_read"]
                    )
                    if not done and self.builds_like_torch:
                        raise _Retry()  # a BUILD the native run left: torch's semantics
                    if not done:  # start over with the ordinary unpickler
                        self.factory = self._make_factory()
                        unpickler.persistent_load = self.factory.persistent_load
                self.unpickler_used = "native" if done else "python"
                if not done and lazy and self.builds_like_torch:
                    raise _Retry()
                if not done:
                    result = unpickler.load()
        except _Retry:
            raise
        except Exception as e:
            wrapped = self.unpickling_failure(
                e, f"while unpickling '{self.archive.prefix}/data.pkl'"
            )
            if wrapped is None:
                raise
            raise wrapped from e
        if self.factory is not None:
            produced, consumed = self.factory.counts
            if produced != consumed:
                raise _Retry()
            self.factory.finish()
            self.factory = None
        if self.verify and self.mmap:
            failures = self.archive.verify(
                [n for n in self.archive.names() if n.startswith("data/")]
            )
            if failures:
                record, problem = failures[0]
                raise self._fail(f"record '{record}' failed verification: {problem}")
        _validate_sparse_tensors(self.info.torch, self.weights_only, self.file)
        return result

    def _make_factory(self):
        info = self.info
        return _native.TensorFactory(
            self.archive,
            swap=self.swap,
            all_cpu=_maps_everything_to_cpu(self.map_location),
            verify=self.verify,
            mapping=self.mapping,
            torch_fns={
                "empty_strided": info.empty_strided,
                "empty_like": info.torch.empty_like,
                "empty": info.empty,
                "UntypedStorage": info.UntypedStorage,
                "untyped_global": self._guard(info.UntypedStorage),
                "frombuffer": info.frombuffer,
                "set_tensor_metadata": info.set_tensor_metadata,
                "uint8": info.uint8,
            },
            sizes=info.sizes,
            from_dlpack=info.from_dlpack,
            dlpack_codes=info.dlpack_codes,
            pack_small=_pack_small_tensors,
            storages_named=self.persistent_ids,
            fallbacks={
                "persistent_load": self.persistent_load,
                "rebuild_tensor_v2": self.rebuild_tensor_v2,
                "rebuild_tensor_v3": self.rebuild_tensor_v3,
                "mapped_storage": self._cpu_storage,
            },
        )

    # -- persistent ids

    def persistent_load(self, saved_id):
        storage_type, key, location, numel = _format.storage_id(saved_id, self.file)
        entry = self.storages.get(key)
        if entry is not None:
            retyped = self._retyped(entry, storage_type, numel)
            if retyped is None:
                return entry
            if retyped is not False:
                return retyped
            # The references disagree on the record's length: this one gets a storage
            # of its own (checked against the record below), as in torch.load.
        info = self.info
        dtype = self._storage_dtype(storage_type)
        if dtype is None:
            raise _unpickling_error(
                f"{self.file}: persistent id names {_brief(storage_type)}, which is not a storage type"
            )
        record = f"data/{key}"
        if not self.archive.has(record):
            raise self._fail(f"record '{self.archive.prefix}/{record}' is missing from the archive")
        nbytes = numel * info.itemsize.get(dtype, 1)
        size = self.archive.info(record)[1]
        if size != nbytes:
            raise self._fail(
                f"record '{self.archive.prefix}/{record}' holds {size} bytes but the pickle "
                f"declares {numel} elements of {dtype} ({nbytes} bytes)"
            )
        swap = info.swap_size(dtype) if self.swap else 0
        entry = self._eager_storage(record, dtype, nbytes, swap, location)
        self.storages.setdefault(key, entry)
        return entry

    def _retyped(self, entry, storage_type, numel):
        """A storage met again under another dtype: ``torch.save`` allows that only for
        a record with no data (an empty storage viewed with several dtypes, or one
        saved from meta). As ``torch.load``: None when the dtype is the same (use
        ``entry``), a storage of the new dtype over the same bytes when the lengths
        agree, False when they do not (the reference needs a storage of its own)."""
        info = self.info
        dtype = self._storage_dtype(storage_type)
        if dtype is None:
            return None  # not a storage type: the caller's checks refuse it
        if dtype == entry.dtype or type(numel) is not int:
            return None
        untyped = entry._untyped_storage
        if untyped.nbytes() != numel * info.itemsize.get(dtype, 1):
            return False
        typed = info.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        typed._fastserial_swapped = getattr(entry, "_fastserial_swapped", True)
        return typed

    def _eager_storage(self, record: str, dtype, nbytes: int, swap: int, location: str):
        info = self.info
        if self.is_meta:
            untyped = info.UntypedStorage(nbytes, device="meta")
        else:
            cpu = self._cpu_storage(record, nbytes, swap)
            try:
                untyped = self.restore_location(cpu, location)
            except _location.UnknownLocationError as e:
                raise self._fail(f"record '{self.archive.prefix}/{record}': {e}") from None
            if self.staging and untyped.device.type != "cpu":
                # Copied to the device: let go of the mapped pages it was read from.
                del cpu
                self.archive.release(record)
        typed = info.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        typed._fastserial_swapped = swap > 1 or not self.swap
        return typed

    def _cpu_storage(self, record: str, nbytes: int, swap: int):
        """A CPU storage holding the record's bytes (mapped when mmap=True)."""
        info = self.info
        if nbytes == 0:
            return info.UntypedStorage(0)
        if self.mapping is not None:
            return self._mapped_tensor(record, info.uint8, nbytes, swap).untyped_storage()
        # Read through a buffer export of the new storage: no address passes through
        # Python, and the storage stays an ordinary (resizable) one, as torch.load's.
        untyped = info.UntypedStorage(nbytes)
        self.archive.read_into([(record, _writable_view(untyped), swap)], verify=self.verify)
        return untyped

    def _mapped_tensor(self, record: str, dtype, count_bytes: int, swap: int):
        """A 1-D tensor over the record's bytes: a view of the mapping when possible,
        otherwise (compressed, byte-swapped, misaligned) an owned aligned copy."""
        info = self.info
        offset, size, _crc, compressed = self.archive.info(record)
        count = count_bytes // info.itemsize.get(dtype, 1)
        if compressed or swap > 1 or offset % 64:
            # Compressed, byte-swapped, or off torch's 64-byte alignment (a zip written
            # by another tool): an aligned owned copy, never a misaligned view.
            buffer = self.archive.read_buffer(record, swap=swap, verify=self.verify)
            return info.frombuffer(buffer, dtype=dtype, count=count)
        return info.frombuffer(self.mapping, dtype=dtype, count=count, offset=offset)

    # -- tensor rebuilds (what find_class returns for torch's _rebuild_* functions)

    def _check_view(self, untyped, itemsize: int, offset, size, stride, what: str):
        """The view's (offset, size, stride), checked well formed and, on a storage with
        bytes (not meta), inside it."""
        offset, size, stride = _format.view_geometry(offset, size, stride, what, self.file)
        if untyped.device.type != "meta":
            overrun = _format.view_overrun(offset, size, stride, itemsize, untyped.nbytes())
            if overrun is not None:
                raise self._fail(f"{what}: {overrun}")
        return offset, size, stride

    def _tensor_from_typed(self, typed, dtype, offset, size, stride):
        info = self.info
        untyped = typed._untyped_storage
        if not getattr(typed, "_fastserial_swapped", True) and untyped.device.type == "cpu":
            # An untyped storage from a foreign-endian file: swap by the tensor's dtype.
            _native.byteswap(_writable_view(untyped), info.swap_size(dtype))
            typed._fastserial_swapped = True
        offset, size, stride = self._check_view(
            untyped, info.itemsize.get(dtype, 1), offset, size, stride, "a storage"
        )
        return info.empty((0,), dtype=dtype, device=untyped.device).set_(
            untyped, offset, size, stride
        )

    def _finish_tensor(self, t, requires_grad, backward_hooks, metadata):
        if type(requires_grad) is not bool:  # torch pickles a bool
            raise _unpickling_error(f"{self.file}: requires_grad is {_brief(requires_grad)}")
        if requires_grad:
            try:
                t.requires_grad = True
            except RuntimeError as e:  # gradients on an integer tensor: a malformed file
                raise _unpickling_error(f"{self.file}: requires_grad=True: {e}") from e
        if metadata:
            self.info.set_tensor_metadata(t, metadata)
        if backward_hooks:
            t._backward_hooks = backward_hooks
        return t

    def rebuild_tensor_v2(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
    ):
        if not isinstance(storage, self.info.TypedStorage):
            raise _unpickling_error(
                f"{self.file}: _rebuild_tensor_v2 received {type(storage).__name__}, not a storage"
            )
        t = self._tensor_from_typed(storage, storage.dtype, storage_offset, size, stride)
        return self._finish_tensor(t, requires_grad, backward_hooks, metadata)

    def rebuild_tensor_v3(
        self,
        storage,
        storage_offset,
        size,
        stride,
        requires_grad,
        backward_hooks,
        dtype,
        metadata=None,
    ):
        if type(dtype) is not type(self.info.uint8):
            raise _unpickling_error(f"{self.file}: _rebuild_tensor_v3 dtype is {dtype!r}")
        if not isinstance(storage, self.info.TypedStorage):
            raise _unpickling_error(
                f"{self.file}: _rebuild_tensor_v3 received {type(storage).__name__}, not a storage"
            )
        t = self._tensor_from_typed(storage, dtype, storage_offset, size, stride)
        return self._finish_tensor(t, requires_grad, backward_hooks, metadata)

    def rebuild_tensor(self, storage, storage_offset, size, stride):
        rebuild = self.factory.rebuild_tensor_v2 if self.factory else self.rebuild_tensor_v2
        return rebuild(storage, storage_offset, size, stride, False, None)

    def materialize(self, storage):
        """A real TypedStorage for a pending one (for functions that take storages)."""
        if self.factory is None or not isinstance(storage, _native.PendingStorage):
            return storage
        return self.info.TypedStorage(
            wrap_storage=storage.untyped(self.factory), dtype=storage.dtype, _internal=True
        )

    def rebuild_qtensor(self, storage, storage_offset, size, stride, *args):
        typed = self.materialize(storage)
        # Packed sub-byte types (quint4x2, quint2x4) count elements below a byte: torch's
        # own set_ checks those; byte-sized ones are checked here with a typed error.
        packed = str(getattr(typed, "dtype", "")) in ("torch.quint4x2", "torch.quint2x4")
        if isinstance(typed, self.info.TypedStorage) and not packed:
            storage_offset, size, stride = self._check_view(
                typed._untyped_storage,
                self.info.itemsize.get(typed.dtype, 1),
                storage_offset,
                size,
                stride,
                "a quantized tensor's storage",
            )
        return self.info.torch._utils._rebuild_qtensor(typed, storage_offset, size, stride, *args)

    # -- globals

    def find_class(self, module: str, name: str, proto: int, fix_imports: bool):
        module, name = _canonical_global(module, name, proto, fix_imports)
        full = f"{module}.{name}"
        verdict = _safe.verdict(module, name) if self.weights_only else None
        if verdict is not None and not verdict.allowed:
            raise _unpickling_error(_refusal(self.file, full, blocked=verdict.blocked))
        if module == "torch" and name.endswith("Storage"):
            info = self.info
            if name == "UntypedStorage":
                return info.UntypedStorage
            dtype = info.dtype_by_storage_name.get(name)
            if dtype is not None:
                return _StorageType(name, dtype)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return getattr(self.info.torch.storage, name)
        override = self._override(full)
        if verdict is not None:
            return override or verdict.obj
        return override

    def torch_build(self, inst, state) -> None:
        """BUILD as torch's weights-only unpickler does it: ``set_(*state)`` on a plain
        tensor, ``__setstate__`` on a Parameter, attributes on an OrderedDict, and on
        allowed types ``__setstate__`` or the pickle module's state update; any other
        object is refused."""
        torch = self.info.torch
        kind = type(inst)
        if kind is torch.Tensor:
            inst.set_(*state)
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is OrderedDict:
            inst.__dict__.update(state)
        elif _safe.is_allowed_object(kind):
            if hasattr(inst, "__setstate__"):
                inst.__setstate__(state)
                return
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            if state:
                inst.__dict__.update(state)
            if slotstate:
                for k, v in slotstate.items():
                    setattr(inst, k, v)
        else:
            raise _unpickling_error(
                f"{self.file}: weights-only load can only BUILD a Tensor, a Parameter, an "
                f"OrderedDict or an allowed type, not {kind.__module__}.{kind.__qualname__}"
            )

    def _guard(self, obj):
        """The one ``_LazyGuard`` of ``obj`` for this load."""
        guard = self._guards.get(id(obj))
        if guard is None:
            guard = self._guards[id(obj)] = _LazyGuard(obj)
        return guard

    def _storage_dtype(self, storage_type):
        """The dtype a persistent id's storage class stands for; None for anything
        that is not a storage class."""
        if self._is_untyped(storage_type):
            return self.info.uint8
        if type(storage_type) is _StorageType:
            return storage_type.dtype
        return None

    def _is_untyped(self, storage_type) -> bool:
        untyped = self.info.UntypedStorage
        return storage_type is untyped or (
            type(storage_type) is _LazyGuard and storage_type.fn is untyped
        )

    def guarded(self, module: str, name: str, proto: int, fix_imports: bool, obj):
        """``obj``, the global ``module.name`` resolved, or its guard in a lazy load
        when a call of it may read tensor data (``_MAY_READ_ARGUMENTS``)."""
        if self.factory is None or obj is None:
            return obj
        full = "{}.{}".format(*_canonical_global(module, name, proto, fix_imports))
        return self._guard(obj) if full in _MAY_READ_ARGUMENTS else obj

    def _override(self, full: str):
        fast = self.factory
        if full == "torch._utils._rebuild_tensor_v2":
            return fast.rebuild_tensor_v2 if fast is not None else self.rebuild_tensor_v2
        if full == "torch._utils._rebuild_tensor_v3":
            return fast.rebuild_tensor_v3 if fast is not None else self.rebuild_tensor_v3
        if full == "torch._utils._rebuild_tensor":
            return self.rebuild_tensor
        if full == "torch._utils._rebuild_qtensor":
            return self.rebuild_qtensor
        return None


def _validate_sparse_tensors(torch, weights_only: bool, file: str) -> None:
    """torch's check of the sparse tensors a load made: always under weights_only
    (an invalid index would read out of bounds later), as torch >= 2.15 does, and
    otherwise when ``torch.sparse.check_sparse_tensor_invariants`` is on."""
    import inspect

    validate = torch._utils._validate_loaded_sparse_tensors
    getter = getattr(torch._utils, "_get_sparse_tensors_to_validate", None)
    pending = getter() if getter is not None else torch._utils._sparse_tensors_to_validate
    if not pending:
        return
    try:
        if "weights_only" in inspect.signature(validate).parameters:
            validate(weights_only=weights_only)
        elif weights_only:
            with torch.sparse.check_sparse_tensor_invariants():
                validate()
        else:
            validate()
    except RuntimeError as e:
        pending.clear()
        raise CheckpointError(f"{file}: a sparse tensor in the checkpoint is invalid: {e}") from e


def _py2_name(module: str, name: str) -> tuple[str, str]:
    """A Python 2 global's Python 3 (module, name), as pickle maps them for protocols < 3."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    if module in _compat_pickle.IMPORT_MAPPING:
        return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def _canonical_global(module: str, name: str, proto: int, fix_imports: bool = True):
    """The (module, name) a global resolves to: Python 2 names mapped as pickle does
    for protocols < 3, and torch's renamed modules."""
    if proto < 3 and fix_imports:
        module, name = _py2_name(module, name)
    return _MODULE_RENAMES.get(module, module), name


def _refusal(file: str, full: str, blocked: bool = False, advice: Optional[str] = None) -> str:
    """The message of a weights-only refusal; ``advice`` replaces the default hint."""
    if blocked:
        return (
            f"{file}: weights-only load refused global '{full}': its module can never be "
            "allowed. The file may be malicious; do not load it with weights_only=False "
            "unless you trust its source."
        )
    return (
        f"{file}: weights-only load refused global '{full}' (GLOBAL {full} is not an "
        "allowed global). " + (advice or _safe.refusal_hint(full))
    )


def _is_storage_global(full: str) -> bool:
    if full in ("torch.storage.UntypedStorage", "torch.storage.TypedStorage"):
        return True
    return full.startswith("torch.") and full.endswith("Storage") and full.count(".") == 1


def _is_dtype_global(full: str) -> bool:
    if not full.startswith("torch.") or full.count(".") != 1:
        return False
    import torch

    return isinstance(getattr(torch, full[6:], None), torch.dtype)


_MALFORMED_PICKLE_ERRORS = _format.MALFORMED_PICKLE_ERRORS


def _cpu_stays_cpu(map_location) -> bool:
    """True when storages tagged 'cpu' stay on the CPU without running user code, so
    the native factory may build them (other storages still go through map_location)."""
    if map_location is None:
        return True
    if isinstance(map_location, dict):
        return map_location.get("cpu", "cpu") == "cpu"
    return _maps_everything_to_cpu(map_location)


def _maps_everything_to_cpu(map_location) -> bool:
    """True for map_location values that send every storage to the CPU."""
    if isinstance(map_location, (str, bytes)):
        return (map_location.decode() if isinstance(map_location, bytes) else map_location) == "cpu"
    if map_location is not None and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if isinstance(map_location, torch.device):
            return map_location.type == "cpu"
    return False


def _is_device_target(map_location) -> bool:
    """True when map_location sends every storage to one non-CPU, non-meta device."""
    if isinstance(map_location, bytes):
        map_location = map_location.decode()
    if isinstance(map_location, str):
        kind = map_location.split(":", 1)[0]
        return kind not in ("cpu", "meta")
    if map_location is not None and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if isinstance(map_location, torch.device):
            return map_location.type not in ("cpu", "meta")
    return False


def _is_meta_location(map_location) -> bool:
    if map_location is None:
        return False
    if isinstance(map_location, str):
        return map_location == "meta"
    torch = _torch()
    if isinstance(map_location, torch.device):
        return map_location.type == "meta"
    return False


_unpickler_classes: dict = {}
_unpickler_lock = threading.Lock()


def _unpickler_class(pickle_module, torch_build: bool = False):
    """An Unpickler subclass of ``pickle_module.Unpickler`` that asks the loader for
    every global (cached per pickle module). ``torch_build``: Python's pure unpickler,
    whose BUILD is the loader's ``torch_build`` (torch's weights-only semantics)."""
    module = pickle_module if pickle_module is not None else pickle
    key = (module, torch_build)
    try:
        cls = _unpickler_classes.get(key)
    except TypeError:  # an unhashable pickle module: build the class uncached
        cls = None
    if cls is not None:
        return cls
    base = pickle._Unpickler if torch_build else module.Unpickler

    class Unpickler(base):  # type: ignore[misc,valid-type]
        def __init__(self, file, *, loader, **kwargs):
            super().__init__(file, **kwargs)
            self._loader = loader
            self._fix_imports = kwargs.get("fix_imports", True)

        def find_class(self, module_name, name):
            proto = getattr(self, "proto", 2)
            found = self._loader.find_class(module_name, name, proto, self._fix_imports)
            if found is None:
                found = super().find_class(_MODULE_RENAMES.get(module_name, module_name), name)
            return self._loader.guarded(module_name, name, proto, self._fix_imports, found)

    if torch_build:

        def load_build(self):
            state = self.stack.pop()
            self._loader.torch_build(self.stack[-1], state)

        def target(self, opcode: str, kinds: tuple):
            obj = self.stack[-1]
            if kinds is mappings and not self._loader.info.checks_setitem_target:
                return obj  # as the installed torch: any target
            if type(obj) not in kinds:
                names = " or ".join(k.__name__ for k in kinds)
                raise pickle.UnpicklingError(
                    f"weights-only load: {opcode} applies to {names} only, not "
                    f"{type(obj).__module__}.{type(obj).__qualname__}"
                )
            return obj

        mappings = (dict, OrderedDict, collections.Counter)

        def load_setitem(self):
            value = self.stack.pop()
            key = self.stack.pop()
            target(self, "SETITEM", mappings)[key] = value

        def load_setitems(self):
            items = self.pop_mark()
            obj = target(self, "SETITEMS", mappings)
            for i in range(0, len(items), 2):
                obj[items[i]] = items[i + 1]

        def load_append(self):
            value = self.stack.pop()
            target(self, "APPEND", (list,)).append(value)

        def load_appends(self):
            items = self.pop_mark()
            target(self, "APPENDS", (list,)).extend(items)

        Unpickler.dispatch = {
            **pickle._Unpickler.dispatch,
            pickle.BUILD[0]: load_build,
            pickle.SETITEM[0]: load_setitem,
            pickle.SETITEMS[0]: load_setitems,
            pickle.APPEND[0]: load_append,
            pickle.APPENDS[0]: load_appends,
        }

    with _unpickler_lock:
        try:
            _unpickler_classes[key] = Unpickler
        except TypeError:
            pass
    return Unpickler


def _weights_only_default(weights_only, pickle_module) -> bool:
    truthy = ("1", "y", "yes", "true")
    force_on = os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in truthy
    force_off = os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in truthy
    if force_on and force_off:
        raise RuntimeError(
            "Only one of TORCH_FORCE_WEIGHTS_ONLY_LOAD or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD "
            "should be set, but both were set."
        )
    if force_on:
        return True
    if weights_only is None:
        if force_off:
            return False
        return pickle_module is None
    return bool(weights_only)


# --------------------------------------------------------------------------- save


def _storage_parts(obj) -> tuple:
    """``(untyped storage, dtype, storage class to pickle, element count)`` of a
    storage met directly by a save: what torch's ``persistent_id`` writes for it."""
    info = _TorchInfo.get()
    if isinstance(obj, info.TypedStorage):
        storage_type = getattr(info.torch, obj._pickle_storage_type())
        return obj._untyped_storage, obj.dtype, storage_type, obj._size()
    return obj, info.uint8, info.UntypedStorage, obj.nbytes()


def _save_helper():
    """The native pickler hooks for one save, with torch's persistent_id semantics for
    storages met directly (TypedStorage / UntypedStorage objects) defined here."""
    info = _TorchInfo.get()

    def pid_for_storage(obj):
        untyped, dtype, storage_type, numel = _storage_parts(obj)
        key = helper.key_for(untyped, dtype, storage_type, numel)
        fake = getattr(obj, "_fake_device", None)
        location = str(fake) if fake is not None else _location.location_tag(untyped)
        return ("storage", storage_type, key, location, numel)

    helper = _native.SaveHelper(
        {
            "Tensor": info.Tensor,
            "OrderedDict": OrderedDict,
            "strided": info.strided,
            "UntypedStorage": info.UntypedStorage,
            "TypedStorage": info.TypedStorage,
            "storage_classes": list(info.storage_classes),
            "storage_class_by_dtype": info.storage_class_by_dtype,
            "itemsize": info.itemsize,
            "rebuild_v2": info.rebuild_tensor_v2,
            "rebuild_v3": info.rebuild_tensor_v3,
            "get_tensor_metadata": info.get_tensor_metadata,
        },
        {"pid_for_storage": pid_for_storage, "location_tag": _location.location_tag},
        cpu_shortcut=not _location.cpu_overridden(),
    )
    return helper


_pickler_classes: dict = {}


def _pickler_class(pickle_module):
    """A Pickler subclass of ``pickle_module.Pickler`` whose hooks are a SaveHelper's.
    Both C and pure-Python picklers read the hooks as instance attributes."""
    try:
        cls = _pickler_classes.get(pickle_module)
    except TypeError:  # an unhashable pickle module: build the class uncached
        cls = None
    if cls is None:

        class Pickler(pickle_module.Pickler):  # type: ignore[misc,name-defined]
            def __init__(self, file, protocol, helper):
                self.persistent_id = helper.persistent_id
                self.reducer_override = helper.reducer_override
                super().__init__(file, protocol)

        cls = Pickler
        try:
            _pickler_classes[pickle_module] = cls
        except TypeError:
            pass
    return cls


def _archive_prefix(path: str) -> str:
    """torch's archive folder name for a path: the basename without its last extension
    (``weights.v2.pth`` -> ``weights.v2``); ``archive`` when that leaves nothing."""
    base = os.path.basename(path.replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem or "archive"


def _remove_stale_temp_files(path: str) -> None:
    """Removes temporary files that earlier saves to ``path`` left behind when their
    process was killed (``.NAME.fastserial-tmp-PID-N`` whose PID is gone)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}{_native.TEMP_MARKER}"
    try:
        candidates = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in candidates:
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _path_target(f, *, zip_format: bool = True) -> tuple[str, str, bool]:
    """Where a save to the path ``f`` goes: ``(file to write, archive prefix, atomic)``.

    As ``torch.save``: a symlink is written through (the link stays, its target gets
    the checkpoint), and a missing parent folder raises torch's exception (its zip
    writer's ``RuntimeError``; ``FileNotFoundError`` for the legacy format, which
    torch writes with ``open()``). The file written is replaced atomically when it is
    a regular file or absent (a temporary file beside it, renamed over it); what
    killed saves to it left behind is removed first."""
    path = os.fspath(f)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory; expected a checkpoint file path")
    prefix = _archive_prefix(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    parent = os.path.dirname(target)
    if parent and not os.path.isdir(parent):
        if not zip_format:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        missing = os.path.dirname(path) if target == path else parent
        raise RuntimeError(f"Parent directory {missing} does not exist.")
    atomic = _atomic_ok(target)
    if atomic:
        _remove_stale_temp_files(target)
    return target, prefix, atomic


def _skip_data() -> bool:
    """Whether a ``torch.serialization.skip_data()`` context is active."""
    ts = sys.modules.get("torch.serialization")
    return bool(getattr(getattr(ts, "_serialization_tls", None), "skip_data", False))


class _SkipData:
    """A save's helper inside ``torch.serialization.skip_data()``: every storage
    record is written with its size but zero bytes (torch leaves the space empty),
    and no storage's memory is read, nor any device storage copied."""

    def __init__(self, helper) -> None:
        self._helper = helper

    def write_plan(self) -> list:
        return [step if isinstance(step, list) else [step] for step in self._helper.write_plan()]

    @staticmethod
    def write_storages(writer, items) -> None:
        for record, untyped in items:
            writer.write_record(record, bytes(untyped.nbytes()))


def _atomic_ok(path: str) -> bool:
    """Atomic replacement needs a regular file (or none) at ``path``."""
    try:
        import stat

        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _torch_writes_format_records() -> bool:
    """Whether the installed torch's save writes ``.format_version`` and
    ``.storage_alignment`` (torch >= 2.7 does; 2.6 does not): fastserial.save writes
    the records the torch beside it writes."""
    return hasattr(_torch().serialization, "_get_storage_alignment")


def _write_checkpoint(
    writer, pickled, write_storages, *, byteorder: bool, fsync: bool, format_records: bool = True
) -> None:
    """Writes a checkpoint's records in torch's order (``write_storages()`` adds the
    ``data/`` records) and finishes ``writer``; on any failure aborts it, so an atomic
    save leaves the previous file in place. ``format_records``: the
    ``.format_version`` and ``.storage_alignment`` records of torch >= 2.7."""
    try:
        writer.write_record("data.pkl", pickled)
        if format_records:
            writer.write_record(".format_version", b"1")
            writer.write_record(".storage_alignment", b"64")
        if byteorder:
            writer.write_record("byteorder", sys.byteorder.encode())
        write_storages()
        writer.write_record("version", b"3\n")
        writer.write_record(".data/serialization_id", writer.serialization_id().encode())
        writer.finish(fsync=fsync)
    except BaseException:
        writer.abort()
        raise


def _write_storages(writer, helper, sorted_keys: bool = False) -> None:
    """CPU storages go to the writer straight from their memory, many per native call,
    each read as it is at write time; a device storage is copied to the CPU on its
    own, so at most one is staged. ``sorted_keys``: records in the order of their keys
    as strings (torch 2.6's order) instead of the keys' order."""
    plan = helper.write_plan()
    if sorted_keys:
        items = [
            (record, untyped, isinstance(step, list))
            for step in plan
            for record, untyped in (step if isinstance(step, list) else [step])
        ]
        items.sort(key=lambda item: item[0])
        plan = []
        for record, untyped, on_cpu in items:
            if not on_cpu:
                plan.append((record, untyped))
            elif plan and isinstance(plan[-1], list):
                plan[-1].append((record, untyped))
            else:
                plan.append([(record, untyped)])
    for step in plan:
        if isinstance(step, list):
            helper.write_storages(writer, step)
            continue
        record, untyped = step
        if untyped.device.type == "meta":
            raise RuntimeError(f"cannot save the data of meta storage '{record}': it has none")
        helper.write_storages(writer, [(record, untyped.cpu())])
