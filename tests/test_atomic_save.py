"""Atomic saves: a save to a path never destroys the checkpoint it replaces.

``fastserial.save(obj, path)`` writes ``.NAME.fastserial-tmp-PID-N`` beside the target,
flushes and fsyncs it, renames it over the target and fsyncs the directory. So:

* a save killed by SIGKILL at any moment leaves the old checkpoint or the new one,
  whole — never a torn mix — and any leftover temporary file carries the marker
  (and the next save to that path removes it);
* a save that fails part-way (an unpicklable object, a write error) leaves the old
  file untouched and removes its temporary file;
* the replaced checkpoint's permissions are kept.

The kill test forks children from this process (torch already imported, the big
tensor already built) so each kill costs only the save itself. Children never run
torch kernels: torch's OpenMP thread pool does not survive fork.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import stat
import sys
import time

import fastserial
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork and Linux semantics"
)

TEMP_RE = re.compile(r"^\.(?P<target>.+)\.fastserial-tmp-(?P<pid>\d+)-(?P<n>\d+)$")

BIG_ELEMENTS = 50 << 20  # float32: 200 MiB, so a save takes long enough to be killed mid-way


@pytest.fixture(scope="module")
def big_new():
    # Deterministic, and every element distinct from the old checkpoint's values.
    return {
        "generation": "new",
        "big": torch.arange(BIG_ELEMENTS, dtype=torch.float32),
        "small": torch.full((7,), 2.5, dtype=torch.float64),
    }


def old_object():
    return {"generation": "old", "w": torch.arange(1000, dtype=torch.float32) * -1.0}


def assert_is_old_or_new(path, new) -> str:
    """Loads ``path`` (every CRC checked) and checks it is exactly one of the two."""
    got = fastserial.load(path, verify=True)
    generation = got.get("generation")
    if generation == "old":
        want = old_object()
        assert list(got) == list(want)
        assert torch.equal(got["w"], want["w"])
    else:
        assert generation == "new", f"unexpected checkpoint contents: {list(got)}"
        assert list(got) == list(new)
        assert got["big"].dtype == torch.float32 and got["big"].shape == new["big"].shape
        assert torch.equal(got["big"], new["big"])
        assert torch.equal(got["small"], new["small"])
    return generation


def leftovers(directory, target_name: str) -> list[str]:
    """Files beside the target other than the target itself; all must be named temps."""
    others = sorted(n for n in os.listdir(directory) if n != target_name)
    for name in others:
        m = TEMP_RE.match(name)
        assert m and m.group("target") == target_name, f"stray file not clearly named: {name!r}"
    return others


def _fork_saver(obj, target, **kwargs) -> tuple[int, int]:
    """Forks a child that signals on a pipe, then saves ``obj`` to ``target`` and exits 0
    (1 when the save raises). Returns ``(pid, read end of the pipe)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, b"S")
            fastserial.save(obj, target, **kwargs)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _wait_started(r: int) -> None:
    assert os.read(r, 1) == b"S"
    os.close(r)


def test_temp_marker_is_exported():
    assert fastserial._fastserial.TEMP_MARKER == ".fastserial-tmp-"


def test_sigkill_at_any_moment_keeps_the_old_or_the_new_checkpoint(tmp_path, big_new):
    folder = tmp_path / "target"
    folder.mkdir()
    target = folder / "ckpt.pt"
    fastserial.save(old_object(), target)

    # How long one uncontended save takes here, to spread the kills over it (the
    # faster of two: the first save into a fresh file is the slowest).
    scratch = tmp_path / "calibrate.pt"
    durations = []
    for _ in range(2):
        pid, r = _fork_saver(big_new, scratch)
        _wait_started(r)
        t0 = time.perf_counter()
        _, status = os.waitpid(pid, 0)
        durations.append(time.perf_counter() - t0)
        assert os.waitstatus_to_exitcode(status) == 0
    duration = min(durations)
    scratch.unlink()

    outcomes = []

    def kill_at(frac: float) -> str:
        deadline = [None]

        def elapsed() -> bool:
            if deadline[0] is None:
                deadline[0] = time.monotonic() + frac * duration
            return time.monotonic() >= deadline[0]

        return kill_when(elapsed, label=round(frac, 3))

    def kill_when(condition, label) -> str:
        """Starts a save, waits until ``condition()`` holds (or 60 s pass), SIGKILLs it.
        The child is reaped only after the kill, so its pid cannot be reused."""
        pid, r = _fork_saver(big_new, target)
        _wait_started(r)
        give_up = time.monotonic() + 60
        while not condition() and time.monotonic() < give_up:
            time.sleep(0.0002)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        assert exit_code in (0, -signal.SIGKILL), exit_code
        strays = leftovers(folder, "ckpt.pt")
        generation = assert_is_old_or_new(target, big_new)
        outcomes.append((label, exit_code, generation, len(strays)))
        if strays:
            assert generation == "old", "a temp file is left only by a save that never renamed"
            for name in strays:  # the killed child's pid is in the name
                assert int(TEMP_RE.match(name).group("pid")) == pid
        if strays or generation == "new":
            # Back to the old checkpoint; this save also removes the killed one's temp.
            fastserial.save(old_object(), target, fsync=False)
            assert leftovers(folder, "ckpt.pt") == [], "the next save left the stray temp"
        return generation

    # Kills at points the test can see, not only at guessed times: once the temporary
    # file holds 10%, 50% and 90% of the checkpoint (robust under any machine load).
    expected = sum(
        t.numel() * t.element_size() for t in big_new.values() if isinstance(t, torch.Tensor)
    )

    def temp_holds(fraction: float):
        def reached() -> bool:
            for name in leftovers(folder, "ckpt.pt"):
                try:
                    if (folder / name).stat().st_size >= fraction * expected:
                        return True
                except FileNotFoundError:
                    pass
            return False

        return reached

    mid_write = {}
    for fraction in (0.1, 0.5, 0.9):
        mid_write[fraction] = kill_when(temp_holds(fraction), label=f"temp {fraction:.0%}")
    assert all(g == "old" for g in mid_write.values()), mid_write

    # Spread over the save in time too: right away, while writing, near the end, after it.
    results = {frac: kill_at(frac) for frac in (0.0, 0.05, 0.3, 0.9, 1.4)}
    # Then home in on the moment the new checkpoint appears (fsync, rename): each kill
    # halves the window between the last kill that left the old file and the first
    # that left the new one.
    lo = max((f for f, g in results.items() if g == "old"), default=0.0)
    hi = min((f for f, g in results.items() if g == "new"), default=2.0)
    for _ in range(4):
        if hi <= lo:
            break
        mid = (lo + hi) / 2
        if kill_at(mid) == "old":
            lo = mid
        else:
            hi = mid

    # Unkilled, the save completes and replaces the old checkpoint.
    pid, r = _fork_saver(big_new, target)
    _wait_started(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert assert_is_old_or_new(target, big_new) == "new"
    assert leftovers(folder, "ckpt.pt") == []

    print("kills (fraction of a save, exit status, checkpoint found, temp files):", outcomes)
    # The kills really landed during the write (temp file present), not only after it.
    assert sum(1 for o in outcomes if o[3]) >= 2, outcomes


class _FailsToPickle:
    def __reduce__(self):
        raise ValueError("refusing to be pickled")


def test_save_that_raises_after_the_tensors_leaves_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    fastserial.save(old_object(), target)
    before = target.read_bytes()
    obj = {"t": torch.ones(1 << 16), "u": torch.zeros(5), "later": _FailsToPickle()}
    with pytest.raises(ValueError, match="refusing"):
        fastserial.save(obj, target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path, "ckpt.pt") == []


def _save_past_a_file_size_limit(tmp_path):
    """Saves 32 MiB over an old checkpoint in a child whose RLIMIT_FSIZE is 4 MiB, so the
    native writer fails (EFBIG) part-way. Returns (target, old bytes, the child's report)."""
    target = tmp_path / "ckpt.pt"
    fastserial.save(old_object(), target)
    before = target.read_bytes()
    # Built before the fork: torch's OpenMP pool does not survive fork, so the child
    # must not run torch kernels.
    obj = {"t": torch.ones(8 << 20)}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        report = {"type": "none"}
        try:
            os.close(r)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
            try:
                fastserial.save(obj, target)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                report = {
                    "type": type(e).__name__,
                    "oserror": isinstance(e, OSError),
                    "errno": getattr(e, "errno", None),
                    "message": str(e)[:1000],
                }
            os.write(w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return target, before, json.loads(b"".join(chunks).decode())


def test_write_error_mid_save_leaves_the_old_file_and_removes_the_temp(tmp_path):
    target, before, report = _save_past_a_file_size_limit(tmp_path)
    assert report["oserror"], report
    assert str(target) in report["message"], f"the error does not name the checkpoint: {report}"
    assert "too large" in report["message"], report
    assert target.read_bytes() == before
    assert leftovers(tmp_path, "ckpt.pt") == []


def test_write_error_carries_its_errno(tmp_path):
    _, _, report = _save_past_a_file_size_limit(tmp_path)
    assert report["errno"] == errno.EFBIG, report


def test_missing_directory_raises_torchs_errors(tmp_path):
    # torch's zip writer raises RuntimeError naming the folder; its legacy writer, a
    # plain open(), FileNotFoundError naming the file (tests/test_torch_fidelity.py).
    target = tmp_path / "no" / "such" / "dir" / "ckpt.pt"
    with pytest.raises(RuntimeError, match="Parent directory .*dir does not exist"):
        fastserial.save({"t": torch.ones(3)}, target)
    with pytest.raises(FileNotFoundError) as info:
        fastserial.save({"t": torch.ones(3)}, target, _use_new_zipfile_serialization=False)
    assert "ckpt.pt" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_permissions_of_the_replaced_checkpoint_are_kept(tmp_path, mode):
    if mode == 0o444 and os.geteuid() != 0:
        pytest.skip("replacing a read-only file needs only a writable directory; checked as root")
    target = tmp_path / "ckpt.pt"
    fastserial.save(old_object(), target)
    os.chmod(target, mode)
    fastserial.save({"generation": "new"}, target)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode
    assert fastserial.load(target)["generation"] == "new"


def test_new_checkpoint_gets_default_permissions(tmp_path):
    target = tmp_path / "fresh.pt"
    old_umask = os.umask(0o027)
    try:
        fastserial.save({"t": torch.ones(2)}, target)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # 0o666 & ~umask, like open()


@pytest.mark.parametrize("fsync", [True, False])
def test_successful_save_leaves_only_the_target(tmp_path, fsync):
    target = tmp_path / "ckpt.pt"
    for i in range(3):
        fastserial.save({"i": i, "t": torch.full((100,), float(i))}, target, fsync=fsync)
        assert fastserial.load(target)["i"] == i
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
