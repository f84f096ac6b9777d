"""fastserial behaves as the installed torch does, case by case (issue 12, item 3).

Every test runs torch's own ``torch.save`` / ``torch.load`` and fastserial's on the
same input and compares what comes out: the objects, the exception (type, and
identity where torch lets the caller's own exception through), the warnings, the
file position, what ends up on disk.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import warnings
import zipfile

import fastserial
import fastserial.numpy as fsnp
import fastserial.serialization as fs_serialization
import numpy as np
import pytest
import torch
import torch.serialization as ts

SAVERS = {"torch": torch.save, "fastserial": fastserial.save}
LOADERS = {"torch": torch.load, "fastserial": fastserial.load}
TORCH_CODE = (torch.save.__code__, torch.load.__code__)


@pytest.fixture(autouse=True)
def torch_is_torch():
    """The reference must be torch's own code: no patch_torch() left active."""
    assert (torch.save.__code__, torch.load.__code__) == TORCH_CODE
    yield
    assert (torch.save.__code__, torch.load.__code__) == TORCH_CODE, "torch left patched"


def state():
    return {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64), "step": 3}


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


class Outcome:
    """What calling ``fn`` did: its result or exception, and the warnings it issued."""

    def __init__(self, fn):
        self.value = self.error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.value = fn()
            except Exception as e:  # noqa: BLE001 - compared by the caller
                self.error = e
        # ResourceWarnings come from whatever the garbage collector finalizes meanwhile.
        self.warnings = [
            (w.category, str(w.message)) for w in caught if w.category is not ResourceWarning
        ]


def both(fn):
    """``fn(api)`` run with torch's functions and with fastserial's."""
    return {
        name: Outcome(lambda api=api: fn(api))
        for name, api in (
            ("torch", (torch.save, torch.load)),
            ("fastserial", (fastserial.save, fastserial.load)),
        )
    }


def legacy_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- a. flush


@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_save_into_open_file_is_readable_by_name_before_close(tmp_path, new_zip):
    obj = state()
    for name, save in SAVERS.items():
        path = tmp_path / f"{name}.pt"
        with open(path, "wb") as f:
            save(obj, f, _use_new_zipfile_serialization=new_zip)
            assert path.stat().st_size > 0, name
            # Another reader (another process, say) sees the whole checkpoint now.
            assert_same(torch.load(str(path)), obj)


def test_save_flushes_a_file_like_that_buffers(tmp_path):
    class Buffered(io.BytesIO):
        flushed = 0

        def flush(self):
            self.flushed += 1
            super().flush()

    for name, save in SAVERS.items():
        buf = Buffered()
        save(state(), buf)
        assert buf.flushed >= 1, name


# --------------------------------------------------------------------------- b. write() errors


class WriteFailed(Exception):
    pass


class FailingWriter:
    def __init__(self, after: int = 0, error: BaseException | None = None):
        self.after = after
        self.written = 0
        self.error = error or WriteFailed("disk on fire")

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self.written + n > self.after:
            raise self.error
        self.written += n
        return n

    def flush(self):
        pass


@pytest.mark.parametrize("after", [0, 100], ids=["first-write", "later-write"])
@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_write_exception_reaches_the_caller_unchanged(after, new_zip):
    for name, save in SAVERS.items():
        sink = FailingWriter(after)
        with pytest.raises(Exception) as info:
            save({"big": torch.zeros(1 << 18)}, sink, _use_new_zipfile_serialization=new_zip)
        if name == "torch" and new_zip and after:
            # torch's zip writer then fails again on its own, in write_end_of_file,
            # and that RuntimeError hides the caller's exception (its __context__).
            assert type(info.value) is RuntimeError and info.value.__context__ is sink.error
            continue
        assert info.value is sink.error, name


def test_write_oserror_keeps_its_errno_and_identity():
    err = OSError(errno.ENOSPC, "No space left on device")
    for name, save in SAVERS.items():
        with pytest.raises(OSError) as info:
            save(state(), FailingWriter(0, err))
        assert info.value is err, name
        assert info.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------- c. map_location errors


def _raiser(exc):
    def map_location(storage, location):
        raise exc

    return map_location


@pytest.mark.parametrize("exc_type", [ValueError, KeyError, RuntimeError, TypeError])
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_map_location_exception_passes_through(tmp_path, exc_type, weights_only, new_zip):
    path = tmp_path / "c.pt"
    torch.save(state(), path, _use_new_zipfile_serialization=new_zip)
    for name, load in LOADERS.items():
        exc = exc_type("from the user's map_location")
        with pytest.raises(exc_type) as info:
            load(path, map_location=_raiser(exc), weights_only=weights_only)
        assert info.value is exc, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
def test_legacy_runtime_error_passes_through(tmp_path, weights_only):
    # A storage saved on cuda:0, loaded on a machine without CUDA: torch's restore
    # raises RuntimeError from inside the legacy pickle's persistent_load.
    data = legacy_bytes({"t": torch.ones(2)})
    assert data.count(b"X\x03\x00\x00\x00cpu") == 1
    path = tmp_path / "cuda.pt"
    path.write_bytes(data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"))
    out = {
        name: Outcome(lambda load=load: load(path, weights_only=weights_only))
        for name, load in LOADERS.items()
    }
    assert type(out["torch"].error) is RuntimeError, out["torch"].error
    assert isinstance(out["fastserial"].error, RuntimeError), out["fastserial"].error
    assert not isinstance(out["fastserial"].error, pickle.UnpicklingError)
    assert "map_location" in str(out["fastserial"].error)


# --------------------------------------------------------------------------- d. TorchScript


@pytest.fixture(scope="module")
def torchscript_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("jit") / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def _loading(load, kind, path, **kwargs):
    """``load`` of ``path`` given as a path, an open file (closed after) or a buffer."""

    def run():
        if kind == "path":
            return load(str(path), **kwargs)
        if kind == "bytesio":
            return load(io.BytesIO(path.read_bytes()), **kwargs)
        with open(path, "rb") as f:
            return load(f, **kwargs)

    return run


@pytest.mark.parametrize("kind", ["path", "fileobj", "bytesio"])
def test_torchscript_with_weights_only_raises_torchs_error(torchscript_path, kind):
    out = {
        name: Outcome(_loading(load, kind, torchscript_path, weights_only=True))
        for name, load in LOADERS.items()
    }
    assert type(out["torch"].error) is RuntimeError
    assert type(out["fastserial"].error) is RuntimeError
    assert str(out["fastserial"].error) == str(out["torch"].error)
    assert out["fastserial"].warnings == out["torch"].warnings


@pytest.mark.parametrize("kind", ["path", "fileobj", "bytesio"])
def test_torchscript_without_weights_only_dispatches_to_jit_load(torchscript_path, kind):
    out = {
        name: Outcome(
            _loading(load, kind, torchscript_path, map_location="cpu", weights_only=False)
        )
        for name, load in LOADERS.items()
    }
    assert out["torch"].error is None and out["fastserial"].error is None, out["fastserial"].error
    assert type(out["fastserial"].value) is type(out["torch"].value)
    assert_same(dict(out["fastserial"].value.state_dict()), dict(out["torch"].value.state_dict()))
    assert out["fastserial"].warnings == out["torch"].warnings
    assert any("TorchScript archive" in msg for _, msg in out["torch"].warnings)


def test_torchscript_warning_points_at_the_caller(torchscript_path):
    with pytest.warns(UserWarning, match="TorchScript archive") as record:
        fastserial.load(str(torchscript_path), weights_only=False)
    hits = [w for w in record if "TorchScript archive" in str(w.message)]
    assert hits and hits[0].filename == __file__


# --------------------------------------------------------------------------- e. symlinks


@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_save_through_a_symlink_writes_its_target(tmp_path, new_zip):
    results = {}
    for name, save in SAVERS.items():
        (tmp_path / name / "blobs").mkdir(parents=True)
        (tmp_path / name / "snapshot").mkdir()
        target = tmp_path / name / "blobs" / "abc123"
        link = tmp_path / name / "snapshot" / "model.pt"
        torch.save({"old": torch.zeros(2)}, target)
        os.symlink(os.path.relpath(target, link.parent), link)
        save(state(), str(link), _use_new_zipfile_serialization=new_zip)
        assert link.is_symlink(), name
        assert_same(torch.load(str(target)), state())
        results[name] = sorted(os.listdir(link.parent)), sorted(os.listdir(target.parent))
        if new_zip:
            with zipfile.ZipFile(target) as z:
                results[name] += (z.namelist()[0].split("/")[0],)
    assert results["fastserial"] == results["torch"]


def test_save_through_a_symlink_is_atomic(tmp_path):
    target = tmp_path / "blobs" / "abc123"
    target.parent.mkdir()
    link = tmp_path / "model.pt"
    fastserial.save({"old": torch.zeros(2)}, target)
    os.symlink(target, link)
    inode = target.stat().st_ino

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        fastserial.save({"t": torch.ones(3), "bad": Unpicklable()}, link)
    assert link.is_symlink()
    assert_same(torch.load(target), {"old": torch.zeros(2)})
    fastserial.save(state(), link)
    assert link.is_symlink()
    assert target.stat().st_ino != inode  # a new file renamed over the target
    assert_same(torch.load(link), state())
    assert os.listdir(target.parent) == ["abc123"]
    assert sorted(os.listdir(tmp_path)) == ["blobs", "model.pt"]


def test_numpy_save_through_a_symlink_writes_its_target(tmp_path):
    target = tmp_path / "target.pt"
    link = tmp_path / "link.pt"
    fsnp.save({"a": np.zeros(2)}, target)
    os.symlink(target.name, link)
    fsnp.save({"a": np.arange(3.0)}, link)
    assert link.is_symlink()
    np.testing.assert_array_equal(torch.load(target)["a"].numpy(), np.arange(3.0))


def test_dangling_symlink_creates_its_target(tmp_path):
    for name, save in SAVERS.items():
        target = tmp_path / f"{name}-target.pt"
        link = tmp_path / f"{name}-link.pt"
        os.symlink(target.name, link)
        save(state(), link)
        assert link.is_symlink() and target.is_file(), name
        assert_same(torch.load(target), state())


# --------------------------------------------------------------------------- f. missing directory


@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_save_into_missing_directory_raises_torchs_exception(
    tmp_path, monkeypatch, new_zip, relative
):
    monkeypatch.chdir(tmp_path)
    path = "missing/deeper/x.pt" if relative else str(tmp_path / "missing" / "x.pt")
    out = both(lambda api: api[0](state(), path, _use_new_zipfile_serialization=new_zip))
    t, f = out["torch"].error, out["fastserial"].error
    assert t is not None and type(f) is type(t), (t, f)
    assert str(f) == str(t)
    assert not os.path.exists(tmp_path / "missing")


def test_numpy_save_into_missing_directory_raises_torchs_exception(tmp_path):
    path = str(tmp_path / "missing" / "x.pt")
    with pytest.raises(RuntimeError) as expected:
        torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError) as got:
        fsnp.save({"a": np.zeros(1)}, path)
    assert str(got.value) == str(expected.value)


# --------------------------------------------------------------------------- g. file position


@pytest.mark.parametrize("opener", ["file", "unbuffered", "custom"])
def test_legacy_load_leaves_the_position_after_the_checkpoint(tmp_path, opener):
    data = legacy_bytes(state())
    path = tmp_path / "offset.pt"
    path.write_bytes(b"junk" + data + b"trailing bytes")

    class Seekable:  # seekable, no fileno: read through read()/readinto()
        def __init__(self, raw):
            self.raw = raw

        def read(self, n=-1):
            return self.raw.read(n)

        def readinto(self, b):
            return self.raw.readinto(b)

        def readline(self):  # torch's legacy loader needs it
            return self.raw.readline()

        def seek(self, *a):
            return self.raw.seek(*a)

        def tell(self):
            return self.raw.tell()

    def open_it():
        if opener == "file":
            return open(path, "rb")
        if opener == "unbuffered":
            return open(path, "rb", buffering=0)
        return Seekable(io.BytesIO(path.read_bytes()))

    positions = {}
    for name, load in LOADERS.items():
        f = open_it()
        try:
            f.seek(4)
            assert_same(load(f), state())
            positions[name] = f.tell()
        finally:
            getattr(f, "close", lambda: None)()
    assert positions["fastserial"] == positions["torch"] == 4 + len(data)


# --------------------------------------------------------------------------- h. readinto, junk


class ReadintoStream:
    """A seekable stream without fileno() that records how it is read."""

    def __init__(self, data: bytes):
        self.raw = io.BytesIO(data)
        self.read_sizes = []
        self.readinto_bytes = 0

    def read(self, n=-1):
        self.read_sizes.append(n)
        return self.raw.read(n)

    def readinto(self, b):
        n = self.raw.readinto(b)
        self.readinto_bytes += n
        return n

    def readline(self):  # torch's legacy loader needs it
        return self.raw.readline()

    def seek(self, *a):
        return self.raw.seek(*a)

    def tell(self):
        return self.raw.tell()

    def seekable(self):
        return True


@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_file_like_with_readinto_is_read_with_readinto(new_zip):
    buf = io.BytesIO()
    obj = {"big": torch.arange(1 << 16, dtype=torch.float32), "step": 1}
    torch.save(obj, buf, _use_new_zipfile_serialization=new_zip)
    data = buf.getvalue()
    expected = torch.load(ReadintoStream(data))
    stream = ReadintoStream(data)
    assert_same(fastserial.load(stream), expected)
    # No whole-stream read(): the bulk of the bytes arrived through readinto.
    assert all(n is not None and 0 <= n <= 1024 for n in stream.read_sizes), stream.read_sizes
    assert stream.readinto_bytes >= len(data) - 1024


class NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self.raw = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self.raw.readinto(b)


@pytest.mark.parametrize(
    "junk", [b"this is not a checkpoint", b"t", b"hello", b"\x00\x01\x02", b'{"json": 1}']
)
def test_junk_from_a_non_seekable_stream_is_not_a_checkpoint(junk):
    # torch refuses non-seekable streams outright; fastserial reads them whole, and
    # must then say plainly that the bytes are no checkpoint.
    with pytest.raises(io.UnsupportedOperation):
        torch.load(NonSeekable(junk))
    with pytest.raises(fastserial.CheckpointError, match="not a checkpoint") as info:
        fastserial.load(NonSeekable(junk))
    assert "MARK" not in str(info.value) and "memo" not in str(info.value)


@pytest.mark.parametrize("new_zip", [True, False], ids=["zip", "legacy"])
def test_non_seekable_stream_still_loads(new_zip):
    buf = io.BytesIO()
    torch.save(state(), buf, _use_new_zipfile_serialization=new_zip)
    assert_same(fastserial.load(NonSeekable(buf.getvalue())), state())


# --------------------------------------------------------------------------- i. shared empty storage


def shared_empty():
    untyped = torch.UntypedStorage(0)
    return [
        torch.empty(0, dtype=torch.float32).set_(untyped),
        torch.empty(0, dtype=torch.int64).set_(untyped),
        torch.empty(0, dtype=torch.float32).set_(untyped),
        {"w": torch.ones(3), "half": torch.empty(0, dtype=torch.float16).set_(untyped)},
    ]


def _dtypes(obj):
    flat = obj[:3] + [obj[3]["w"], obj[3]["half"]]
    return [t.dtype for t in flat]


def _same_storage(a, b):
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


@pytest.mark.parametrize(
    "map_location",
    [
        pytest.param(None, id="native-path"),
        pytest.param(lambda storage, location: storage, id="python-path"),
    ],
)
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
@pytest.mark.skipif(
    not hasattr(torch.serialization, "_get_storage_alignment"),
    reason="torch 2.6 gives such tensors separate storages (eager) or the first dtype "
    "(mmap); fastserial follows torch >= 2.7 here",
)
def test_empty_storage_shared_by_two_dtypes_loads_as_torch(
    tmp_path, mmap, weights_only, map_location
):
    path = tmp_path / "shared.pt"
    torch.save(shared_empty(), path)
    kwargs = dict(mmap=mmap, weights_only=weights_only, map_location=map_location)
    expected = torch.load(path, **kwargs)
    got = fastserial.load(path, **kwargs)
    assert (
        _dtypes(got)
        == _dtypes(expected)
        == [torch.float32, torch.int64, torch.float32, torch.float32, torch.float16]
    )
    assert_same(got, expected)
    assert _same_storage(got[0], got[1]) == _same_storage(expected[0], expected[1])


def test_empty_storage_shared_by_two_dtypes_legacy(tmp_path):
    path = tmp_path / "shared-legacy.pt"
    torch.save(shared_empty(), path, _use_new_zipfile_serialization=False)
    assert _dtypes(fastserial.load(path)) == _dtypes(torch.load(path))


def test_saved_empty_storage_shared_by_two_dtypes_loads_in_torch_as_torchs(tmp_path):
    out = {}
    for name, save in SAVERS.items():
        save(shared_empty(), tmp_path / name)
        out[name] = _dtypes(torch.load(tmp_path / name))
    assert out["fastserial"] == out["torch"]


# --------------------------------------------------------------------------- j. skip_data


def test_skip_data_writes_no_tensor_data():
    out = {}
    for name, save in SAVERS.items():
        buf = io.BytesIO()
        with ts.skip_data():
            save(state(), buf)
        out[name] = buf.getvalue()
        loaded = torch.load(io.BytesIO(out[name]))
        assert_same(
            loaded, {"w": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int64), "step": 3}
        )
    assert len(out["fastserial"]) == len(out["torch"])
    # And outside the context, data is written again.
    buf = io.BytesIO()
    fastserial.save(state(), buf)
    assert_same(torch.load(io.BytesIO(buf.getvalue())), state())


def test_skip_data_to_a_path(tmp_path):
    with ts.skip_data():
        fastserial.save(state(), tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.zeros(2, 3))


def test_skip_data_with_legacy_format_raises_torchs_error():
    out = both(lambda api: _skip_legacy(api[0]))
    assert type(out["torch"].error) is RuntimeError
    assert type(out["fastserial"].error) is RuntimeError
    assert str(out["fastserial"].error) == str(out["torch"].error)


def _skip_legacy(save):
    with ts.skip_data():
        save(state(), io.BytesIO(), _use_new_zipfile_serialization=False)


# --------------------------------------------------------------------------- k. patch_torch


def _captured_before(obj, f, save_function=torch.save):
    save_function(obj, f)


def _captured_load_before(f, load_function=torch.load):
    return load_function(f)


def test_patch_reaches_defaults_captured_before_it(monkeypatch):
    calls = []
    real_save, real_load = fs_serialization.save, fs_serialization.load

    def spy_save(*args, **kwargs):
        calls.append("save")
        return real_save(*args, **kwargs)

    def spy_load(*args, **kwargs):
        calls.append("load")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fs_serialization, "save", spy_save)
    monkeypatch.setattr(fs_serialization, "load", spy_load)
    buf = io.BytesIO()
    with fastserial.patch_torch():
        _captured_before(state(), buf)
        assert_same(_captured_load_before(io.BytesIO(buf.getvalue())), state())
    assert calls == ["save", "load"]
    # undo() restores torch's own functions for these callers too.
    calls.clear()
    buf = io.BytesIO()
    _captured_before(state(), buf)
    assert_same(_captured_load_before(io.BytesIO(buf.getvalue())), state())
    assert calls == []


def test_patch_then_capture_then_undo_restores_torch(monkeypatch):
    calls = []
    real_save = fs_serialization.save

    def spy_save(*args, **kwargs):
        calls.append("save")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fs_serialization, "save", spy_save)
    undo = fastserial.patch_torch()
    try:

        def captured_during(obj, f, save_function=torch.save):
            save_function(obj, f)

        captured_during(state(), io.BytesIO())
        assert calls == ["save"]
    finally:
        undo()
    calls.clear()
    captured_during(state(), io.BytesIO())
    assert calls == []


def test_patched_functions_keep_torchs_signatures():
    import inspect

    before = (inspect.signature(torch.save), inspect.signature(torch.load))
    with fastserial.patch_torch():
        during = (inspect.signature(torch.save), inspect.signature(torch.load))
        assert torch.load.__defaults__ == ts.load.__defaults__
    assert [list(s.parameters) for s in during] == [list(s.parameters) for s in before]


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_eof_error_from_map_location_passes_through(tmp_path, legacy, weights_only):
    """An EOFError is also what a truncated legacy pickle raises; one that map_location
    raised is the user's, and reaches the caller unchanged, as from torch.load."""
    path = tmp_path / "x.pt"
    torch.save({"t": torch.ones(2)}, path, _use_new_zipfile_serialization=not legacy)
    raised = []

    def boom(storage, location):
        raised.append(EOFError("user EOF"))
        raise raised[-1]

    for load in (torch.load, fastserial.load):
        with pytest.raises(EOFError) as info:
            load(path, map_location=boom, weights_only=weights_only)
        assert info.value is raised[-1], load
