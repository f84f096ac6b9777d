"""fastserial as the storage of ``torch.distributed.checkpoint`` (DCP).

Switching is an import change: the classes have torch's names and arguments::

    import torch.distributed.checkpoint as dcp
    from fastserial.dcp import FileSystemReader, FileSystemWriter

    dcp.save(state_dict, storage_writer=FileSystemWriter("ckpt"))   # or dcp.async_save
    dcp.load(state_dict, storage_reader=FileSystemReader("ckpt"))   # any world size

The checkpoint is torch's own DCP layout (torch's ``FileSystemReader`` and tools read
fastserial's checkpoints, fastserial reads torch's), with tensor data 4 KiB-aligned in
the shard files. Saves are crash-safe: shard files get new names on every save and
``.metadata`` is committed atomically, so a rank that dies at any moment leaves the
previous checkpoint loadable; files the new checkpoint does not use are removed only
after the commit. ``.metadata`` is read through an allow-list, so a crafted checkpoint
gets :class:`fastserial.CheckpointError` instead of running code.
"""

from ._convert import dcp_to_torch_save, torch_save_to_dcp
from ._reader import FileSystemReader, FsspecReader
from ._writer import FileSystemWriter, FsspecWriter

__all__ = [
    "FileSystemWriter",
    "FileSystemReader",
    "FsspecWriter",
    "FsspecReader",
    "dcp_to_torch_save",
    "torch_save_to_dcp",
]
