"""Thread safety: saves and loads from many threads at once are all correct, and the
GIL is released during the bulk reads and writes so other Python threads keep running.
"""

from __future__ import annotations

import io
import sys
import threading
import time

import fastserial
import pytest
import torch
from fastserial import _fastserial as native

THREADS = 8
ROUNDS = 4


def make_object(thread: int, rnd: int) -> dict:
    """A distinct state dict per (thread, round): one larger tensor, many small ones,
    a view sharing storage, several dtypes."""
    g = torch.Generator().manual_seed(thread * 1000 + rnd)
    big = torch.randn(256, 1024, generator=g)  # 1 MiB
    obj = {
        "thread": thread,
        "round": rnd,
        "big": big,
        "row": big[thread],  # a view of "big"
        "ints": torch.arange(thread, thread + 300, dtype=torch.int64),
        "half": torch.randn(64, generator=g).to(torch.float16),
    }
    for k in range(40):
        obj[f"small.{k}"] = torch.full((k + 1,), float(thread * 100 + k))
    return obj


def assert_same(got: dict, want: dict, where: str) -> None:
    assert list(got) == list(want), where
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            g = got[k]
            assert g.dtype == v.dtype and g.shape == v.shape and g.stride() == v.stride(), (
                where,
                k,
            )
            assert torch.equal(g, v), (where, k)
        else:
            assert got[k] == v, (where, k)
    # The view still shares the big tensor's storage after the load.
    assert got["row"].untyped_storage().data_ptr() == got["big"].untyped_storage().data_ptr()


def run_threads(target, n: int = THREADS, timeout: float = 120) -> None:
    """Runs target(i) on n threads started together; re-raises the first failure and
    fails on a thread that does not finish (a deadlock)."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout} s (deadlock?): {alive}"
    if errors:
        raise errors[0]


def test_eight_threads_save_and_load_their_own_checkpoints(tmp_path):
    def worker(i: int) -> None:
        path = tmp_path / f"thread{i}.pt"
        for rnd in range(ROUNDS):
            want = make_object(i, rnd)
            fastserial.save(want, path)
            assert_same(fastserial.load(path, mmap=rnd % 2 == 1), want, f"path {i}/{rnd}")
            buf = io.BytesIO()
            fastserial.save(want, buf)
            got = fastserial.load(io.BytesIO(buf.getvalue()), verify=True)
            assert_same(got, want, f"bytesio {i}/{rnd}")
            # The buffer and the file hold the same records (ids and folder differ).
            assert len(buf.getvalue()) > 1 << 20

    run_threads(worker)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"thread{i}.pt" for i in range(THREADS)
    )


def test_eight_threads_load_one_checkpoint(tmp_path):
    want = make_object(99, 0)
    path = tmp_path / "shared.pt"
    fastserial.save(want, path)

    def worker(i: int) -> None:
        for rnd in range(ROUNDS):
            got = fastserial.load(path, mmap=(i + rnd) % 2 == 0, verify=rnd == 0)
            assert_same(got, want, f"reader {i}/{rnd}")
            got["big"].add_(1.0)  # private copies: one reader's writes reach nobody else

    run_threads(worker)
    assert_same(fastserial.load(path), want, "after")


def test_threads_mixing_torch_and_fastserial(tmp_path):
    # Files written by either library on some threads are read by the other on others.
    def worker(i: int) -> None:
        want = make_object(i, 7)
        path = tmp_path / f"mixed{i}.pt"
        (torch.save if i % 2 else fastserial.save)(want, path)
        assert_same(fastserial.load(path), want, f"fastserial reads {i}")
        got = torch.load(path)
        assert all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))

    run_threads(worker)


# --------------------------------------------------------------------------- the GIL


_NATIVE_CLASSES = {n for n in dir(native) if isinstance(getattr(native, n), type)}


class GilWatch:
    """Which of fastserial's native calls let another Python thread run while they were
    in progress: a yes or no for each call, not a count or a time.

    A profile hook on the calling thread notes the native call in progress (between its
    ``c_call`` and ``c_return`` events); a second, pure-Python thread records that
    call's name whenever it gets to run. With a long switch interval (the fixture
    below) nothing preempts the calling thread, so the second thread runs inside a
    native call only when that call released the GIL."""

    def __init__(self) -> None:
        self.inside: str | None = None
        self.ran_inside: set[str] = set()
        self.stop = False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _profile(self, frame, event, arg) -> None:
        if event == "c_call":
            name = getattr(arg, "__qualname__", "") or ""
            if (
                name.split(".")[0] in _NATIVE_CLASSES
                or getattr(arg, "__module__", None) == native.__name__
            ):
                self.inside = name
        elif event in ("c_return", "c_exception"):
            self.inside = None

    def _run(self) -> None:
        self.started.set()
        while not self.stop:
            inside = self.inside
            if inside is not None:
                self.ran_inside.add(inside)
            time.sleep(0)

    def __enter__(self) -> GilWatch:
        self.thread.start()
        self.started.wait()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        self.stop = True
        self.thread.join(10)


@pytest.fixture
def long_switch_interval():
    # Without a pending switch request nobody preempts the main thread for 5 s, so the
    # counter advances during a call only if that call releases the GIL itself.
    old = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    yield
    sys.setswitchinterval(old)


BIG = 128 << 20  # bytes


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gil") / "big.pt"
    tensor = torch.arange(BIG // 4, dtype=torch.float32)
    fastserial.save({"big": tensor}, path, fsync=False)
    return path, tensor


def test_watch_sees_a_native_call_that_holds_the_gil(long_switch_interval):
    # Control: the pickle scan holds the GIL throughout (it reads a Python bytes
    # object), so the other thread never runs inside it.
    data = b"\x80\x02" + b"N0" * (8 << 20) + b"N."
    with GilWatch() as watch:
        native.scan_pickle(data)
    assert watch.ran_inside == set()


def test_gil_released_while_loading(big_checkpoint, long_switch_interval):
    path, tensor = big_checkpoint
    with GilWatch() as watch:
        eager = fastserial.load(path)["big"]
    assert "TensorFactory.finish" in watch.ran_inside, watch.ran_inside  # the reads
    with GilWatch() as watch:
        mapped = fastserial.load(path, mmap=True, verify=True)["big"]
    assert "Archive.verify" in watch.ran_inside, watch.ran_inside  # the CRC32 pass
    assert torch.equal(eager, tensor) and torch.equal(mapped, tensor)


def test_gil_released_while_saving(big_checkpoint, tmp_path, long_switch_interval):
    _, tensor = big_checkpoint
    target = tmp_path / "s.pt"
    for fsync in (False, True):
        with GilWatch() as watch:
            fastserial.save({"big": tensor}, target, fsync=fsync)
        assert "SaveHelper.write_storages" in watch.ran_inside, watch.ran_inside
        assert torch.equal(fastserial.load(target)["big"], tensor)


def test_concurrent_big_loads_overlap(big_checkpoint):
    # Two threads loading at once both finish correctly; with the GIL released during
    # the reads they run side by side rather than one after the other. (Only
    # correctness is asserted: timings belong in the benchmarks.)
    path, tensor = big_checkpoint

    def worker(i: int) -> None:
        assert torch.equal(fastserial.load(path, mmap=i == 1)["big"], tensor)

    run_threads(worker, n=2)
