"""fastserial.dcp: a torch.distributed.checkpoint storage backend (issue 14).

Multi-process checks run as real ranks (gloo on the CPU, one subprocess per rank,
``tests/dcp_helpers/worker.py``): one 2-rank group saves and loads (DTensor Shard(0)
and Shard(1), plain tensors, non-tensor values; torch's writer and reader against
ours; async_save with both executors; a file:// URL; plan caching), one 4-rank group
loads what it saved, and two 2-rank groups die on purpose (a rank SIGKILLed in
``write_data``, the coordinator SIGKILLed in ``finish``). World-size-1 loads,
conversions, crafted files and torch's own failures run in this process.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import fastserial
import numpy as np
import pytest
import torch
from conftest import subprocess_env

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from dcp_helpers import state  # noqa: E402
from fastserial.dcp import (  # noqa: E402
    FileSystemReader,
    FileSystemWriter,
    FsspecReader,
    FsspecWriter,
    dcp_to_torch_save,
    torch_save_to_dcp,
)
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint.planner import WriteItemType  # noqa: E402

#: torch >= 2.7 asks for no_dist=True to save and load in one process without a process
#: group; older DCP does so whenever no process group is initialised.
NO_DIST = {"no_dist": True} if "no_dist" in inspect.signature(dcp.save).parameters else {}
_needs_collectives_flag = pytest.mark.skipif(
    "use_collectives" not in inspect.signature(dcp.save).parameters,
    reason="this torch's dcp.save has no use_collectives (rank-local metadata)",
)

WORKER = Path(__file__).resolve().parent / "dcp_helpers" / "worker.py"
TIMEOUT = 150

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, root: Path, world: int) -> list[tuple[int, str]]:
    """Runs ``world`` ranks of the worker; returns each rank's (exit code, output)."""
    env = subprocess_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(root)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + TIMEOUT
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: ranks still running after {TIMEOUT}s")
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def _results(root: Path, scenario: str, world: int, runs) -> list[dict]:
    found = []
    for rank in range(world):
        path = root / f"results-{scenario}-{rank}.json"
        if not path.exists():
            rc, out = runs[rank]
            pytest.fail(f"{scenario} rank {rank} left no results (exit {rc}):\n{out[-4000:]}")
        found.append(json.loads(path.read_text()))
    return found


def _load_plain(reader, like=None) -> dict:
    sd = like if like is not None else state.empty_plain_state()
    dcp.load(sd, storage_reader=reader, **NO_DIST)
    return sd


def _assert_plain(sd: dict, version: int = 0) -> None:
    want = state.plain_state(version)
    for name in {**state.SHARDED, **state.PLAIN}:
        assert state.bitwise_equal(sd[name], want[name]), name
    assert sd["step"] == want["step"] and sd["opt"] == want["opt"]


def _save_plain(writer, version: int = 0, planner=None) -> None:
    dcp.save(state.plain_state(version), storage_writer=writer, planner=planner, **NO_DIST)


def _shards(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))


# --------------------------------------------------------------------------- the ranks

MAIN_CHECKS = [
    "save_ours",
    "save_torch",
    "load_ours_at_world",
    "torch_reader_on_ours",
    "ours_on_torch",
    "column_shards",
    "resave_cleans_up",
    "plan_caching",
    "file_url",
    "async_thread",
    "async_process",
]
LOAD4_CHECKS = [
    "ours_at_4",
    "torch_reader_on_ours_at_4",
    "ours_on_torch_at_4",
    "column_shards_at_4",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank group's checkpoints (ours in ``ours/``, torch's in ``torch/``), then a
    4-rank group's loads of them."""
    root = tmp_path_factory.mktemp("dcp")
    runs = {"main": _launch("main", root, 2)}
    runs["load4"] = _launch("load4", root, 4)
    return root, runs


@pytest.mark.parametrize("check", MAIN_CHECKS)
def test_two_ranks(saved, check):
    root, runs = saved
    for rank, results in enumerate(_results(root, "main", 2, runs["main"])):
        assert results.get(check) == "ok", f"rank {rank}: {results.get(check)}"


@pytest.mark.parametrize("check", LOAD4_CHECKS)
def test_four_ranks_load_a_two_rank_checkpoint(saved, check):
    root, runs = saved
    for rank, results in enumerate(_results(root, "load4", 4, runs["load4"])):
        assert results.get(check) == "ok", f"rank {rank}: {results.get(check)}"


@pytest.mark.parametrize("reader_kind", ["fastserial", "torch"])
@pytest.mark.parametrize("writer_kind", ["ours", "torch"])
def test_world_size_1_loads_a_two_rank_checkpoint(saved, reader_kind, writer_kind):
    root, _ = saved
    reader_cls = FileSystemReader if reader_kind == "fastserial" else dcp.FileSystemReader
    _assert_plain(_load_plain(reader_cls(root / writer_kind)))


def test_tensor_data_is_4k_aligned_and_each_blob_is_a_torch_save_zip(saved):
    root, _ = saved
    md = FileSystemReader(root / "ours").read_metadata()
    tensors = 0
    for index, info in md.storage_data.items():
        blob = (root / "ours" / info.relative_path).read_bytes()[
            info.offset : info.offset + info.length
        ]
        if isinstance(md.state_dict_metadata[index.fqn], dcp.metadata.BytesStorageMetadata):
            continue
        z = zipfile.ZipFile(io.BytesIO(blob))
        rec = z.getinfo("archive/data/0")
        name_len, extra_len = struct.unpack(
            "<HH", blob[rec.header_offset + 26 : rec.header_offset + 30]
        )
        data_at = info.offset + rec.header_offset + 30 + name_len + extra_len
        assert data_at % 4096 == 0, (index.fqn, data_at)
        assert torch.load(io.BytesIO(blob), weights_only=True).numel() >= 0
        tensors += 1
    assert tensors >= len(state.SHARDED) * 2


def test_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    """A request for some rows of a chunk reads those bytes, not the chunk (torch's
    reader loads the whole chunk); the destination is filled straight from the file."""
    from fastserial.dcp import _files
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    full = torch.randn(256, 512)
    dcp.save({"w": full}, storage_writer=FileSystemWriter(tmp_path), **NO_DIST)
    reader = FileSystemReader(tmp_path, thread_count=1)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    dst = torch.zeros(64, 512)

    class Planner:
        def resolve_tensor(self, req):
            return dst

        def commit_tensor(self, req, tensor):
            assert tensor is not None

    fetched = []
    real = _files.LocalSource.read_into

    def counting(self, offset, view):
        fetched.append((len(view), np.frombuffer(view, dtype=np.uint8).ctypes.data))
        return real(self, offset, view)

    monkeypatch.setattr(_files.LocalSource, "read_into", counting)
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w", (0, 0)),
        dest_offsets=torch.Size((0, 0)),
        storage_index=MetadataIndex("w", (0, 0)),
        storage_offsets=torch.Size((100, 0)),
        lengths=torch.Size((64, 512)),
    )
    reader.read_data(LoadPlan([req]), Planner()).wait()
    assert torch.equal(dst, full[100:164])
    assert sum(n for n, _ in fetched) == dst.nbytes  # the 64 rows, not the 256
    assert {address for _, address in fetched} == {dst.data_ptr()}  # straight into dst


# --------------------------------------------------------------------------- crashes


def _check_previous_survives_and_next_save_cleans(path: Path, leftovers: int) -> None:
    names = _shards(path)
    assert len(names) == 2 + leftovers, names
    for reader in (FileSystemReader(path), dcp.FileSystemReader(path)):
        _assert_plain(_load_plain(reader), version=0)
    _save_plain(FileSystemWriter(path), version=2)
    assert sorted(os.listdir(path)) == [".metadata", *_shards(path)]
    assert len(_shards(path)) == 1 and not set(_shards(path)) & set(names)
    _assert_plain(_load_plain(FileSystemReader(path)), version=2)


def test_rank_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    runs = _launch("crash_write", tmp_path, 2)
    assert runs[1][0] == -signal.SIGKILL, runs[1][1][-2000:]
    results = _results(tmp_path, "crash_write", 2, runs)
    assert results[0]["previous_save"] == "ok", results[0]
    assert results[0]["second_save"].startswith("failed"), results[0]
    # rank 0's finished file and rank 1's partial one stay until the next save
    _check_previous_survives_and_next_save_cleans(tmp_path / "crash_write", leftovers=2)


def test_coordinator_killed_in_finish_leaves_the_previous_checkpoint(tmp_path):
    runs = _launch("crash_finish", tmp_path, 2)
    assert runs[0][0] == -signal.SIGKILL, runs[0][1][-2000:]
    results = _results(tmp_path, "crash_finish", 2, runs)
    assert results[1]["previous_save"] == "ok", results[1]
    assert results[1]["second_save"].startswith("failed"), results[1]
    path = tmp_path / "crash_finish"
    assert any(n.startswith(".metadata.") and n.endswith(".tmp") for n in os.listdir(path))
    _check_previous_survives_and_next_save_cleans(path, leftovers=2)
    assert not any(n.endswith(".tmp") for n in os.listdir(path))


class _FailingPlanner(DefaultSavePlanner):
    """Fails on the third tensor, as a full disk or a device error would."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0

    def resolve_data(self, write_item):
        if write_item.type != WriteItemType.BYTE_IO:
            self.tensors += 1
            if self.tensors == 3:
                raise OSError(28, "No space left on device")
        return super().resolve_data(write_item)


def _loads_version_0(reader) -> bool:
    try:
        _assert_plain(_load_plain(reader), version=0)
        return True
    except (BaseException, AssertionError):
        return False


def test_failed_write_keeps_the_previous_checkpoint_unlike_torch(tmp_path):
    for kind, writer_cls in (("torch", dcp.FileSystemWriter), ("ours", FileSystemWriter)):
        path = tmp_path / kind
        _save_plain(writer_cls(path), version=0)
        with pytest.raises(CheckpointException):
            _save_plain(writer_cls(path), version=1, planner=_FailingPlanner())
        if kind == "torch":
            # torch truncated __0_0.distcp in place: its previous checkpoint is gone
            assert not _loads_version_0(dcp.FileSystemReader(path))
        else:
            assert _loads_version_0(FileSystemReader(path))
            assert _loads_version_0(dcp.FileSystemReader(path))
            assert len(_shards(path)) == 1  # the failed save removed what it wrote


def test_failed_commit_keeps_the_previous_checkpoint_unlike_torch(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    def broken_rename(*args, **kwargs):
        raise OSError(5, "Input/output error")

    torch_path, our_path = tmp_path / "torch", tmp_path / "ours"
    _save_plain(dcp.FileSystemWriter(torch_path), version=0)
    _save_plain(FileSystemWriter(our_path), version=0)
    with monkeypatch.context() as m:
        m.setattr(filesystem.FileSystem, "rename", broken_rename)
        m.setattr(os, "replace", broken_rename)
        for path, writer_cls in ((torch_path, dcp.FileSystemWriter), (our_path, FileSystemWriter)):
            with pytest.raises(CheckpointException):
                _save_plain(writer_cls(path), version=1)
    assert not (torch_path / ".metadata").exists()  # torch unlinks it before renaming
    assert _loads_version_0(FileSystemReader(our_path))
    _save_plain(FileSystemWriter(our_path), version=1)
    assert sorted(os.listdir(our_path)) == [".metadata", *_shards(our_path)]
    assert len(_shards(our_path)) == 1


# --------------------------------------------------------------------------- conversions


def _assert_same_nested(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_nested(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert state.bitwise_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("writer_kind", ["ours", "torch"])
def test_dcp_to_torch_save_matches_torch(saved, tmp_path, writer_kind):
    from torch.distributed.checkpoint import format_utils

    root, _ = saved
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    dcp_to_torch_save(root / writer_kind, ours)
    format_utils.dcp_to_torch_save(root / writer_kind, theirs)
    want = torch.load(theirs, weights_only=False)
    _assert_same_nested(torch.load(ours, weights_only=True), want)
    _assert_same_nested(fastserial.load(ours), want)
    assert zipfile.ZipFile(ours).namelist()[0] == "ours/data.pkl"  # torch's prefix rule
    assert not [n for n in os.listdir(tmp_path) if n not in ("ours.pt", "theirs.pt")]


def test_torch_save_to_dcp_matches_torch(tmp_path):
    from torch.distributed.checkpoint import format_utils

    torch.save(state.plain_state(3), tmp_path / "model.pt")
    torch_save_to_dcp(tmp_path / "model.pt", tmp_path / "ours")
    format_utils.torch_save_to_dcp(tmp_path / "model.pt", tmp_path / "theirs")
    for path in ("ours", "theirs"):
        for reader in (FileSystemReader, dcp.FileSystemReader):
            _assert_plain(_load_plain(reader(tmp_path / path)), version=3)
    assert _shards(tmp_path / "ours")[0].startswith("__0_0-")


# --------------------------------------------------------------------------- safety


def _plain_checkpoint(path: Path) -> Path:
    _save_plain(FileSystemWriter(path), version=0)
    return path


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_crafted_metadata_runs_no_code(tmp_path):
    path = _plain_checkpoint(tmp_path / "ckpt")
    md = FileSystemReader(path).read_metadata()
    sentinel = tmp_path / "pwned"
    md.planner_data = {"x": _Payload(str(sentinel))}
    (path / ".metadata").write_bytes(pickle.dumps(md))

    with pytest.raises(fastserial.CheckpointError, match="os.makedirs|posix.makedirs"):
        FileSystemReader(path).read_metadata()
    with pytest.raises(CheckpointException, match="not allowed in DCP metadata"):
        _load_plain(FileSystemReader(path))
    assert not sentinel.exists()
    dcp.FileSystemReader(path).read_metadata()  # torch's reader runs the payload
    assert sentinel.exists()


def _edited_metadata(path: Path, edit) -> None:
    md = FileSystemReader(path).read_metadata()
    edit(md)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _first_tensor_info(md):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[index.fqn], TensorStorageMetadata):
            return index, info
    raise AssertionError("no tensor")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda md: setattr(_first_tensor_info(md)[1], "relative_path", "../../etc/passwd"),
            "outside",
        ),
        (lambda md: setattr(_first_tensor_info(md)[1], "offset", -1), "negative"),
        (lambda md: setattr(md, "storage_data", ["x"]), "storage_data"),
        (
            lambda md: setattr(
                md.state_dict_metadata["layer.w"].chunks[0], "sizes", torch.Size((11, 8))
            ),
            "exceeds",
        ),
        (
            lambda md: setattr(md.state_dict_metadata["layer.w"], "properties", "float"),
            "properties",
        ),
    ],
    ids=[
        "path-traversal",
        "negative-offset",
        "storage-not-dict",
        "chunk-past-size",
        "bad-properties",
    ],
)
def test_crafted_metadata_fields_are_refused(tmp_path, edit, message):
    path = _plain_checkpoint(tmp_path / "ckpt")
    _edited_metadata(path, edit)
    with pytest.raises(fastserial.CheckpointError, match=message):
        FileSystemReader(path).read_metadata()


def _blob_info(md, fqn: str = "layer.w"):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return md.storage_data[MetadataIndex(fqn, (0,) * len(state.SHARDED[fqn][0]))]


def _corrupt_blob(path: Path, edit) -> None:
    """Edits the bytes of layer.w's blob in place."""
    info = _blob_info(FileSystemReader(path).read_metadata())
    shard = path / info.relative_path
    data = bytearray(shard.read_bytes())
    blob = bytearray(data[info.offset : info.offset + info.length])
    edit(blob)
    data[info.offset : info.offset + info.length] = blob
    shard.write_bytes(bytes(data))


def _replace_blob(path: Path, blob: bytes) -> None:
    """Points layer.w at ``blob``, appended to its shard file."""
    md = FileSystemReader(path).read_metadata()
    info = _blob_info(md)
    shard = path / info.relative_path
    info.offset = shard.stat().st_size
    info.length = len(blob)
    with open(shard, "ab") as f:
        f.write(blob)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _past_storage_blob() -> bytes:
    """A valid archive (CRCs right) whose tensor, size (10, 80), overruns its storage of
    80 elements."""
    blob = io.BytesIO(_torch_save_bytes(torch.zeros(10, 8)))
    out = io.BytesIO()
    with zipfile.ZipFile(blob) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert body.count(b"K\nK\x08\x86") == 1
                body = body.replace(b"K\nK\x08\x86", b"K\nK\x50\x86")
            dst.writestr(info.filename, body)
    return out.getvalue()


@pytest.mark.parametrize(
    "craft, message",
    [
        (
            lambda p, t: _corrupt_blob(p, lambda b: b.__setitem__(slice(-22, None), bytes(22))),
            "end",
        ),
        (lambda p, t: _corrupt_blob(p, lambda b: b.__setitem__(slice(0, 4), b"JUNK")), "header"),
        (lambda p, t: _replace_blob(p, _past_storage_blob()), "past the end of its"),
        (lambda p, t: _replace_blob(p, _torch_save_bytes(_Payload(str(t)))), "not load safely"),
        (lambda p, t: _replace_blob(p, b"PK" + bytes(100)), "zip"),
    ],
    ids=["no-zip-end", "bad-local-header", "tensor-past-storage", "forbidden-global", "garbage"],
)
def test_crafted_shard_is_refused(tmp_path, craft, message):
    path = _plain_checkpoint(tmp_path / "ckpt")
    sentinel = tmp_path / "pwned"
    craft(path, sentinel)
    with pytest.raises(CheckpointException) as info:
        _load_plain(FileSystemReader(path))
    errors = [exc for exc, _ in info.value.failures.values()]
    assert errors and all(isinstance(e, fastserial.CheckpointError) for e in errors), errors
    assert any(message in str(e) for e in errors), errors
    assert not sentinel.exists()


def test_truncated_shard_is_refused(tmp_path):
    path = _plain_checkpoint(tmp_path / "ckpt")
    shard = path / _shards(path)[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointException) as info:
        _load_plain(FileSystemReader(path))
    ((exc, _),) = info.value.failures.values()
    assert isinstance(exc, fastserial.CheckpointError) and "truncated" in str(exc)


def test_verify_detects_flipped_data_bits(tmp_path):
    path = _plain_checkpoint(tmp_path / "ckpt")

    def flip(blob):
        z = zipfile.ZipFile(io.BytesIO(bytes(blob)))
        rec = z.getinfo("archive/data/0")
        n, e = struct.unpack("<HH", blob[rec.header_offset + 26 : rec.header_offset + 30])
        blob[rec.header_offset + 30 + n + e] ^= 0x40

    _corrupt_blob(path, flip)
    _load_plain(FileSystemReader(path))  # as torch: data CRCs are not checked by default
    with pytest.raises(CheckpointException, match="CRC32"):
        _load_plain(FileSystemReader(path, verify=True))


# --------------------------------------------------------------------------- API


def test_writer_and_reader_pickle(tmp_path):
    for obj in (
        FileSystemWriter(tmp_path),
        FsspecWriter(f"file://{tmp_path}"),
        FsspecWriter("memory://x"),
        FileSystemReader(tmp_path),
        FsspecReader("memory://x"),
    ):
        copy = pickle.loads(pickle.dumps(obj))
        assert type(copy) is type(obj) and copy.checkpoint_id == obj.checkpoint_id


_FORMATS = getattr(dcp.filesystem, "SerializationFormat", None)  # torch >= 2.7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache_staged_state_dict": True},
        {"_extensions": [object()]},
        pytest.param(
            {"serialization_format": getattr(_FORMATS, "SAFETENSORS", None)},
            marks=pytest.mark.skipif(_FORMATS is None, reason="torch < 2.7 has one format"),
        ),
    ],
    ids=["cache_staged_state_dict", "_extensions", "safetensors"],
)
def test_unsupported_torch_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        FileSystemWriter(tmp_path, **kwargs)


def test_overwrite_false_refuses_an_existing_checkpoint(tmp_path):
    _plain_checkpoint(tmp_path)
    with pytest.raises(CheckpointException, match="already exists"):
        _save_plain(FileSystemWriter(tmp_path, overwrite=False))


def test_one_file_per_item_and_several_threads(tmp_path):
    _save_plain(FileSystemWriter(tmp_path, single_file_per_rank=False, thread_count=3))
    md = FileSystemReader(tmp_path).read_metadata()
    assert len(_shards(tmp_path)) == len(md.storage_data)
    _assert_plain(_load_plain(FileSystemReader(tmp_path, thread_count=3)))
    _assert_plain(_load_plain(dcp.FileSystemReader(tmp_path)))


@_needs_collectives_flag
def test_rank_local_metadata_without_collectives(tmp_path):
    dcp.save(
        state.plain_state(0),
        storage_writer=FileSystemWriter(tmp_path),
        **NO_DIST,
        use_collectives=False,
    )
    assert "__0.metadata" in os.listdir(tmp_path) and ".metadata" not in os.listdir(tmp_path)
    _assert_plain(_load_plain(FileSystemReader(tmp_path)))


@pytest.mark.skipif(
    not hasattr(dcp, "FsspecReader"), reason="this torch's DCP has no FsspecReader to compare with"
)
def test_fsspec_memory_filesystem(tmp_path):
    """A non-local fsspec filesystem: streamed shard files, cat_ranges reads, metadata
    moved into place; torch's FsspecReader reads the result."""
    import fsspec

    url = f"memory://dcp-test-{os.getpid()}"
    fs = fsspec.filesystem("memory")
    try:
        _save_plain(FsspecWriter(url), version=0)
        first = [p for p in fs.ls(url, detail=False) if p.endswith(".distcp")]
        _assert_plain(_load_plain(FsspecReader(url)))
        from torch.distributed.checkpoint import FsspecReader as TorchFsspecReader

        _assert_plain(_load_plain(TorchFsspecReader(url)))
        _save_plain(FsspecWriter(url), version=1)
        names = [os.path.basename(p) for p in fs.ls(url, detail=False)]
        assert sorted(names)[0] == ".metadata" and len(names) == 2, names
        assert not set(first) & set(fs.ls(url, detail=False))
        _assert_plain(_load_plain(FsspecReader(url)), version=1)
    finally:
        fs.rm(url, recursive=True)


def test_s3_through_a_local_moto_server(tmp_path):
    """Object-store path against moto's S3 server (skipped without moto and s3fs)."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (fsspec's S3 filesystem)")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._port}"
        creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
            Bucket="ckpt"
        )
        options = {
            "key": "test",
            "secret": "test",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        url = "s3://ckpt/run1"
        _save_plain(FsspecWriter(url, **options), version=0)
        _assert_plain(_load_plain(FsspecReader(url, **options)))
        _save_plain(FsspecWriter(url, **options), version=1)
        _assert_plain(_load_plain(FsspecReader(url, **options)), version=1)
        import s3fs

        names = s3fs.S3FileSystem(**options).ls("ckpt/run1", detail=False)
        assert len([n for n in names if n.endswith(".distcp")]) == 1, names
    finally:
        server.stop()


def test_blob_framing_is_torch_saves(tmp_path):
    """A blob's records are torch.save's, byte for byte, but the serialization id."""
    from fastserial.dcp import _blob

    for dtype, shape in [
        (torch.float32, (3, 4)),
        (torch.bfloat16, ()),
        (torch.uint16, (5,)),
        (torch.float8_e4m3fn, (2, 2, 2)),
        (torch.complex64, (1,)),
        (torch.bool, (7,)),
    ]:
        t = torch.zeros(shape, dtype=dtype)
        theirs = io.BytesIO()
        torch.save(t, theirs)
        frame = _blob.TensorFrame(dtype, shape, t.numel() * t.element_size())
        data = bytes(t.numel() * t.element_size())
        ours = frame.head + data + frame.tail(_blob.crc32(data))
        zo, zt = zipfile.ZipFile(io.BytesIO(ours)), zipfile.ZipFile(io.BytesIO(theirs.getvalue()))
        assert zo.namelist() == zt.namelist()
        for a, b in zip(zo.infolist(), zt.infolist()):
            assert (a.header_offset, a.file_size) == (b.header_offset, b.file_size), a.filename
            if not a.filename.endswith("serialization_id"):
                assert zo.read(a) == zt.read(b), a.filename
        assert len(ours) == frame.length == len(theirs.getvalue())


def test_no_stray_files_after_many_saves(tmp_path):
    for version in range(3):
        _save_plain(FileSystemWriter(tmp_path), version=version)
    assert sorted(os.listdir(tmp_path)) == [".metadata", *_shards(tmp_path)]
    assert len(_shards(tmp_path)) == 1
    _assert_plain(_load_plain(FileSystemReader(tmp_path)), version=2)


def test_items_written_through_torch_extensions_load(tmp_path):
    """Items with transform descriptors (torch's stream extensions) take torch's reader
    code; the rest of the checkpoint the fast path."""
    extension = pytest.importorskip(
        "torch.distributed.checkpoint._extension", reason="torch < 2.7 has no stream extensions"
    )
    ZStandard = extension.ZStandard
    if not ZStandard.is_available():
        pytest.skip("torch's ZStandard extension needs the zstandard package")
    writer = dcp.FileSystemWriter(tmp_path, _extensions=[ZStandard()])
    dcp.save(state.plain_state(0), storage_writer=writer, **NO_DIST)
    _assert_plain(_load_plain(FileSystemReader(tmp_path)))


# --------------------------------------------------------------------------- review fixes


def test_metadata_that_modifies_a_class_is_refused(tmp_path):
    """A BUILD on an allowed global would set attributes on torch's class for the whole
    process (every later checkpoint); the scan's refusal stops it before it runs."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    path = _plain_checkpoint(tmp_path / "ckpt")
    good = (path / ".metadata").read_bytes()
    assert good[:2] == b"\x80\x04" or good[:1] == b"\x80"
    proto = good[:2]
    # GLOBAL _StorageInfo; (None, {'transform_descriptors': ['zzz']}) BUILD POP, then the
    # real metadata pickle's opcodes (after its PROTO).
    evil = (
        proto
        + b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n"
        + b"N}X\x15\x00\x00\x00transform_descriptors]X\x03\x00\x00\x00zzzas\x86b0"
        + good[2:]
    )
    (path / ".metadata").write_bytes(evil)
    before = getattr(_StorageInfo, "transform_descriptors", None)
    with pytest.raises(fastserial.CheckpointError, match="BUILD"):
        FileSystemReader(path).read_metadata()
    assert getattr(_StorageInfo, "transform_descriptors", None) == before


def test_conjugate_and_negative_bits_load_as_torch_loads_them(tmp_path):
    sd = {
        "c": torch.tensor([1 + 2j, 3 - 4j, 5 + 0j]).conj(),
        "n": torch._neg_view(torch.tensor([1.0, 2.0])),
    }
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path), **NO_DIST)
    want = {k: torch.zeros_like(v.resolve_conj().resolve_neg()) for k, v in sd.items()}
    got = {k: v.clone() for k, v in want.items()}
    dcp.load(want, storage_reader=dcp.FileSystemReader(tmp_path), **NO_DIST)
    dcp.load(got, storage_reader=FileSystemReader(tmp_path), **NO_DIST)
    for k in sd:
        assert torch.equal(got[k], want[k]) and torch.equal(
            want[k], sd[k].resolve_conj().resolve_neg()
        )
    # A destination that carries the conjugate bit itself is filled through a copy.
    dst = {"c": torch.zeros(3, dtype=torch.complex64).conj(), "n": torch.zeros(2)}
    dcp.load(dst, storage_reader=FileSystemReader(tmp_path), **NO_DIST)
    assert torch.equal(dst["c"].resolve_conj(), want["c"])


@_needs_collectives_flag
def test_a_rank_local_save_keeps_what_the_collective_metadata_names(tmp_path):
    _save_plain(FileSystemWriter(tmp_path), version=0)
    dcp.save(
        state.plain_state(1),
        storage_writer=FileSystemWriter(tmp_path),
        **NO_DIST,
        use_collectives=False,
    )
    _assert_plain(_load_plain(FileSystemReader(tmp_path)), version=0)  # .metadata
    _assert_plain(_load_plain(dcp.FileSystemReader(tmp_path)), version=0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda md: setattr(md, "planner_data", {"step": 5}), "planner path"),
        (lambda md: setattr(md, "planner_data", {"step": ("x", 10**9)}), "planner path step"),
        (
            lambda md: setattr(md.state_dict_metadata["layer.w"], "size", torch.Size((1 << 40, 8))),
            "cover|outside",
        ),
    ],
    ids=["path-not-a-tuple", "huge-list-index", "size-beyond-chunks"],
)
def test_dcp_to_torch_save_refuses_crafted_metadata(tmp_path, edit, message):
    path = _plain_checkpoint(tmp_path / "ckpt")
    _edited_metadata(path, edit)
    with pytest.raises(fastserial.CheckpointError, match=message):
        dcp_to_torch_save(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("name", [".", "sub/..", "./"])
def test_shard_paths_naming_the_directory_are_refused(tmp_path, name):
    path = _plain_checkpoint(tmp_path / "ckpt")
    _edited_metadata(path, lambda md: setattr(_first_tensor_info(md)[1], "relative_path", name))
    with pytest.raises(fastserial.CheckpointError, match="outside"):
        FileSystemReader(path).read_metadata()


def test_unknown_stream_extension_is_a_checkpoint_error(tmp_path):
    path = _plain_checkpoint(tmp_path / "ckpt")
    _edited_metadata(
        path, lambda md: setattr(_first_tensor_info(md)[1], "transform_descriptors", ["nope/1"])
    )
    with pytest.raises(CheckpointException) as info:
        _load_plain(FileSystemReader(path))
    errors = [exc for exc, _ in info.value.failures.values()]
    assert errors and all(isinstance(e, fastserial.CheckpointError) for e in errors), errors
