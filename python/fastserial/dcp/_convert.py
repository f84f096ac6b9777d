"""Conversions between a DCP checkpoint and one ``torch.save`` file."""

from __future__ import annotations

import io
import os
from typing import Union

from .. import _fastserial as _native
from ._blob import TensorPickler, TensorStandIn, format_records, tensor_bytes
from ._reader import FileSystemReader, _ReadEngine, _ReadJob
from ._writer import FileSystemWriter, default_thread_count


def _archive_prefix(path: str) -> str:
    """The top folder torch names an archive written to ``path``: the file name without
    its last extension."""
    base = os.path.basename(path)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem or "archive"


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
            if fqn in planner_data:
                set_element(sd, planner_data[fqn], value)
            else:
                sd[fqn] = value
        pickled = io.BytesIO()
        pickler = TensorPickler(pickled, protocol=2)
        pickler.dump(sd)
        records = {v.key: v for v, _, _ in tensors if v.key is not None}
        records.update(pickler.storages)
        entries = {id(v): (fqn, entry) for v, fqn, entry in tensors}

        writer = _native.ArchiveWriter(out, _archive_prefix(out), atomic=True, durable=fsync)
        try:
            writer.write_record("data.pkl", pickled.getbuffer())
            for name, data in format_records():
                writer.write_record(name, data)
            for key in sorted(records, key=int):
                value = records[key]
                if not isinstance(value, TensorStandIn):
                    writer.write_record(f"data/{key}", _storage_bytes(value))
                    continue
                fqn, entry = entries[id(value)]
                numel = 1
                for s in entry.size:
                    numel *= s
                covered = 0
                for chunk in entry.chunks:
                    n = 1
                    for s in chunk.sizes:
                        n *= s
                    covered += n
                make = torch.empty if covered >= numel else torch.zeros
                tensor = make(entry.size, dtype=entry.properties.dtype)
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
            writer.write_record("version", b"3\n")
            writer.write_record(".data/serialization_id", writer.serialization_id().encode())
            writer.finish(fsync=fsync)
        except BaseException:
            writer.abort()
            raise


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
