"""Shared helpers for the fastserial test suite.

Nothing in here imports ``fastserial`` at module import time: the reference
tests (``-k reference``) drive the same checker with ``torch.load`` and must
run even while the package is not importable.

The central piece is :func:`assert_matches_manifest`, which walks the
structure described by ``tests/data/manifest.json`` (written without torch by
the fixture generator) and compares a loaded object against it: container
kinds, scalars, tensor metadata, the sha256 of tensor values, and storage
sharing.  ``test_reference.py`` proves the checker honest against real
``torch.load``.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
MANIFEST_PATH = DATA_DIR / "manifest.json"

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Keep hypothesis' cache under tests/ (git-ignored) rather than the repo root.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(TESTS_DIR / ".hypothesis"))

# Load modes every fixture is exercised with.
#   path      -> load(str(path))
#   pathlike  -> load(pathlib.Path(path))
#   fileobj   -> load(open(path, "rb"))
#   bytesio   -> load(io.BytesIO(path.read_bytes()))
#   mmap      -> load(str(path), mmap=True)
LOAD_MODES = ("path", "pathlike", "fileobj", "bytesio", "mmap")


# --------------------------------------------------------------------------
# pytest plumbing
# --------------------------------------------------------------------------

requires_cuda = pytest.mark.requires_cuda


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_cuda: test needs a CUDA device (skipped when none is available)"
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda") is not None and not torch.cuda.is_available():
        pytest.skip("requires CUDA (torch.cuda.is_available() is False)")


@pytest.fixture(params=LOAD_MODES)
def load_mode(request):
    return request.param


# --------------------------------------------------------------------------
# Manifest access
# --------------------------------------------------------------------------

_MANIFEST_CACHE: dict | None = None


def load_manifest() -> dict:
    """The parsed manifest.json (``{"torch_version": ..., "fixtures": {...}}``)."""
    global _MANIFEST_CACHE
    if _MANIFEST_CACHE is None:
        with open(MANIFEST_PATH, encoding="utf-8") as fh:
            _MANIFEST_CACHE = json.load(fh)
    return _MANIFEST_CACHE


def fixture_entries() -> dict:
    return load_manifest()["fixtures"]


def fixture_names(*, malicious: bool = False) -> list[str]:
    """Fixture file names, either the benign ones or the malicious ones."""
    return [
        name
        for name, entry in fixture_entries().items()
        if bool(entry.get("malicious", False)) == malicious
    ]


def fixture_path(name: str) -> pathlib.Path:
    return DATA_DIR / name


def manifest_weights_only(name: str) -> bool:
    return bool(fixture_entries()[name]["weights_only"])


def is_zip_checkpoint(path) -> bool:
    """True for the zip format, False for the legacy (pre-1.6) format."""
    return zipfile.is_zipfile(path)


def expected_for(name: str, encoding: str = "utf-8"):
    """The manifest's ``expect`` tree for ``name``, with placeholders filled in.

    ``py2_strings.pt``: the manifest leaves the first list element (a Python-2
    ``str``) as ``null`` in ``expect`` and gives its decoded value per
    ``encoding`` in ``expect_by_encoding``; substitute the value for the
    requested encoding ('utf-8', 'latin1' or 'bytes').
    """
    entry = fixture_entries()[name]
    expect = copy.deepcopy(entry["expect"])
    by_enc = entry.get("expect_by_encoding")
    if by_enc is not None:
        assert expect["kind"] == "list" and expect["items"][0] is None, (
            "unexpected py2_strings manifest layout"
        )
        if encoding == "bytes":
            expect["items"][0] = {"kind": "bytes", "hex": by_enc["bytes_hex"]}
        else:
            expect["items"][0] = by_enc[encoding]
    return expect


# --------------------------------------------------------------------------
# Loading in the various modes (driven by torch.load or fastserial.load)
# --------------------------------------------------------------------------


def load_with_mode(load_fn, path, mode: str, **kwargs):
    """Load ``path`` with ``load_fn`` (torch.load or fastserial.load) in ``mode``."""
    path = pathlib.Path(path)
    if mode == "path":
        return load_fn(str(path), **kwargs)
    if mode == "pathlike":
        return load_fn(path, **kwargs)
    if mode == "fileobj":
        with open(path, "rb") as fh:
            return load_fn(fh, **kwargs)
    if mode == "bytesio":
        return load_fn(io.BytesIO(path.read_bytes()), **kwargs)
    if mode == "mmap":
        if not is_zip_checkpoint(path):
            if load_fn is torch.load:
                pytest.skip("torch.load raises for mmap=True on legacy (non-zip) files")
            # fastserial accepts mmap=True for legacy files and reads them eagerly.
        return load_fn(str(path), mmap=True, **kwargs)
    raise ValueError(f"unknown load mode {mode!r}")


def import_fastserial():
    """Import fastserial lazily (keeps conftest importable without it)."""
    import fastserial

    return fastserial


@pytest.fixture
def loaders(monkeypatch):
    """Every ``_ZipLoader`` that runs a load, in order (captured before it runs, so a
    load that raises is recorded too)."""
    from fastserial import serialization

    seen: list = []
    original = serialization._ZipLoader.load

    def load(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(serialization._ZipLoader, "load", load)
    return seen


def fs_load(loaders, f, **kwargs):
    """``fastserial.load(f, **kwargs)`` and which unpickler ran its pickle (with the
    ``loaders`` fixture)."""
    before = len(loaders)
    got = import_fastserial().load(f, **kwargs)
    assert len(loaders) == before + 1, "the load did not run through _ZipLoader.load"
    return got, loaders[-1].unpickler_used


# --------------------------------------------------------------------------
# Tensor hashing
# --------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Values of ``t`` as contiguous little-endian bytes (row-major order).

    Goes through ``view(torch.uint8)`` rather than numpy so every dtype
    (bfloat16, float8, complex, bool, uint16/32/64) works.  Quantized tensors
    hash their integer representation (``int_repr()``): viewing a quantized
    tensor as uint8 crashes the interpreter.
    """
    t = t.detach()
    if t.is_quantized:
        t = t.int_repr()
    t = t.cpu()
    if t.numel() == 0:
        return b""
    # A fresh 1-D buffer with stride 1: .contiguous() may keep an odd stride
    # on size-1 dims (shape [1], stride [2]), which view(uint8) rejects.
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    raw = flat.view(torch.uint8).numpy().tobytes()
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - LE hosts
        esize = t.element_size()
        if t.is_complex():
            esize //= 2
        raw = b"".join(raw[i : i + esize][::-1] for i in range(0, len(raw), esize))
    return raw


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


# --------------------------------------------------------------------------
# The manifest checker
# --------------------------------------------------------------------------


class _StorageRecord:
    __slots__ = ("index", "nbytes", "ptr", "where")

    def __init__(self, index, ptr, nbytes, where):
        self.index, self.ptr, self.nbytes, self.where = index, ptr, nbytes, where


def assert_matches_manifest(obj, expect, *, device: str = "cpu", check_sharing: bool = True):
    """Assert that ``obj`` matches the manifest ``expect`` tree.

    ``device``: the device type every (dense) tensor must live on.
    ``check_sharing``: tensors with the same manifest ``storage`` index must
    share one storage (equal ``untyped_storage().data_ptr()``), tensors with
    different indices must not (empty storages excepted: they have no data).
    """
    storages: list[_StorageRecord] = []
    _check(obj, expect, "obj", storages, device)
    if check_sharing:
        _check_sharing(storages)


def _fail(where, msg):
    raise AssertionError(f"{where}: {msg}")


def _check_scalar(obj, expect, where):
    if expect is None:
        if obj is not None:
            _fail(where, f"expected None, got {obj!r}")
    elif isinstance(expect, bool):
        if type(obj) is not bool or obj is not expect:
            _fail(where, f"expected bool {expect!r}, got {type(obj).__name__} {obj!r}")
    elif isinstance(expect, int):
        if type(obj) is not int or obj != expect:
            _fail(where, f"expected int {expect!r}, got {type(obj).__name__} {obj!r}")
    elif isinstance(expect, float):
        if type(obj) is not float:
            _fail(where, f"expected float {expect!r}, got {type(obj).__name__} {obj!r}")
        if math.isnan(expect):
            if not math.isnan(obj):
                _fail(where, f"expected nan, got {obj!r}")
        elif obj != expect or math.copysign(1.0, obj) != math.copysign(1.0, expect):
            _fail(where, f"expected float {expect!r}, got {obj!r}")
    elif isinstance(expect, str):
        if type(obj) is not str or obj != expect:
            _fail(where, f"expected str {expect!r}, got {type(obj).__name__} {obj!r}")
    else:  # pragma: no cover - manifest format error
        _fail(where, f"unsupported manifest scalar {expect!r}")


def _check(obj, expect, where, storages, device):
    if not isinstance(expect, dict):
        _check_scalar(obj, expect, where)
        return

    kind = expect["kind"]
    if kind in ("dict", "OrderedDict"):
        want_type = dict if kind == "dict" else collections.OrderedDict
        if type(obj) is not want_type:
            _fail(where, f"expected {kind}, got {type(obj).__module__}.{type(obj).__qualname__}")
        keys = [k for k, _ in expect["items"]]
        if list(obj.keys()) != keys:
            _fail(where, f"keys differ: expected {keys!r}, got {list(obj.keys())!r}")
        for (k, sub), got_k in zip(expect["items"], obj.keys()):
            if type(got_k) is not type(k):
                _fail(
                    where, f"key {k!r} has type {type(got_k).__name__}, expected {type(k).__name__}"
                )
            _check(obj[k], sub, f"{where}[{k!r}]", storages, device)
        got_meta = getattr(obj, "_metadata", None)
        if "_metadata" in expect:
            if got_meta is None:
                _fail(where, "missing _metadata attribute")
            _check(got_meta, expect["_metadata"], f"{where}._metadata", storages, device)
        elif got_meta is not None:
            _fail(where, f"unexpected _metadata attribute {got_meta!r}")
    elif kind in ("list", "tuple"):
        want_type = list if kind == "list" else tuple
        if type(obj) is not want_type:
            _fail(where, f"expected {kind}, got {type(obj).__name__}")
        if len(obj) != len(expect["items"]):
            _fail(where, f"length {len(obj)} != expected {len(expect['items'])}")
        for i, (got, sub) in enumerate(zip(obj, expect["items"])):
            _check(got, sub, f"{where}[{i}]", storages, device)
    elif kind == "bytes":
        if type(obj) is not bytes or obj.hex() != expect["hex"]:
            _fail(where, f"expected bytes {expect['hex']}, got {obj!r}")
    elif kind == "torch.Size":
        if type(obj) is not torch.Size or list(obj) != expect["value"]:
            _fail(where, f"expected torch.Size({expect['value']}), got {obj!r}")
    elif kind == "torch.dtype":
        if not isinstance(obj, torch.dtype) or str(obj) != expect["value"]:
            _fail(where, f"expected {expect['value']}, got {obj!r}")
    elif kind == "torch.device":
        if type(obj) is not torch.device or str(obj) != expect["value"]:
            _fail(where, f"expected device {expect['value']!r}, got {obj!r}")
    elif kind == "module":
        cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if cls != expect["class"]:
            _fail(where, f"expected an instance of {expect['class']}, got {cls}")
        _check(obj.state_dict(), expect["state_dict"], f"{where}.state_dict()", storages, device)
    elif kind in ("tensor", "parameter"):
        _check_tensor(obj, expect, where, storages, device)
    else:  # pragma: no cover - manifest format error
        _fail(where, f"unknown manifest kind {kind!r}")


def _check_tensor(t, expect, where, storages, device):
    kind = expect["kind"]
    if kind == "parameter":
        if type(t) is not torch.nn.Parameter:
            _fail(
                where,
                f"expected torch.nn.Parameter, got {type(t).__module__}.{type(t).__qualname__}",
            )
    elif type(t) is not torch.Tensor:
        _fail(where, f"expected torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")

    if str(t.dtype) != "torch." + expect["dtype"]:
        _fail(where, f"dtype {t.dtype} != torch.{expect['dtype']}")
    if list(t.shape) != expect["shape"]:
        _fail(where, f"shape {list(t.shape)} != {expect['shape']}")
    if t.requires_grad is not expect["requires_grad"]:
        _fail(where, f"requires_grad {t.requires_grad} != {expect['requires_grad']}")
    if t.device.type != device:
        _fail(where, f"device {t.device} is not of type {device!r}")

    layout = expect.get("layout", "strided")
    if t.layout != getattr(torch, layout):
        _fail(where, f"layout {t.layout} != torch.{layout}")

    if layout == "sparse_coo":
        got = tensor_sha256(t._indices()), tensor_sha256(t._values())
        if got != (expect["indices_sha256"], expect["values_sha256"]):
            _fail(where, "sparse COO indices/values differ from the manifest")
        return
    if layout != "strided":
        if tensor_sha256(t.to_dense()) != expect["dense_sha256"]:
            _fail(where, f"{layout} dense values differ from the manifest")
        return

    if list(t.stride()) != expect["stride"]:
        _fail(where, f"stride {list(t.stride())} != {expect['stride']}")
    if t.storage_offset() != expect["storage_offset"]:
        _fail(where, f"storage_offset {t.storage_offset()} != {expect['storage_offset']}")

    if "qscheme" in expect:
        if not t.is_quantized:
            _fail(where, "expected a quantized tensor")
        if str(t.qscheme()) != "torch." + expect["qscheme"]:
            _fail(where, f"qscheme {t.qscheme()} != torch.{expect['qscheme']}")
        if t.q_scale() != expect["q_scale"]:
            _fail(where, f"q_scale {t.q_scale()!r} != {expect['q_scale']!r}")
        if t.q_zero_point() != expect["q_zero_point"]:
            _fail(where, f"q_zero_point {t.q_zero_point()} != {expect['q_zero_point']}")

    storage = t.untyped_storage()
    if storage.nbytes() != expect["storage_nbytes"]:
        _fail(where, f"storage nbytes {storage.nbytes()} != {expect['storage_nbytes']}")
    if tensor_sha256(t) != expect["sha256"]:
        _fail(where, "tensor values (sha256) differ from the manifest")
    storages.append(_StorageRecord(expect["storage"], storage.data_ptr(), storage.nbytes(), where))


def _check_sharing(storages):
    by_index: dict[int, list[_StorageRecord]] = {}
    for rec in storages:
        by_index.setdefault(rec.index, []).append(rec)
    ptr_owner: dict[int, int] = {}
    for index, recs in by_index.items():
        first = recs[0]
        for rec in recs[1:]:
            if rec.ptr != first.ptr:
                raise AssertionError(
                    f"{rec.where} and {first.where} should share storage #{index} "
                    f"but have data_ptr {rec.ptr:#x} vs {first.ptr:#x}"
                )
        if first.nbytes == 0:
            continue  # empty storages have no data (data_ptr may be 0 for all of them)
        other = ptr_owner.setdefault(first.ptr, index)
        if other != index:
            raise AssertionError(
                f"storages #{other} and #{index} must be distinct but share data_ptr {first.ptr:#x} "
                f"({first.where})"
            )


# --------------------------------------------------------------------------
# Subprocess helper
# --------------------------------------------------------------------------


def subprocess_env(**extra) -> dict:
    """Environment for a child interpreter that sees the same imports as this one."""
    env = dict(os.environ)
    env.pop("FASTSERIAL_PWNED", None)
    paths = [p for p in sys.path if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def run_python(code: str, *args, timeout: float = 120, **extra_env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same executable and sys.path)."""
    return subprocess.run(  # noqa: PLW1510 - callers check returncode
        [sys.executable, "-c", code, *map(str, args)],
        env=subprocess_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
