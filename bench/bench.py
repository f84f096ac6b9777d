#!/usr/bin/env python3
"""fastserial benchmark: torch vs safetensors vs fastserial, and the peers
(tensorizer, runai-model-streamer, fastsafetensors) when installed, beside the floor:
the same bytes with one writev / one readinto / one mmap.

    python bench/bench.py                        # full run (all workloads, all ops)
    python bench/bench.py --quick                # smoke test with small sizes
    python bench/bench.py --only torch,safetensors
    python bench/bench.py --impl-module torch    # torch stands in for fastserial
    python bench/bench.py --json out.json --markdown results.md

See bench/README.md for what every number means.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if len(sys.argv) >= 3 and sys.argv[1] == "--child":
    # Fresh process used for peak-memory measurements (see _common.child_measure).
    from _common import child_main

    sys.exit(child_main(sys.argv[2]))

import argparse
import gc
import json
import shutil
import tempfile
import time
import traceback
from math import prod

import torch
from _common import (
    BENCH_LIBS,
    PEER_LIBS,
    WORKLOAD_DESC,
    WORKLOADS,
    GiB,
    MiB,
    build_from_shapes,
    build_workload,
    check_tmpdir,
    data_bytes,
    emit_report,
    gpt2_shapes,
    iter_tensors,
    log,
    meta_lines,
    mmap_floor,
    percentile,
    raw_read_into,
    raw_write,
    readinto_floor,
    release_freed_memory,
    render_table,
    rm,
    run_child,
    start_run,
    system_meta,
    timed,
    timed_write,
    touch,
    trim_freed_memory,
    verify,
    warm_file,
    workload_shapes,
    writev_floor,
)
from _fmt import fmt_ratio, fmt_size, fmt_time  # the formatting report.py uses too

OPS = ("save", "load", "mmap", "mmap_touch", "load_other", "raw", "memory")
TIME_OPS = ("save", "save_durable", "load", "mmap", "mmap_touch", "load_other")
OP_LABEL = {
    "save": "save",
    "save_durable": "save + fsync (fastserial default) (d)",
    "load": "eager load",
    "mmap": "mmap load",
    "mmap_touch": "mmap load + touch",
    "load_other": "eager load, other lib's file (a)",
}
MEM_OPS = ("save", "load")
MEM_LABEL = {"save": "peak RSS delta, save", "load": "peak RSS delta, eager load"}

# The "floor" column: the same tensor bytes with no format, one system call each
# (measured with --ops raw, interleaved with the libraries' rounds).
FLOOR = "floor"
FLOOR_DESC = {
    "save": "os.writev of every tensor's bytes (one call per IOV_MAX = 1024 tensors), open + close",
    "load": "one readinto of the whole file into a preallocated uint8 tensor (fresh pages: "
    "the page faults are in the time), open + close",
    "mmap": "one mmap of the whole file (MAP_PRIVATE), as a float32 tensor",
    "mmap_touch": "that mmap, then one .sum() over all of it",
    "memory": "the loaded object itself at rest: the same tensors made by torch.zeros, nothing read",
}

# Small files: a checkpoint of a few MB loaded many times in a row (--small N).
SMALL_SHAPES = gpt2_shapes(n_layer=1, vocab=1024, n_ctx=256, d=256)
SMALL_DESC = "GPT-2 shapes with 1 layer, d 256, vocab 1024, ctx 256, float32"
SMALL_KEY = "small_files"  # its key in the results (and in the JSON, beside "workloads")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark torch.save/torch.load vs safetensors vs fastserial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma list of: " + ", ".join(WORKLOADS)
    )
    p.add_argument("--ops", default=",".join(OPS), help="comma list of: " + ", ".join(OPS))
    p.add_argument(
        "--only",
        default=None,
        help="comma list of libraries (default: all of "
        + ", ".join(BENCH_LIBS)
        + "; peers that are not installed are reported and skipped)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timings are the min of this many runs")
    p.add_argument("--quick", action="store_true", help="small sizes, for smoke testing")
    p.add_argument(
        "--small",
        type=int,
        default=200,
        metavar="N",
        help="eager-load a checkpoint of a few MB N times in a row per library and report "
        "p50/p99 latency (0: skip)",
    )
    p.add_argument(
        "--impl-module",
        default="fastserial",
        help="module providing save()/load() for the 'fastserial' column (e.g. 'torch' as a stand-in)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="call fastserial.set_num_threads(N) if it exists"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads() for the benchmark process (0: leave torch's default)",
    )
    p.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="do not os.sync() (untimed) before each timed save",
    )
    p.add_argument(
        "--no-mallopt",
        dest="mallopt",
        action="store_false",
        help="keep glibc's dynamic mmap threshold (see README)",
    )
    p.add_argument(
        "--tmpdir", default=None, help="directory for checkpoint files (must be a real disk)"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking loaded tensors against the originals",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="dump all numbers as JSON")
    p.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="emit Markdown tables (to stdout instead of the plain tables, or to PATH)",
    )
    a = p.parse_args(argv)
    a.workload_list = [w.strip() for w in a.workloads.split(",") if w.strip()]
    a.op_list = [o.strip() for o in a.ops.split(",") if o.strip()]
    for w in a.workload_list:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    for o in a.op_list:
        if o not in OPS:
            p.error(f"unknown op {o!r}")
    a.explicit_only = a.only is not None
    a.lib_list = [l.strip() for l in (a.only or ",".join(BENCH_LIBS)).split(",") if l.strip()]
    for l in a.lib_list:
        if l not in BENCH_LIBS:
            p.error(f"unknown library {l!r}")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.small < 0:
        p.error("--small must be >= 0")
    return a


class Recorder:
    """Collects best-of-N timings and errors for one workload."""

    def __init__(self, res):
        self.res = res

    def add_time(self, op, lib, secs):
        d = self.res["times"].setdefault(op, {}).setdefault(lib, {"runs": []})
        d["runs"].append(secs)
        d["best"] = min(d["runs"])

    def add_error(self, op, lib, exc):
        msg = f"{type(exc).__name__}: {exc}"
        self.res["times"].setdefault(op, {})[lib] = {"error": msg}
        log(f"  !! {lib} {op} failed: {msg}")
        tb = traceback.format_exc().strip().splitlines()
        if len(tb) > 1:
            log("     " + "\n     ".join(tb[-4:]))

    def failed(self, op, lib):
        return "error" in self.res["times"].get(op, {}).get(lib, {})


def run_workload(name, impls, args, tmpdir):
    R = args.repeats
    ops = args.op_list
    t_start = time.perf_counter()
    log(f"\n[{name}] building workload: {WORKLOAD_DESC[args.quick][name]}")
    obj = build_workload(name, args.quick)
    nbytes = data_bytes(obj)
    ntensors = sum(1 for _ in iter_tensors(obj))
    res = {
        "description": WORKLOAD_DESC[args.quick][name],
        "n_tensors": ntensors,
        "data_bytes": nbytes,
        "times": {},
        "memory": {},
        "baselines": {},
        "file_bytes": {},
        "verify": {},
    }
    rec = Recorder(res)
    by_name = {i.name: i for i in impls}
    # One sub-directory per library, same base name: torch.save derives the
    # archive's record prefix from the file name, so this keeps the torch and
    # fastserial files byte-comparable.
    paths = {i.name: os.path.join(tmpdir, i.name, f"{name}{i.ext}") for i in impls}
    floor_on = "raw" in ops
    floor_path = os.path.join(tmpdir, FLOOR, f"{name}.bin")
    for p in [*paths.values(), floor_path]:
        os.makedirs(os.path.dirname(p), exist_ok=True)
    log(f"[{name}] {ntensors} tensors, {fmt_size(nbytes)}")
    savers = [i for i in impls if i.can_save]

    # ---- save (timed), which also produces the files used by every load; the floor
    # (one writev of the same bytes) runs in the same rounds ----
    if "save" in ops:
        for rep in range(R):
            for impl in savers:
                if rec.failed("save", impl.name):
                    continue
                impl.remove_saved(paths[impl.name])
                try:
                    secs = timed_write(impl.save, obj, paths[impl.name])
                except Exception as e:
                    impl.remove_saved(paths[impl.name])
                    rec.add_error("save", impl.name, e)
                    continue
                rec.add_time("save", impl.name, secs)
                log(f"  save  {impl.name:<20} run {rep + 1}/{R}: {fmt_time(secs)}")
            if floor_on:
                rm(floor_path)
                secs = timed_write(writev_floor, obj, floor_path)
                rec.add_time("save", FLOOR, secs)
                log(f"  save  {'floor (writev)':<20} run {rep + 1}/{R}: {fmt_time(secs)}")
    else:
        for impl in savers:
            try:
                impl.save(obj, paths[impl.name])
            except Exception as e:
                impl.remove_saved(paths[impl.name])
                rec.add_error("save", impl.name, e)
        if floor_on:
            writev_floor(obj, floor_path)
    for impl in savers:
        files = [f for f in impl.saved_files(paths[impl.name]) if os.path.exists(f)]
        if files:
            res["file_bytes"][impl.name] = sum(os.path.getsize(f) for f in files)
        if files != [paths[impl.name]]:  # e.g. shards: not what its load reads
            impl.remove_saved(paths[impl.name])
    # ---- fastserial's default, durable save: the same, plus fsync of the file and
    # its directory before the rename. torch.save never syncs, so this row has no
    # torch number: it shows what durability costs on this disk.
    fs_impl = by_name.get("fastserial")
    if "save" in ops and fs_impl is not None and hasattr(fs_impl, "save_durable"):
        durable_path = paths["fastserial"] + ".durable"
        for rep in range(R):
            rm(durable_path)
            try:
                secs = timed_write(fs_impl.save_durable, obj, durable_path)
            except Exception as e:
                rec.add_error("save_durable", "fastserial", e)
                break
            rec.add_time("save_durable", "fastserial", secs)
            log(f"  save+fsync fastserial   run {rep + 1}/{R}: {fmt_time(secs)}")
        rm(durable_path)
    # Every library's input for the loads, in its own format, written outside the timed
    # region: the last save's file, or (for readers of safetensors files) the file
    # safetensors.torch.save_file writes.
    donor = paths.get("safetensors")
    for impl in impls:
        if impl.reads_format is None and rec.failed("save", impl.name):
            # No file of its own to load; a half-written one is removed by then.
            for op in ("load", "mmap", "mmap_touch"):
                if op in ops and (op == "load" or impl.can_mmap):
                    res["times"].setdefault(op, {})[impl.name] = {
                        "error": "no file to load: its save failed"
                    }
            continue
        try:
            impl.prepare_load_file(obj, paths[impl.name], donor)
        except Exception as e:
            impl.remove_saved(paths[impl.name])
            rm(paths[impl.name])
            rec.add_error("load", impl.name, e)
    have_file = [i for i in impls if os.path.exists(paths[i.name])]
    floor_ok = floor_on and os.path.exists(floor_path)

    # ---- raw write / read baselines (per tensor, buffered: kept for older results) ----
    if "raw" in ops:
        raw_path = os.path.join(tmpdir, f"{name}.raw")
        wr = []
        for _rep in range(R):
            rm(raw_path)
            wr.append(timed_write(raw_write, obj, raw_path))
        res["baselines"]["raw_write"] = {
            "best": min(wr),
            "runs": wr,
            "what": "open(path,'wb') + f.write(memoryview) per tensor",
        }
        log(f"  raw write: {fmt_time(min(wr))}")
        shapes_dtypes = [(t.shape, t.dtype) for t in iter_tensors(obj)]
        warm_file(raw_path)
        rd = [timed(raw_read_into, shapes_dtypes, raw_path) for _ in range(R)]
        res["baselines"]["raw_read"] = {
            "best": min(rd),
            "runs": rd,
            "what": "torch.empty + f.readinto(memoryview) per tensor",
        }
        log(f"  raw read:  {fmt_time(min(rd))}")
        rm(raw_path)

    # ---- loads ----
    load_fns = {
        "load": lambda i: (i.load, None),
        "mmap": lambda i: (i.load_mmap, None),
        "mmap_touch": lambda i: (i.load_mmap, touch),
    }
    floor_size = os.path.getsize(floor_path) if floor_ok else 0

    def floor_run(op):
        if op == "load":  # preallocated outside the timed region, pages not yet touched
            buf = torch.empty(floor_size, dtype=torch.uint8)
            return timed(readinto_floor, floor_path, buf)
        return timed(mmap_floor, floor_path, post=(_sum_all if op == "mmap_touch" else None))

    for op in ("load", "mmap", "mmap_touch"):
        if op not in ops:
            continue
        runners = [i for i in have_file if op == "load" or i.can_mmap]
        for impl in runners:
            warm_file(paths[impl.name])
        if floor_ok:
            warm_file(floor_path)
        for rep in range(R):
            for impl in runners:
                if rec.failed(op, impl.name):
                    continue
                fn, post = load_fns[op](impl)
                try:
                    secs = timed(fn, paths[impl.name], post=post)
                except Exception as e:
                    rec.add_error(op, impl.name, e)
                    continue
                rec.add_time(op, impl.name, secs)
                log(f"  {op:<10} {impl.name:<20} run {rep + 1}/{R}: {fmt_time(secs)}")
            if floor_ok:
                secs = floor_run(op)
                rec.add_time(op, FLOOR, secs)
                log(f"  {op:<10} {'floor':<20} run {rep + 1}/{R}: {fmt_time(secs)}")
        if op == "load" and floor_ok:
            # The same readinto into one buffer whose pages are already faulted: a copy
            # out of the page cache and nothing else (what is left without page faults).
            buf = torch.empty(floor_size, dtype=torch.uint8).zero_()
            runs = [timed(readinto_floor, floor_path, buf) for _ in range(R)]
            res["baselines"]["readinto_reused"] = {
                "best": min(runs),
                "runs": runs,
                "what": "one readinto of the whole file into a reused, already-faulted buffer",
            }
            if args.verify:
                res["verify"].setdefault(op, {})[FLOOR] = _verify_flat(obj, buf)
            del buf
            log(f"  load, floor into a reused buffer: {fmt_time(min(runs))}")
        if args.verify and op in ("load", "mmap"):
            for impl in runners:
                if rec.failed(op, impl.name):
                    continue
                try:
                    r = load_fns[op](impl)[0](paths[impl.name])
                    res["verify"].setdefault(op, {})[impl.name] = verify(obj, r)
                    del r
                except Exception as e:
                    res["verify"].setdefault(op, {})[impl.name] = f"ERROR: {type(e).__name__}: {e}"
                release_freed_memory()

    # ---- cross-loading: torch <-> fastserial files ----
    if "load_other" in ops and "torch" in by_name and "fastserial" in by_name:
        pairs = [  # (library that loads, library whose file it loads)
            ("torch", "fastserial"),
            ("fastserial", "torch"),
        ]
        pairs = [(a, b) for a, b in pairs if os.path.exists(paths[b])]
        for _, b in pairs:
            warm_file(paths[b])
        for rep in range(R):
            for a, b in pairs:
                if rec.failed("load_other", a):
                    continue
                try:
                    secs = timed(by_name[a].load, paths[b])
                except Exception as e:
                    rec.add_error("load_other", a, e)
                    continue
                rec.add_time("load_other", a, secs)
                log(f"  load {b}-file with {a:<10} run {rep + 1}/{R}: {fmt_time(secs)}")
        if args.verify:
            for a, b in pairs:
                if rec.failed("load_other", a):
                    continue
                try:
                    r = by_name[a].load(paths[b])
                    res["verify"].setdefault("load_other", {})[a] = verify(obj, r)
                    del r
                except Exception as e:
                    res["verify"].setdefault("load_other", {})[a] = (
                        f"ERROR: {type(e).__name__}: {e}"
                    )
                release_freed_memory()

    # ---- peak memory, each in a fresh process ----
    if "memory" in ops:
        script = os.path.abspath(__file__)
        for mop in MEM_OPS:
            for impl in impls:
                spec = {
                    "lib": impl.name,
                    "op": mop,
                    "workload": name,
                    "quick": args.quick,
                    "impl_module": args.impl_module,
                    "threads": args.threads,
                    "torch_threads": args.torch_threads,
                    "mallopt": args.mallopt,
                    "extra_path": getattr(impl, "extra_path", []),
                }
                if mop == "save":
                    if not impl.can_save:
                        continue
                    spec["path"] = os.path.join(tmpdir, f"memchild-{name}{impl.ext}")
                else:
                    if not os.path.exists(paths[impl.name]):
                        continue
                    spec["path"] = paths[impl.name]
                r = run_child(script, spec)
                if mop == "save":
                    impl.remove_saved(spec["path"])
                res["memory"].setdefault(mop, {})[impl.name] = r
                if "error" in r:
                    log(f"  !! memory {mop} {impl.name}: {r['error']}")
                else:
                    log(
                        f"  memory {mop:<5} {impl.name:<20}: peak +{r['peak_delta_bytes'] / MiB:.0f} MiB "
                        f"({r['ratio']:.2f}x data)"
                    )
        # The floor under every eager load's peak: the result itself, at rest.
        floor_spec = {
            "lib": "torch",
            "op": "rest",
            "workload": name,
            "quick": args.quick,
            "impl_module": "torch",
            "torch_threads": args.torch_threads,
            "mallopt": args.mallopt,
        }
        res["memory_floor"] = floor = run_child(script, floor_spec)
        loads = res["memory"].get("load", {})
        if floor.get("peak_delta_bytes"):
            res["memory_floor_ratio"] = {
                l: loads[l]["peak_delta_bytes"] / floor["peak_delta_bytes"]
                for l in loads
                if "peak_delta_bytes" in loads[l]
            }
            log(
                f"  memory floor (the {ntensors:,} loaded tensors themselves, at rest): "
                f"{floor['peak_delta_bytes'] / MiB:.1f} MiB; eager-load peak / floor: "
                + ", ".join(f"{l} {v:.2f}x" for l, v in res["memory_floor_ratio"].items())
            )

    for impl in impls:
        impl.remove_saved(paths[impl.name])
        rm(paths[impl.name])
    rm(floor_path)
    del obj
    release_freed_memory()
    res["elapsed_s"] = time.perf_counter() - t_start
    log(f"[{name}] done in {res['elapsed_s']:.1f} s")
    return res


def _sum_all(t):
    t.sum()


def _verify_flat(obj, buf) -> str:
    """The floor's readinto result holds every tensor's bytes, in order."""
    off = 0
    for t in iter_tensors(obj):
        n = t.numel() * t.element_size()
        got = buf[off : off + n].view(t.dtype).view(t.shape)
        if not torch.equal(got, t):
            return "MISMATCH: floor buffer differs from the tensor bytes"
        off += n
    return "ok" if off == buf.numel() else f"MISMATCH: {buf.numel()} bytes read, {off} expected"


def _timed_in_a_row(fn, *args):
    """timed() for loads in a tight loop: the same untimed malloc_trim, but only a young-
    generation gc between loads (a full collection of this process's heap takes tens of
    ms, longer than the loads)."""
    gc.collect(1)
    trim_freed_memory()
    t0 = time.perf_counter()
    r = fn(*args)
    t1 = time.perf_counter()
    del r
    return t1 - t0


def run_small(impls, args, tmpdir):
    """A checkpoint of a few MB, eager-loaded ``args.small`` times in a row by each library
    (one library after the other, not interleaved: a tight loop of loads, as a program
    that opens many small checkpoints runs). Latency p50 / p99 (nearest rank) and max."""
    n_iter = args.small
    t_start = time.perf_counter()
    obj = build_from_shapes(SMALL_SHAPES, seed=1)
    nbytes = data_bytes(obj)
    ntensors = sum(1 for _ in iter_tensors(obj))
    log(f"\n[small] {SMALL_DESC}: {ntensors} tensors, {fmt_size(nbytes)}; {n_iter} loads in a row")
    out = {
        "description": SMALL_DESC,
        "n_tensors": ntensors,
        "data_bytes": nbytes,
        "iterations": n_iter,
        "latency": {},
        "file_bytes": {},
        "verify": {},
        "errors": {},
    }
    d = os.path.join(tmpdir, "small")
    paths = {i.name: os.path.join(d, i.name, f"small{i.ext}") for i in impls}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    floor_path = os.path.join(d, "small.bin")
    for impl in impls:  # safetensors (the donor) comes before the peers that read its files
        try:
            impl.prepare_load_file(obj, paths[impl.name], paths.get("safetensors"))
            out["file_bytes"][impl.name] = os.path.getsize(paths[impl.name])
        except Exception as e:
            impl.remove_saved(paths[impl.name])
            rm(paths[impl.name])
            out["errors"][impl.name] = f"{type(e).__name__}: {e}"
    writev_floor(obj, floor_path)

    def record(lib, runs):
        out["latency"][lib] = {
            "p50": percentile(runs, 0.50),
            "p99": percentile(runs, 0.99),
            "min": min(runs),
            "max": max(runs),
            "mean": sum(runs) / len(runs),
            "runs": runs,
        }
        lat = out["latency"][lib]
        log(
            f"  small {lib:<20} p50 {fmt_time(lat['p50'])}, p99 {fmt_time(lat['p99'])}, "
            f"max {fmt_time(lat['max'])}"
        )

    for impl in impls:
        if impl.name in out["errors"]:
            continue
        path = paths[impl.name]
        warm_file(path)
        try:
            r = impl.load(path)  # also the warm-up: imports, first-call set-up
            if args.verify:
                out["verify"][impl.name] = verify(obj, r)
            del r
            release_freed_memory()
            runs = [_timed_in_a_row(impl.load, path) for _ in range(n_iter)]
        except Exception as e:
            out["errors"][impl.name] = f"{type(e).__name__}: {e}"
            log(f"  !! small {impl.name}: {out['errors'][impl.name]}")
            continue
        record(impl.name, runs)
    warm_file(floor_path)
    size = os.path.getsize(floor_path)
    runs = []
    for _ in range(n_iter):
        buf = torch.empty(size, dtype=torch.uint8)
        runs.append(_timed_in_a_row(readinto_floor, floor_path, buf))
    if args.verify:
        out["verify"][FLOOR] = _verify_flat(obj, buf)
    del buf
    record(FLOOR, runs)
    shutil.rmtree(d, ignore_errors=True)
    del obj
    release_freed_memory()
    out["elapsed_s"] = time.perf_counter() - t_start
    log(f"[small] done in {out['elapsed_s']:.1f} s")
    return out


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _best(res, op, lib):
    d = res["times"].get(op, {}).get(lib)
    if d is None:
        return None, "-"
    if "error" in d:
        return None, "ERR"
    return d["best"], fmt_time(d["best"])


def _fastest_other(vals, libs):
    """(ratio cell, name) of the fastest library other than fastserial: its number / fastserial's."""
    fs = vals.get("fastserial", (None,))[0]
    others = [(vals[l][0], l) for l in libs if l != "fastserial" and vals[l][0] is not None]
    if fs is None or not others:
        return "-"
    v, l = min(others)
    return f"{fmt_ratio(v, fs)} {l}"


def _has_floor(res):
    return any(FLOOR in d for d in res["times"].values())


def _ratio_columns(libs):
    """torch/fastserial and safetensors/fastserial, plus the fastest other library when
    peers were measured."""
    if "fastserial" not in libs:
        return [], False
    return [l for l in ("torch", "safetensors") if l in libs], any(l in libs for l in PEER_LIBS)


def workload_table(res, libs, markdown=False):
    ratio_libs, best_col = _ratio_columns(libs)
    floor = _has_floor(res)
    fs_floor = floor and "fastserial" in libs
    headers = (
        ["operation"]
        + libs
        + ([FLOOR] if floor else [])
        + [f"{l}/fastserial" for l in ratio_libs]
        + (["fastest other/fastserial"] if best_col else [])
        + (["fastserial/floor"] if fs_floor else [])
    )
    rows = []
    for op in TIME_OPS:
        if op not in res["times"]:
            continue
        vals = {l: _best(res, op, l) for l in libs + [FLOOR]}
        row = [OP_LABEL[op]] + [vals[l][1] for l in libs]
        row += [vals[FLOOR][1]] if floor else []
        row += [fmt_ratio(vals[l][0], vals["fastserial"][0]) for l in ratio_libs]
        row += [_fastest_other(vals, libs)] if best_col else []
        row += [fmt_ratio(vals["fastserial"][0], vals[FLOOR][0])] if fs_floor else []
        rows.append(row)
    mem_floor = (res.get("memory_floor") or {}).get("peak_delta_bytes")
    for mop in MEM_OPS:
        if mop not in res["memory"]:
            continue
        m = res["memory"][mop]
        cells, deltas = [], {}
        for l in libs:
            r = m.get(l)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("ERR")
            else:
                deltas[l] = r["peak_delta_bytes"]
                cells.append(f"{r['peak_delta_bytes'] / MiB:.0f} MiB ({r['ratio']:.2f}x)")
        row = [MEM_LABEL[mop]] + cells
        fl = mem_floor if mop == "load" else None
        if floor:
            row.append(
                f"{fl / MiB:.0f} MiB ({fl / res['data_bytes']:.2f}x)" if fl is not None else "-"
            )
        # ratios of near-zero deltas are noise: only show them above 1 MiB
        den = deltas.get("fastserial")
        den = den if den is not None and den >= MiB else None
        row += [fmt_ratio(deltas.get(l), den) for l in ratio_libs]
        if best_col:
            others = [(v, l) for l, v in deltas.items() if l != "fastserial"]
            row.append(
                f"{fmt_ratio(min(others)[0], den)} {min(others)[1]}" if others and den else "-"
            )
        if fs_floor:
            row.append(fmt_ratio(deltas.get("fastserial"), fl))
        rows.append(row)
    return render_table(headers, rows, markdown=markdown)


SMALL_ROWS = (("p50", "eager load, p50"), ("p99", "eager load, p99"), ("max", "eager load, max"))


def small_table(small, libs, markdown=False):
    lat = small["latency"]
    ratio_libs, best_col = _ratio_columns(libs)
    fs_floor = "fastserial" in libs and FLOOR in lat
    headers = (
        ["latency"]
        + libs
        + ([FLOOR] if FLOOR in lat else [])
        + [f"{l}/fastserial" for l in ratio_libs]
        + (["fastest other/fastserial"] if best_col else [])
        + (["fastserial/floor"] if fs_floor else [])
    )
    rows = []
    for key, label in SMALL_ROWS + (("p99/p50", "p99 / p50"),):
        if key == "p99/p50":
            row = [label] + [
                fmt_ratio(lat[l]["p99"], lat[l]["p50"]) if l in lat else "-" for l in libs
            ]
            row += [fmt_ratio(lat[FLOOR]["p99"], lat[FLOOR]["p50"])] if FLOOR in lat else []
            row += [""] * (len(headers) - len(row))
            rows.append(row)
            continue
        vals = {
            l: (lat[l][key], fmt_time(lat[l][key]))
            if l in lat
            else (None, "ERR" if l in small["errors"] else "-")
            for l in libs + [FLOOR]
        }
        row = [label] + [vals[l][1] for l in libs]
        row += [vals[FLOOR][1]] if FLOOR in lat else []
        row += [fmt_ratio(vals[l][0], vals["fastserial"][0]) for l in ratio_libs]
        row += [_fastest_other(vals, libs)] if best_col else []
        row += [fmt_ratio(vals["fastserial"][0], vals[FLOOR][0])] if fs_floor else []
        rows.append(row)
    return render_table(headers, rows, markdown=markdown)


def small_notes(small, libs):
    notes = [
        f"{small['iterations']} eager loads in a row of one {fmt_size(small['data_bytes'])} file "
        f"({small['n_tensors']} tensors) per library, one library after the other; "
        "each load timed on its own (young-generation gc + malloc_trim between loads, untimed); "
        "p50 / p99 are nearest-rank percentiles; floor = one readinto of the bare bytes "
        "into a fresh preallocated buffer"
    ]
    bad = [f"{l}: {v}" for l, v in small["verify"].items() if v != "ok"]
    if small["verify"]:
        notes.append("verify: " + ("all loads equal the originals" if not bad else "; ".join(bad)))
    if small["errors"]:
        notes.append("errors: " + "; ".join(f"{l}: {e}" for l, e in small["errors"].items()))
    return notes


def workload_notes(res, libs):
    notes = []
    b = res["baselines"]
    gib = res["data_bytes"] / GiB
    if "raw_write" in b:
        w = b["raw_write"]["best"]
        s = f"raw write baseline (f.write(memoryview) per tensor): {fmt_time(w)} ({gib / w:.2f} GiB/s)"
        parts = [
            f"{l} {fmt_ratio(_best(res, 'save', l)[0], w)}"
            for l in libs
            if _best(res, "save", l)[0]
        ]
        if parts:
            s += "; save / raw write: " + ", ".join(parts) + " (fastserial target <= 1.20x)"
        notes.append(s)
    if "readinto_reused" in b:
        r = b["readinto_reused"]["best"]
        f = _best(res, "load", FLOOR)[0]
        s = (
            f"floor, eager load into a reused buffer (pages already faulted: a copy from the "
            f"page cache and nothing else): {fmt_time(r)} ({gib / r:.2f} GiB/s)"
        )
        if f:
            s += f"; into fresh pages (the floor column): {fmt_time(f)} ({gib / f:.2f} GiB/s)"
        notes.append(s)
    if "raw_read" in b:
        r = b["raw_read"]["best"]
        s = f"raw read baseline (torch.empty + f.readinto per tensor): {fmt_time(r)} ({gib / r:.2f} GiB/s)"
        parts = [
            f"{l} {fmt_ratio(_best(res, 'load', l)[0], r)}"
            for l in libs
            if _best(res, "load", l)[0]
        ]
        if parts:
            s += "; eager load / raw read: " + ", ".join(parts)
        notes.append(s)
    if "load_other" in res["times"]:
        for a, b_ in (("fastserial", "torch"), ("torch", "fastserial")):
            own, other = _best(res, "load", a)[0], _best(res, "load_other", a)[0]
            if own and other:
                notes.append(
                    f"(a) {a}.load: own file {fmt_time(own)}, {b_}-written file {fmt_time(other)} "
                    f"(other/own = {other / own:.2f}x)"
                )
    floor = res.get("memory_floor") or {}
    loads = res["memory"].get("load", {})
    if "peak_delta_bytes" in floor and loads:
        f = floor["peak_delta_bytes"]
        parts = [
            f"{l} {loads[l]['peak_delta_bytes'] / f:.2f}x"
            for l in libs
            if "peak_delta_bytes" in loads.get(l, {})
        ]
        s = (
            f"(m) the loaded object itself, made with torch.zeros (nothing read): {f / MiB:.0f} MiB "
            f"({floor['ratio']:.2f}x data), a floor no eager load can go under; "
            "eager-load peak / that floor: " + ", ".join(parts)
        )
        fs = loads.get("fastserial", {}).get("peak_delta_bytes")
        if fs is not None:
            s += f"; fastserial's peak above it: {(fs - f) / MiB:.0f} MiB ({(fs - f) / res['data_bytes']:.2f}x data)"
        notes.append(s)
    readers = [l for l in ("runai-model-streamer", "fastsafetensors") if l in libs]
    if readers:
        notes.append(
            " and ".join(readers)
            + ": load the single file safetensors.torch.save_file writes (made untimed)"
            + (
                "; fastsafetensors' save writes 16 shard files (ParallelSaver's default)"
                if "fastsafetensors" in res["file_bytes"]
                else ""
            )
        )
    if res["file_bytes"]:
        notes.append(
            "file sizes: "
            + ", ".join(f"{l} {fmt_size(s)}" for l, s in res["file_bytes"].items())
            + f" (tensor data {fmt_size(res['data_bytes'])})"
        )
    bad = []
    for op, d in res["verify"].items():
        for lib, v in d.items():
            if v != "ok":
                bad.append(f"{lib} {op}: {v}")
    if res["verify"]:
        notes.append(
            "verify: " + ("all loaded tensors equal the originals" if not bad else "; ".join(bad))
        )
    errs = [
        f"{lib} {op}: {d['error']}"
        for op, dd in res["times"].items()
        for lib, d in dd.items()
        if "error" in d
    ]
    errs += [
        f"{lib} memory {op}: {d['error']}"
        for op, dd in res["memory"].items()
        for lib, d in dd.items()
        if "error" in d
    ]
    if errs:
        notes.append("errors: " + "; ".join(errs))
    return notes


LEGEND = [
    "times are the best of {R} runs (time.perf_counter), page cache warm, files on {fs} under {tmp}",
    "X/fastserial columns = X's number divided by fastserial's (> 1 means fastserial is faster / uses less memory)",
    "mmap load + touch = mmap load, then t.sum() on every tensor (reads every page)",
    "peak RSS delta = peak resident memory above the level before the call, in a fresh process; "
    "in parentheses as a multiple of the tensor data size",
    "safetensors: eager load = {st_load}; mmap load = {st_mmap}",
]


def floor_legend(meta):
    fl = meta.get("floor")
    if not fl:
        return []
    return [
        "floor = the same tensor bytes with no format, interleaved with the libraries' rounds: "
        + "; ".join(f"{op}: {what}" for op, what in fl.items())
    ]


def peer_legend(meta):
    out = []
    for lib in PEER_LIBS:
        api = meta["libs"].get(lib, {}).get("api")
        if api:
            calls = "; ".join(f"{op} = {c}" for op, c in api.items() if c)
            out.append(f"{lib} {meta['libs'][lib]['version']}: {calls}")
    out += [f"{lib}: not measured ({why})" for lib, why in meta.get("unavailable", {}).items()]
    return out


def render_report(results, meta, libs, args, markdown):
    small = results.get(SMALL_KEY)
    results = {k: v for k, v in results.items() if k != SMALL_KEY}
    out = []
    fs = meta.get("tmpdir", {})
    st_desc = meta["libs"].get("safetensors", {}).get("api", {})
    legend = [
        l.format(
            R=args.repeats,
            fs=fs.get("fstype", "?"),
            tmp=fs.get("path", "?"),
            st_load=st_desc.get("load", "n/a"),
            st_mmap=st_desc.get("mmap", "n/a"),
        )
        for l in LEGEND
    ]
    fsm = meta["libs"].get("fastserial", {})
    if fsm.get("stand_in"):
        legend.insert(
            0,
            f"NOTE: the 'fastserial' column is the stand-in module {fsm['impl_module']!r}, not fastserial",
        )
    pc = meta.get("process", {})
    legend.append(
        f"process: torch intra-op threads = {pc.get('torch_threads')}; glibc mmap threshold "
        + (
            f"fixed at {pc['mallopt_mmap_threshold'] // 1024} KiB + malloc_trim between runs (every large allocation gets fresh pages)"
            if pc.get("mallopt_mmap_threshold")
            else "glibc default (dynamic)"
        )
        + (
            "; os.sync() (untimed) before every timed save / raw write"
            if pc.get("sync_before_saves")
            else ""
        )
    )
    legend += floor_legend(meta) + peer_legend(meta)
    if fsm.get("num_threads") is not None:
        legend.append(f"fastserial threads: {fsm['num_threads']}")
    if not fsm.get("stand_in"):
        legend.append(
            "save = fastserial.save(obj, path, fsync=False), like for like with torch.save and the raw "
            "write (neither syncs; the atomic rename still happens); (d) save + fsync = fastserial's "
            "default, durable save: fsync of the file and its directory before the rename"
        )
    if markdown:
        out.append("## fastserial benchmark" + (" (quick)" if args.quick else ""))
        out.append("")
        out += [f"- {l}" for l in meta_lines(meta)]
        out.append("")
        for name, res in results.items():
            out.append(f"### {name}: {res['description']}")
            out.append("")
            out.append(workload_table(res, libs, markdown=True))
            out.append("")
            out += [f"- {n}" for n in workload_notes(res, libs)]
            out.append("")
        if small:
            out.append(f"### small files: {small['description']}")
            out.append("")
            out.append(small_table(small, libs, markdown=True))
            out.append("")
            out += [f"- {n}" for n in small_notes(small, libs)]
            out.append("")
        out.append("Notes:")
        out.append("")
        out += [f"- {l}" for l in legend]
    else:
        out.append("=" * 78)
        out.append("fastserial benchmark" + (" (quick)" if args.quick else ""))
        out += meta_lines(meta)
        for name, res in results.items():
            out.append("")
            out.append(
                f"== {name}: {res['description']} -- {res['n_tensors']} tensors, {fmt_size(res['data_bytes'])}"
            )
            out.append(workload_table(res, libs))
            out += [f"  {n}" for n in workload_notes(res, libs)]
        if small:
            out.append("")
            out.append(
                f"== small files: {small['description']} -- {small['n_tensors']} tensors, "
                f"{fmt_size(small['data_bytes'])}, {small['iterations']} loads in a row"
            )
            out.append(small_table(small, libs))
            out += [f"  {n}" for n in small_notes(small, libs)]
        out.append("")
        out += [f"* {l}" for l in legend]
    return "\n".join(out)


def write_chart_and_hint(json_path):
    """The chart of the run (report.py), beside its JSON, and how to put it in the README."""
    from report import write_chart

    try:
        svg = write_chart(json_path)
    except Exception as e:  # the results are written; a chart bug must not hide them
        log(f"!! chart not written: {type(e).__name__}: {e}")
        return
    log(f"chart written to {svg}")
    log(f"README table and chart: python bench/report.py {json_path} --readme README.md")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    proc_cfg, impls, libs = start_run(args)
    fsimpl = next((i for i in impls if i.name == "fastserial"), None)
    if fsimpl is not None and fsimpl.module_name != "fastserial":
        log(
            f"NOTE: the 'fastserial' column is backed by the stand-in module {fsimpl.module_name!r}"
        )

    biggest = max(
        sum(prod(s) for _, s in workload_shapes(w, args.quick)) * 4 for w in args.workload_list
    )
    tmpdir = tempfile.mkdtemp(prefix="fastserial-bench-", dir=args.tmpdir)
    tmpinfo = check_tmpdir(tmpdir, biggest * (len(impls) + 2))
    meta = system_meta(
        impls,
        {
            "tmpdir": tmpinfo,
            "repeats": args.repeats,
            "quick": args.quick,
            "ops": args.op_list,
            "process": proc_cfg,
        },
    )
    if "raw" in args.op_list:
        meta["floor"] = FLOOR_DESC
    log("\n".join(meta_lines(meta)))
    log(f"checkpoint files in {tmpdir} ({tmpinfo['fstype']})")

    results = {}
    try:
        for w in args.workload_list:
            results[w] = run_workload(w, impls, args, tmpdir)
        if args.small:
            results[SMALL_KEY] = run_small(impls, args, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    meta["total_elapsed_s"] = time.perf_counter() - t0

    emit_report(render_report, results, meta, libs, args, log_written=log)
    if not args.json:  # keep every run's full results, out of git's way
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.json = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "local", f"run-{stamp}.json"
        )
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            out = {
                "meta": meta,
                "args": {k: v for k, v in vars(args).items()},
                "workloads": {k: v for k, v in results.items() if k != SMALL_KEY},
            }
            if SMALL_KEY in results:
                out["small_files"] = results[SMALL_KEY]
            json.dump(out, f, indent=2)
        log(f"json written to {args.json}")
        write_chart_and_hint(args.json)
    log(f"total time {meta['total_elapsed_s']:.1f} s; full results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
