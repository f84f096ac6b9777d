"""Where a checkpoint's files live: a local directory (positional reads and writes on
descriptors, with the GIL released by the ``os`` calls) or any fsspec filesystem.

Both are plain picklable objects that hold no open file between calls, so a writer
can travel to ``async_save``'s checkpoint process.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from .._fastserial import CheckpointError
from ._metadata import load_metadata

#: fsspec protocols of object stores: no atomic rename, but a single put is atomic.
_OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "tos", "cos", "obs"}
)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems do not open directories; the files are synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None. Called through ctypes, which releases
    the GIL for the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Asks the kernel to start writing a range to disk now, so the final fsync waits
    for the tail only (what fastserial's native writer does every 32 MiB)."""
    if _SYNC_FILE_RANGE is not None and n > 0:
        _SYNC_FILE_RANGE(fd, offset, n, _SYNC_FILE_RANGE_WRITE)


def metadata_tmp_prefix(name: str) -> str:
    return f"{name}."


class LocalSource:
    """One local shard file opened for reading."""

    def __init__(self, path: str, display: str) -> None:
        self.display = display
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size

    def get(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        while len(data) < n:
            more = os.pread(self.fd, n - len(data), offset + len(data))
            if not more:
                raise CheckpointError(
                    f"{self.display}: truncated: {n} bytes at offset {offset} asked, "
                    f"the file has {self.size}"
                )
            data += more
        return data

    def read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        n = len(view)
        while done < n:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(
                    f"{self.display}: truncated: {n} bytes at offset {offset} asked, "
                    f"the file has {self.size}"
                )
            done += got

    def prefetch(self, ranges) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalFiles:
    """A checkpoint directory on a local (or locally mounted) filesystem."""

    native = True

    def __init__(self, root: str) -> None:
        self.root = os.fspath(root)

    def join(self, name: str) -> str:
        return os.path.join(self.root, name)

    def mkdir(self) -> None:
        if os.path.isdir(self.root):
            return
        os.makedirs(self.root, exist_ok=True)
        # A new checkpoint directory survives a power loss once its parent's entry is
        # on disk, as its files do once the directory is synced at the commit.
        _fsync_dir(os.path.dirname(os.path.abspath(self.root)))

    def exists(self, name: str) -> bool:
        return os.path.exists(self.join(name))

    def read_all(self, name: str) -> bytes:
        with open(self.join(name), "rb") as f:
            return f.read()

    def open_source(self, name: str) -> LocalSource:
        return LocalSource(self.join(name), self.join(name))

    def create(self, name: str) -> int:
        """A new file: a name is never reopened for writing once created."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        return os.open(self.join(name), flags, 0o644)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self.join(name))
        except FileNotFoundError:
            pass

    def listdir(self) -> list[str]:
        return os.listdir(self.root)

    def commit(self, name: str, data: bytes, sync: bool) -> None:
        """Makes ``data`` the content of ``name`` atomically: written to a fresh
        temporary name, fsynced, renamed over ``name``; the directory is fsynced before
        the rename (the shard files' entries) and after it (the commit itself)."""
        tmp = f"{metadata_tmp_prefix(name)}{secrets.token_hex(8)}.tmp"
        fd = self.create(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.remove(tmp)
            raise
        os.close(fd)
        if sync:
            _fsync_dir(self.root)
        os.replace(self.join(tmp), self.join(name))
        if sync:
            _fsync_dir(self.root)

    def __repr__(self) -> str:
        return f"LocalFiles({self.root!r})"


class FsspecSource:
    """One shard file on an fsspec filesystem: reads are byte ranges."""

    def __init__(self, fs, path: str, display: str) -> None:
        self.fs = fs
        self.path = path
        self.display = display
        self.size = fs.size(path)
        self._cache: dict[tuple[int, int], bytes] = {}

    def prefetch(self, ranges) -> None:
        """Fetches several ranges in one call (concurrent on async filesystems)."""
        ranges = [r for r in ranges if r not in self._cache and r[1] > 0]
        if not ranges:
            return
        datas = self.fs.cat_ranges(
            [self.path] * len(ranges), [a for a, _ in ranges], [a + n for a, n in ranges]
        )
        for r, data in zip(ranges, datas):
            if isinstance(data, Exception):
                raise data
            self._cache[r] = data

    def get(self, offset: int, n: int) -> bytes:
        data = self._cache.pop((offset, n), None)
        if data is None:
            data = self.fs.cat_file(self.path, start=offset, end=offset + n) if n else b""
        if len(data) != n:
            raise CheckpointError(
                f"{self.display}: truncated: {n} bytes at offset {offset} asked, "
                f"the file has {self.size}"
            )
        return data

    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.get(offset, len(view))

    def close(self) -> None:
        self._cache.clear()


class FsspecFiles:
    """A checkpoint directory on an fsspec filesystem (object stores included)."""

    native = False

    def __init__(self, fs, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or root
        self.url = url

    @property
    def object_store(self) -> bool:
        protocols = self.fs.protocol
        if isinstance(protocols, str):
            protocols = (protocols,)
        return any(p in _OBJECT_STORES for p in protocols)

    def join(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def mkdir(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def read_all(self, name: str) -> bytes:
        return self.fs.cat_file(self.join(name))

    def open_source(self, name: str) -> FsspecSource:
        return FsspecSource(self.fs, self.join(name), f"{self.url.rstrip('/')}/{name}")

    def open_write(self, name: str):
        return self.fs.open(self.join(name), "wb")

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.join(name))
        except FileNotFoundError:
            pass

    def listdir(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(str(p).rstrip("/")) for p in entries]

    def commit(self, name: str, data: bytes, sync: bool) -> None:
        """Object stores: one put (atomic there). Elsewhere: a temporary file moved
        over ``name``."""
        if self.object_store:
            self.fs.pipe_file(self.join(name), data)
            return
        tmp = f"{metadata_tmp_prefix(name)}{secrets.token_hex(8)}.tmp"
        self.fs.pipe_file(self.join(tmp), data)
        try:
            self.fs.mv(self.join(tmp), self.join(name))
        except BaseException:
            self.remove(tmp)
            raise

    def __repr__(self) -> str:
        return f"FsspecFiles({self.url!r})"


def files_for_url(url: Any, storage_options: dict) -> tuple[Any, Any]:
    """(backend, checkpoint_id) for an fsspec URL: ``file://`` and plain local paths
    take the native local backend."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:  # pragma: no cover - fsspec is a torch dependency
        raise ImportError("FsspecWriter/FsspecReader need fsspec (pip install fsspec)") from e
    fs, path = url_to_fs(os.fspath(url), **storage_options)
    protocols = fs.protocol if not isinstance(fs.protocol, str) else (fs.protocol,)
    if any(p in ("file", "local") for p in protocols):
        return LocalFiles(path), url
    return FsspecFiles(fs, path, os.fspath(url)), url


def _is_metadata_name(name: str) -> bool:
    """`.metadata`, or a rank-local `__<rank>.metadata`."""
    if name == ".metadata":
        return True
    return name.startswith("__") and name.endswith(".metadata") and name[2:-9].isdigit()


def remove_unreferenced(
    files, referenced: set, metadata_name: str, rank_prefix: Optional[str]
) -> None:
    """After a commit: removes the directory's shard files that the committed metadata
    does not name (a failed or older save's), and dead commits' temporary files.
    ``rank_prefix`` limits this to one rank's files (rank-local metadata)."""
    try:
        names = files.listdir()
    except OSError as e:
        warnings.warn(f"could not list {files!r} to remove stale files: {e}", stacklevel=3)
        return
    # The shard files another committed metadata of this directory names (a
    # rank-local `__r.metadata` beside `.metadata`, or the reverse) stay too: removing
    # them would break a checkpoint that is still committed. When one cannot be read,
    # nothing is removed (what is left costs only disk, until the next save).
    referenced = set(referenced)
    for other in names:
        if other != metadata_name and _is_metadata_name(other):
            try:
                md = load_metadata(files.read_all(other), f"{files!r}/{other}")
            except Exception as e:  # noqa: BLE001 - any failure: keep every file
                warnings.warn(
                    f"kept stale files: could not read {other!r} to see what it names: {e}",
                    stacklevel=3,
                )
                return
            referenced.update(info.relative_path for info in md.storage_data.values())
    tmp_prefix = metadata_tmp_prefix(metadata_name)
    stale = [
        name
        for name in names
        if (
            name.endswith(".distcp")
            and name not in referenced
            and (rank_prefix is None or name.startswith(rank_prefix))
        )
        or (name.startswith(tmp_prefix) and name.endswith(".tmp"))
    ]

    def remove(name: str) -> None:
        try:
            files.remove(name)
        except OSError as e:
            warnings.warn(f"could not remove stale file {name!r}: {e}", stacklevel=4)

    if len(stale) < 2:
        for name in stale:
            remove(name)
        return
    # Unlinking a big file drops its pages and frees its blocks: the coordinator removes
    # every rank's old files, so it does so on several threads, as the ranks would.
    with ThreadPoolExecutor(min(len(stale), 8), thread_name_prefix="fastserial-dcp") as pool:
        list(pool.map(remove, stale))
