"""Conversions between a DCP checkpoint and one ``torch.save`` file."""

from __future__ import annotations

import io
import os
from typing import Union

from .. import _fastserial as _native
from .._fastserial import CheckpointError
from .._torch_io import _archive_prefix, _torch_writes_format_records, _write_checkpoint
from ._blob import TensorPickler, TensorStandIn, tensor_bytes
from ._reader import FileSystemReader, _ReadEngine, _ReadJob
from ._writer import FileSystemWriter, default_thread_count


def _storage_bytes(storage) -> memoryview:
    import torch

    t = torch.empty(0, dtype=torch.uint8)
    t.set_(storage)
    return tensor_bytes(t)


def dcp_to_torch_save(
    dcp_checkpoint_dir: Union[str, os.PathLike],
    torch_save_path: Union[str, os.PathLike],
    *,
    fsync: bool = True,
    weights_only: bool = True,
) -> None:
    """Converts a DCP checkpoint (any world size, fastserial's or torch's) into one file
    that ``torch.load`` and ``fastserial.load`` read, as torch's
    ``format_utils.dcp_to_torch_save`` does.

    The file is written atomically (a temporary file renamed over ``torch_save_path``;
    ``fsync=False`` skips the durability step). Tensors are streamed: each is assembled
    from its chunks, written and freed before the next, so memory holds one tensor at a
    time, never the whole state dict. Non-tensor values are loaded with
    ``fastserial.load(weights_only=weights_only)`` (torch's converter runs
    ``torch.load(weights_only=False)`` on them).
    """
    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    from ..serialization import load

    reader = FileSystemReader(dcp_checkpoint_dir)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    planner_data = md.planner_data if isinstance(md.planner_data, dict) else {}
    display = os.fspath(dcp_checkpoint_dir)
    out = os.fspath(torch_save_path)
    with _ReadEngine(reader._files, default_thread_count(), verify=False) as engine:
        sd: dict = {}
        tensors = []
        for fqn, entry in md.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                value = TensorStandIn(entry.properties.dtype, entry.size)
                tensors.append((value, fqn, entry))
            else:
                data = engine.read_bytes(reader._info(MetadataIndex(fqn)))
                value = load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
            if isinstance(entry, TensorStorageMetadata):
                _check_tensor_entry(reader, fqn, entry, display)
            if fqn in planner_data:
                limit = len(md.state_dict_metadata)
                set_element(sd, _check_path(planner_data[fqn], limit, fqn, display), value)
            else:
                sd[fqn] = value
        pickled = io.BytesIO()
        pickler = TensorPickler(pickled, protocol=2)
        pickler.dump(sd)
        records = {v.key: v for v, _, _ in tensors if v.key is not None}
        records.update(pickler.storages)
        entries = {id(v): (fqn, entry) for v, fqn, entry in tensors}

        def write_storages() -> None:
            for key in sorted(records, key=int):
                value = records[key]
                if not isinstance(value, TensorStandIn):
                    writer.write_record(f"data/{key}", _storage_bytes(value))
                    continue
                fqn, entry = entries[id(value)]
                tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
                jobs = []
                for chunk in entry.chunks:
                    sinfo = reader._info(MetadataIndex(fqn, chunk.offsets))
                    dst = tensor
                    for dim, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                        dst = dst.narrow(dim, o, n)
                    jobs.append(
                        _ReadJob(
                            engine.source(sinfo.relative_path),
                            sinfo,
                            (0,) * len(chunk.sizes),
                            tuple(chunk.sizes),
                            dst,
                            (sinfo.relative_path, sinfo.offset),
                        )
                    )
                engine.run(jobs)
                writer.write_record(f"data/{key}", tensor_bytes(tensor))
                del tensor, jobs

        writer = _native.ArchiveWriter(out, _archive_prefix(out), atomic=True, durable=fsync)
        _write_checkpoint(
            writer,
            pickled.getbuffer(),
            write_storages,
            byteorder=True,
            fsync=fsync,
            format_records=_torch_writes_format_records(),
        )


def _check_tensor_entry(reader, fqn: str, entry, display: str) -> None:
    """Before a tensor of ``entry.size`` is allocated: its chunks lie inside it, cover it
    (DCP saves whole tensors), and each is no bigger than the bytes stored for it, so
    a crafted size cannot allocate more than the checkpoint holds."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    itemsize = torch_itemsize(entry.properties.dtype)
    numel = _volume(entry.size)
    covered = 0
    for chunk in entry.chunks:
        if len(chunk.offsets) != len(entry.size) or any(
            o + n > s for o, n, s in zip(chunk.offsets, chunk.sizes, entry.size)
        ):
            raise CheckpointError(f"{display}: '{fqn}': a chunk lies outside the tensor")
        n = _volume(chunk.sizes)
        if n * itemsize > reader._info(MetadataIndex(fqn, chunk.offsets)).length:
            raise CheckpointError(
                f"{display}: '{fqn}': a chunk of {n} elements has fewer bytes stored"
            )
        covered += n
    if covered < numel:
        raise CheckpointError(
            f"{display}: '{fqn}': its chunks cover {covered} of its {numel} elements"
        )


def _check_path(path, limit: int, fqn: str, display: str) -> tuple:
    """A ``planner_data`` path: keys (str) and list indices (int) where torch's
    ``set_element`` puts a value; an index pads a list with None up to it, so it is
    bounded by the number of values the checkpoint holds."""
    if not isinstance(path, (tuple, list)) or not path or len(path) > 256:
        raise CheckpointError(f"{display}: '{fqn}': bad planner path {path!r:.200}")
    for step in path:
        if not (type(step) is str or (type(step) is int and 0 <= step <= limit)):
            raise CheckpointError(f"{display}: '{fqn}': bad planner path step {step!r:.200}")
    return tuple(path)


def _volume(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def torch_itemsize(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def torch_save_to_dcp(
    torch_save_path: Union[str, os.PathLike],
    dcp_checkpoint_dir: Union[str, os.PathLike],
    *,
    weights_only: bool = True,
) -> None:
    """Converts a ``torch.save`` file into a one-process DCP checkpoint, as torch's
    ``format_utils.torch_save_to_dcp`` does: ``fastserial.load`` (memory-mapped, so the
    tensors are not copied on the way; ``weights_only=True`` unless told otherwise,
    where torch's converter unpickles with ``weights_only=False``), then a save with
    :class:`FileSystemWriter`."""
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    from ..serialization import load

    state_dict = load(torch_save_path, map_location="cpu", weights_only=weights_only, mmap=True)
    _save_state_dict(state_dict, storage_writer=FileSystemWriter(dcp_checkpoint_dir), no_dist=True)
