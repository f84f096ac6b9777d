"""Issue 13's attack corpus (``tests/attacks/make_attacks.py``) against fastserial.

Every check runs in a process of its own, so that a crash fails its test instead of
killing pytest. One child (``subprocess.run``) imports torch and fastserial once
(about 5 s), then forks one grandchild per check, ``PARALLEL`` at a time, each under
an address-space cap and a deadline; a grandchild killed by a signal or by its
deadline is reported as such, and fails only its own test.

What each check accepts:

* ``load``: fastserial refuses with a typed error (``fastserial.CheckpointError``,
  ``pickle.UnpicklingError``), or raises exactly the exception type ``torch.load``
  raises on the same bytes, or returns a value equal to ``torch.load``'s (dtypes,
  shapes, strides, offsets, storage sizes and bytes), computed in the same grandchild.
* ``zip``: the same with ``CheckpointError`` as the only refusal (an ambiguous
  archive is refused as such, or read exactly as torch reads it); the scanner
  (``get_unsafe_globals_in_checkpoint``) and ``fastserial.numpy.load`` likewise, and
  the scanner never returns ``[]`` for a file whose pickle, as torch reads it, calls
  ``builtins.eval``.
* ``rss`` / ``open`` / ``inspect``: as ``load`` (or a clean exit for the CLI), within a
  time limit and with peak RSS growth below 10x the file size + 50 MiB.
* ``save``: the file fastserial writes loads in torch as what ``torch.save`` writes for
  an identical fresh object (or fastserial refuses to save).
* ``native``: functions taking raw addresses are gone or refuse an integer address,
  and ``Archive.open_fd`` leaves the caller's descriptor open.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
ATTACKS = TESTS / "attacks"
if str(ATTACKS) not in sys.path:
    sys.path.insert(0, str(ATTACKS))

import make_attacks as corpus  # noqa: E402

PARALLEL = min(4, max(2, os.cpu_count() or 2))  # grandchildren at a time
ADDRESS_SPACE_MARGIN = 3 << 30  # a grandchild may map this much beyond what it starts with
DEFAULT_SECONDS = 20  # a grandchild's deadline, unless the case sets max_seconds (+2 s)
RSS_FACTOR, RSS_SLACK = 10, 50 << 20

ZIP_MODES = ("path", "bytesio", "mmap", "scanner", "numpy")
INSPECT_MODES = ("json", "text")


def _modes(c) -> tuple[str, ...]:
    if c.check == "zip":
        return ZIP_MODES
    if c.check in ("inspect", "open"):
        return c.options.get("modes", INSPECT_MODES if c.check == "inspect" else ("numpy",))
    return c.modes


JOBS = [(name, mode) for name, c in corpus.CASES.items() for mode in _modes(c)]


# =========================================================================== parent side


@functools.cache
def _corpus_dir() -> str:
    path = tempfile.mkdtemp(prefix="fastserial-attacks-")
    atexit.register(shutil.rmtree, path, True)
    corpus.write_all(path)
    return path


def _deadline(name: str) -> float:
    c = corpus.CASES[name]
    return c.options["max_seconds"] + 2 if "max_seconds" in c.options else DEFAULT_SECONDS


@functools.cache
def _run(jobs: tuple[tuple[str, str], ...]) -> tuple[dict, str]:
    """Runs the checks ``jobs`` in one child; returns ({(name, mode): report}, the
    child's stderr). The child only imports and forks: the checks run in grandchildren."""
    payload = json.dumps({"dir": _corpus_dir(), "jobs": jobs})
    budget = sum(_deadline(n) for n, _ in jobs) / PARALLEL + 60
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
        "import test_attacks; test_attacks.child_main(sys.argv[3])"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(TESTS), str(ATTACKS), payload],
            capture_output=True,
            text=True,
            timeout=min(300, max(60, budget)),
            cwd=str(TESTS),
        )
    except subprocess.TimeoutExpired as e:
        return {}, f"the child running the checks timed out: {e}"
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            reports[(r["name"], r["mode"])] = r
    note = proc.stderr[-3000:]
    if proc.returncode != 0:
        note = f"the child exited with {proc.returncode}\n{note}"
    return reports, note


def _run_all() -> tuple[dict, str]:
    return _run(tuple(JOBS))


@pytest.fixture(scope="session")
def attack_reports(request) -> tuple[dict, str]:
    """The reports of every ``test_attack`` this session selected (all by default),
    run together in one child."""
    selected = tuple(
        (item.callspec.params["name"], item.callspec.params["mode"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_attack"
        and item.module.__name__ == __name__
        and hasattr(item, "callspec")
    )
    return _run(selected or tuple(JOBS))


def _report(reports: tuple[dict, str], name: str, mode: str) -> dict:
    found, note = reports
    r = found.get((name, mode))
    if r is None:
        pytest.fail(f"no report for {name}[{mode}]; child output:\n{note}")
    return r


def _describe(o: dict | None) -> str:
    if o is None:
        return "nothing"
    if o.get("ok"):
        return "value " + json.dumps(o["value"])[:600]
    return f"{o['type']}: {o['msg'][:400]}"


def _same(fs: dict, torch_o: dict) -> bool:
    """fastserial's outcome is torch's: equal values, or the same exception type."""
    if fs["ok"] and torch_o["ok"]:
        return fs["value"] == torch_o["value"]
    if not fs["ok"] and not torch_o["ok"]:
        return fs["type"] == torch_o["type"]
    return False


def _accept_load(fs: dict, torch_o: dict) -> bool:
    return (not fs["ok"] and fs["typed"]) or _same(fs, torch_o)


def _accept_zip(fs: dict, torch_o: dict) -> bool:
    return (not fs["ok"] and fs["checkpoint_error"]) or _same(fs, torch_o)


def _assert_finished(r: dict) -> dict:
    status = r["status"]
    if status == "crash":
        pytest.fail(f"the process crashed: {r['detail']}")
    if status == "timeout":
        pytest.fail(f"no answer within {r['detail']} s (killed)")
    if status != "done":
        pytest.fail(f"the check itself failed ({status}): {r['detail']}")
    return r["result"]


def _assert_bounded(res: dict, max_seconds: float | None = None) -> None:
    if max_seconds is not None:
        assert res["seconds"] <= max_seconds, (
            f"took {res['seconds']:.1f} s, more than {max_seconds} s"
        )
    if "rss_growth" in res:
        limit = RSS_FACTOR * res["file_size"] + RSS_SLACK
        assert res["rss_growth"] <= limit, (
            f"peak RSS grew by {res['rss_growth'] / 2**20:.0f} MiB for a "
            f"{res['file_size'] / 2**10:.0f} KiB file (limit {limit / 2**20:.0f} MiB)"
        )


def _torch_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("torch").split(".")[:2]
    return int(major), int(minor)


#: Cases whose reference is behaviour torch 2.7 introduced: torch 2.6 accepts nested
#: tensors under weights_only (and returns invalid ones), and reads past a record that
#: is shorter than its storage (so the saved files can only be compared by chance).
_NEEDS_TORCH_2_7 = {
    "nested_tensor_offsets_past_buffer",
    "nested_tensor_negative_offset",
    "save_shrink_big_storage",
    "save_shrink_small_storage",
}


@pytest.mark.parametrize("name,mode", JOBS, ids=[f"{n}-{m}" for n, m in JOBS])
def test_attack(name, mode, attack_reports):
    if name in _NEEDS_TORCH_2_7 and _torch_version() < (2, 7):
        pytest.skip("the reference behaviour is torch >= 2.7's")
    c = corpus.CASES[name]
    res = _assert_finished(_report(attack_reports, name, mode))
    check = c.check
    max_seconds = c.options.get("max_seconds")

    if check in ("load", "rss") and c.options.get("refuse"):
        fs, torch_o = res["fs"], res["torch"]
        assert not fs["ok"] and (fs["typed"] or _same(fs, torch_o)), (
            f"fastserial: {_describe(fs)}\ntorch.load: {_describe(torch_o)}\n"
            "expected a typed refusal (CheckpointError / UnpicklingError): no value read "
            "from this file is right"
        )
        _assert_bounded(res, max_seconds)

    elif check in ("load", "rss"):
        fs, torch_o = res["fs"], res["torch"]
        assert _accept_load(fs, torch_o), (
            f"fastserial: {_describe(fs)}\ntorch.load: {_describe(torch_o)}\n"
            "expected a typed refusal (CheckpointError / UnpicklingError), torch's "
            "exception type, or torch's value"
        )
        _assert_bounded(res, max_seconds)

    elif check == "zip":
        torch_o = res["torch"]
        if mode == "scanner":
            fs, ref = res["fs"], res["torch_globals"]
            if ref["ok"] and "builtins.eval" in ref["value"]:
                assert not (fs["ok"] and fs["value"] == []), (
                    "get_unsafe_globals_in_checkpoint returned [] for a file whose pickle, "
                    "as torch reads it, calls builtins.eval"
                )
            assert _accept_zip(fs, ref), (
                f"fastserial scanner: {_describe(fs)}\ntorch's scanner: {_describe(ref)}\n"
                "expected CheckpointError or torch's list of globals"
            )
        elif mode == "numpy":
            fs, ref = res["fs"], res["torch_lite"]
            assert _accept_zip(fs, ref), (
                f"fastserial.numpy.load: {_describe(fs)}\ntorch.load: {_describe(ref)}\n"
                "expected CheckpointError or what torch reads"
            )
        else:
            fs = res["fs"]
            assert _accept_zip(fs, torch_o), (
                f"fastserial.load: {_describe(fs)}\ntorch.load: {_describe(torch_o)}\n"
                "expected CheckpointError or exactly what torch reads"
            )

    elif check == "open":
        fs = res["fs"]
        assert (not fs["ok"] and fs["typed"]) or (fs["ok"] and fs["value"] == "the expected key"), (
            f"fastserial.open: {_describe(fs)}; expected a typed refusal or the one dotted "
            "key of the tensor at the bottom"
        )
        _assert_bounded(res, max_seconds)

    elif check == "inspect":
        fs = res["fs"]
        assert fs["ok"] and fs["value"] in (0, 1), (
            f"fastserial inspect: {_describe(fs)} (stderr: {res.get('stderr', '')[:300]}); "
            "expected exit status 0 or 1 with no exception escaping"
        )
        _assert_bounded(res, max_seconds)

    elif check == "save":
        fs_saved, torch_loaded, fs_loaded = res["fs_saved"], res["torch_loaded"], res["fs_loaded"]
        if not fs_saved["ok"]:
            assert fs_saved["refusal"], (
                f"fastserial.save raised {_describe(fs_saved)}; expected success or a "
                "RuntimeError / ValueError / PicklingError refusal"
            )
        else:
            assert res["fs_records"] == res["torch_records"], (
                "fastserial wrote other storage bytes than torch.save for the same object: "
                f"(size, sha256) {res['fs_records']} instead of {res['torch_records']}"
            )
            assert _same(fs_loaded, torch_loaded), (
                f"torch.load of fastserial's file: {_describe(fs_loaded)}\n"
                f"torch.load of torch's file: {_describe(torch_loaded)}"
            )

    elif check == "native":
        verdict = res["verdict"]
        assert verdict in ("absent", "refused", "kept open"), (
            f"{c.doc}: {verdict} ({res.get('detail', '')})"
        )

    else:  # pragma: no cover
        raise AssertionError(f"unknown check {check!r}")


def test_corpus_files_are_small_and_distinct():
    """The generator itself: every file is under 1 MiB and the cases differ."""
    seen = {}
    for name, c in corpus.CASES.items():
        if c.build is None:
            continue
        data = pathlib.Path(_corpus_dir(), name + c.suffix).read_bytes()
        assert len(data) < 1 << 20, name
        assert data not in seen, f"{name} is the same file as {seen.get(data)}"
        seen[data] = name


# =========================================================================== child side
#
# Everything below runs in the child (``child_main``) and its forked grandchildren.


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _canon(obj, lite: bool = False, depth: int = 0, budget: list | None = None):
    """A JSON-able description of a loaded object, equal for equal loads. ``lite``
    describes tensors and arrays alike (dtype, shape, bytes) for the numpy front end.
    At most 100,000 nodes and 40 levels are described (a DAG would be exponential)."""
    import hashlib

    import numpy as np
    import torch

    budget = [100_000] if budget is None else budget
    budget[0] -= 1
    if depth > 40 or budget[0] < 0:
        return ["too-big"]
    rec = functools.partial(_canon, lite=lite, depth=depth + 1, budget=budget)

    def blob(raw: bytes):
        return [len(raw), hashlib.sha256(raw).hexdigest()[:16], raw[:32].hex()]

    if isinstance(obj, torch.Tensor):
        if obj.is_nested:
            return ["nested", [rec(t) for t in obj.unbind()]]
        if obj.layout == torch.sparse_coo:
            return [
                "sparse",
                str(obj.layout),
                list(obj.shape),
                rec(obj._indices()),
                rec(obj._values()),
            ]
        if obj.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = (obj.crow_indices(), obj.col_indices(), obj.values())
            return ["sparse", str(obj.layout), list(obj.shape), [rec(v) for v in parts]]
        if obj.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = (obj.ccol_indices(), obj.row_indices(), obj.values())
            return ["sparse", str(obj.layout), list(obj.shape), [rec(v) for v in parts]]
        t = obj.detach()
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).replace("torch.", "")
        if lite:
            return ["array", dtype, list(t.shape), blob(raw)]
        return [
            "tensor",
            type(obj).__name__,
            dtype,
            list(t.shape),
            list(t.stride()),
            t.storage_offset(),
            t.untyped_storage().nbytes(),
            bool(obj.requires_grad),
            blob(raw),
        ]
    if isinstance(obj, np.ndarray):
        raw = np.ascontiguousarray(obj).tobytes()
        return ["array", str(obj.dtype), list(obj.shape), blob(raw)]
    if isinstance(obj, torch.Size):
        return ["Size", list(obj)]
    if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
        return ["storage", type(obj).__name__, obj.nbytes()]
    if isinstance(obj, dict):
        return [type(obj).__name__, [[rec(k), rec(v)] for k, v in obj.items()]]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [rec(v) for v in obj]]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return [type(obj).__name__, repr(obj)[:200]]
    return ["object", _qualname(type(obj)), repr(obj)[:200]]


def _outcome(fn, lite: bool = False, canon=True) -> dict:
    import pickle

    import fastserial

    try:
        value = fn()
    except BaseException as e:  # noqa: BLE001 - every outcome is reported
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        try:
            msg = str(e)[:800]
        except BaseException:  # noqa: BLE001
            msg = "<str() failed>"
        return {
            "ok": False,
            "type": _qualname(type(e)),
            "msg": msg,
            "typed": isinstance(e, (fastserial.CheckpointError, pickle.UnpicklingError)),
            "checkpoint_error": isinstance(e, fastserial.CheckpointError),
            "refusal": isinstance(e, (RuntimeError, ValueError, pickle.PicklingError)),
        }
    return {"ok": True, "value": _canon(value, lite) if canon else value}


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dirty_heap() -> None:
    """Leaves freed heap chunks full of a non-zero pattern, as any long-running
    process has, so that memory handed out uninitialized shows."""
    import torch

    junk = [bytes([0xA5]) * (8 * corpus.ZN + 64 * k) for k in range(48)]
    tensors = [torch.full((corpus.ZN + k,), 0x5A5A5A5A5A5A, dtype=torch.int64) for k in range(48)]
    del junk, tensors


def _fs_load(mode: str, path: str, data: bytes, **kw):
    import io

    import fastserial

    if mode == "path":
        return fastserial.load(path, **kw)
    if mode == "bytesio":
        return fastserial.load(io.BytesIO(data), **kw)
    if mode == "mmap":
        return fastserial.load(path, mmap=True, **kw)
    if mode == "fileobj":
        with open(path, "rb") as fh:
            return fastserial.load(fh, **kw)
    raise AssertionError(mode)


def _check_load(c, mode: str, path: str) -> dict:
    import io
    import time

    import torch

    data = pathlib.Path(path).read_bytes()
    wo = c.options.get("weights_only", True)
    torch_o = _outcome(lambda: torch.load(io.BytesIO(data), weights_only=wo))
    if c.options.get("dirty_heap"):
        _dirty_heap()
    start = time.monotonic()
    fs = _outcome(lambda: _fs_load(mode, path, data, weights_only=wo))
    return {"torch": torch_o, "fs": fs, "seconds": time.monotonic() - start}


def _check_rss(c, mode: str, path: str) -> dict:
    import gc
    import io
    import time

    import torch

    data = pathlib.Path(path).read_bytes()
    gc.collect()
    before = _maxrss()
    start = time.monotonic()
    fs = _outcome(lambda: _fs_load(mode, path, data))
    seconds = time.monotonic() - start
    growth = _maxrss() - before
    torch_o = _outcome(lambda: torch.load(io.BytesIO(data), weights_only=True))
    return {
        "torch": torch_o,
        "fs": fs,
        "seconds": seconds,
        "rss_growth": growth,
        "file_size": len(data),
    }


def _check_zip(c, mode: str, path: str) -> dict:
    import io

    import torch

    data = pathlib.Path(path).read_bytes()
    torch_o = _outcome(lambda: torch.load(io.BytesIO(data), weights_only=True))
    if mode == "scanner":
        import fastserial

        ref = _outcome(
            lambda: sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)),
            canon=False,
        )
        fs = _outcome(
            lambda: sorted(fastserial.get_unsafe_globals_in_checkpoint(path)), canon=False
        )
        return {"torch": torch_o, "torch_globals": ref, "fs": fs}
    if mode == "numpy":
        import fastserial.numpy as fsnp

        lite = _outcome(lambda: torch.load(io.BytesIO(data), weights_only=True), lite=True)
        fs = _outcome(lambda: fsnp.load(path), lite=True)
        return {"torch": torch_o, "torch_lite": lite, "fs": fs}
    fs = _outcome(lambda: _fs_load(mode, path, data))
    return {"torch": torch_o, "fs": fs}


def _check_open(c, mode: str, path: str) -> dict:
    import gc
    import time

    import fastserial

    expected = ".".join([c.options["key"]] * c.options["depth"] + ["w"])

    def keys():
        with fastserial.open(path, framework=mode) as ckpt:
            got = list(ckpt.keys())
        # The expected key is 13 MB: compare here, report a summary.
        return "the expected key" if got == [expected] else [k[:100] for k in got[:5]]

    gc.collect()
    before = _maxrss()
    start = time.monotonic()
    fs = _outcome(keys, canon=False)
    return {
        "fs": fs,
        "seconds": time.monotonic() - start,
        "rss_growth": _maxrss() - before,
        "file_size": os.path.getsize(path),
    }


def _check_inspect(c, mode: str, path: str) -> dict:
    import gc
    import io
    import time

    from fastserial import cli

    out, err = io.StringIO(), io.StringIO()
    argv = ["inspect", "--json", path] if mode == "json" else ["inspect", path]
    gc.collect()
    before = _maxrss()
    start = time.monotonic()
    fs = _outcome(lambda: cli.main(argv, out=out, err=err), canon=False)
    return {
        "fs": fs,
        "stderr": err.getvalue()[-600:],
        "seconds": time.monotonic() - start,
        "rss_growth": _maxrss() - before,
        "file_size": os.path.getsize(path),
    }


def _check_save(c, mode: str, path: str) -> dict:
    import io

    import fastserial
    import torch

    torch_buf = io.BytesIO()
    torch_saved = _outcome(lambda: torch.save(corpus.save_attack_object(c.name), torch_buf))
    torch_loaded = (
        _outcome(lambda: torch.load(io.BytesIO(torch_buf.getvalue()), weights_only=True))
        if torch_saved["ok"]
        else torch_saved
    )
    obj = corpus.save_attack_object(c.name)
    if mode == "bytesio":
        fs_buf = io.BytesIO()
        fs_saved = _outcome(lambda: fastserial.save(obj, fs_buf))
        fs_bytes = fs_buf.getvalue()
    else:
        target = os.path.join(tempfile.mkdtemp(prefix="fastserial-save-attack-"), "out.pt")
        fs_saved = _outcome(lambda: fastserial.save(obj, target, fsync=False))
        fs_bytes = pathlib.Path(target).read_bytes() if fs_saved["ok"] else b""
        shutil.rmtree(os.path.dirname(target), ignore_errors=True)
    fs_loaded = (
        _outcome(lambda: torch.load(io.BytesIO(fs_bytes), weights_only=True))
        if fs_saved["ok"]
        else fs_saved
    )
    return {
        "torch_saved": torch_saved,
        "torch_loaded": torch_loaded,
        "fs_saved": fs_saved,
        "fs_loaded": fs_loaded,
        "torch_records": _storage_records(torch_buf.getvalue()),
        "fs_records": _storage_records(fs_bytes) if fs_saved["ok"] else None,
    }


def _storage_records(data: bytes):
    """(size, sha256) of every ``data/`` record of a zip checkpoint, sorted."""
    import hashlib
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return sorted(
                [zf.getinfo(n).file_size, hashlib.sha256(zf.read(n)).hexdigest()[:16]]
                for n in zf.namelist()
                if n.split("/", 1)[-1].startswith("data/")
            )
    except Exception as e:  # noqa: BLE001 - a file zipfile cannot read is an answer too
        return [f"unreadable: {type(e).__name__}: {e}"]


def _valid_checkpoint(directory: str) -> str:
    path = os.path.join(directory, "valid.pt")
    with open(path, "wb") as fh:
        fh.write(corpus.checkpoint(corpus._benign_pkl(), {"0": corpus.GOOD}))
    return path


def _check_native(c, mode: str, path: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="fastserial-native-attack-")
    try:
        return _native_verdict(c.name, _valid_checkpoint(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _native_verdict(name: str, valid: str) -> dict:
    """Calls a native entry point with the integer address of a buffer this process
    owns (so that accepting it corrupts nothing): 'absent' and 'refused' (TypeError
    or ValueError for every argument shape tried) are the answers wanted."""
    import ctypes
    import gc
    import io

    from fastserial import _fastserial as native

    buf = bytearray(64)
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))

    def attempt(*calls) -> dict:
        refusals = []
        for call in calls:
            try:
                call()
            except (TypeError, ValueError) as e:
                refusals.append(f"{_qualname(type(e))}: {e}")
                continue
            except Exception as e:  # noqa: BLE001
                return {"verdict": "raised another error", "detail": f"{_qualname(type(e))}: {e}"}
            return {"verdict": "accepted an integer address", "detail": ""}
        return {"verdict": "refused", "detail": "; ".join(refusals)}

    if name == "native_byteswap_address":
        fn = getattr(native, "byteswap_address", None)
        if fn is None:
            return {"verdict": "absent"}
        return attempt(lambda: fn(addr, 16, 2), lambda: fn(addr, 16), lambda: fn(addr))

    if name == "native_read_into_address":
        archive_cls = getattr(native, "Archive", None)
        if archive_cls is None or not hasattr(archive_cls, "read_into"):
            return {"verdict": "absent"}
        archive = archive_cls.open_path(valid)
        return attempt(
            *(
                lambda job=job: archive.read_into([job])
                for job in (("data/0", addr, 16, 0), ("data/0", addr, 16), ("data/0", addr))
            )
        )

    if name == "native_write_storages_address":
        writer_cls = getattr(native, "ArchiveWriter", None)
        if writer_cls is None or not hasattr(writer_cls, "write_storages"):
            return {"verdict": "absent"}
        writer = writer_cls(io.BytesIO(), "archive", atomic=False, durable=False)
        result = attempt(
            lambda: writer.write_storages([("data/0", addr, 16)]),
            lambda: writer.write_storages([("data/0", addr)]),
        )
        try:
            writer.abort()
        except Exception:  # noqa: BLE001
            pass
        return result

    if name == "native_open_fd_keeps_fd":
        archive_cls = getattr(native, "Archive", None)
        if archive_cls is None or not hasattr(archive_cls, "open_fd"):
            return {"verdict": "absent"}
        fh = open(valid, "rb")  # noqa: SIM115 - closed below, after the check
        fd = fh.fileno()
        try:
            archive = archive_cls.open_fd(fd, valid)
            names = archive.names()
            del archive
        except (TypeError, ValueError) as e:
            return {"verdict": "refused", "detail": f"{_qualname(type(e))}: {e}"}
        gc.collect()
        try:
            os.fstat(fd)
            head = os.pread(fd, 4, 0)
        except OSError as e:
            return {"verdict": "closed the caller's descriptor", "detail": f"{e} ({names[:3]})"}
        fh.close()
        if head != b"PK\x03\x04":
            return {"verdict": "descriptor now names another file", "detail": repr(head)}
        return {"verdict": "kept open"}

    raise AssertionError(name)


CHECKS = {
    "load": _check_load,
    "rss": _check_rss,
    "zip": _check_zip,
    "open": _check_open,
    "inspect": _check_inspect,
    "save": _check_save,
    "native": _check_native,
}


def _grandchild(name: str, mode: str, directory: str, write_fd: int) -> None:
    """Runs one check and writes its JSON result to ``write_fd``; never returns."""
    status = 1
    try:
        import resource

        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
        cap = vm * 1024 + ADDRESS_SPACE_MARGIN
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        # A backstop should this process outlive its parent (which enforces the
        # deadline): CPU time well past it ends the process.
        cpu = int(4 * _deadline(name)) + 10
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        c = corpus.CASES[name]
        path = os.path.join(directory, name + c.suffix) if c.build is not None else ""
        result = CHECKS[c.check](c, mode, path)
        payload = json.dumps({"status": "done", "result": result}).encode()
        status = 0
    except BaseException as e:  # noqa: BLE001
        import traceback

        payload = json.dumps(
            {
                "status": "error",
                "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"[-3000:],
            }
        ).encode()
    with os.fdopen(write_fd, "wb") as out:
        out.write(payload)
    os._exit(status)


def child_main(payload: str) -> None:
    """Runs each job in a forked grandchild, ``PARALLEL`` at a time, and prints one
    ``RESULT {json}`` line per job."""
    import selectors
    import signal
    import time
    import warnings

    # Imported once here, before forking, so that no grandchild pays for it.
    import fastserial  # noqa: F401
    import fastserial.cli  # noqa: F401
    import fastserial.numpy  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401

    warnings.simplefilter("ignore")  # torch's notes on sparse validation and beta layouts
    spec = json.loads(payload)
    directory = spec["dir"]
    pending = [tuple(j) for j in spec["jobs"]]
    running: dict[int, dict] = {}  # read fd -> job state
    sel = selectors.DefaultSelector()

    def start(job) -> None:
        name, mode = job
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _grandchild(name, mode, directory, w)
        os.close(w)
        os.set_blocking(r, False)
        running[r] = {
            "job": job,
            "pid": pid,
            "chunks": [],
            "started": time.monotonic(),
            "deadline": time.monotonic() + _deadline(name),
            "timed_out": False,
        }
        sel.register(r, selectors.EVENT_READ)

    def finish(r: int) -> None:
        state = running.pop(r)
        sel.unregister(r)
        os.close(r)
        _, wstatus = os.waitpid(state["pid"], 0)
        name, mode = state["job"]
        raw = b"".join(state["chunks"])
        if state["timed_out"]:
            report = {"status": "timeout", "detail": _deadline(name)}
        elif os.WIFSIGNALED(wstatus):
            sig = os.WTERMSIG(wstatus)
            report = {"status": "crash", "detail": f"killed by {signal.Signals(sig).name}"}
        else:
            try:
                report = json.loads(raw.decode())
            except ValueError:
                report = {
                    "status": "error",
                    "detail": f"exit status {os.WEXITSTATUS(wstatus)}, output {raw[:200]!r}",
                }
        report.update(name=name, mode=mode, wall=round(time.monotonic() - state["started"], 3))
        print("RESULT " + json.dumps(report), flush=True)

    while pending or running:
        while pending and len(running) < PARALLEL:
            start(pending.pop(0))
        now = time.monotonic()
        timeout = max(0.0, min(s["deadline"] for s in running.values()) - now)
        for key, _ in sel.select(timeout=min(timeout, 1.0)):
            r = key.fd
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                continue
            if chunk:
                running[r]["chunks"].append(chunk)
            else:
                finish(r)
        now = time.monotonic()
        for state in list(running.values()):
            if now > state["deadline"] and not state["timed_out"]:
                state["timed_out"] = True
                os.kill(state["pid"], signal.SIGKILL)
