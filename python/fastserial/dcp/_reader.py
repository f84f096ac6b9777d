"""``FileSystemReader`` / ``FsspecReader``: DCP storage readers that read only the bytes
asked for, straight into the destination tensor when they can.

For each tensor item the reader parses the blob's zip directory and ``data.pkl`` (a few
small reads), computes where the requested box lies, and reads it: straight into the
destination when it is contiguous CPU memory and the box is one byte range of the blob
(any run of whole rows of a row-major chunk), else the range covering the box into a
buffer that is then copied. Reads are grouped by file, sorted by offset and run on
``thread_count`` threads with the GIL released.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import _fastserial as _native
from .._fastserial import CheckpointError
from ._blob import crc32, describe_blob, tensor_bytes
from ._files import LocalFiles, files_for_url
from ._metadata import load_metadata, safe_relative_path
from ._writer import _fsspec_validate, default_thread_count

#: Blobs of a local file up to this size are read whole in one request while they are
#: described (their data then comes from memory); blobs on other filesystems always are.
_SMALL_BLOB = 64 << 10
#: Bytes of one read; big boxes are split so several threads share them.
_PIECE = 64 << 20
#: Requested bytes resolved and read per batch (bounds what a planner may allocate).
_BATCH_BYTES = 1 << 30


class _BlobView:
    """``get(offset, n)`` over one blob of a shard file, served from a head and a tail
    window (or the whole blob when it is small)."""

    def __init__(self, source, base: int, length: int) -> None:
        self.source = source
        self.base = base
        self.length = length
        self._windows: list[tuple[int, bytes]] = []

    def window_ranges(self) -> list[tuple[int, int]]:
        if getattr(self.source, "fd", None) is not None and self.length > _SMALL_BLOB:
            return []  # a local file: the archive reader reads the directory itself
        return [(self.base, self.length)]

    def archive(self, display: str):
        """The blob as an archive of fastserial's native reader: a window of a local
        file, or the bytes fetched whole."""
        fd = getattr(self.source, "fd", None)
        if fd is not None:  # read through a duplicate of the source's descriptor
            return _native.Archive.open_fd(fd, display, window=(self.base, self.length))
        return _native.Archive.open_buffer(self.get(0, self.length), display)

    def load_windows(self) -> None:
        self._windows = [(a - self.base, self.source.get(a, n)) for a, n in self.window_ranges()]

    def cached(self, offset: int, n: int) -> Optional[memoryview]:
        """Bytes already fetched with a window, or None."""
        for start, data in self._windows:
            if start <= offset and offset + n <= start + len(data):
                return memoryview(data)[offset - start : offset - start + n]
        return None

    def get(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.length:
            raise CheckpointError(
                f"{self.source.display}: blob at offset {self.base}: a read of {n} bytes at "
                f"{offset} leaves its {self.length} bytes"
            )
        for start, data in self._windows:
            if start <= offset and offset + n <= start + len(data):
                return data[offset - start : offset - start + n]
        return self.source.get(self.base + offset, n)


def _contiguous(lengths, strides) -> bool:
    expected = 1
    for n, s in zip(reversed(lengths), reversed(strides)):
        if n != 1:
            if s != expected:
                return False
            expected *= n
    return True


def _pieces(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + _PIECE, n)) for a in range(0, n, _PIECE)]


class _ReadJob:
    """One request: a box of a blob's tensor into ``dst``."""

    __slots__ = ("source", "sinfo", "offsets", "lengths", "dst", "key")

    def __init__(self, source, sinfo, offsets, lengths, dst, key) -> None:
        self.source = source
        self.sinfo = sinfo
        self.offsets = tuple(offsets)
        self.lengths = tuple(lengths)
        self.dst = dst
        self.key = key


class _ReadEngine:
    """Serves tensor boxes and byte blobs from shard files (shared by the readers and
    the conversions)."""

    def __init__(self, files, threads: int, verify: bool) -> None:
        self.files = files
        self.threads = max(1, threads)
        self.verify = verify
        self._sources: dict[str, Any] = {}
        self._records: dict[tuple[str, int], Any] = {}
        self._views: dict[tuple[str, int], _BlobView] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def __enter__(self) -> _ReadEngine:
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastserial-dcp")
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for s in self._sources.values():
            s.close()
        self._sources.clear()

    def source(self, relative_path: str):
        s = self._sources.get(relative_path)
        if s is None:
            safe_relative_path(relative_path, repr(self.files))
            s = self._sources[relative_path] = self.files.open_source(relative_path)
        return s

    def _check_span(self, source, sinfo) -> None:
        if sinfo.offset + sinfo.length > source.size:
            raise CheckpointError(
                f"{source.display}: the metadata puts a blob at [{sinfo.offset}, "
                f"{sinfo.offset + sinfo.length}), past the file's end ({source.size} bytes): "
                "truncated or mismatched shard file"
            )

    def read_bytes(self, sinfo) -> bytes:
        source = self.source(sinfo.relative_path)
        self._check_span(source, sinfo)
        return source.get(sinfo.offset, sinfo.length)

    def records(self, jobs: list[_ReadJob]) -> list:
        """The parsed blob of each job (parsing each blob once; the windows of all new
        blobs fetched together)."""
        views = {}
        for job in jobs:
            if job.key not in self._records and job.key not in views:
                self._check_span(job.source, job.sinfo)
                views[job.key] = _BlobView(job.source, job.sinfo.offset, job.sinfo.length)
        by_source: dict[int, list] = {}
        for v in views.values():
            by_source.setdefault(id(v.source), [v.source, []])[1].extend(v.window_ranges())
        for source, ranges in by_source.values():
            source.prefetch(ranges)
        for key, view in views.items():
            view.load_windows()
            self._views[key] = view
            display = f"{view.source.display}@{view.base}"
            # None: loaded whole by fastserial.load
            self._records[key] = describe_blob(view.archive(display), display)
        return [self._records[job.key] for job in jobs]

    def run(self, jobs: list[_ReadJob]) -> None:
        """Fills every job's ``dst``."""
        jobs = sorted(jobs, key=lambda j: (j.sinfo.relative_path, j.sinfo.offset))
        tasks: list[Callable[[], None]] = []
        try:
            for job, rec in zip(jobs, self.records(jobs)):
                tasks.extend(self._tasks(job, rec))
        finally:
            views, self._views = self._views, {}
        del views  # the windows served what they could while the tasks were made
        if self._pool is None or len(tasks) < 2:
            for t in tasks:
                t()
            return
        futures = [self._pool.submit(t) for t in tasks]
        for f in futures:
            f.result()

    def _tasks(self, job: _ReadJob, rec) -> list[Callable[[], None]]:
        import torch

        dst = job.dst
        where = f"{job.source.display}@{job.sinfo.offset}"
        if tuple(dst.shape) != job.lengths:
            raise CheckpointError(
                f"{where}: the destination has size {tuple(dst.shape)}, the request {job.lengths}"
            )
        if rec is None:
            return [lambda: self._load_whole(job)]
        ndim = len(rec.size)
        if len(job.offsets) != ndim or len(job.lengths) != ndim:
            raise CheckpointError(
                f"{where}: a {len(job.lengths)}-d request for a {ndim}-d stored tensor"
            )
        if any(o + n > s for o, n, s in zip(job.offsets, job.lengths, rec.size)):
            raise CheckpointError(
                f"{where}: request {job.offsets}+{job.lengths} exceeds the stored size {rec.size}"
            )
        numel = 1
        for n in job.lengths:
            numel *= n
        if numel == 0:
            return []
        first = rec.storage_offset + sum(o * s for o, s in zip(job.offsets, rec.stride))
        base = job.sinfo.offset + rec.data_start
        if self.verify:
            return [lambda: self._read_verified(job, rec, first)]
        direct = (
            _contiguous(job.lengths, rec.stride)
            and dst.device.type == "cpu"
            and dst.dtype == rec.dtype
            and dst.is_contiguous()
            and not dst.is_conj()
            and not dst.is_neg()
        )
        if direct:
            view = tensor_bytes(dst)
            start = base + first * rec.itemsize
            blob = self._views.get(job.key)
            fetched = blob.cached(start - job.sinfo.offset, len(view)) if blob else None
            if fetched is not None:  # a small blob read whole while parsing it
                view[:] = fetched
                return []
            src = job.source
            return [
                (lambda a=a, b=b: src.read_into(start + a, view[a:b]))
                for a, b in _pieces(len(view))
            ]
        span = 1 + sum((n - 1) * s for n, s in zip(job.lengths, rec.stride))

        def copy() -> None:
            buf = torch.empty(span, dtype=rec.dtype)
            job.source.read_into(base + first * rec.itemsize, tensor_bytes(buf))
            dst.copy_(buf.as_strided(job.lengths, rec.stride, 0))

        return [copy]

    def _read_verified(self, job: _ReadJob, rec, first: int) -> None:
        import torch

        whole = torch.empty(rec.data_len // rec.itemsize, dtype=rec.dtype)
        view = tensor_bytes(whole)
        job.source.read_into(job.sinfo.offset + rec.data_start, view)
        if rec.data_len % rec.itemsize or crc32(view) != rec.crc:
            raise CheckpointError(
                f"{job.source.display}@{job.sinfo.offset}: CRC32 mismatch in the tensor data"
                " (the shard file is corrupted)"
            )
        job.dst.copy_(whole.as_strided(job.lengths, rec.stride, first))

    def _load_whole(self, job: _ReadJob) -> None:
        """A blob fastserial does not decode itself: ``fastserial.load`` (weights_only)."""
        import torch

        from ..serialization import load

        data = job.source.get(job.sinfo.offset, job.sinfo.length)
        try:
            tensor = load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:
            # A refused global (UnpicklingError) or a broken archive: the shard is bad.
            raise CheckpointError(
                f"{job.source.display}@{job.sinfo.offset}: the blob does not load safely: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{job.source.display}@{job.sinfo.offset}: holds a {type(tensor).__name__}, "
                "not a tensor"
            )
        if (
            tensor.layout != torch.strided
            or tensor.dim() != len(job.lengths)
            or any(o + n > s for o, n, s in zip(job.offsets, job.lengths, tensor.shape))
        ):
            raise CheckpointError(
                f"{job.source.display}@{job.sinfo.offset}: holds a {tensor.layout} tensor of "
                f"size {tuple(tensor.shape)}; the metadata asks for {job.offsets}+{job.lengths}"
            )
        for dim, (o, n) in enumerate(zip(job.offsets, job.lengths)):
            tensor = tensor.narrow(dim, o, n)
        job.dst.copy_(tensor)


class FileSystemReader(StorageReader):
    """A DCP ``StorageReader`` for a local directory; reads any DCP checkpoint written
    by torch's ``FileSystemWriter`` or fastserial's.

    ``.metadata`` is unpickled through an allow-list (a crafted one is refused with
    :class:`fastserial.CheckpointError`), tensor blobs are decoded safely. Requests are
    read straight into their destination when possible, and only the rows a rank needs
    when resharding. ``verify=True`` checks every tensor's CRC32 (reading its whole
    record)."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        _extension_registry=None,
        *,
        thread_count: Optional[int] = None,
        verify: bool = False,
    ) -> None:
        super().__init__()
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, not {thread_count}")
        self.thread_count = thread_count
        self.verify = verify
        self._extension_registry = _extension_registry
        self.storage_data: dict = {}
        self.rank: Optional[int] = None
        self.use_collectives = True
        self.load_id = os.urandom(16).hex()
        self._set_path(path)

    def _set_path(self, path) -> None:
        self.path = FileSystem().init_path(path)
        self._files = LocalFiles(os.fspath(path))

    def reset(self, checkpoint_id: Union[str, os.PathLike, None] = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.load_id = os.urandom(16).hex()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        data = self._files.read_all(name)
        md = load_metadata(data, f"{self._files.join(name)}")
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if not isinstance(getattr(metadata, "storage_data", None), dict):
            raise CheckpointError(f"{self.path}: the metadata has no storage_data")
        self.storage_data = metadata.storage_data
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _info(self, index):
        try:
            return self.storage_data[index]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: the metadata has no storage entry for {index}"
            ) from None

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        threads = self.thread_count or default_thread_count()
        with _ReadEngine(self._files, threads, self.verify) as engine:
            transformed = []
            batch: list = []
            batch_bytes = 0
            items = sorted(
                plan.items,
                key=lambda r: (
                    self._info(r.storage_index).relative_path,
                    self._info(r.storage_index).offset,
                ),
            )
            for req in items:
                sinfo = self._info(req.storage_index)
                if getattr(sinfo, "transform_descriptors", None):
                    transformed.append(req)
                    continue
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(engine.read_bytes(sinfo)))
                    continue
                batch.append(req)
                batch_bytes += sinfo.length
                if batch_bytes >= _BATCH_BYTES:
                    self._read_tensors(engine, batch, planner)
                    batch, batch_bytes = [], 0
            if batch:
                self._read_tensors(engine, batch, planner)
            if transformed:
                self._check_extensions(transformed)
                self._read_transformed(transformed, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_tensors(self, engine: _ReadEngine, reqs: list, planner: LoadPlanner) -> None:
        jobs = []
        targets = []
        for req in reqs:
            sinfo = self._info(req.storage_index)
            dst = planner.resolve_tensor(req).detach()
            targets.append((req, dst))
            jobs.append(
                _ReadJob(
                    engine.source(sinfo.relative_path),
                    sinfo,
                    req.storage_offsets,
                    req.lengths,
                    dst,
                    (sinfo.relative_path, sinfo.offset),
                )
            )
        engine.run(jobs)
        for req, dst in targets:
            planner.commit_tensor(req, dst)

    def _check_extensions(self, reqs: list) -> None:
        """Every stream extension the metadata names is one torch's registry knows (an
        unknown one is a malformed checkpoint, not a ValueError of torch's reader)."""
        try:
            from torch.distributed.checkpoint._extension import ExtensionRegistry
        except ImportError:  # torch < 2.7 has no stream extensions at all
            raise CheckpointError(
                f"{self.path}: '{reqs[0].storage_index.fqn}' was written through a stream "
                "extension, which this torch does not have"
            ) from None
        registry = self._extension_registry or ExtensionRegistry()
        for req in reqs:
            descriptors = self._info(req.storage_index).transform_descriptors
            try:
                registry.from_descriptor_list(descriptors)
            except ValueError as e:
                raise CheckpointError(
                    f"{self.path}: '{req.storage_index.fqn}' was written through a stream "
                    f"extension this torch does not have: {e}"
                ) from e

    def _read_transformed(self, reqs: list, planner: LoadPlanner) -> None:
        """Items written through stream extensions: torch's own reader code."""
        from torch.distributed.checkpoint.filesystem import FileSystemReader as TorchReader

        torch_reader = TorchReader(os.fspath(self.path), self._extension_registry)
        torch_reader.storage_data = self.storage_data
        torch_reader.read_data(LoadPlan(reqs), planner).wait()

    @property
    def checkpoint_id(self) -> Union[str, os.PathLike]:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)


class FsspecReader(FileSystemReader):
    """:class:`FileSystemReader` for an fsspec URL (``FsspecReader(url,
    **storage_options)``): ``file://`` reads natively, other filesystems with byte-range
    requests (``cat_ranges``)."""

    def __init__(self, path: Union[str, os.PathLike], **storage_options: Any) -> None:
        self._storage_options = storage_options
        super().__init__(path)

    def _set_path(self, path) -> None:
        self._files, self.path = files_for_url(path, self._storage_options)

    def _read_transformed(self, reqs: list, planner: LoadPlanner) -> None:
        from torch.distributed.checkpoint.fsspec_filesystem import FsspecReader as TorchReader

        torch_reader = TorchReader(self.path, **self._storage_options)
        torch_reader.storage_data = self.storage_data
        torch_reader.read_data(LoadPlan(reqs), planner).wait()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike]) -> bool:
        return _fsspec_validate(checkpoint_id)
