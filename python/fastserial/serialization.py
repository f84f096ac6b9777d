"""``save`` / ``load``: PyTorch's zip checkpoint format through fastserial's native core.

Saving pickles the object with Python's C pickler. Plain tensors take a fast
``reducer_override`` path that writes exactly what ``Tensor.__reduce_ex__`` writes,
and every storage is written once, straight from its memory, by the native writer.

Loading scans the pickle natively first (globals, memo bounds), then unpickles it
with the C unpickler. When the pickle only uses inert globals (the state-dict case),
tensors are built directly at their final size with no intermediate storage object,
and all storage bytes are read afterwards in one native call on several threads
with the GIL released.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import OrderedDict
from typing import IO, Any, BinaryIO, Optional, Union

from . import _fastserial as _native
from . import allowlist as _safe
from . import legacy
from ._fastserial import CheckpointError
from ._optional import require as _require
from ._torch_io import (  # noqa: F401 - some are re-exported for tests
    LoadEndianness,
    _canonical_global,
    _default_mmap,
    _gc_paused,
    _is_device_target,
    _is_path,
    _is_torchscript,
    _open_checkpoint,
    _Opened,
    _path_target,
    _pickler_class,
    _save_helper,
    _skip_data,
    _SkipData,
    _StorageType,
    _torch,
    _torch_writes_format_records,
    _TorchInfo,
    _weights_only_default,
    _write_checkpoint,
    _write_storages,
    _ZipLoader,
    get_default_load_endianness,
    get_default_mmap_options,
    get_pack_small_tensors,
    set_default_load_endianness,
    set_default_mmap_options,
    set_pack_small_tensors,
)

__all__ = [
    "save",
    "load",
    "CheckpointError",
    "LoadEndianness",
    "get_default_load_endianness",
    "set_default_load_endianness",
    "get_default_mmap_options",
    "set_default_mmap_options",
    "set_pack_small_tensors",
    "get_pack_small_tensors",
    "DEFAULT_PROTOCOL",
]

DEFAULT_PROTOCOL = 2
FileLike = Union[str, os.PathLike, BinaryIO, IO[bytes]]


def load(
    f: FileLike,
    map_location=None,
    pickle_module=None,
    *,
    weights_only: Optional[bool] = None,
    mmap: Optional[bool] = None,
    verify: bool = False,
    **pickle_load_args: Any,
):
    """Loads an object saved with ``torch.save`` or :func:`fastserial.save`.

    Drop-in for ``torch.load``: the same arguments and defaults (``weights_only``
    defaults to True unless ``pickle_module`` is given). Extras:

    * ``verify=True`` checks the CRC32 of every record, so corrupted data raises
      :class:`CheckpointError` instead of loading as wrong values. ``data.pkl`` is
      always checked.
    * ``mmap=True`` also works for file objects and in-memory buffers (buffers are
      read eagerly), and for legacy files (read eagerly).
    """
    weights_only = _weights_only_default(weights_only, pickle_module)
    if weights_only:
        if pickle_module is not None:
            raise RuntimeError(
                "Can not safely load weights when explicit pickle_module is specified"
            )
    elif pickle_module is None:
        pickle_module = pickle
    if weights_only and set(pickle_load_args) - {"encoding", "errors", "fix_imports"}:
        warnings.warn("pickle_load_args only works if `weights_only=False`.", stacklevel=2)
        pickle_load_args = {
            k: v for k, v in pickle_load_args.items() if k in ("encoding", "errors", "fix_imports")
        }
    pickle_load_args.setdefault("encoding", "utf-8")
    mmap = _default_mmap() if mmap is None else bool(mmap)

    if _is_path(f) and os.fspath(f).endswith(".safetensors"):
        return _load_safetensors(os.fspath(f), map_location)

    # Loading straight to an accelerator: stage every storage through a mapping of the
    # file (the page cache) instead of an anonymous CPU buffer. No tensor stays on the
    # CPU, so nothing user-visible is backed by the mapping.
    stage_through_mapping = not mmap and _is_path(f) and _is_device_target(map_location)
    start = None if _is_path(f) else _position(f)
    opened = _open_checkpoint(f, mmap or stage_through_mapping)
    try:
        if opened.kind == "zip" and _is_torchscript(opened.archive):
            # As torch.load: a TorchScript archive goes to torch.jit.load, with a warning.
            warnings.warn(_TORCHSCRIPT_WARNING, UserWarning, stacklevel=2)
            opened.close()
            return _load_torchscript(f, opened, start, map_location, weights_only)
        if opened.kind == "zip":
            if stage_through_mapping:
                mmap = True
            loader = _ZipLoader(
                opened, map_location, pickle_module, weights_only, mmap, verify, pickle_load_args
            )
            loader.staging = stage_through_mapping
            return loader.load()
        if opened.kind == "tar":
            return legacy.load_tar(
                opened, map_location, pickle_module, weights_only, pickle_load_args
            )
        return legacy.load_legacy(
            opened, map_location, pickle_module, weights_only, pickle_load_args
        )
    finally:
        opened.close()


_TORCHSCRIPT_WARNING = (
    "'torch.load' received a zip file that looks like a TorchScript archive"
    " dispatching to 'torch.jit.load' (call 'torch.jit.load' directly to"
    " silence this warning)"
)


def _position(f) -> Optional[int]:
    try:
        return f.tell()
    except (AttributeError, OSError, ValueError):
        return None


def _load_torchscript(f, opened: _Opened, start: Optional[int], map_location, weights_only: bool):
    """What torch.load does with a TorchScript archive (torch's ``_is_torchscript_zip``:
    it has ``constants.pkl``): refuse it under weights_only, else ``torch.jit.load``
    from where the file started."""
    torch = _torch()
    if weights_only:
        raise RuntimeError(
            "Cannot use ``weights_only=True`` with TorchScript archives passed to "
            "``torch.load``. " + getattr(torch.serialization, "UNSAFE_MESSAGE", "")
        )
    if _is_path(f):
        source = os.fspath(f)
    elif opened.data is not None:
        source = io.BytesIO(opened.data)  # a stream read whole (it may not seek back)
    else:
        f.seek(start if start is not None else 0)
        source = f
    return torch.jit.load(source, map_location=map_location)


def _load_safetensors(path: str, map_location):
    safetensors_torch = _require("safetensors.torch", "loading a .safetensors file")
    device = "cpu"
    if map_location is not None:
        if isinstance(map_location, (str, bytes)):
            device = map_location.decode() if isinstance(map_location, bytes) else map_location
        elif isinstance(map_location, _torch().device):
            device = str(map_location)
        else:
            raise RuntimeError(
                "Loading a safetensors file supports only a device string or torch.device "
                "as map_location."
            )
    return safetensors_torch.load_file(path, device=device)


def save(
    obj: object,
    f: FileLike,
    pickle_module: Any = pickle,
    pickle_protocol: int = DEFAULT_PROTOCOL,
    *,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    fsync: bool = True,
) -> None:
    """Saves ``obj`` in torch's checkpoint format; ``torch.load`` reads the result.

    Drop-in for ``torch.save``. Saving to a path is atomic: the checkpoint is written
    to a temporary file beside the target, flushed, fsynced (``fsync=False`` skips
    this durability step, not the atomicity) and renamed over the target, so a crash
    at any moment leaves the previous checkpoint or the new one, whole. As torch, a
    symlink is written through (atomically, beside its target), a file object is
    flushed at the end, and ``torch.serialization.skip_data()`` is honoured.
    """
    skip_data = _skip_data()
    if not _use_new_zipfile_serialization:
        if skip_data:
            raise RuntimeError(
                "Cannot use skip_data=True with _use_new_zipfile_serialization=False"
            )
        return legacy.save_legacy(obj, f, pickle_module, pickle_protocol, fsync=fsync)
    target: Any
    if _is_path(f):
        target, prefix, atomic = _path_target(f)
    else:
        if not hasattr(f, "write"):
            raise AttributeError(
                f"expected 'f' to be string, path, or a file-like object with a 'write' "
                f"attribute, got {type(f).__name__}"
            )
        target, prefix, atomic = f, "archive", False

    helper = _save_helper()
    pickled = None
    if pickle_module is pickle and pickle_protocol == 2 and type(obj) in (dict, OrderedDict):
        # State dicts (str -> plain tensor) are pickled natively, with the opcodes the
        # general path below would produce; anything else returns None.
        pickled = helper.fast_state_dict(obj)
    if pickled is None:
        buf = io.BytesIO()
        with _gc_paused():
            _pickler_class(pickle_module)(buf, pickle_protocol, helper).dump(obj)
        pickled = buf.getbuffer()
    else:
        pickled = memoryview(pickled)

    if skip_data:
        helper = _SkipData(helper)
    # torch >= 2.7 writes .format_version / .storage_alignment and its storages in
    # key order; torch 2.6 neither, and its storages sorted as strings ("10" < "2").
    newer_layout = _torch_writes_format_records()
    writer = _native.ArchiveWriter(target, prefix, atomic=atomic, durable=fsync)
    try:
        _write_checkpoint(
            writer,
            pickled,
            lambda: _write_storages(writer, helper, sorted_keys=not newer_layout),
            byteorder=not _disable_byteorder_record,
            fsync=fsync,
            format_records=newer_layout,
        )
    finally:
        pickled.release()


# --------------------------------------------------------------------------- inspection


def get_unsafe_globals_in_checkpoint(f: FileLike) -> list[str]:
    """The globals in ``f``'s pickle that a weights-only load would refuse, as
    ``"module.name"`` strings, found without executing anything. Call
    :func:`add_safe_globals` with the ones you trust, then load."""
    opened = _open_checkpoint(f, mmap=False)
    try:
        if opened.kind != "zip":
            raise ValueError(
                f"{opened.display}: get_unsafe_globals_in_checkpoint supports zip checkpoints "
                "(torch >= 1.6), not the legacy format"
            )
        archive = opened.archive
        if not archive.has("data.pkl"):
            raise CheckpointError(
                f"{opened.display}: record '{archive.prefix}/data.pkl' is missing from the archive"
            )
        scan = _native.scan_pickle(archive.read("data.pkl"), opened.display)
    finally:
        opened.close()
    unsafe = []
    for module, name in scan["globals"]:
        module, name = _canonical_global(module, name, scan["protocol"])
        full = f"{module}.{name}"
        if _safe.verdict(module, name).allowed:
            continue
        unsafe.append(full)
    return unsafe
