"""``fastserial.numpy``: PyTorch checkpoints with numpy, no torch needed.

::

    import fastserial.numpy as fsnp
    sd = fsnp.load("ckpt.pt")                  # {"weight": numpy.ndarray, ...}
    sd = fsnp.load("ckpt.pt", mmap=True)       # arrays view the mapped file, no copy
    fsnp.save({"weight": w}, "out.pt")         # torch.load(weights_only=True) reads it

Loading returns the checkpoint's structure (dicts, OrderedDicts, lists, tuples, Python
values) with every tensor as a ``numpy.ndarray`` of the right dtype, shape, strides and
values. ``bfloat16``, ``complex32`` and the float8 types come from ``ml_dtypes``.
Tensors that shared a storage come back as arrays over one buffer: ``arr.base`` is a
1-D ``uint8`` array over the whole storage, the same object for every tensor of that
storage. Files written big-endian are swapped to native order.

Torch objects other than tensors come back as small stand-ins:

* ``nn.Parameter`` -> a plain ``numpy.ndarray`` (``requires_grad`` is dropped);
* ``torch.Size`` -> ``tuple``;
* ``torch.dtype`` -> :class:`TorchDType` (``str()`` gives ``"torch.float16"``,
  ``.numpy_dtype`` the numpy equivalent);
* ``torch.device`` -> :class:`TorchDevice` (``.type``, ``.index``, ``str()`` gives ``"cuda:0"``);
* a bare storage -> a 1-D array of its elements (``uint8`` for untyped storages).

Saving accepts numpy arrays of any dtype torch has (``ml_dtypes`` ones included,
big-endian and non-contiguous arrays too) and writes them as torch tensors; arrays
that view one base array (same dtype) share one storage in the file, as torch does.
Numpy scalars are written as 0-d tensors of their dtype; :class:`TorchDType` and
:class:`TorchDevice` as the real torch objects.

Loading is weights-only by default, with the same guarantees as :func:`fastserial.load`:
the pickle is scanned natively first and unpickled by an unpickler that imports
nothing outside an allow-list, so a malicious checkpoint raises
``pickle.UnpicklingError`` instead of running code. Quantized, sparse and nested
tensors raise :class:`UnsupportedTensorError`.

A TorchScript archive (``torch.jit.save``) loads too, without torch and without its
code: ``load`` returns the object tree of its ``data.pkl``, every tensor an array as
above, and every scripted module (a ``__torch__.*`` class) an inert :class:`Opaque`
placeholder whose ``.state`` is the dict of the module's attributes (parameters,
buffers, submodules, other attributes), so ``m.state["fc"].state["weight"]`` is the
tensor torch calls ``fc.weight``; :func:`iter_leaves` gives those dotted names. The
root placeholder's ``.constants`` holds the tensors of ``constants.pkl`` (the code's
``CONSTANTS.c0``, ...) as a tuple. Nothing named ``__torch__`` is imported: the
placeholder classes are made per load, the rest of the pickle is held to the same
allow-list, and the archive's ``code/`` is never read.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import struct
import sys
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO, Callable, Union

import numpy as np

from . import _fastserial as _native
from . import _format
from . import allowlist as _safe
from ._fastserial import CheckpointError
from ._torch_io import (
    _assumed_byteorder,
    _brief,
    _is_path,
    _is_torchscript,
    _open_checkpoint,
    _Opened,
    _path_target,
    _py2_name,
    _refusal,
    _write_checkpoint,
)
from .legacy import scan_next_pickle, tar_member, tar_tensor_geometry

try:  # a declared dependency, but keep plain dtypes working without it
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on environment
    _ml_dtypes = None

__all__ = [
    "DTYPES",
    "CheckpointError",
    "TorchDType",
    "TorchDevice",
    "UnsupportedTensorError",
    "dtype_from_torch_name",
    "load",
    "save",
    "torch_dtype_for",
]

FileLike = Union[str, os.PathLike, BinaryIO]


class UnsupportedTensorError(NotImplementedError):
    """The checkpoint holds a tensor numpy cannot represent (quantized, sparse, nested,
    meta, a tensor subclass, or a dtype without a numpy equivalent)."""


# --------------------------------------------------------------------------- dtypes


class _Frozen:
    """Stand-ins are shared by every load: a pickle's BUILD opcode must not be able to
    change them (the C unpickler would ``setattr`` whatever the file says)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} objects are read-only")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} objects are read-only")


_set = object.__setattr__


class _Callable(_Frozen):
    """A stand-in function or class for the unpickler: callable, not modifiable."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable, name: str):
        _set(self, "_fn", fn)
        _set(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self._name


class TorchDType(_Frozen):
    """Stand-in for a ``torch.dtype`` in torch-free loads.

    ``str()`` and ``repr()`` give torch's spelling (``"torch.float16"``); ``name`` is the
    bare name, ``itemsize`` its size in bytes and ``numpy_dtype`` the numpy dtype the
    numpy front end uses for it (``None`` when numpy has none, e.g. quantized types).
    Instances are singletons: compare them with ``is`` or ``==``, or by ``name``.
    Saving one with :func:`save` writes the real ``torch.<name>``.
    """

    __slots__ = ("__weakref__", "is_complex", "itemsize", "name", "numpy_dtype", "storage_name")

    def __init__(self, name: str, itemsize: int, numpy_dtype, storage_name: str | None):
        _set(self, "name", name)
        _set(self, "itemsize", itemsize)
        _set(self, "numpy_dtype", None if numpy_dtype is None else np.dtype(numpy_dtype))
        _set(self, "is_complex", name.startswith("complex"))
        # torch's legacy storage class (FloatStorage); None for the dtypes torch saves
        # through UntypedStorage and _rebuild_tensor_v3.
        _set(self, "storage_name", storage_name)

    @property
    def swap_size(self) -> int:
        """Element size to byte-swap by: complex numbers swap per component."""
        return self.itemsize // 2 if self.is_complex else self.itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    __str__ = __repr__

    def __reduce__(self):
        return (dtype_from_torch_name, (self.name,))


def _ml(name: str):
    return getattr(_ml_dtypes, name, None) if _ml_dtypes is not None else None


# torch dtype -> (itemsize, numpy dtype, legacy storage class). The storage names are
# torch.storage._dtype_to_storage_type_map() (stable since torch 1.x); dtypes without one
# are torch.storage._new_dtypes(), saved as UntypedStorage + _rebuild_tensor_v3. Both were
# read from torch 2.13 and are hard-coded here so that no torch is needed.
_DTYPE_TABLE: dict[str, tuple[int, Any, str | None]] = {
    "float64": (8, np.float64, "DoubleStorage"),
    "float32": (4, np.float32, "FloatStorage"),
    "float16": (2, np.float16, "HalfStorage"),
    "bfloat16": (2, _ml("bfloat16"), "BFloat16Storage"),
    "complex128": (16, np.complex128, "ComplexDoubleStorage"),
    "complex64": (8, np.complex64, "ComplexFloatStorage"),
    "complex32": (4, _ml("complex32"), None),
    "int64": (8, np.int64, "LongStorage"),
    "int32": (4, np.int32, "IntStorage"),
    "int16": (2, np.int16, "ShortStorage"),
    "int8": (1, np.int8, "CharStorage"),
    "uint8": (1, np.uint8, "ByteStorage"),
    "bool": (1, np.bool_, "BoolStorage"),
    "uint16": (2, np.uint16, None),
    "uint32": (4, np.uint32, None),
    "uint64": (8, np.uint64, None),
    "float8_e4m3fn": (1, _ml("float8_e4m3fn"), None),
    "float8_e5m2": (1, _ml("float8_e5m2"), None),
    "float8_e4m3fnuz": (1, _ml("float8_e4m3fnuz"), None),
    "float8_e5m2fnuz": (1, _ml("float8_e5m2fnuz"), None),
    "float8_e8m0fnu": (1, _ml("float8_e8m0fnu"), None),
    # No numpy equivalent: loading a tensor of these raises UnsupportedTensorError.
    "qint8": (1, None, "QInt8Storage"),
    "quint8": (1, None, "QUInt8Storage"),
    "qint32": (4, None, "QInt32Storage"),
    "quint4x2": (1, None, "QUInt4x2Storage"),
    "quint2x4": (1, None, "QUInt2x4Storage"),
    "float4_e2m1fn_x2": (1, None, None),  # two fp4 values per byte; ml_dtypes unpacks
    "bits8": (1, None, None),
    "bits16": (2, None, None),
    "bits1x8": (1, None, None),
    "bits2x4": (1, None, None),
    "bits4x2": (1, None, None),
    **{f"{p}int{b}": (1, None, None) for p in ("", "u") for b in range(1, 8)},
}

#: Every torch dtype by name (``"float32"``), as :class:`TorchDType` singletons.
DTYPES: dict[str, TorchDType] = {
    name: TorchDType(name, size, npd, storage)
    for name, (size, npd, storage) in _DTYPE_TABLE.items()
}
_DTYPE_ALIASES = {
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "short": "int16",
    "int": "int32",
    "long": "int64",
    "bit": "uint1",
}
_STORAGE_TYPES: dict[str, TorchDType] = {
    d.storage_name: d for d in DTYPES.values() if d.storage_name is not None
}
_UINT8 = DTYPES["uint8"]

_DTYPE_BY_NUMPY: dict[np.dtype, TorchDType] = {
    d.numpy_dtype: d for d in DTYPES.values() if d.numpy_dtype is not None
}


def dtype_from_torch_name(name: str) -> TorchDType:
    """The :class:`TorchDType` for a torch dtype name (``"float32"``, ``"torch.half"``)."""
    bare = name.removeprefix("torch.")
    bare = _DTYPE_ALIASES.get(bare, bare)
    try:
        return DTYPES[bare]
    except KeyError:
        raise ValueError(f"unknown torch dtype {name!r}") from None


def torch_dtype_for(np_dtype) -> TorchDType:
    """The torch dtype a numpy dtype is saved as (byte order aside)."""
    np_dtype = np.dtype(np_dtype)
    native = np_dtype if np_dtype.isnative else np_dtype.newbyteorder("=")
    found = _DTYPE_BY_NUMPY.get(native)
    if found is None:
        raise TypeError(
            f"numpy dtype {np_dtype} has no torch equivalent; torch checkpoints hold "
            "bool, (u)int8-64, float16/32/64, bfloat16, float8, complex64/128 data"
        )
    return found


class TorchDevice(_Frozen):
    """Stand-in for a ``torch.device``: ``type`` (``"cpu"``, ``"cuda"``, ...) and
    ``index`` (``int`` or ``None``). ``str()`` gives ``"cuda:0"``; saving one with
    :func:`save` writes a real ``torch.device``."""

    __slots__ = ("index", "type")

    def __init__(self, type: str | TorchDevice, index: int | None = None):
        if isinstance(type, TorchDevice):
            type, index = type.type, type.index if index is None else index
        if isinstance(type, int) and index is None:
            type, index = "cuda", type
        if not isinstance(type, str):
            raise TypeError(f"device type must be a string, got {type!r}")
        if ":" in type:
            if index is not None:
                raise ValueError(f"device {type!r} already names an index")
            type, _, idx = type.partition(":")
            if not idx.isdigit():
                raise ValueError(f"invalid device index in {type}:{idx!r}")
            index = int(idx)
        if index is not None and (not isinstance(index, int) or index < 0):
            raise ValueError(f"invalid device index {index!r}")
        _set(self, "type", type)
        _set(self, "index", index)

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        if self.index is None:
            return f"device(type={self.type!r})"
        return f"device(type={self.type!r}, index={self.index})"

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return str(self) == other
        return isinstance(other, TorchDevice) and (self.type, self.index) == (
            other.type,
            other.index,
        )

    def __hash__(self) -> int:
        return hash((self.type, self.index))

    def __reduce__(self):
        return (TorchDevice, (self.type, self.index))


class _TorchName(_Frozen):
    """A torch object that only needs to be named (a layout, a qscheme, a class)."""

    __slots__ = ("full",)

    def __init__(self, full: str):
        _set(self, "full", full)

    def __repr__(self) -> str:
        return self.full


_TENSOR = _TorchName("torch.Tensor")
_PARAMETER = _TorchName("torch.nn.parameter.Parameter")
_LAYOUTS = {
    name: _TorchName(f"torch.{name}")
    for name in (
        "strided",
        "sparse_coo",
        "sparse_csr",
        "sparse_csc",
        "sparse_bsr",
        "sparse_bsc",
        "_mkldnn",
        "jagged",
    )
}
_QSCHEMES = {
    name: _TorchName(f"torch.{name}")
    for name in (
        "per_tensor_affine",
        "per_tensor_symmetric",
        "per_channel_affine",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    )
}
_TENSOR_CLASSES = {
    f"{prefix}Tensor": _TorchName(f"torch.{prefix}Tensor")
    for prefix in (
        "Double",
        "Float",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexDouble",
        "ComplexFloat",
    )
}


def _layout_named(name):
    """Stand-in for ``torch.serialization._get_layout('torch.sparse_coo')``."""
    bare = name[6:] if isinstance(name, str) and name.startswith("torch.") else name
    layout = _LAYOUTS.get(bare)
    if layout is None:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return layout


def _size_of(*args):
    """Stand-in for ``torch.Size``: a tuple of ints."""
    if len(args) > 1:
        raise pickle.UnpicklingError(f"torch.Size takes one sequence, got {len(args)} arguments")
    values = tuple(args[0]) if args else ()
    for v in values:
        if type(v) is not int:
            raise pickle.UnpicklingError(f"torch.Size holds {v!r}, not an int")
    return values


_get_layout = _Callable(_layout_named, "torch.serialization._get_layout")
_size = _Callable(_size_of, "torch.Size")
_device = _Callable(TorchDevice, "torch.device")


class _StorageType(_Frozen):
    """What a storage class global (``torch.FloatStorage``) unpickles to."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: TorchDType | None):
        _set(self, "name", name)
        _set(self, "dtype", dtype)  # None: UntypedStorage (bytes; the tensor decides the dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_UNTYPED = _StorageType("UntypedStorage", None)
_STORAGE_MARKERS = {name: _StorageType(name, d) for name, d in _STORAGE_TYPES.items()}


def _c10_name(dtype: str) -> str:
    """c10's name of a scalar type (``UInt16``, ``Float8_e4m3fn``, ``ComplexHalf``)."""
    if dtype == "complex32":
        return "ComplexHalf"
    for prefix, c10 in (("uint", "UInt"), ("int", "Int"), ("bits", "Bits"), ("float", "Float")):
        if dtype.startswith(prefix):
            return c10 + dtype[len(prefix) :]
    return dtype  # pragma: no cover - every dtype without a legacy storage class is above


# TorchScript's pickler names a storage ``torch.<c10 name>Storage`` for every dtype:
# the legacy classes for the classic ones, and names torch's Python never had
# (``torch.UInt16Storage``, ``torch.Float8_e4m3fnStorage``) for the others. These are
# accepted only inside a TorchScript archive.
_TORCHSCRIPT_STORAGES = {
    f"{_c10_name(d.name)}Storage": _StorageType(f"{_c10_name(d.name)}Storage", d)
    for d in DTYPES.values()
    if d.storage_name is None
}


def _returns_data(data):
    return data


def _restore_type_tag(value, type_str):
    if not isinstance(type_str, str):
        raise pickle.UnpicklingError(f"restore_type_tag with type {type_str!r}")
    return value


# The ``torch.jit._pickle`` functions TorchScript's pickler writes: torch's own
# definitions return their first argument (the type tag only matters to TorchScript).
_JIT_PICKLE = {
    **{
        name: _Callable(_returns_data, f"torch.jit._pickle.{name}")
        for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")
    },
    "restore_type_tag": _Callable(_restore_type_tag, "torch.jit._pickle.restore_type_tag"),
}


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode``, which protocol 2 uses to pickle bytes
    (``encode(text, 'latin1')``): text codecs only, never codecs.encode's others."""
    if not isinstance(text, str) or not isinstance(encoding, str) or not isinstance(errors, str):
        raise pickle.UnpicklingError(
            f"_codecs.encode called with {type(text).__name__}, {encoding!r}"
        )
    if codecs.lookup(encoding).name not in ("iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, encoding, errors)


#: Non-torch globals a weights-only load may import (the same as the torch front end).
_PLAIN_SAFE_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": _Callable(collections.Counter, "collections.Counter"),
    "_codecs.encode": _Callable(_codecs_encode, "_codecs.encode"),  # protocol 2's bytes
    "builtins.bytearray": bytearray,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
}

_UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_sparse_csr_tensor": "a sparse CSR tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (it has no data)",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a device tensor saved from numpy",
    "_rebuild_mkldnn_tensor": "an MKL-DNN tensor",
    "_rebuild_xla_tensor": "an XLA tensor",
    "_rebuild_mps_tensor": "an MPS tensor",
}


# --------------------------------------------------------------------------- metadata


class StorageInfo:
    """A storage named by the pickle, before (or instead of) reading its bytes."""

    __slots__ = (
        "compressed",
        "data_offset",
        "dtype",
        "key",
        "location",
        "nbytes",
        "parent",
        "parent_offset",
        "raw",
        "record",
        "swap_pending",
    )

    def __init__(self, key, dtype: TorchDType | None, nbytes: int, location: str, record=None):
        self.key = key
        self.dtype = dtype  # None for UntypedStorage
        self.nbytes = nbytes
        self.location = location
        self.record = record  # zip record name ("data/0"); None for legacy files
        self.data_offset: int | None = None  # where the bytes start in the file
        self.compressed = False
        self.parent: StorageInfo | None = None  # legacy storage views
        self.parent_offset = 0
        self.swap_pending = False
        self.raw: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"StorageInfo(key={self.key!r}, dtype={self.dtype}, nbytes={self.nbytes})"


class TensorInfo:
    """A dense tensor described by the pickle, without its data."""

    __slots__ = (
        "conj",
        "dtype",
        "neg",
        "parameter",
        "problem",
        "requires_grad",
        "shape",
        "storage",
        "storage_offset",
        "stride",
    )

    def __init__(self, storage: StorageInfo, dtype: TorchDType, offset: int, shape, stride):
        self.storage = storage
        self.dtype = dtype
        self.storage_offset = offset
        self.shape = tuple(shape)
        self.stride = tuple(stride)
        self.requires_grad = False
        self.parameter = False
        #: torch's conjugate and negative bits (the values are the conjugate or the
        #: negation of the bytes stored)
        self.conj = False
        self.neg = False
        self.problem: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def span(self) -> tuple[int, int]:
        """``(first, end)`` element indices of the storage this view touches."""
        if self.numel == 0:
            return self.storage_offset, self.storage_offset
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.storage_offset, last + 1

    def __repr__(self) -> str:
        return (
            f"TensorInfo(dtype={self.dtype}, shape={self.shape}, stride={self.stride}, "
            f"storage={self.storage.key!r}, storage_offset={self.storage_offset})"
        )


class OtherTensorInfo:
    """A tensor kind the numpy front end cannot build (sparse, quantized, ...)."""

    __slots__ = ("args", "function", "kind")

    def __init__(self, kind: str, function: str, args: tuple):
        self.kind = kind
        self.function = function
        self.args = args

    def __repr__(self) -> str:
        return f"<{self.kind} ({self.function})>"


class Opaque:
    """An instance of a global outside the allow-list, in a never-executing parse
    (``inspect``, ``verify``), or a scripted module of a TorchScript archive: it
    records what the pickle gave it and runs nothing.

    ``global_name`` is the class the pickle named (``"__torch__.Net"``); ``args`` and
    ``kwargs`` what it was called with; ``state`` what BUILD gave it (a TorchScript
    module's dict of attributes); ``entries`` items and elements appended to it.
    """

    _global = "?"
    _family: dict = {}

    @property
    def global_name(self) -> str:
        return self._global

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.entries: list = []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def append(self, value):
        self.entries.append((len(self.entries), value))

    def extend(self, values):
        for v in values:
            self.append(v)

    def __call__(self, *args, **kwargs):
        return _opaque_class(f"{self._global}()", self._family)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._global} (not loaded)>"


def _opaque_class(full: str, family: dict) -> type:
    """The placeholder class for ``full``, one per load (``family``): a pickle that
    modifies a placeholder class cannot affect any other load."""
    cls = family.get(full)
    if cls is None:
        cls = type("Opaque", (Opaque,), {"_global": full, "_family": family})
        family[full] = cls
    return cls


def is_allowed_global(module: str, name: str) -> bool:
    """Whether a weights-only load accepts ``module.name`` (the one policy of
    ``fastserial.allowlist``, which every front end asks)."""
    return _safe.verdict(*_py2_name(module, name)).allowed


def _torch_standin(module: str, name: str):
    """The stand-in for a torch global that does not depend on the load in progress."""
    if module == "torch":
        bare = _DTYPE_ALIASES.get(name, name)
        if bare in DTYPES:
            return DTYPES[bare]
        if name in _STORAGE_MARKERS:
            return _STORAGE_MARKERS[name]
        if name == "UntypedStorage":
            return _UNTYPED
        if name == "Size":
            return _size
        if name == "device":
            return _device
        if name == "Tensor":
            return _TENSOR
        return _LAYOUTS.get(name) or _QSCHEMES.get(name) or _TENSOR_CLASSES.get(name)
    if module == "torch.storage" and name == "UntypedStorage":
        return _UNTYPED
    if module == "torch.nn.parameter" and name == "Parameter":
        return _PARAMETER
    if module == "torch.serialization" and name == "_get_layout":
        return _get_layout
    return None


# --------------------------------------------------------------------------- unpickling


#: What a refusal suggests for the numpy front end (the rest of the message is shared).
_REFUSAL_ADVICE = (
    "fastserial.numpy builds only tensors and plain Python values; if you trust this "
    "checkpoint, allow the global with fastserial.add_safe_globals or load with "
    "weights_only=False (which runs code from the file)."
)


class _Unpickler(pickle.Unpickler):
    """Python's C unpickler, asking the reader for every global and storage."""

    def __init__(self, file, reader: _Reader, persistent_load: Callable, **kwargs):
        super().__init__(file, **kwargs)
        self._reader = reader
        self._fix_imports = kwargs.get("fix_imports", True)
        self.persistent_load = persistent_load

    def find_class(self, module, name):
        found = self._reader.find_class(module, name, getattr(self, "proto", 2), self._fix_imports)
        if found is not None:
            return found
        return super().find_class(module, name)


class _Reader:
    """Unpickles one checkpoint's object pickle with numpy-side stand-ins.

    ``mode``: ``"strict"`` (weights-only: unknown globals raise), ``"trusting"``
    (weights_only=False: unknown globals are imported), ``"opaque"`` (inspection:
    unknown globals become inert :class:`Opaque` placeholders, nothing is imported).
    ``factory`` turns storages and tensor views into results (arrays or metadata).
    ``torchscript``: the pickle is a TorchScript archive's (``data.pkl`` or
    ``constants.pkl``): its ``__torch__.*`` classes become :class:`Opaque` placeholders
    in every mode, and ``record_dir`` is the folder of its storages' records.
    """

    def __init__(
        self,
        display: str,
        mode: str,
        factory,
        encoding: str = "utf-8",
        problems: list | None = None,
        unscanned: bool = False,
        torchscript: bool = False,
        record_dir: str = "data/",
    ):
        self.file = display
        self.torchscript = torchscript
        self.record_dir = record_dir
        self.unscanned = unscanned  # legacy streams: scan each pickle before unpickling it
        self.mode = mode
        self.factory = factory
        self.encoding = encoding
        self.problems = problems
        self.storages: dict[Any, Any] = {}
        self.info_of: dict[int, StorageInfo] = {}
        self.globals_seen: list[str] = []
        self._opaque_family: dict[str, type] = {}
        self._rebuilds = {
            "_rebuild_tensor": self.rebuild_tensor,
            "_rebuild_tensor_v2": self.rebuild_tensor_v2,
            "_rebuild_tensor_v3": self.rebuild_tensor_v3,
            "_rebuild_parameter": self.rebuild_parameter,
            "_rebuild_parameter_with_state": self.rebuild_parameter_with_state,
            "_rebuild_device_tensor_from_cpu_tensor": self.rebuild_device_tensor_from_cpu_tensor,
        }

    # -- running

    def unpickle(self, stream, persistent_load: Callable | None = None):
        if persistent_load is None:
            persistent_load = self._no_persistent_ids
        if self.unscanned:
            self._scan(stream)
        unpickler = _Unpickler(stream, self, persistent_load, encoding=self.encoding)
        try:
            return unpickler.load()
        except (CheckpointError, pickle.UnpicklingError, UnsupportedTensorError, RecursionError):
            raise
        except MemoryError as e:
            if not self.unscanned:
                raise
            raise CheckpointError(
                f"{self.file}: the pickle declares an object larger than memory (corrupted?)"
            ) from e
        except Exception as e:
            if self.mode == "trusting":
                raise
            wrapped = _format.unpickling_failure(e, self.file, "while unpickling")
            if wrapped is None:
                raise
            raise wrapped from e

    def _scan(self, stream) -> None:
        """The native scan of the pickle starting at the stream's position (legacy
        files are pickles back to back): bounds every length before Python's unpickler
        allocates for it, and finds opcodes a weights-only load refuses."""
        start = stream.tell()
        scan_next_pickle(stream, f"{self.file}: the pickle at byte {start}", self.mode == "strict")
        stream.seek(start)

    def _no_persistent_ids(self, saved_id):
        raise pickle.UnpicklingError(f"{self.file}: unexpected persistent id {_brief(saved_id)}")

    def fail(self, what: str) -> None:
        """A structural problem: raised, or recorded when collecting (verify)."""
        if self.problems is None:
            raise CheckpointError(f"{self.file}: {what}")
        self.problems.append(what)

    # -- globals

    def find_class(self, module: str, name: str, proto: int, fix_imports: bool):
        if proto < 3 and fix_imports:
            module, name = _py2_name(module, name)
        full = f"{module}.{name}"
        if full not in self.globals_seen:
            self.globals_seen.append(full)
        if self.torchscript:
            found = self._torchscript_global(module, name, full)
            if found is not None:
                return found
        verdict = _safe.verdict(module, name) if self.mode == "strict" else None
        if verdict is not None and not verdict.allowed:
            raise pickle.UnpicklingError(
                _refusal(self.file, full, verdict.blocked, _REFUSAL_ADVICE)
            )
        if module == "torch._utils":
            fn = self._rebuilds.get(name)
            if fn is not None:
                return fn
            if name.startswith("_rebuild_"):
                return self._unsupported(name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self.rebuild_from_type_v2
        standin = _torch_standin(module, name)
        if standin is not None:
            return standin
        plain = _PLAIN_SAFE_GLOBALS.get(full)
        if plain is not None:
            return plain
        if self.mode == "opaque":
            return _opaque_class(full, self._opaque_family)
        if verdict is not None:
            if verdict.obj is None:
                raise UnsupportedTensorError(
                    f"{self.file}: the checkpoint uses {full}, which torch allows but "
                    "fastserial.numpy has no numpy equivalent of; load it with torch "
                    "(fastserial.load) instead."
                )
            return verdict.obj  # a global the user allowed
        return None  # trusting: import it

    def _torchscript_global(self, module: str, name: str, full: str):
        """What TorchScript's pickler writes beyond a torch.save pickle: its classes
        (``__torch__.*``, compiled from the archive's code, which is never run: an
        inert placeholder), the ``torch.jit._pickle`` list builders and type tags
        (which return their argument) and its storage names for the newer dtypes."""
        if _is_torchscript_class(module):
            return _opaque_class(full, self._opaque_family)
        if module == "torch.jit._pickle":
            return _JIT_PICKLE.get(name)
        if module == "torch":
            return _TORCHSCRIPT_STORAGES.get(name)
        return None

    def _unsupported(self, name: str):
        kind = _UNSUPPORTED_REBUILDS.get(name, f"a tensor rebuilt by torch._utils.{name}")

        def rebuild(*args, **kwargs):
            made = self.factory.other_tensor(kind, f"torch._utils.{name}", args)
            if made is not None:
                return made
            raise UnsupportedTensorError(
                f"{self.file}: the checkpoint holds {kind} (torch._utils.{name}); "
                "fastserial.numpy builds dense tensors only. Load this file with torch "
                "(fastserial.load) instead."
            )

        return rebuild

    # -- storages

    def persistent_load(self, saved_id):
        """A zip checkpoint's ``('storage', type, key, location, numel)``."""
        storage_type, key, location, numel = _format.storage_id(saved_id, self.file)
        dtype = self._storage_dtype(storage_type)
        found = self.storages.get(key)
        if found is not None:
            known = self.info_of[id(found)]
            if known.dtype is dtype:
                return found
            # A record met again under another dtype (an empty storage viewed with
            # two dtypes): as torch.load, a storage of that dtype over the same record,
            # checked against its length like the first.
            info = StorageInfo(
                known.key,
                dtype,
                numel * (dtype.itemsize if dtype else 1),
                location,
                record=known.record,
            )
            made = self.factory.storage(info)
            self.info_of[id(made)] = info
            return made
        record = f"{self.record_dir}{key}"
        info = StorageInfo(
            key if self.record_dir == "data/" else record,  # TorchScript's constants/N
            dtype,
            numel * (dtype.itemsize if dtype else 1),
            location,
            record=record,
        )
        return self._register(key, info)

    def legacy_persistent_load(self, saved_id):
        """A legacy file's ``('storage', type, root_key, location, numel, view)``."""
        parsed = _format.legacy_storage_id(saved_id, self.file)
        if not isinstance(parsed, _format.LegacyStorageId):
            return parsed[1][1]  # a module's class
        storage_type, root_key, location, numel, view = parsed
        dtype = self._storage_dtype(storage_type)
        itemsize = dtype.itemsize if dtype else 1
        root = self.storages.get(root_key)
        if root is None:
            info = StorageInfo(root_key, dtype, numel * itemsize, location)
            root = self._register(root_key, info)
        if view is None:
            return root
        view_key = view[0]
        found = self.storages.get(view_key)
        if found is not None:
            return found
        parent = self.info_of[id(root)]
        start, end = _format.storage_view_bytes(view, itemsize, parent.nbytes, self.file)
        info = StorageInfo(view_key, dtype, end - start, parent.location)
        info.parent, info.parent_offset = parent, start
        made = self.factory.view_storage(root, parent, info)
        self.storages[view_key] = made
        self.info_of[id(made)] = info
        return made

    def _storage_dtype(self, storage_type) -> TorchDType | None:
        if type(storage_type) is not _StorageType:
            raise pickle.UnpicklingError(
                f"{self.file}: persistent id names {storage_type!r}, which is not a storage type"
            )
        return storage_type.dtype

    def _register(self, key, info: StorageInfo):
        made = self.factory.storage(info)
        self.storages[key] = made
        self.info_of[id(made)] = info
        return made

    # -- tensors

    def _storage_info(self, storage, fn: str) -> StorageInfo:
        info = self.info_of.get(id(storage))
        if info is None:
            raise pickle.UnpicklingError(
                f"{self.file}: {fn} received {type(storage).__name__}, not a storage"
            )
        return info

    def _tensor(self, storage, dtype: TorchDType, offset, size, stride, fn: str):
        info = self._storage_info(storage, fn)
        offset, size, stride = _format.view_geometry(offset, size, stride, fn, self.file)
        problem = _format.view_overrun(offset, size, stride, dtype.itemsize, info.nbytes)
        if problem is not None:
            where = f"record '{info.record}'" if info.record else f"storage {_brief(info.key)}"
            problem = f"{where}: {problem} ({dtype})"
            self.fail(problem)
        return self.factory.tensor(storage, info, dtype, offset, size, stride, problem)

    def rebuild_tensor_v2(
        self,
        storage,
        storage_offset,
        size,
        stride,
        requires_grad=False,
        backward_hooks=None,
        metadata=None,
    ):
        info = self._storage_info(storage, "_rebuild_tensor_v2")
        dtype = info.dtype or _UINT8
        made = self._tensor(storage, dtype, storage_offset, size, stride, "_rebuild_tensor_v2")
        return self.factory.finish(self._with_bits(made, metadata, dtype), requires_grad)

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
        if type(dtype) is not TorchDType:
            raise pickle.UnpicklingError(f"{self.file}: _rebuild_tensor_v3 dtype is {dtype!r}")
        made = self._tensor(storage, dtype, storage_offset, size, stride, "_rebuild_tensor_v3")
        return self.factory.finish(self._with_bits(made, metadata, dtype), requires_grad)

    def _with_bits(self, made, metadata, dtype: TorchDType):
        """The tensor with the conjugate and negative bits of its metadata applied:
        recorded on a ``TensorInfo``, computed into a new array (numpy has no such bits)."""
        conj, neg = _format.tensor_bits(metadata, dtype.is_complex, self.file)
        if not (conj or neg):
            return made
        return self.factory.with_bits(made, conj, neg)

    def rebuild_tensor(self, storage, storage_offset, size, stride):
        return self.rebuild_tensor_v2(storage, storage_offset, size, stride)

    def rebuild_parameter(self, data, requires_grad, backward_hooks=None):
        return self.factory.parameter(data, requires_grad)

    def rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self.factory.parameter(data, requires_grad)

    def rebuild_device_tensor_from_cpu_tensor(self, data, dtype, device, requires_grad):
        return self.factory.finish(data, requires_grad)

    def rebuild_from_type_v2(self, func, new_type, args, state):
        if new_type is not _TENSOR and new_type is not _PARAMETER:
            # Metadata front ends (inspect, verify) record it like other tensors they
            # cannot build; the array front end refuses it.
            made = self.factory.other_tensor(
                "a tensor subclass", "torch._tensor._rebuild_from_type_v2", args
            )
            if made is not None:
                return made
            raise UnsupportedTensorError(
                f"{self.file}: the checkpoint holds a tensor subclass ({new_type!r}); "
                "fastserial.numpy builds plain tensors only. Load this file with torch "
                "(fastserial.load) instead."
            )
        made = func(*args)
        if new_type is _PARAMETER:
            made = self.factory.parameter(made, False)
        return made


def _is_torchscript_class(module: str) -> bool:
    return module == "__torch__" or module.startswith("__torch__.")


def _is_torchscript_global(full: str) -> bool:
    """Whether a TorchScript archive's reader gives ``full`` a stand-in of its own
    (a placeholder class, a ``torch.jit._pickle`` function, a storage name)."""
    module, _, name = full.rpartition(".")
    return (
        _is_torchscript_class(module)
        or (module == "torch.jit._pickle" and name in _JIT_PICKLE)
        or (module == "torch" and name in _TORCHSCRIPT_STORAGES)
    )


def _decode(value):
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- factories


def _typed_view(raw: np.ndarray, dtype: TorchDType | None) -> np.ndarray:
    """A bare storage as numpy sees it: its elements (bytes when untyped)."""
    if dtype is None or dtype.numpy_dtype is None or dtype is _UINT8:
        return raw
    if raw.nbytes % dtype.itemsize:
        return raw
    return raw.view(dtype.numpy_dtype)


def _as_array(raw: np.ndarray, dtype: TorchDType, offset: int, size, stride, file: str):
    npd = dtype.numpy_dtype
    if npd is None:
        raise UnsupportedTensorError(
            f"{file}: the checkpoint holds a {dtype} tensor, which numpy cannot represent"
            + ("" if _ml_dtypes is not None else " (install ml_dtypes for bfloat16 and float8)")
            + "; load this file with torch (fastserial.load) instead."
        )
    itemsize = dtype.itemsize
    byte_offset = offset * itemsize
    byte_offset = min(byte_offset, raw.nbytes)
    return np.ndarray(
        size, dtype=npd, buffer=raw, offset=byte_offset, strides=tuple(s * itemsize for s in stride)
    )


class _ArrayFactory:
    """Builds numpy arrays. Storage bytes arrive after the pickle, in one native call
    (zip) or from the stream (legacy); tensors are views created before that."""

    def __init__(self, file: str):
        self.file = file
        self.deferred_swaps: list[tuple[np.ndarray, int]] = []
        #: (source view, result, conj, neg): filled once the bytes are in
        self.deferred_bits: list[tuple[np.ndarray, np.ndarray, bool, bool]] = []

    def with_bits(self, made, conj: bool, neg: bool):
        """A new array that will hold the conjugate and/or negation of ``made``'s
        values (numpy has no such bits), computed when the storages are filled."""
        if not isinstance(made, np.ndarray):
            return made
        out = np.empty(made.shape, made.dtype)
        self.deferred_bits.append((made, out, conj, neg))
        return out

    def view_storage(self, root, parent: StorageInfo, info: StorageInfo):
        info.raw = parent.raw[info.parent_offset : info.parent_offset + info.nbytes]
        info.swap_pending = parent.swap_pending
        return _typed_view(info.raw, info.dtype)

    def tensor(self, storage, info: StorageInfo, dtype, offset, size, stride, problem):
        base = info
        while base.parent is not None:
            base = base.parent
        if base.swap_pending:
            # An untyped storage from a foreign-endian file: swap by its first tensor's dtype.
            base.swap_pending = False
            if dtype.swap_size > 1:
                self.deferred_swaps.append((base.raw, dtype.swap_size))
        return _as_array(info.raw, dtype, offset, size, stride, self.file)

    def finish(self, made, requires_grad):
        return made

    def parameter(self, data, requires_grad):
        return data

    def other_tensor(self, kind, function, args):
        return None

    def apply_swaps(self) -> None:
        """What waits for the storages' bytes: byte swaps, then conjugate and negative
        bits (on the swapped values)."""
        for raw, size in self.deferred_swaps:
            if raw.nbytes:
                _native.byteswap(raw, size)
        self.deferred_swaps = []
        for made, out, conj, neg in self.deferred_bits:
            np.copyto(out, made)
            if conj:
                np.conjugate(out, out=out)
            if neg:
                np.negative(out, out=out)
        self.deferred_bits = []


class _ZipArrays(_ArrayFactory):
    def __init__(self, archive, file: str, swap: bool, mmap: bool, verify: bool):
        super().__init__(file)
        self.archive = archive
        self.swap = swap
        self.mapping = archive.mapping if mmap else None
        self.verify = verify
        self.jobs: list[tuple[str, np.ndarray, int]] = []
        self.mapped: list[str] = []

    def storage(self, info: StorageInfo):
        _check_record(self.archive, info, self.file, None)
        record, nbytes = info.record, info.nbytes
        swap = info.dtype.swap_size if self.swap and info.dtype is not None else 0
        info.swap_pending = self.swap and info.dtype is None and nbytes > 0
        if nbytes == 0:
            raw = np.empty(0, np.uint8)
        elif self.mapping is not None:
            if info.compressed or swap > 1 or info.swap_pending:
                buffer = self.archive.read_buffer(record, swap=swap, verify=self.verify)
                raw = np.frombuffer(buffer, np.uint8)
            else:
                raw = np.frombuffer(self.mapping, np.uint8, count=nbytes, offset=info.data_offset)
                self.mapped.append(record)
        else:
            raw = np.empty(nbytes, np.uint8)
            self.jobs.append((record, raw, swap if swap > 1 else 0))
        info.raw = raw
        return _typed_view(raw, info.dtype)

    def read(self) -> None:
        if self.jobs:
            self.archive.read_into(self.jobs, verify=self.verify)
        self.jobs = []
        if self.verify and self.mapped:
            failures = self.archive.verify(self.mapped)
            if failures:
                record, problem = failures[0]
                raise CheckpointError(
                    f"{self.file}: record '{record}' failed verification: {problem}"
                )
        self.apply_swaps()


class _LegacyArrays(_ArrayFactory):
    def __init__(self, file: str, size_limit: int):
        super().__init__(file)
        self.size_limit = size_limit

    def storage(self, info: StorageInfo):
        if info.nbytes > self.size_limit:  # check before allocating what the pickle claims
            raise CheckpointError(
                f"{self.file}: storage {info.key!r} declares {info.nbytes} bytes but the whole "
                f"file holds {self.size_limit}"
            )
        info.raw = np.empty(info.nbytes, np.uint8)
        return _typed_view(info.raw, info.dtype)


class _MetaFactory:
    """Builds :class:`TensorInfo` descriptions; reads no tensor data."""

    def __init__(self, archive=None, file: str = "", problems: list | None = None):
        self.archive = archive
        self.file = file
        self.problems = problems

    def storage(self, info: StorageInfo):
        if self.archive is not None:
            _check_record(self.archive, info, self.file, self.problems)
        return info

    def view_storage(self, root, parent: StorageInfo, info: StorageInfo):
        return info

    def tensor(self, storage, info: StorageInfo, dtype, offset, size, stride, problem):
        while info.parent is not None:
            offset += info.parent_offset // max(dtype.itemsize, 1)
            info = info.parent
        t = TensorInfo(info, dtype, offset, size, stride)
        t.problem = problem
        return t

    def finish(self, made, requires_grad):
        if type(made) is TensorInfo:
            made.requires_grad = bool(requires_grad)
        return made

    def with_bits(self, made, conj: bool, neg: bool):
        if type(made) is TensorInfo:
            made.conj, made.neg = conj, neg
        return made

    def parameter(self, data, requires_grad):
        if type(data) is TensorInfo:
            data.parameter = True
            data.requires_grad = bool(requires_grad)
        return data

    def other_tensor(self, kind, function, args):
        return OtherTensorInfo(kind, function, args)


def _check_record(archive, info: StorageInfo, file: str, problems: list | None) -> None:
    """The storage's record exists and holds exactly the bytes the pickle declares."""
    record = info.record
    prefix = archive.prefix
    if not archive.has(record):
        msg = f"record '{prefix}/{record}' is missing from the archive"
    else:
        offset, size, _crc, compressed = archive.info(record)
        info.data_offset, info.compressed = offset, compressed
        if size == info.nbytes:
            return
        what = f"{info.dtype}" if info.dtype else "bytes"
        msg = (
            f"record '{prefix}/{record}' holds {size} bytes but the pickle declares "
            f"{info.nbytes} bytes of {what}"
        )
    if problems is None:
        raise CheckpointError(f"{file}: {msg}")
    problems.append(msg)


# --------------------------------------------------------------------------- load


def load(
    f: FileLike,
    *,
    mmap: bool = False,
    weights_only: bool = True,
    encoding: str = "utf-8",
    verify: bool = False,
):
    """Loads a torch checkpoint (``torch.save`` or :func:`fastserial.save` output, zip
    or legacy) with every tensor as a ``numpy.ndarray``; torch is not needed.

    ``mmap=True`` maps the file and returns arrays that view it without copying
    (copy-on-write: writing to an array never changes the file). ``weights_only=False``
    lets the pickle import any global (only for files you trust). ``encoding`` decodes
    Python-2 strings (``"utf-8"``, ``"latin1"`` or ``"bytes"``). ``verify=True`` checks
    the CRC32 of every record read.
    """
    mode = "strict" if weights_only else "trusting"
    opened = _open_checkpoint(f, bool(mmap))
    try:
        if opened.kind == "zip":
            return _load_zip(opened, mode, bool(mmap), encoding, verify)
        if opened.kind == "tar":
            return _load_tar(opened, mode, encoding)
        return _load_legacy(opened, mode, encoding)
    finally:
        opened.close()


def _zip_pickle(archive, file: str, mode: str, record: str = "data.pkl") -> tuple[bytes, dict]:
    if not archive.has(record):
        if record == "data.pkl" and _is_torchscript(archive):
            raise CheckpointError(
                f"{file}: this is a TorchScript archive of the format before torch 1.4 "
                "(no data.pkl); fastserial reads the tensors of newer ones only"
            )
        raise CheckpointError(
            f"{file}: record '{archive.prefix}/{record}' is missing from the archive"
        )
    data = archive.read(record)  # CRC32 always checked
    scan = _native.scan_pickle(data, f"{file}: record '{archive.prefix}/{record}'")
    if mode == "strict" and scan["unsafe_opcodes"]:
        raise pickle.UnpicklingError(
            f"{file}: weights-only load refuses pickle opcodes {', '.join(scan['unsafe_opcodes'])}"
        )
    return data, scan


def _zip_byteorder(archive, file: str) -> str:
    if archive.has("byteorder"):
        value = archive.read("byteorder")
        if value not in (b"little", b"big"):
            raise CheckpointError(
                f"{file}: record '{archive.prefix}/byteorder' holds {value[:20]!r}; "
                "expected b'little' or b'big'"
            )
        return value.decode()
    return _assumed_byteorder()


_pickle_stream = _format.pickle_stream


def _load_zip(opened: _Opened, mode: str, mmap: bool, encoding: str, verify: bool):
    archive, file = opened.archive, opened.display
    torchscript = _is_torchscript(archive)
    data, _scan = _zip_pickle(archive, file, mode)
    swap = _zip_byteorder(archive, file) != sys.byteorder
    factory = _ZipArrays(archive, file, swap, mmap, verify)
    reader = _Reader(file, mode, factory, encoding, torchscript=torchscript)
    result = reader.unpickle(_pickle_stream(data), reader.persistent_load)
    if torchscript:
        constants, _storages = _torchscript_constants(archive, file, mode, factory, encoding, None)
        if isinstance(result, Opaque):
            result.constants = constants
    factory.read()
    return result


def _torchscript_constants(archive, file: str, mode: str, factory, encoding: str, problems):
    """The tuple a TorchScript archive's ``constants.pkl`` holds (the tensors its code
    calls ``CONSTANTS.c0``, ...), with storages in the ``constants/`` records, and the
    storages it met."""
    data, _scan = _zip_pickle(archive, file, mode, "constants.pkl")
    reader = _Reader(
        file, mode, factory, encoding, problems, torchscript=True, record_dir="constants/"
    )
    return reader.unpickle(_pickle_stream(data), reader.persistent_load), reader.storages


MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _legacy_header(reader: _Reader, stream) -> None:
    magic = reader.unpickle(stream)
    if magic != MAGIC_NUMBER:
        raise CheckpointError(
            f"{reader.file}: not a torch checkpoint (invalid magic number; corrupt file?)"
        )
    version = reader.unpickle(stream)
    if version != PROTOCOL_VERSION:
        raise CheckpointError(f"{reader.file}: invalid legacy protocol version {version!r}")
    reader.unpickle(stream)  # system info; legacy storage data is always little-endian


def _legacy_keys(reader: _Reader, stream) -> list:
    keys = reader.unpickle(stream)
    if not isinstance(keys, list):
        raise CheckpointError(f"{reader.file}: the storage key list is missing or malformed")
    for key in keys:
        if (
            key not in reader.storages
            or reader.info_of[id(reader.storages[key])].parent is not None
        ):
            raise CheckpointError(f"{reader.file}: storage {key!r} is listed but never used")
    return keys


def _stream_size(stream) -> int:
    here = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(here)
    return end


def _load_legacy(opened: _Opened, mode: str, encoding: str):
    stream = opened.stream
    factory = _LegacyArrays(opened.display, _stream_size(stream))
    reader = _Reader(opened.display, mode, factory, encoding, unscanned=True)
    _legacy_header(reader, stream)
    result = reader.unpickle(stream, reader.legacy_persistent_load)
    for key in _legacy_keys(reader, stream):
        info = reader.info_of[id(reader.storages[key])]
        _fill_legacy_storage(stream, info, reader.file)
    factory.apply_swaps()
    return result


def _legacy_count(stream, info: StorageInfo, file: str) -> int:
    header = stream.read(8)
    if len(header) != 8:
        raise CheckpointError(f"{file}: storage {info.key!r}: the file ends before its data")
    (count,) = struct.unpack("<q", header)
    itemsize = info.dtype.itemsize if info.dtype else 1
    if count * itemsize != info.nbytes:
        raise CheckpointError(
            f"{file}: storage {info.key!r} holds {count} elements of {itemsize} bytes but the "
            f"pickle declares {info.nbytes} bytes"
        )
    return count


def _fill_legacy_storage(stream, info: StorageInfo, file: str) -> None:
    _legacy_count(stream, info, file)
    if info.nbytes:
        got = stream.readinto(memoryview(info.raw))
        if got != info.nbytes:
            raise CheckpointError(
                f"{file}: storage {info.key!r}: the file ends after {got} of its {info.nbytes} bytes"
            )
        # Legacy storage bytes are little-endian whatever machine wrote them.
        if sys.byteorder == "big" and info.dtype is not None and info.dtype.swap_size > 1:
            _native.byteswap(info.raw, info.dtype.swap_size)


def _load_tar(opened: _Opened, mode: str, encoding: str):
    """The pre-0.4 tar format (``storages``, ``tensors``, ``pickle`` members)."""
    file = opened.display
    if mode == "strict":
        raise RuntimeError(
            f"{file}: cannot use weights_only=True with files saved in the legacy .tar format; "
            "load with weights_only=False only if you trust the file."
        )
    factory = _LegacyArrays(file, _stream_size(opened.stream))
    reader = _Reader(file, mode, factory, encoding, unscanned=True)
    try:
        with tarfile.open(fileobj=opened.stream, mode="r:", format=tarfile.PAX_FORMAT) as tar:
            return _read_tar(tar, reader, factory, file)
    except tarfile.TarError as e:
        raise CheckpointError(f"{file}: unreadable tar checkpoint: {e}") from e


def _read_tar(tar: tarfile.TarFile, reader: _Reader, factory: _LegacyArrays, file: str):
    objects: dict[Any, Any] = {}

    def member(name: str) -> io.BytesIO:
        return tar_member(tar, name, file)

    storages = member("storages")
    for _ in range(reader.unpickle(storages)):
        key, location, storage_type = reader.unpickle(storages)
        dtype = reader._storage_dtype(storage_type)
        (count,) = struct.unpack("<q", storages.read(8))
        info = StorageInfo(key, dtype, count * (dtype.itemsize if dtype else 1), _decode(location))
        made = reader._register(key, info)
        if info.nbytes and storages.readinto(memoryview(info.raw)) != info.nbytes:
            raise CheckpointError(f"{file}: storage {key!r} is truncated")
        objects[key] = made
    for target, root_key, offset, numel in reader.unpickle(storages):
        root = objects[root_key]
        parent = reader.info_of[id(root)]
        itemsize = parent.dtype.itemsize if parent.dtype else 1
        info = StorageInfo(target, parent.dtype, numel * itemsize, parent.location)
        info.parent, info.parent_offset = parent, offset * itemsize
        made = factory.view_storage(root, parent, info)
        reader.info_of[id(made)] = info
        objects[target] = made
    tensors = member("tensors")
    for _ in range(reader.unpickle(tensors)):
        key, storage_id, _tensor_type = reader.unpickle(tensors)
        storage = objects[storage_id]
        size, stride, offset = tar_tensor_geometry(tensors)
        info = reader.info_of[id(storage)]
        objects[key] = reader._tensor(
            storage, info.dtype or _UINT8, offset, size, stride, "tar tensor"
        )

    def persistent_load(saved_id):
        if isinstance(saved_id, tuple):
            return saved_id[0]
        return objects[int(saved_id)]

    return reader.unpickle(member("pickle"), persistent_load)


# --------------------------------------------------------------------------- metadata-only reads


class CheckpointStructure:
    """A checkpoint parsed without reading tensor data: the object tree with
    :class:`TensorInfo` in place of tensors, plus where every storage's bytes lie."""

    def __init__(self, opened: _Opened, kind: str):
        self.opened = opened
        self.file = opened.display
        self.kind = kind  # "zip" | "legacy" | "tar"
        #: a TorchScript archive (torch.jit.save): ``root`` is its data.pkl, with
        #: scripted modules as Opaque placeholders, and ``constants`` its constants.pkl
        self.torchscript = False
        self.constants: Any = None
        self.byteorder = "little"
        self.prefix: str | None = None
        self.protocol: int | None = None
        self.globals: list[str] = []
        self.root: Any = None
        self.storages: dict[Any, StorageInfo] = {}
        self.problems: list[str] = []
        self.error: BaseException | None = None  # the parse failed (inspect keeps going)

    @property
    def archive(self):
        return self.opened.archive

    @property
    def swap(self) -> bool:
        return self.byteorder != sys.byteorder

    def leaves(self) -> Iterator[tuple[str, Any]]:
        """:func:`iter_leaves` of the object tree, then, for a TorchScript archive, of
        its constants under the names its code uses (``CONSTANTS.c0``, ...)."""
        yield from iter_leaves(self.root)
        constants = self.constants
        if isinstance(constants, tuple):
            constants = {f"c{i}": v for i, v in enumerate(constants)}
        if constants is not None and constants != {}:
            yield from iter_leaves(constants, "CONSTANTS")

    def close(self) -> None:
        self.opened.close()

    def read_span(self, t: TensorInfo) -> tuple[np.ndarray, int]:
        """The bytes of the storage that ``t`` touches, in native order, and the element
        index they start at. Reads nothing else."""
        info = t.storage
        itemsize = t.dtype.itemsize
        first, end = t.span()
        start, stop = first * itemsize, end * itemsize
        if stop > info.nbytes:
            raise CheckpointError(f"{self.file}: {t!r} reaches past the end of its storage")
        count = stop - start
        if self.kind == "zip":
            archive = self.opened.archive
            mapping = archive.mapping
            if count == 0:
                raw = np.empty(0, np.uint8)
            elif mapping is not None and not info.compressed:
                raw = np.frombuffer(
                    mapping, np.uint8, count=count, offset=info.data_offset + start
                ).copy()
            else:
                raw = np.frombuffer(archive.read_buffer(info.record), np.uint8)[start:stop].copy()
        elif self.kind == "legacy":
            stream = self.opened.stream
            raw = np.empty(count, np.uint8)
            if count:
                stream.seek(info.data_offset + start)
                if stream.readinto(memoryview(raw)) != count:
                    raise CheckpointError(f"{self.file}: storage {info.key!r} is truncated")
        else:
            raise CheckpointError(
                f"{self.file}: reading tensors of the tar format lazily is not supported"
            )
        if self.swap and t.dtype.swap_size > 1 and count:
            _native.byteswap(raw, t.dtype.swap_size)
        return raw, first

    def array(self, t: TensorInfo) -> np.ndarray:
        """``t`` as a numpy array over a fresh buffer holding just its bytes."""
        raw, first = self.read_span(t)
        arr = _as_array(raw, t.dtype, t.storage_offset - first, t.shape, t.stride, self.file)
        if t.conj:
            arr = np.conjugate(arr)
        if t.neg:
            arr = np.negative(arr)
        return arr


def read_structure(
    f, *, mode: str = "strict", collect: bool = False, mmap: bool = False, encoding: str = "utf-8"
) -> CheckpointStructure:
    """Parses a checkpoint's pickle and storage layout without reading tensor data.

    ``mode``: ``"strict"`` refuses globals outside the weights-only allow-list;
    ``"opaque"`` replaces them with inert placeholders (nothing is imported or run).
    ``collect=True`` records structural problems in ``.problems`` (and a failed parse
    in ``.error``) instead of raising. The caller closes the result.
    """
    return structure_of(_open_checkpoint(f, mmap), mode=mode, collect=collect, encoding=encoding)


def structure_of(
    opened: _Opened, *, mode: str = "strict", collect: bool = False, encoding: str = "utf-8"
) -> CheckpointStructure:
    """``read_structure`` of a checkpoint already opened (an archive inside a larger
    file, say); the result owns ``opened`` and closes it."""
    s = CheckpointStructure(opened, opened.kind)
    problems = s.problems if collect else None
    try:
        if opened.kind == "zip":
            _structure_zip(s, mode, problems, encoding)
        elif opened.kind == "legacy":
            _structure_legacy(s, mode, problems, encoding)
        elif not collect:
            raise CheckpointError(
                f"{s.file}: the pre-0.4 tar format can only be loaded whole "
                "(fastserial.load or fastserial.numpy.load with weights_only=False)"
            )
    except BaseException as e:
        if not collect or not isinstance(e, Exception):
            s.close()
            raise
        s.error = e
    return s


def _structure_zip(s: CheckpointStructure, mode: str, problems, encoding: str) -> None:
    archive = s.opened.archive
    s.prefix = archive.prefix
    s.byteorder = _zip_byteorder(archive, s.file)
    s.torchscript = _is_torchscript(archive)
    data, scan = _zip_pickle(archive, s.file, mode)
    s.protocol = scan["protocol"]
    s.globals = [f"{m}.{n}" for m, n in scan["globals"]]
    factory = _MetaFactory(archive, s.file, problems)
    reader = _Reader(s.file, mode, factory, encoding, problems, torchscript=s.torchscript)
    try:
        s.root = reader.unpickle(_pickle_stream(data), reader.persistent_load)
    finally:
        s.storages = {k: v for k, v in reader.storages.items()}
    if s.torchscript:
        s.constants, storages = _torchscript_constants(
            archive, s.file, mode, factory, encoding, problems
        )
        s.storages.update((info.key, info) for info in storages.values())


def _structure_legacy(s: CheckpointStructure, mode: str, problems, encoding: str) -> None:
    stream = s.opened.stream
    reader = _Reader(
        s.file, mode, _MetaFactory(None, s.file, problems), encoding, problems, unscanned=True
    )
    _legacy_header(reader, stream)
    start = stream.tell()
    head = stream.read(2)
    stream.seek(start)
    s.protocol = head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else None
    s.root = reader.unpickle(stream, reader.legacy_persistent_load)
    s.globals = list(reader.globals_seen)
    keys = _legacy_keys(reader, stream)
    s.storages = {k: reader.info_of[id(v)] for k, v in reader.storages.items()}
    pos = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    for key in keys:
        info = s.storages[key]
        stream.seek(pos)
        try:
            _legacy_count(stream, info, s.file)
        except CheckpointError as e:
            if problems is None:
                raise
            problems.append(str(e).split(": ", 1)[-1])
            break
        info.data_offset = pos + 8
        pos += 8 + info.nbytes
        if pos > end:
            msg = f"storage {key!r}: the file ends {pos - end} bytes before the end of its data"
            if problems is None:
                raise CheckpointError(f"{s.file}: {msg}")
            problems.append(msg)
            break


#: How deep ``iter_leaves`` follows nested containers.
MAX_NESTING = 1000


def iter_leaves(obj, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` for every leaf of a loaded structure: dict keys and
    sequence indices joined with ``.``; tensors (arrays, :class:`TensorInfo`) are
    leaves, as is every non-container value. Containers reached twice are walked once."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(prefix, obj, 0)]
    while stack:
        name, value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple, Opaque)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if depth >= MAX_NESTING:
                # Each level's name repeats the one above: deeper structures would
                # cost time and memory quadratic in the depth (no checkpoint nests so).
                raise CheckpointError(
                    f"the checkpoint nests containers more than {MAX_NESTING} levels deep "
                    f"(under {name[:80]!r}...); refusing to name its entries"
                )
            children: list[tuple[str, Any]]
            if isinstance(value, dict):
                children = [(_join(name, k), v) for k, v in value.items()]
            elif isinstance(value, Opaque):
                children = [(_join(name, f"args.{i}"), v) for i, v in enumerate(value.args)]
                state = value.state
                if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
                    state = (
                        {**(state[0] or {}), **state[1]} if isinstance(state[0], dict) else state[1]
                    )
                if isinstance(state, dict):
                    children += [(_join(name, k), v) for k, v in state.items()]
                elif state is not None:
                    children.append((_join(name, "state"), state))
                children += [(_join(name, k), v) for k, v in value.entries]
            else:
                children = [(_join(name, i), v) for i, v in enumerate(value)]
            stack.extend((n, v, depth + 1) for n, v in reversed(children))
        else:
            yield name, value


def _join(prefix: str, key) -> str:
    key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    return f"{prefix}.{key}" if prefix else key


# --------------------------------------------------------------------------- save


class _TorchGlobal(_Frozen):
    """A torch function written into a pickle by name; never imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        _set(self, "module", module)
        _set(self, "name", name)

    def __call__(self, *args, **kwargs):  # picklers insist that a reduce function is callable
        raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling only")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


_REBUILD_V2 = _TorchGlobal("torch._utils", "_rebuild_tensor_v2")
_REBUILD_V3 = _TorchGlobal("torch._utils", "_rebuild_tensor_v3")
_DEVICE_GLOBAL = _TorchGlobal("torch", "device")


def _torch_global_name(obj) -> tuple[str, str]:
    t = type(obj)
    if t is _TorchGlobal:
        return obj.module, obj.name
    if t is TorchDType:
        return "torch", obj.name
    if t is _StorageType:
        return ("torch.storage" if obj is _UNTYPED else "torch"), obj.name
    module, _, name = obj.full.rpartition(".")  # _TorchName
    return module, name


# Every object saved as ``GLOBAL torch...``. The C pickler writes a global only after
# importing its module and finding the object there, so each one is published in this
# module as ``_tg<N>``; the pickle is written naming ``fastserial.numpy _tg<N>`` and
# those (memoized, so each written once) opcodes are renamed to torch's afterwards.
_PLACEHOLDER_TYPES = (_TorchGlobal, TorchDType, _StorageType, _TorchName)
_PLACEHOLDERS: dict[int, tuple[str, bytes, bytes]] = {}
for _i, _obj in enumerate(
    [
        _REBUILD_V2,
        _REBUILD_V3,
        _DEVICE_GLOBAL,
        _UNTYPED,
        _TENSOR,
        _PARAMETER,
        *DTYPES.values(),
        *_STORAGE_MARKERS.values(),
        *_LAYOUTS.values(),
        *_QSCHEMES.values(),
        *_TENSOR_CLASSES.values(),
    ]
):
    _module, _name = _torch_global_name(_obj)
    globals()[f"_tg{_i}"] = _obj
    _PLACEHOLDERS[id(_obj)] = (
        f"_tg{_i}",
        pickle.GLOBAL + f"{__name__}\n_tg{_i}\n".encode(),
        pickle.GLOBAL + f"{_module}\n{_name}\n".encode(),
    )
del _i, _obj, _module, _name


class _StorageRef:
    """Stands for one storage in the pickle; persistent_id writes its id."""

    __slots__ = ("key", "numel", "storage_type")

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel

    def pid(self) -> tuple:
        return ("storage", self.storage_type, self.key, "cpu", self.numel)


class _Storage:
    """Bytes one saved storage takes from memory: ``[low, high)`` of ``root``."""

    __slots__ = ("dtype", "high", "low", "np_dtype", "ref", "root", "swap")

    def __init__(self, ref, root, np_dtype, dtype: TorchDType, low: int, high: int):
        self.ref = ref
        self.root = root  # keeps the memory alive until it is written
        self.np_dtype = np_dtype
        self.dtype = dtype
        self.low = low
        self.high = high
        self.swap = dtype.swap_size if not np_dtype.isnative and dtype.swap_size > 1 else 0

    def bytes_now(self) -> np.ndarray:
        """The storage's bytes as a uint8 array over ``root``'s memory, which it keeps
        alive, checked against ``root`` as it is now: code run by the pickler (a
        ``__reduce__``) may have resized it since the storage was met."""
        if (self.low, self.high) != _byte_bounds(self.root):
            raise ValueError(
                "an array changed its memory while it was being saved (resized by code "
                "run during pickling?); save it again"
            )
        return np.asarray(_Span(self.root, self.low, self.high - self.low))


class _Span:
    """``n`` bytes at ``low`` inside ``root``'s memory, as numpy's array interface,
    holding ``root`` so that the memory outlives the view."""

    __slots__ = ("__array_interface__", "root")

    def __init__(self, root, low: int, n: int):
        self.root = root
        self.__array_interface__ = {
            "data": (low, True),
            "shape": (n,),
            "typestr": "|u1",
            "version": 3,
        }


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    """``[low, high)`` addresses of the memory an array's elements occupy."""
    ai = a.__array_interface__
    low = high = ai["data"][0]
    if a.size == 0:
        return low, low
    strides = ai["strides"]
    if strides is None:
        return low, low + a.nbytes
    for n, s in zip(a.shape, strides):
        if s < 0:
            low += (n - 1) * s
        else:
            high += (n - 1) * s
    return low, high + a.itemsize


def _contiguous_strides(shape) -> tuple:
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


class _SaveState:
    """The storages one save has met, in first-seen order."""

    def __init__(self) -> None:
        self.by_root: dict[int, _Storage] = {}
        self.storages: list[_Storage] = []

    def reset(self) -> None:
        self.by_root.clear()
        self.storages.clear()

    def _new_storage(self, root, np_dtype, dtype: TorchDType, low: int, high: int) -> _Storage:
        key = str(len(self.storages))
        nbytes = high - low
        if dtype.storage_name is None:
            ref = _StorageRef(key, _UNTYPED, nbytes)
        else:
            ref = _StorageRef(key, _STORAGE_MARKERS[dtype.storage_name], nbytes // dtype.itemsize)
        storage = _Storage(ref, root, np_dtype, dtype, low, high)
        self.storages.append(storage)
        return storage

    def reduce(self, obj):
        """The reduction for numpy objects and stand-ins; ``None`` for anything else."""
        if isinstance(obj, np.ndarray):
            return self.reduce_array(obj)
        if isinstance(obj, np.generic):
            if obj.dtype.kind in "OSUVMm" and obj.dtype not in _DTYPE_BY_NUMPY:
                raise TypeError(
                    f"cannot save the numpy scalar {obj!r} ({obj.dtype}) as a tensor; "
                    "convert it to a Python value first"
                )
            return self.reduce_array(np.asarray(obj))  # a 0-d tensor of its dtype
        t = type(obj)
        if t is TorchDevice:
            return (_DEVICE_GLOBAL, (obj.type,) if obj.index is None else (obj.type, obj.index))
        if t.__module__.split(".")[0] == "torch":
            raise TypeError(
                f"fastserial.numpy.save writes numpy arrays; got a {t.__module__}.{t.__qualname__}. "
                "Use fastserial.save for torch objects, or convert them with .numpy()."
            )
        return None

    def reduce_array(self, arr: np.ndarray):
        if isinstance(arr, np.ma.MaskedArray):
            raise TypeError(
                "masked arrays cannot be saved as tensors; save .data and .mask separately"
            )
        dtype = torch_dtype_for(arr.dtype)
        placed = self._place_shared(arr, dtype)
        if placed is None:
            placed = self._place_private(arr, dtype)
        ref, offset, stride = placed
        args = (
            ref,
            offset,
            tuple(int(n) for n in arr.shape),
            stride,
            False,
            collections.OrderedDict(),
        )
        if dtype.storage_name is None:
            return (_REBUILD_V3, (*args, dtype))
        return (_REBUILD_V2, args)

    def _place_shared(self, arr: np.ndarray, dtype: TorchDType):
        """The array as a view of the storage of its base array, when torch can say so."""
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        itemsize = arr.itemsize
        storage = self.by_root.get(id(root))
        if storage is not None:
            if storage.np_dtype != arr.dtype:
                return None  # one torch storage holds one dtype: this array gets its own
            low = storage.low
        else:
            low, high = _byte_bounds(root)
            if (high - low) % itemsize:
                return None
        if arr.size == 0:
            offset, stride = 0, _contiguous_strides(arr.shape)
        else:
            delta = arr.__array_interface__["data"][0] - low
            if delta < 0 or delta % itemsize:
                return None
            offset = delta // itemsize
            elems = []
            for n, s, c in zip(arr.shape, arr.strides, _contiguous_strides(arr.shape)):
                if n == 1:
                    elems.append(c)
                elif s < 0 or s % itemsize:
                    return None  # torch has no negative strides
                else:
                    elems.append(s // itemsize)
            stride = tuple(elems)
        if storage is None:
            storage = self._new_storage(root, arr.dtype, dtype, low, high)
            self.by_root[id(root)] = storage
        return storage.ref, offset, stride

    def _place_private(self, arr: np.ndarray, dtype: TorchDType):
        """A contiguous copy in a storage of its own (negative or odd strides, ...)."""
        copy = np.array(arr, order="C")
        low, high = _byte_bounds(copy)
        storage = self._new_storage(copy, copy.dtype, dtype, low, high)
        return storage.ref, 0, _contiguous_strides(arr.shape)


class _Pickler(pickle.Pickler):
    """The C pickler, writing torch's globals under placeholder names."""

    def __init__(self, file, state: _SaveState):
        super().__init__(file, protocol=2)
        self._state = state
        self.placeholders: list[tuple[str, bytes, bytes]] = []

    def persistent_id(self, obj):
        return obj.pid() if type(obj) is _StorageRef else None

    def reducer_override(self, obj):
        if isinstance(obj, _PLACEHOLDER_TYPES):
            entry = _PLACEHOLDERS.get(id(obj))
            if entry is None:
                raise TypeError(f"cannot save {obj!r}: not one of fastserial.numpy's stand-ins")
            self.placeholders.append(entry)
            return entry[0]
        reduced = self._state.reduce(obj)
        return NotImplemented if reduced is None else reduced


class _PurePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Python's pickler, which lets us write each GLOBAL directly. Slower; used only
    when a placeholder name also occurs in the data (see :func:`_dump`)."""

    def __init__(self, file, state: _SaveState):
        super().__init__(file, 2)
        self._state = state

    def persistent_id(self, obj):
        return obj.pid() if type(obj) is _StorageRef else None

    def reducer_override(self, obj):
        if isinstance(obj, _PLACEHOLDER_TYPES):
            return "by name"  # save_global below writes it
        reduced = self._state.reduce(obj)
        return NotImplemented if reduced is None else reduced

    def save_global(self, obj, name=None):
        entry = _PLACEHOLDERS.get(id(obj)) if isinstance(obj, _PLACEHOLDER_TYPES) else None
        if entry is None:
            if isinstance(obj, _PLACEHOLDER_TYPES):
                raise TypeError(f"cannot save {obj!r}: not one of fastserial.numpy's stand-ins")
            return super().save_global(obj, name)
        self.write(entry[2])
        self.memoize(obj)
        return None


def _dump(obj, state: _SaveState) -> bytes:
    """The pickle of ``obj``, protocol 2, with arrays as torch tensors."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, state)
    pickler.dump(obj)
    data = buf.getvalue()
    for _attr, placeholder, real in dict.fromkeys(pickler.placeholders):
        if data.count(placeholder) != 1:  # the same bytes occur in the data: rename is unsafe
            break
        data = data.replace(placeholder, real)
    else:
        return data
    state.reset()
    buf = io.BytesIO()
    _PurePickler(buf, state).dump(obj)
    return buf.getvalue()


def save(obj: object, f: FileLike, *, fsync: bool = True) -> None:
    """Saves ``obj`` in torch's checkpoint format with numpy arrays as tensors;
    ``torch.load(weights_only=True)`` reads the result. torch is not needed.

    Arrays of any dtype torch has (``ml_dtypes`` bfloat16 and float8 included) become
    tensors of that dtype with the same shape and strides; big-endian arrays are stored
    in native order, arrays with negative strides as contiguous copies. Arrays viewing
    one base array with one dtype share a storage, so they load as views of each other
    again. Numpy scalars become 0-d tensors. Saving to a path is atomic.
    """
    _save(obj, f, fsync=fsync)


def _save(obj, f, *, fsync: bool = True, progress: Callable[[int], None] | None = None) -> None:
    state = _SaveState()
    data = _dump(obj, state)
    if _is_path(f):
        # As fastserial.save: through a symlink to its target, atomic over a regular
        # file, after removing what killed saves to it left behind, with early
        # writeback when it will fsync.
        path, prefix, atomic = _path_target(f)
        writer = _native.ArchiveWriter(path, prefix, atomic=atomic, durable=fsync)
    elif hasattr(f, "write"):
        writer = _native.ArchiveWriter(f, "archive", durable=fsync)
    else:
        raise TypeError(
            f"expected a path or a file-like object with write(), got {type(f).__name__}"
        )
    _write_checkpoint(
        writer,
        data,
        lambda: _write_storages(writer, state.storages, progress),
        byteorder=True,
        fsync=fsync,
    )


_BATCH_BYTES = 64 << 20


def _write_storages(writer, storages: list[_Storage], progress) -> None:
    """Storages straight from the arrays' memory, in batches (for the progress bar);
    big-endian ones through a swapped copy, one at a time."""
    batch: list[tuple[str, np.ndarray]] = []
    batch_bytes = 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            writer.write_storages(batch)
            if progress is not None:
                progress(batch_bytes)
        batch, batch_bytes = [], 0

    for s in storages:
        name, data = f"data/{s.ref.key}", s.bytes_now()
        if s.swap and data.nbytes:
            flush()
            copy = data.copy()
            _native.byteswap(copy, s.swap)
            writer.write_storages([(name, copy)])
            if progress is not None:
                progress(copy.nbytes)
            continue
        batch.append((name, data))
        batch_bytes += data.nbytes
        if batch_bytes >= _BATCH_BYTES:
            flush()
    flush()
