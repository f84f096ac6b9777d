"""``.metadata``: torch's pickled ``Metadata``, read through an allow-list.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load``: a
crafted checkpoint runs code. Here only DCP's metadata dataclasses, torch's
``_StorageInfo``, ``torch.Size``, dtypes, layouts, paths and a few containers may be
named (plus what the user allowed with ``fastserial.add_safe_globals``), the native
scanner bounds the pickle first, and the result is checked field by field, so a
crafted file gets a :class:`fastserial.CheckpointError`.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
from typing import Any

from .. import _fastserial as _native
from .. import allowlist
from .._fastserial import CheckpointError

#: The version torch's FileSystemWriter stamps (``CURRENT_DCP_VERSION``).
DCP_VERSION = "1.0.0"


def _layout_by_name(name):
    """``torch.serialization._get_layout`` without its cache: a layout or an error."""
    import torch

    layout = getattr(torch, str(name).replace("torch.", "", 1), None)
    if not isinstance(layout, torch.layout):
        raise ValueError(f"unknown layout {name!r}")
    return layout


def _builtin_allowed() -> dict[str, Any]:
    import collections
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    found: dict[str, Any] = {}
    classes = [
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    ]
    for module in ("torch.distributed.checkpoint.metadata",):
        for name in classes:
            obj = getattr(metadata, name, None)
            if obj is not None:
                found[f"{module}.{name}"] = obj
                # checkpoints from torch < 2.0 name the older package
                found[f"torch.distributed._shard.checkpoint.metadata.{name}"] = obj
    found["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    found["torch.distributed._shard.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    found["torch.Size"] = torch.Size
    found["torch.serialization._get_layout"] = _layout_by_name
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            found[f"torch.{name}"] = value
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath):
        found[f"pathlib.{cls.__name__}"] = cls
    found["pathlib.PureWindowsPath"] = pathlib.PureWindowsPath
    found["collections.OrderedDict"] = collections.OrderedDict
    found["builtins.set"] = set
    found["builtins.frozenset"] = frozenset
    return found


_BUILTIN: dict[str, Any] = {}


def _allowed() -> dict[str, Any]:
    if not _BUILTIN:
        _BUILTIN.update(_builtin_allowed())
    allowed = dict(_BUILTIN)
    for entry in allowlist.get_safe_globals():
        if isinstance(entry, tuple) and len(entry) == 2:
            obj, name = entry
        else:
            obj, name = entry, f"{entry.__module__}.{entry.__qualname__}"
        allowed.setdefault(name, obj)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: dict, display: str) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._display = display

    def find_class(self, module, name):
        full = f"{module}.{name}"
        obj = self._allowed.get(full)
        if obj is None:
            raise CheckpointError(
                f"{self._display}: the metadata names '{full}', which is not allowed in DCP "
                f"metadata. {allowlist.refusal_hint(full)}"
            )
        return obj

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._display}: DCP metadata holds no persistent ids")


def load_metadata(data: bytes, display: str):
    """Unpickles and checks a ``.metadata`` file's bytes."""
    from torch.distributed.checkpoint.metadata import Metadata

    scan = _native.scan_pickle(data, display)  # memo bounds, malformed opcodes
    if scan["unsafe_opcodes"]:
        # A BUILD or SETITEM on an imported class would change it for the whole
        # process (every later checkpoint), whoever reads them.
        raise CheckpointError(
            f"{display}: the metadata uses refused pickle opcodes: "
            f"{', '.join(scan['unsafe_opcodes'])}"
        )
    try:
        md = _MetadataUnpickler(data, _allowed(), display).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{display}: the metadata does not unpickle: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{display}: holds a {type(md).__name__}, not DCP Metadata")
    check_metadata(md, display)
    return md


def _sizes(value, what: str, display: str, n=None) -> tuple:
    import torch

    if not isinstance(value, (torch.Size, tuple)) or not all(
        type(v) is int and v >= 0 for v in value
    ):
        raise CheckpointError(f"{display}: {what} is not a tuple of non-negative ints: {value!r}")
    if n is not None and len(value) != n:
        raise CheckpointError(f"{display}: {what} has {len(value)} dimensions, expected {n}")
    return tuple(value)


def safe_relative_path(path, display: str) -> str:
    """A shard file name from the metadata, refused if it leaves the checkpoint."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise CheckpointError(f"{display}: bad shard file name {path!r}")
    norm = posixpath.normpath(path.replace("\\", "/"))
    if (
        norm.startswith("/")
        or norm in ("..", ".")
        or norm.startswith("../")
        or os.path.isabs(path)
        or (len(path) > 1 and path[1] == ":")
    ):
        raise CheckpointError(f"{display}: shard file {path!r} lies outside the checkpoint")
    return path


def check_metadata(md, display: str) -> None:
    """Field-by-field checks of an unpickled ``Metadata`` (types and bounds)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    sdm = getattr(md, "state_dict_metadata", None)
    if not isinstance(sdm, dict):
        raise CheckpointError(f"{display}: state_dict_metadata is not a dict")
    checked: set = set()
    for fqn, entry in sdm.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{display}: state dict key {fqn!r} is not a string")
        where = f"{display}: '{fqn}'"
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {type(entry).__name__} is not storage metadata")
        props = entry.properties
        if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
            raise CheckpointError(f"{where}: bad tensor properties")
        size = _sizes(entry.size, "size", where)
        if not isinstance(entry.chunks, list):
            raise CheckpointError(f"{where}: chunks is not a list")
        # A pickle can name one chunk list from many entries (its memo): each list is
        # checked once per size, so the work stays proportional to the file.
        if (id(entry.chunks), size) in checked:
            continue
        checked.add((id(entry.chunks), size))
        for chunk in entry.chunks:
            if not isinstance(chunk, ChunkStorageMetadata):
                raise CheckpointError(f"{where}: bad chunk {chunk!r}")
            offsets = _sizes(chunk.offsets, "chunk offsets", where, len(size))
            sizes = _sizes(chunk.sizes, "chunk sizes", where, len(size))
            if any(o + s > t for o, s, t in zip(offsets, sizes, size)):
                raise CheckpointError(f"{where}: chunk {offsets}+{sizes} exceeds size {size}")
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{display}: storage_data is not a dict")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            raise CheckpointError(f"{display}: bad storage index {index!r}")
        if index.offset is not None:
            _sizes(index.offset, "storage index offset", display)
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{display}: '{index.fqn}': bad storage info {info!r}")
        safe_relative_path(info.relative_path, display)
        if not (type(info.offset) is int and type(info.length) is int):
            raise CheckpointError(f"{display}: '{index.fqn}': offset and length must be ints")
        if info.offset < 0 or info.length < 0:
            raise CheckpointError(f"{display}: '{index.fqn}': negative offset or length")
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors is not None and (
            not isinstance(descriptors, (list, tuple))
            or not all(isinstance(d, str) for d in descriptors)
        ):
            raise CheckpointError(f"{display}: '{index.fqn}': bad transform descriptors")
    meta = getattr(md, "storage_meta", None)
    if meta is not None and not isinstance(meta, StorageMeta):
        raise CheckpointError(f"{display}: storage_meta is a {type(meta).__name__}")
