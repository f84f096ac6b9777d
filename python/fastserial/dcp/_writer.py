"""``FileSystemWriter`` / ``FsspecWriter``: DCP storage writers with torch's layout and a
crash-safe commit.

Each save writes shard files under names no earlier save used
(``__{rank}_{n}-{token}.distcp``, the token drawn on each rank in ``write_data``), then
the coordinator commits ``.metadata`` atomically and only then removes the files the
new metadata does not name. A save that dies at any moment leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import secrets
from concurrent.futures import Future as _CFuture
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

try:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    _TORCH_SAVE = SerializationFormat.TORCH_SAVE
except ImportError:  # torch < 2.7: the torch.save layout is the only one
    SerializationFormat = None
    _TORCH_SAVE = None

from .._fastserial import get_num_threads
from ._blob import TensorFrame, aligned_blob_offset, crc32, tensor_bytes
from ._files import LocalFiles, files_for_url, remove_unreferenced, start_writeback
from ._metadata import DCP_VERSION

#: Bytes of one positional write (then its writeback is started); big tensors are split
#: so several threads share them.
_PIECE = 32 << 20
#: The smallest piece worth a thread of its own.
_MIN_PIECE = 4 << 20


def default_thread_count() -> int:
    """fastserial's threads divided among the ranks of this host (``LOCAL_WORLD_SIZE``)."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, get_num_threads() // max(local, 1))


def _refuse_unsupported(cache_staged_state_dict, _extensions, serialization_format) -> None:
    if cache_staged_state_dict:
        raise ValueError(
            "fastserial.dcp writers are not AsyncStagers: cache_staged_state_dict=True is "
            "not supported (dcp.async_save stages with its DefaultStager)"
        )
    if _extensions:
        raise ValueError(
            "fastserial.dcp writers do not support stream _extensions; use "
            "torch.distributed.checkpoint.FileSystemWriter for them"
        )
    if serialization_format is not None and serialization_format != _TORCH_SAVE:
        raise ValueError(
            f"fastserial.dcp writes SerializationFormat.TORCH_SAVE only, not {serialization_format}"
        )


def _pwrite_all(fd: int, data, offset: int, writeback: bool = False) -> None:
    view = memoryview(data)
    start, total = offset, len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    if writeback:
        start_writeback(fd, start, total)


def _pieces(n: int, threads: int) -> list[tuple[int, int]]:
    if n == 0:
        return []
    size = min(_PIECE, max(_MIN_PIECE, -(-n // max(threads, 1))))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


class _Staged:
    """One item ready to write: either a tensor with its frame, or finished bytes."""

    __slots__ = ("tensor", "frame", "blob", "copied")

    def __init__(self, tensor=None, frame=None, blob=None, copied: int = 0) -> None:
        self.tensor = tensor
        self.frame = frame
        self.blob = blob
        self.copied = copied


def _stage(item, data) -> _Staged:
    """A resolved item as CPU-contiguous data (copying only when it must)."""
    import torch

    if item.type == WriteItemType.BYTE_IO:
        if not isinstance(data, io.BytesIO):
            raise TypeError(f"'{item.index.fqn}': a BYTE_IO item resolved to {type(data)}")
        return _Staged(blob=data.getbuffer())
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"'{item.index.fqn}': a tensor item resolved to {type(data)}")
    t = data.detach()
    plain = (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and t.device.type != "meta"
    )
    if not plain:
        # What torch's writer does, for what fastserial does not frame itself.
        buf = io.BytesIO()
        torch.save(t.cpu() if t.device.type != "cpu" else t, buf)
        return _Staged(blob=buf.getbuffer())
    copied = 0
    if t.device.type != "cpu":
        t = t.to("cpu")
        copied = t.numel() * t.element_size()
    if t.is_conj():
        t = t.resolve_conj()
        copied = t.numel() * t.element_size()
    if t.is_neg():
        t = t.resolve_neg()
        copied = t.numel() * t.element_size()
    if not t.is_contiguous():
        t = t.contiguous()
        copied = t.numel() * t.element_size()
    nbytes = t.numel() * t.element_size()
    return _Staged(tensor=t, frame=TensorFrame(t.dtype, t.shape, nbytes), copied=copied)


class FileSystemWriter(StorageWriter):
    """A DCP ``StorageWriter`` for a local directory, with torch's arguments.

    The checkpoint is the one torch's ``FileSystemWriter`` writes (torch's reader and
    tools read it), except that shard files get new names on every save, tensor data
    is 4 KiB-aligned in them, and ``.metadata`` is committed atomically: a save killed
    at any point leaves the previous checkpoint loadable. ``thread_count=None`` uses
    ``fastserial.get_num_threads()`` divided by the ranks on this host
    (``LOCAL_WORLD_SIZE``); ``single_file_per_rank=True`` writes one file per rank
    whatever ``thread_count`` is.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: Optional[int] = None,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions=None,
        serialization_format: SerializationFormat = _TORCH_SAVE,
    ) -> None:
        _refuse_unsupported(cache_staged_state_dict, _extensions, serialization_format)
        super().__init__()
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, not {thread_count}")
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.overwrite = overwrite
        self.rank: Optional[int] = None
        self.use_collectives = True
        self.is_coordinator = False
        self.save_id = secrets.token_hex(16)
        self._set_path(path)

    def _set_path(self, path) -> None:
        self.path = Path(path)
        self._files = LocalFiles(os.fspath(path))

    # ------------------------------------------------------------------ StorageWriter

    def reset(self, checkpoint_id: Union[str, os.PathLike, None] = None) -> None:
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.save_id = secrets.token_hex(16)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def storage_meta(self) -> Optional[StorageMeta]:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def _metadata_name(self) -> str:
        if not self.use_collectives and self.rank is not None:
            return f"__{self.rank}.metadata"
        return ".metadata"

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._files.mkdir()
        if not self.overwrite:
            existing = ".metadata" if self.use_collectives else "__0.metadata"
            if self._files.exists(existing):
                raise RuntimeError(
                    f"Checkpoint already exists and self.overwrite={self.overwrite}."
                )
        # Nothing goes into plan.storage_data: with plan caching DCP replays an earlier
        # save's final plans, storage_data included, so per-save state lives here.
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = self.rank if self.rank is not None else _current_rank()
        token = secrets.token_hex(6)  # fresh on every rank and every save
        tensors = [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        blobs = [i for i in plan.items if i.type == WriteItemType.BYTE_IO]
        ordered = tensors + blobs  # byte blobs last, after the aligned tensor data
        if not ordered:
            groups = []
        elif self.single_file_per_rank:
            groups = [ordered]
        else:
            groups = [[i] for i in ordered]
        files = [(f"__{rank}_{n}-{token}.distcp", g) for n, g in enumerate(groups)]
        threads = self.thread_count or default_thread_count()
        if self._files.native:
            results = self._write_local(files, planner, threads)
        else:
            results = self._write_streams(files, planner, threads)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.version = DCP_VERSION
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        name = self._metadata_name()
        self._files.commit(name, pickle.dumps(metadata), self.sync_files)
        referenced = {info.relative_path for info in storage_md.values()}
        rank_prefix = f"__{self.rank}_" if name != ".metadata" else None
        remove_unreferenced(self._files, referenced, name, rank_prefix)

    @property
    def checkpoint_id(self) -> Union[str, os.PathLike]:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    # ------------------------------------------------------------------ writing

    def _write_local(self, files, planner, threads: int) -> list[WriteResult]:
        """Positional writes on ``threads`` threads (the GIL is released in ``os.pwrite``
        and the native CRC); ``planner.resolve_data`` is called lazily, and copies (device
        to CPU, non-contiguous) run at most ``per_thread_copy_ahead`` per thread ahead of
        the writes."""
        store = self._files
        budget = max(self.per_thread_copy_ahead, 0) * threads
        created: list[tuple[str, int]] = []
        results: list[WriteResult] = []
        tails: list[tuple[int, int, Any, _CFuture]] = []
        pending: collections.deque = collections.deque()
        in_flight = 0
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastserial-dcp")

        def settle(entry) -> int:
            futures, staged = entry
            for f in futures:
                f.result()
            return staged.copied

        try:
            for name, items in files:
                fd = store.create(name)
                created.append((name, fd))
                cursor = 0
                for item in items:
                    staged = _stage(item, planner.resolve_data(item))
                    if staged.blob is not None:
                        blob = staged.blob
                        futures = [pool.submit(_pwrite_all, fd, blob, cursor)] if len(blob) else []
                        info = _StorageInfo(name, cursor, len(blob))
                        cursor += len(blob)
                    else:
                        frame = staged.frame
                        offset = aligned_blob_offset(cursor, len(frame.head))
                        data_at = offset + len(frame.head)
                        view = tensor_bytes(staged.tensor)
                        futures = [pool.submit(_pwrite_all, fd, frame.head, offset)]
                        futures += [
                            pool.submit(_pwrite_all, fd, view[a:b], data_at + a, self.sync_files)
                            for a, b in _pieces(len(view), threads)
                        ]
                        crc = pool.submit(crc32, view)
                        futures.append(crc)
                        tails.append((fd, data_at + frame.nbytes, frame, crc))
                        info = _StorageInfo(name, offset, frame.length)
                        cursor = offset + frame.length
                    results.append(WriteResult(item.index, info.length, info))
                    pending.append((futures, staged))
                    in_flight += staged.copied
                    while in_flight > budget and len(pending) > 1:
                        in_flight -= settle(pending.popleft())
            while pending:
                settle(pending.popleft())
            for fd, at, frame, crc in tails:
                _pwrite_all(fd, frame.tail(crc.result()), at)
            if self.sync_files:
                for f in [pool.submit(os.fsync, fd) for _, fd in created]:
                    f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for name, fd in created:
                os.close(fd)
                store.remove(name)
            raise
        pool.shutdown(wait=True)
        for _, fd in created:
            os.close(fd)
        return results

    def _write_streams(self, files, planner, threads: int) -> list[WriteResult]:
        """fsspec: each file is one sequential stream (an object store's upload)."""
        store = self._files
        created: list[str] = []
        results: list[WriteResult] = []
        try:
            for name, items in files:
                created.append(name)
                with store.open_write(name) as out:
                    cursor = 0
                    for item in items:
                        staged = _stage(item, planner.resolve_data(item))
                        if staged.blob is not None:
                            out.write(staged.blob)
                            info = _StorageInfo(name, cursor, len(staged.blob))
                            cursor += len(staged.blob)
                        else:
                            frame = staged.frame
                            offset = aligned_blob_offset(cursor, len(frame.head))
                            view = tensor_bytes(staged.tensor)
                            out.write(bytes(offset - cursor))
                            out.write(frame.head)
                            if len(view):
                                out.write(view)
                            out.write(frame.tail(crc32(view)))
                            info = _StorageInfo(name, offset, frame.length)
                            cursor = offset + frame.length
                        results.append(WriteResult(item.index, info.length, info))
        except BaseException:
            for name in created:
                try:
                    store.remove(name)
                except Exception:
                    pass
            raise
        return results


class FsspecWriter(FileSystemWriter):
    """:class:`FileSystemWriter` for an fsspec URL (``FsspecWriter(url, ...,
    **storage_options)``). ``file://`` URLs take the native local path; other
    filesystems stream each shard file, and on object stores ``.metadata`` is one put
    (atomic there)."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: Optional[int] = None,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions=None,
        serialization_format: SerializationFormat = _TORCH_SAVE,
        **storage_options: Any,
    ) -> None:
        self._storage_options = storage_options
        super().__init__(
            path,
            single_file_per_rank,
            sync_files,
            thread_count,
            per_thread_copy_ahead,
            cache_staged_state_dict,
            overwrite,
            _extensions,
            serialization_format,
        )

    def _set_path(self, path) -> None:
        self._files, self.path = files_for_url(path, self._storage_options)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike]) -> bool:
        return _fsspec_validate(checkpoint_id)


def _fsspec_validate(checkpoint_id) -> bool:
    if isinstance(checkpoint_id, Path):
        return False
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        return False
    try:
        url_to_fs(checkpoint_id)
    except ValueError:
        return False
    return True


def _current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
