"""Shared helpers for the fastserial benchmarks (``bench.py`` and ``scaling.py``).

Nothing in here is specific to one script: library adapters (torch,
safetensors, fastserial or a stand-in module), workload builders, timing,
peak-memory measurement in a child process, system metadata and table
formatting.
"""

from __future__ import annotations

import datetime
import gc
import glob
import importlib
import inspect
import itertools
import json
import math
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping

import torch
from _fmt import GiB, KiB, MiB, fmt_ratio, fmt_size, fmt_time  # noqa: F401 - re-exported

ALL_LIBS = ("torch", "safetensors", "fastserial")
# Other fast checkpoint libraries, benchmarked by bench.py when installed
# (pip install ".[peers]"); each is skipped with a message when it is not.
PEER_LIBS = ("tensorizer", "runai-model-streamer", "fastsafetensors")
BENCH_LIBS = ALL_LIBS + PEER_LIBS
HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def log(msg: str) -> None:
    """Progress output goes to stderr so stdout stays clean for tables/markdown."""
    print(msg, file=sys.stderr, flush=True)


_LIBC = None  # set by configure_process when glibc tuning is on


def release_freed_memory():
    """gc + malloc_trim(0): hand freed heap pages back to the kernel.

    glibc serves a large allocation from a big-enough free heap chunk before
    it considers mmap, so without this a load that follows a workload with
    many small tensors could reuse already-faulted pages and look several
    times faster than the same load in a fresh process."""
    gc.collect()
    trim_freed_memory()


def trim_freed_memory():
    """malloc_trim(0) alone (when glibc tuning is on)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def configure_process(torch_threads=1, mallopt=True) -> dict:
    """Make timings reproducible on small machines.

    * torch intra-op threads (default 1): t.sum() in the "touch" step with
      OpenMP workers showed multi-millisecond wake-up stalls per call on a
      2-core VM; with one thread it is stable.  torch.save/torch.load do not
      use intra-op threads, fastserial has its own thread pool.
    * glibc mallopt(M_MMAP_THRESHOLD, 128 KiB): disables glibc's dynamic mmap
      threshold, so every large tensor allocation gets fresh pages from the
      kernel (as in the first load of a fresh process) instead of sometimes
      reusing pages freed by the previous repeat, which made eager-load times
      jump 2-4x between repeats; plus malloc_trim(0) between runs (see
      release_freed_memory).
    """
    global _LIBC
    info = {"torch_threads": None, "mallopt_mmap_threshold": None, "malloc_trim": False}
    if torch_threads:
        torch.set_num_threads(torch_threads)
    info["torch_threads"] = torch.get_num_threads()
    if mallopt and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            M_MMAP_THRESHOLD = -3
            if libc.mallopt(M_MMAP_THRESHOLD, 128 * KiB) == 1:
                info["mallopt_mmap_threshold"] = 128 * KiB
                _LIBC = libc
                info["malloc_trim"] = True
        except Exception:
            pass
    return info


# --------------------------------------------------------------------------
# Library adapters
# --------------------------------------------------------------------------


class LibUnavailable(Exception):
    pass


class Impl:
    """One library under test.

    save(obj, path)      -- write ``obj`` to ``path``
    load(path)           -- eager load: every tensor ends up in anonymous memory
    load_mmap(path)      -- lazy load: tensors backed by a memory map of the file
    load_torch_file(path)-- eager load of a torch.save-format file (None if n/a)
    """

    name = "?"
    ext = ".bin"
    version = "?"
    describe: dict = {}

    def save(self, obj, path):
        raise NotImplementedError

    def load(self, path):
        raise NotImplementedError

    def load_mmap(self, path):
        raise NotImplementedError

    # Whether this library reads/writes the torch zip format (cross-loading).
    torch_format = False
    # A peer (bench.py's optional comparison libraries, PEER_LIBS).
    peer = False
    # The library whose format load() reads, when not this one's own (see prepare_load_file).
    reads_format = None
    # Whether save() / load_mmap() exist for this library (a missing one is a "-" cell).
    can_save = True
    can_mmap = True

    def extra_meta(self) -> dict:
        return {}

    def saved_files(self, path) -> list:
        """The files save(obj, path) writes (one, unless the library shards)."""
        return [path]

    def remove_saved(self, path):
        for f in self.saved_files(path):
            rm(f)

    def prepare_load_file(self, obj, path, donor=None):
        """Make sure ``path`` holds ``obj`` in the format load() reads (untimed).

        Libraries whose save() writes that file have it already, from the last save;
        readers of another library's format (``reads_format``) link the ``donor`` file
        of that format when there is one, or write it themselves."""
        if not os.path.exists(path):
            self.save(obj, path)


class TorchImpl(Impl):
    name = "torch"
    ext = ".pt"
    torch_format = True

    def __init__(self):
        self.version = torch.__version__
        self.describe = {
            "save": "torch.save(obj, path)",
            "load": "torch.load(path, weights_only=True)",
            "mmap": "torch.load(path, weights_only=True, mmap=True)",
        }

    def save(self, obj, path):
        torch.save(obj, path)

    def load(self, path):
        return torch.load(path, weights_only=True)

    def load_mmap(self, path):
        return torch.load(path, weights_only=True, mmap=True)


class SafetensorsImpl(Impl):
    name = "safetensors"
    ext = ".safetensors"

    def __init__(self):
        try:
            import safetensors
            import safetensors.torch as st
        except Exception as e:  # pragma: no cover - depends on environment
            raise LibUnavailable(f"cannot import safetensors: {e!r}") from e
        self._st = st
        self.version = getattr(safetensors, "__version__", "?")
        try:
            self._has_pread = "backend" in inspect.signature(st.load_file).parameters
        except (TypeError, ValueError):
            self._has_pread = False
        eager = (
            "safetensors.torch.load_file(path, backend='pread')"
            if self._has_pread
            else "safetensors.torch.load(open(path,'rb').read())"
        )
        self.describe = {
            "save": "safetensors.torch.save_file(obj, path)",
            "load": eager,
            "mmap": "safetensors.torch.load_file(path) (= safe_open + get_tensor for every key; mmap-backed)",
        }

    def save(self, obj, path):
        self._st.save_file(obj, path)

    def load(self, path):
        if self._has_pread:
            return self._st.load_file(path, backend="pread")
        with open(path, "rb") as f:
            data = f.read()
        return self._st.load(data)

    def load_mmap(self, path):
        return self._st.load_file(path)


def _import_impl_module(module_name: str):
    """Import the fastserial implementation.

    If a plain import fails, retry with the repository root (and the usual
    ``python/`` and ``src/`` layouts) on sys.path, so an in-tree build works
    without installing it.  Returns (module, extra_sys_path_entries).
    """
    try:
        return importlib.import_module(module_name), []
    except ImportError as first:
        top = module_name.split(".")[0]
        extra = []
        for cand in (REPO_ROOT, os.path.join(REPO_ROOT, "python"), os.path.join(REPO_ROOT, "src")):
            if os.path.isdir(os.path.join(cand, top)) or os.path.isfile(
                os.path.join(cand, top + ".py")
            ):
                extra.append(cand)
        if not extra:
            raise first
        sys.path[:0] = extra
        for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
            del sys.modules[key]
        try:
            return importlib.import_module(module_name), extra
        except ImportError:
            del sys.path[: len(extra)]
            raise first from None


class FastserialImpl(Impl):
    name = "fastserial"
    ext = ".pt"
    torch_format = True

    def __init__(self, module_name: str = "fastserial", threads: int | None = None):
        try:
            mod, extra = _import_impl_module(module_name)
        except Exception as e:
            raise LibUnavailable(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
        for attr in ("save", "load"):
            if not callable(getattr(mod, attr, None)):
                raise LibUnavailable(f"module {module_name!r} has no callable {attr}()")
        self.mod = mod
        self.module_name = module_name
        self.extra_path = extra
        self.version = str(getattr(mod, "__version__", "?"))
        if threads is not None:
            setter = getattr(mod, "set_num_threads", None)
            if callable(setter) and module_name != "torch":
                setter(threads)
            elif module_name != "torch":
                log(
                    f"warning: {module_name}.set_num_threads() does not exist; --threads ignored for it"
                )
        # Like for like with torch.save (which never syncs): fastserial's save without
        # its fsync; the atomic rename still happens. The durable default is timed as
        # its own row (save_durable).
        self._fsync_kw = module_name == "fastserial"
        self.describe = {
            "save": f"{module_name}.save(obj, path" + (", fsync=False)" if self._fsync_kw else ")"),
            "save_durable": f"{module_name}.save(obj, path)  (default: fsync before the atomic rename)",
            "load": f"{module_name}.load(path, weights_only=True)",
            "mmap": f"{module_name}.load(path, weights_only=True, mmap=True)",
        }

    def num_threads(self):
        getter = getattr(self.mod, "get_num_threads", None)
        if callable(getter) and self.module_name != "torch":
            try:
                return getter()
            except Exception:
                return None
        return None

    def save(self, obj, path):
        if self._fsync_kw:
            self.mod.save(obj, path, fsync=False)
        else:
            self.mod.save(obj, path)

    def save_durable(self, obj, path):
        self.mod.save(obj, path)

    def load(self, path):
        return self.mod.load(path, weights_only=True)

    def load_mmap(self, path):
        return self.mod.load(path, weights_only=True, mmap=True)

    def extra_meta(self):
        return {
            "impl_module": self.module_name,
            "stand_in": self.module_name != "fastserial",
            "num_threads": self.num_threads(),
            "extra_sys_path": self.extra_path,
        }


# --------------------------------------------------------------------------
# Peers: each used the way its own documentation gives as the fast path on a CPU
# (the call is recorded in meta.libs.<lib>.api; see bench/README.md for the sources)
# --------------------------------------------------------------------------


def _import_peer(module, dist):
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise LibUnavailable(
            f"not installed/unavailable (import {module}: {type(e).__name__}: {e}); "
            'pip install ".[peers]" to include it'
        ) from e
    try:
        from importlib.metadata import version

        ver = version(dist)
    except Exception:
        ver = str(getattr(mod, "__version__", "?"))
    return mod, ver


def _version_tuple(v):
    out = []
    for part in str(v).split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        out.append(int(digits) if digits else 0)
    return tuple(out)


class _SafetensorsReader(Impl):
    """A peer that reads safetensors files: its input is the file safetensors.torch.save_file
    writes, made once per workload outside the timed region (a hard link to the safetensors
    library's own file when that exists)."""

    ext = ".safetensors"
    reads_format = "safetensors"
    peer = True
    can_mmap = False

    def prepare_load_file(self, obj, path, donor=None):
        if os.path.exists(path):
            return
        if donor and os.path.exists(donor):
            try:
                os.link(donor, path)
                return
            except OSError:
                pass
        import safetensors.torch as st

        st.save_file(obj, path)


class TensorizerImpl(Impl):
    """CoreWeave tensorizer: its own format (TensorSerializer), read back by
    TensorDeserializer. README "Concurrent Reads": num_readers > 1 "can greatly improve
    performance"; the default (None) picks it dynamically, 8 readers for a local file.
    Eager: lazy_load=False (the default: every tensor read in the constructor). Lazy (the
    mmap rows; tensorizer has no mmap mode): lazy_load=True, tensors read on access."""

    name = "tensorizer"
    ext = ".tensors"
    peer = True

    def __init__(self):
        mod, self.version = _import_peer("tensorizer", "tensorizer")
        self._ser, self._deser = mod.TensorSerializer, mod.TensorDeserializer
        self.describe = {
            "save": "s = TensorSerializer(path); s.write_state_dict(obj); s.close()",
            "load": "with TensorDeserializer(path, device='cpu') as d: dict(d)  "
            "(eager; num_readers=None: dynamic, 8 for a local file)",
            "mmap": "TensorDeserializer(path, device='cpu', lazy_load=True)  "
            "(no mmap mode: the lazy mode, every tensor read on first access)",
        }

    def save(self, obj, path):
        s = self._ser(path)
        try:
            s.write_state_dict(obj)
        except RuntimeError as e:
            if "Metadata overflow" in str(e):
                raise RuntimeError(
                    f"{e} (tensorizer reserves a fixed 256 KiB for the metadata of all "
                    "tensors; this many entries do not fit)"
                ) from e
            raise
        finally:
            s.close()

    def load(self, path):
        with self._deser(path, device="cpu") as d:
            return dict(d)

    def load_mmap(self, path):
        return self._deser(path, device="cpu", lazy_load=True)


class RunaiStreamerImpl(_SafetensorsReader):
    """Run:ai Model Streamer: reads safetensors files with a pool of C++ threads
    (RUNAI_STREAMER_CONCURRENCY, default 16 for a file system: its docs/src/env-vars.md;
    docs/src/benchmarks.md found 16 fastest). stream_file(owned=True), the default since
    0.17: every yielded tensor belongs to the caller, no clone needed. No save, no mmap."""

    name = "runai-model-streamer"
    can_save = False

    def __init__(self):
        mod, self.version = _import_peer("runai_model_streamer", "runai-model-streamer")
        self._streamer = mod.SafetensorsStreamer
        try:  # before owned=True (0.17), yielded tensors live in the streamer's buffers
            params = inspect.signature(self._streamer.stream_file).parameters
            self._clone = "owned" not in params
        except (TypeError, ValueError):
            self._clone = True
        self.describe = {
            "save": None,
            "load": "with SafetensorsStreamer() as s: s.stream_file(path); "
            + (
                "{k: t.clone() for k, t in s.get_tensors()}"
                if self._clone
                else "dict(s.get_tensors())"
            )
            + "  (of the safetensors file; concurrency default 16)",
            "mmap": None,
        }

    def save(self, obj, path):
        raise NotImplementedError("runai-model-streamer only reads")

    def load(self, path):
        with self._streamer() as s:
            s.stream_file(path)
            if self._clone:
                return {k: t.clone() for k, t in s.get_tensors()}
            return dict(s.get_tensors())


class FastsafetensorsImpl(_SafetensorsReader):
    """fastsafetensors: reads safetensors files without mmap, in parallel, into one buffer
    (docs/overview.md: on a machine without GPU Direct Storage, ``nogds=True``,
    ``device="cpu"``, through fastsafe_open; since 0.5 its tensors stay valid after the
    context closes, no clone). Saves with ParallelSaver, whose docs say separate files
    write in parallel where one file serializes on its inode: its defaults, 16 shard files
    and 8 threads (so its save writes 16 files, not one). No mmap (by design)."""

    name = "fastsafetensors"

    def __init__(self):
        mod, self.version = _import_peer("fastsafetensors", "fastsafetensors")
        self._open = mod.fastsafe_open
        # Before 0.5 its tensors lived in buffers that close() frees: its docs say clone.
        self._clone = _version_tuple(self.version) < (0, 5)
        self._saver = mod.ParallelSaver() if hasattr(mod, "ParallelSaver") else None
        self.can_save = self._saver is not None
        self.describe = {
            "save": "ParallelSaver().save(obj, base)  (defaults: 16 shard files, 8 threads)"
            if self.can_save
            else None,
            "load": "with fastsafe_open(filenames=[path], nogds=True, device='cpu') as f: "
            + (
                "{k: f.get_tensor(k).clone() for k in f.get_keys()}"
                if self._clone
                else "{k: f.get_tensor(k) for k in f.keys()}"
            )
            + "  (of the safetensors file)",
            "mmap": None,
        }

    @staticmethod
    def _base(path):
        return os.path.splitext(path)[0] + ".saved"

    def saved_files(self, path):
        return sorted(glob.glob(glob.escape(self._base(path)) + "-*-of-*.safetensors"))

    def save(self, obj, path):
        self._saver.save(obj, self._base(path))

    def load(self, path):
        with self._open(filenames=[path], nogds=True, device="cpu") as f:
            if self._clone:
                return {k: f.get_tensor(k).clone() for k in f.get_keys()}
            return {k: f.get_tensor(k) for k in f.keys()}


PEER_IMPLS = {
    "tensorizer": TensorizerImpl,
    "runai-model-streamer": RunaiStreamerImpl,
    "fastsafetensors": FastsafetensorsImpl,
}


UNAVAILABLE: dict = {}  # library -> why it was skipped (make_impls fills it; in meta)


def make_impls(only, impl_module="fastserial", threads=None, explicit=False):
    """Instantiate the requested libraries.

    A library that cannot be imported is dropped with a clear message when
    the selection is the default one; when the user asked for it explicitly
    (``--only``) it is a hard error.
    """
    impls = []
    for name in only:
        try:
            if name == "torch":
                impls.append(TorchImpl())
            elif name == "safetensors":
                impls.append(SafetensorsImpl())
            elif name == "fastserial":
                impls.append(FastserialImpl(impl_module, threads))
            elif name in PEER_IMPLS:
                impls.append(PEER_IMPLS[name]())
            else:
                raise SystemExit(f"unknown library {name!r}; choose from {', '.join(BENCH_LIBS)}")
        except LibUnavailable as e:
            UNAVAILABLE[name] = str(e)
            msg = f"{name} unavailable: {e}"
            if explicit:
                hint = (
                    "  Install it first or drop it from --only."
                    if name in PEER_IMPLS
                    else "  Build/install it first, drop it from --only, or benchmark a stand-in "
                    "with --impl-module torch."
                )
                raise SystemExit(f"error: {msg}\n{hint}") from None
            if name in PEER_IMPLS:
                log(f"note: {msg} -> skipped")
                continue
            log(
                f"warning: {msg}\n"
                f"  -> continuing without {name}. (Use --only to choose libraries, or "
                "--impl-module torch to exercise the harness with torch standing in for fastserial.)"
            )
    if not impls:
        raise SystemExit("error: no library available to benchmark")
    return impls


def start_run(args):
    """What every benchmark entry point does first, from its parsed arguments:
    configure the process, set the sync-before-writes policy, and instantiate the
    libraries. Returns ``(proc_cfg, impls, libs)``, libs in ALL_LIBS order."""
    global SYNC_BEFORE_WRITES
    proc_cfg = configure_process(args.torch_threads, args.mallopt)
    SYNC_BEFORE_WRITES = proc_cfg["sync_before_saves"] = args.sync
    impls = make_impls(args.lib_list, args.impl_module, args.threads, explicit=args.explicit_only)
    libs = [l for l in BENCH_LIBS if any(i.name == l for i in impls)]
    return proc_cfg, impls, libs


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


def _rand(shape, gen):
    # In-place fill: no temporary allocation, so the peak RSS after building a
    # workload equals its resident size (matters for ru_maxrss fallbacks).
    t = torch.empty(shape, dtype=torch.float32)
    t.uniform_(-1.0, 1.0, generator=gen)
    return t


def gpt2_shapes(n_layer=12, vocab=50257, n_ctx=1024, d=768):
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


WORKLOADS = ("big", "gpt2", "many")

WORKLOAD_DESC = {
    False: {
        "big": "16 float32 tensors of 4096x4096 (1 GiB)",
        "gpt2": "GPT-2-small state_dict shapes, float32 (148 tensors, ~475 MiB)",
        "many": "20,000 float32 tensors of 256 elements, dict with string keys",
    },
    True: {
        "big": "[quick] 4 float32 tensors of 1024x1024 (16 MiB)",
        "gpt2": "[quick] GPT-2 shapes with 2 layers, vocab 8192, ctx 256",
        "many": "[quick] 2,000 float32 tensors of 256 elements",
    },
}


def workload_shapes(name: str, quick: bool):
    if name == "big":
        n, d = (4, 1024) if quick else (16, 4096)
        return [(f"tensor_{i:02d}", (d, d)) for i in range(n)]
    if name == "gpt2":
        return gpt2_shapes(n_layer=2, vocab=8192, n_ctx=256) if quick else gpt2_shapes()
    if name == "many":
        n = 2000 if quick else 20000
        return [(f"param_{i:05d}", (256,)) for i in range(n)]
    raise ValueError(f"unknown workload {name!r}")


def build_from_shapes(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: _rand(s, gen) for k, s in shapes}


def build_workload(name: str, quick: bool):
    return build_from_shapes(workload_shapes(name, quick))


def iter_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, Mapping)):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def data_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def touch(obj):
    """Read every byte of every tensor (same for every library): t.sum() per tensor."""
    for t in iter_tensors(obj):
        t.sum()


def verify(ref, got) -> str:
    """'ok' or a short description of the first difference."""
    if not isinstance(got, (dict, Mapping)):
        return f"MISMATCH: result is {type(got).__name__}, expected dict"
    if set(ref) != set(got):
        missing = len(set(ref) - set(got))
        extra = len(set(got) - set(ref))
        return f"MISMATCH: keys differ ({missing} missing, {extra} unexpected)"
    for k, v in ref.items():
        w = got[k]
        if not isinstance(w, torch.Tensor):
            return f"MISMATCH: {k!r} is {type(w).__name__}"
        if w.dtype != v.dtype or w.shape != v.shape:
            return (
                f"MISMATCH: {k!r} is {w.dtype}{tuple(w.shape)}, expected {v.dtype}{tuple(v.shape)}"
            )
        if not torch.equal(v, w):
            return f"MISMATCH: {k!r} values differ"
    return "ok"


# --------------------------------------------------------------------------
# Files and timing
# --------------------------------------------------------------------------


def rm(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def warm_file(path, chunk=16 * MiB):
    """Write back any dirty pages (untimed; a file just saved without fsync is still
    being written to disk, and reads racing that writeback are several times slower),
    then read the whole file once so it is in the page cache."""
    if hasattr(os, "sync"):
        os.sync()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass


def timed(fn, *args, post=None):
    """Run fn(*args) (+ post(result)) once; return seconds. The result is
    dropped (untimed) before returning."""
    release_freed_memory()
    t0 = time.perf_counter()
    r = fn(*args)
    if post is not None:
        post(r)
    t1 = time.perf_counter()
    del r
    release_freed_memory()
    return t1 - t0


SYNC_BEFORE_WRITES = True


def timed_write(fn, *args):
    """Like timed() for saves: first flush dirty pages (os.sync, untimed) so
    every save starts from the same state instead of being throttled by
    writeback of the previous repeat's file."""
    if SYNC_BEFORE_WRITES and hasattr(os, "sync"):
        os.sync()
    return timed(fn, *args)


def raw_write(obj, path):
    """Baseline: the same tensor bytes written with plain f.write(memoryview) per tensor."""
    with open(path, "wb") as f:
        for t in iter_tensors(obj):
            f.write(memoryview(t.numpy()).cast("B"))


def raw_read_into(shapes_dtypes, path):
    """Baseline: read the raw file back into freshly allocated tensors (readinto per tensor)."""
    out = []
    with open(path, "rb") as f:
        for shape, dtype in shapes_dtypes:
            t = torch.empty(shape, dtype=dtype)
            f.readinto(memoryview(t.numpy()).cast("B"))
            out.append(t)
    return out


# The floor: what the machine does with the same bytes and no format at all.
# Single calls, no per-tensor work, so no library can beat them by more than noise.


def _iov_max():
    try:
        return os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 1024


def writev_floor(obj, path):
    """Floor for save: every tensor's bytes in one os.writev (IOV_MAX buffers per call,
    one call for up to 1024 tensors), open + close included."""
    bufs = [memoryview(t.numpy()).cast("B") for t in iter_tensors(obj)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        step = _iov_max()
        for i in range(0, len(bufs), step):
            batch = bufs[i : i + step]
            left = sum(len(b) for b in batch)
            n = os.writev(fd, batch)
            while n < left:  # a short write (> 2 GiB in one call, a signal): the rest
                left -= n
                for j, b in enumerate(batch):
                    if n < len(b):
                        batch = [b[n:]] + batch[j + 1 :]
                        break
                    n -= len(b)
                n = os.writev(fd, batch)
    finally:
        os.close(fd)


def readinto_floor(path, buf):
    """Floor for eager load: the whole file in one readinto into ``buf``, a preallocated
    uint8 tensor of its size (fresh pages: the page faults are in the time; reused pages:
    a copy from the page cache and nothing else). Open + close included."""
    mv = memoryview(buf.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(mv)
        while 0 < got < len(mv):  # reads stop at 2 GiB - 4 KiB on Linux
            n = f.readinto(mv[got:])
            if not n:
                break
            got += n
    return buf


def mmap_floor(path):
    """Floor for mmap load: one private mapping of the whole file (as torch.load(mmap=True)
    makes), as a float32 tensor. Nothing is read until it is touched."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = len(mm) // 4
    return torch.frombuffer(mm, dtype=torch.float32, count=n) if n else torch.empty(0)


def percentile(values, q):
    """Nearest-rank percentile (q in [0, 1]): a value that was measured."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def parse_size(s: str) -> int:
    s = s.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    for suf, m in (("k", KiB), ("m", MiB), ("g", GiB), ("t", 1 << 40)):
        if s.endswith(suf):
            mult, s = m, s[: -len(suf)]
            break
    return int(float(s) * mult)


def check_tmpdir(path, need_bytes) -> dict:
    info = {"path": path, "fstype": "?", "free_bytes": shutil.disk_usage(path).free}
    try:
        import psutil

        best = None
        real = os.path.realpath(path)
        for p in psutil.disk_partitions(all=True):
            if real == p.mountpoint or real.startswith(p.mountpoint.rstrip("/") + "/"):
                if best is None or len(p.mountpoint) > len(best.mountpoint):
                    best = p
        if best is not None:
            info["fstype"] = best.fstype
    except Exception:
        pass
    if info["fstype"] in ("tmpfs", "ramfs"):
        log(
            f"warning: {path} is on {info['fstype']} (RAM): 'on disk' numbers will really be "
            "in-memory and files count against RAM. Use --tmpdir on a real disk."
        )
    if need_bytes and info["free_bytes"] < need_bytes:
        log(
            f"warning: {path} has {fmt_size(info['free_bytes'])} free, this run needs about "
            f"{fmt_size(need_bytes)}"
        )
    return info


# --------------------------------------------------------------------------
# Peak memory (run in a fresh child process)
# --------------------------------------------------------------------------


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def _rss():
    v = _status_kib("VmRSS")
    if v is None:
        import psutil

        v = psutil.Process().memory_info().rss
    return v


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes():
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * KiB


def child_measure(spec: dict) -> dict:
    """Body of the ``--child`` process: measure peak RSS growth of one op.

    spec: {lib, op ('save'|'load'|'mmap_touch'|'rest'), workload, quick, path,
           impl_module, threads, extra_path}
    The workload is rebuilt here for 'save'; loads read the file at ``path``.
    """
    sys.path[:0] = spec.get("extra_path") or []
    configure_process(spec.get("torch_threads", 1), spec.get("mallopt", True))
    (impl,) = make_impls(
        [spec["lib"]], spec.get("impl_module", "fastserial"), spec.get("threads"), explicit=True
    )
    op = spec["op"]
    obj = None
    if op == "rest":
        # The floor under any eager load's peak: the same tensors made by torch.zeros
        # (one allocation each, as torch.load makes them, every page touched as a
        # load touches it), nothing read.
        shapes = workload_shapes(spec["workload"], spec["quick"])
    if op == "save":
        obj = build_workload(spec["workload"], spec["quick"])
        nbytes = data_bytes(obj)
    release_freed_memory()
    reset_ok = _reset_peak()
    base_rss = _rss()
    base_hwm = _status_kib("VmHWM") if reset_ok else _maxrss_bytes()
    if op == "save":
        impl.save(obj, spec["path"])
        result = None
    elif op == "load":
        result = impl.load(spec["path"])
    elif op == "mmap_touch":
        result = impl.load_mmap(spec["path"])
        touch(result)
    elif op == "rest":
        result = {k: torch.zeros(s) for k, s in shapes}
    else:
        raise ValueError(op)
    after_rss = _rss()
    hwm = _status_kib("VmHWM") if reset_ok else _maxrss_bytes()
    if result is not None:
        nbytes = data_bytes(result)
    if reset_ok:
        peak_delta = max(0, hwm - base_rss)
        method = "VmHWM after /proc/self/clear_refs reset, minus RSS before the op"
    else:
        # ru_maxrss is monotonic; the workload was built in place so the
        # pre-op high-water mark is ~ the pre-op RSS.
        peak_delta = max(0, hwm - max(base_rss, base_hwm))
        method = "ru_maxrss after - max(RSS, ru_maxrss) before (lower bound)"
    return {
        "peak_delta_bytes": peak_delta,
        "retained_delta_bytes": max(0, after_rss - base_rss),
        "baseline_rss_bytes": base_rss,
        "data_bytes": nbytes,
        "ratio": peak_delta / nbytes if nbytes else None,
        "method": method,
    }


CHILD_TAG = "FASTSERIAL_BENCH_CHILD_RESULT "


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = child_measure(spec)
    except Exception as e:
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    print(CHILD_TAG + json.dumps(res), flush=True)
    return 0


def run_child(script: str, spec: dict, timeout=900) -> dict:
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"child timed out after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG) :])
    tail = (p.stderr or "").strip().splitlines()[-5:]
    return {"error": f"child exited {p.returncode} without a result: " + " | ".join(tail)}


# --------------------------------------------------------------------------
# System metadata
# --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def system_meta(impls, extra=None) -> dict:
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        load1 = load5 = None
    if load1 is not None and load1 > 0.5 * (affinity or 1):
        log(
            f"warning: load average is {load1:.2f} on {affinity} CPUs -- other processes are busy; "
            "timings will be noisy (compare runs made under the same conditions)"
        )
    meta = {
        "loadavg_at_start": [load1, load5],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "ram_bytes": ram,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_threads_default": os.cpu_count(),
        "libs": {
            i.name: {"version": i.version, "api": i.describe, **i.extra_meta()} for i in impls
        },
    }
    try:
        import safetensors

        meta["safetensors"] = safetensors.__version__
    except Exception:
        meta["safetensors"] = None
    if UNAVAILABLE:
        meta["unavailable"] = dict(UNAVAILABLE)
    fs = next((i for i in impls if i.name == "fastserial"), None)
    meta["fastserial"] = (
        None
        if fs is None
        else (
            fs.version
            if not fs.extra_meta()["stand_in"]
            else f"stand-in: {fs.module_name} {fs.version}"
        )
    )
    if extra:
        meta.update(extra)
    return meta


def meta_lines(meta) -> list:
    return (
        [
            f"date: {meta['date']}",
            f"cpu: {meta['cpu_model']} (platform.processor()={meta['processor']!r}), "
            f"{meta['cpu_count']} cores ({meta['cpus_usable']} usable), RAM {fmt_size(meta['ram_bytes'])}",
            f"os: {meta['platform']}, python {meta['python']}, load average at start {meta['loadavg_at_start'][0]}",
            f"torch {meta['torch']} (intra-op threads set to {meta['torch_num_threads']}), "
            f"safetensors {meta['safetensors']}, fastserial {meta['fastserial']}",
        ]
        + (
            [
                "peers: "
                + ", ".join(
                    f"{l} {meta['libs'][l]['version']}" for l in PEER_LIBS if l in meta["libs"]
                )
            ]
            if any(l in meta["libs"] for l in PEER_LIBS)
            else []
        )
        + [f"not measured: {l}: {why}" for l, why in meta.get("unavailable", {}).items()]
    )


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def render_table(headers, rows, markdown=False) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    if markdown:
        out = ["| " + " | ".join(cells[0]) + " |"]
        out.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
        for r in cells[1:]:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return "\n".join(out)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(
            (c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])) for i, c in enumerate(r)
        )

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def emit_report(render, results, meta, libs, args, log_written=None) -> None:
    """Prints the plain report (or Markdown with ``--markdown -``), writes the Markdown
    file when ``--markdown PATH`` is given."""
    if args.markdown == "-":
        print(render(results, meta, libs, args, markdown=True))
        return
    print(render(results, meta, libs, args, markdown=False))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render(results, meta, libs, args, markdown=True) + "\n")
        if log_written is not None:
            log_written(f"markdown written to {args.markdown}")
