#!/usr/bin/env python3
"""fastserial scaling table: how save / eager load / mmap load scale with the
number of tensors and with the total size, torch vs fastserial.

    python bench/scaling.py                          # 1k/10k/100k tensors; 64 MiB, 256 MiB, 1 GiB
    python bench/scaling.py --max-size 4G            # also the 4 GiB case (needs ~8 GiB disk, ~12 GiB RAM)
    python bench/scaling.py --impl-module torch      # torch stands in for fastserial
    python bench/scaling.py --quick                  # smoke test

See bench/README.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import shutil
import tempfile
import time
from math import prod

from _common import (
    ALL_LIBS,
    GiB,
    MiB,
    build_from_shapes,
    check_tmpdir,
    data_bytes,
    emit_report,
    fmt_ratio,
    fmt_size,
    fmt_time,
    log,
    meta_lines,
    parse_size,
    release_freed_memory,
    render_table,
    rm,
    start_run,
    system_meta,
    timed,
    timed_write,
    touch,
    warm_file,
)

OPS = ("save", "load", "mmap", "mmap_touch")
OP_LABEL = {
    "save": "save",
    "load": "eager load",
    "mmap": "mmap load",
    "mmap_touch": "mmap load + touch",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Scaling of save/load time with tensor count and total size (torch vs fastserial).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--counts", default="1000,10000,100000", help="numbers of 256-float32 tensors (1 KiB each)"
    )
    p.add_argument(
        "--sizes", default="64M,256M,1G,4G", help="total sizes for the few-big-tensors cases"
    )
    p.add_argument(
        "--max-size",
        default="1G",
        help="skip size cases above this (4G needs ~8 GiB free disk and ~12 GiB RAM incl. page cache)",
    )
    p.add_argument(
        "--big-tensors", type=int, default=8, help="number of tensors the size cases are split into"
    )
    p.add_argument("--ops", default="save,load,mmap", help="comma list of: " + ", ".join(OPS))
    p.add_argument(
        "--only", default=None, help="comma list of libraries (default: torch,fastserial)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timings are the min of this many runs")
    p.add_argument("--quick", action="store_true", help="counts 1000,10000 and sizes 16M,64M")
    p.add_argument(
        "--impl-module",
        default="fastserial",
        help="module for the 'fastserial' column ('torch' = stand-in)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="call fastserial.set_num_threads(N) if it exists"
    )
    p.add_argument(
        "--torch-threads", type=int, default=1, help="torch.set_num_threads() (0: torch default)"
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
        help="keep glibc's dynamic mmap threshold",
    )
    p.add_argument(
        "--tmpdir", default=None, help="directory for checkpoint files (must be a real disk)"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="dump all numbers as JSON")
    p.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="Markdown output (stdout or PATH)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.counts, a.sizes, a.max_size = "1000,10000", "16M,64M", "64M"
    a.count_list = [int(x) for x in a.counts.split(",") if x.strip()]
    a.size_list = [parse_size(x) for x in a.sizes.split(",") if x.strip()]
    a.max_bytes = parse_size(a.max_size)
    a.op_list = [o.strip() for o in a.ops.split(",") if o.strip()]
    for o in a.op_list:
        if o not in OPS:
            p.error(f"unknown op {o!r}")
    a.explicit_only = a.only is not None
    a.lib_list = [l.strip() for l in (a.only or "torch,fastserial").split(",") if l.strip()]
    for l in a.lib_list:
        if l not in ALL_LIBS:
            p.error(f"unknown library {l!r}")
    if a.big_tensors < 1 or a.repeats < 1:
        p.error("--big-tensors and --repeats must be >= 1")
    return a


def make_cases(args):
    cases = []
    for n in args.count_list:
        cases.append(
            {
                "kind": "count",
                "label": f"{n:,} x 1 KiB",
                "shapes": [(f"param_{i:06d}", (256,)) for i in range(n)],
            }
        )
    skipped = []
    for size in args.size_list:
        if size > args.max_bytes:
            skipped.append(size)
            continue
        k = args.big_tensors
        elems = size // 4 // k
        shape = (elems // 1024, 1024) if elems % 1024 == 0 else (elems,)
        cases.append(
            {
                "kind": "size",
                "label": f"{fmt_size(size)} ({k} x {fmt_size(elems * 4)})",
                "shapes": [(f"tensor_{i:02d}", shape) for i in range(k)],
            }
        )
    if skipped:
        log(
            "skipping size cases above --max-size "
            f"{fmt_size(args.max_bytes)}: {', '.join(fmt_size(s) for s in skipped)} "
            f"(run with --max-size {fmt_size(max(skipped)).replace(' ', '').replace('.00', '')} to include them)"
        )
    return cases


def run_case(case, impls, args, tmpdir):
    R = args.repeats
    t_case = time.perf_counter()
    obj = build_from_shapes(case["shapes"])
    nbytes, ntensors = data_bytes(obj), len(case["shapes"])
    res = {
        "label": case["label"],
        "kind": case["kind"],
        "n_tensors": ntensors,
        "data_bytes": nbytes,
        "times": {},
        "errors": {},
    }
    log(f"\n[{case['label']}] {ntensors} tensors, {fmt_size(nbytes)}")
    free = shutil.disk_usage(tmpdir).free
    if free < nbytes * len(impls) * 1.05 + 256 * MiB:
        log(f"  skipped: needs ~{fmt_size(nbytes * len(impls))} of disk, {fmt_size(free)} free")
        res["skipped"] = "not enough disk"
        return res
    paths = {i.name: os.path.join(tmpdir, i.name, f"scaling{i.ext}") for i in impls}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)

    def add(op, lib, secs):
        d = res["times"].setdefault(op, {}).setdefault(lib, {"runs": []})
        d["runs"].append(secs)
        d["best"] = min(d["runs"])

    def fail(op, lib, e):
        res["errors"].setdefault(op, {})[lib] = f"{type(e).__name__}: {e}"
        log(f"  !! {lib} {op} failed: {type(e).__name__}: {e}")

    # saves (timed or not) -- they produce the files for the loads
    timed_save = "save" in args.op_list
    for rep in range(R if timed_save else 1):
        for impl in impls:
            if impl.name in res["errors"].get("save", {}):
                continue
            rm(paths[impl.name])
            try:
                secs = timed_write(impl.save, obj, paths[impl.name])
            except Exception as e:
                rm(paths[impl.name])
                fail("save", impl.name, e)
                continue
            if timed_save:
                add("save", impl.name, secs)
                log(f"  save       {impl.name:<12} run {rep + 1}/{R}: {fmt_time(secs)}")
    # The original is no longer needed: free it so the largest case fits in RAM.
    del obj
    release_freed_memory()

    have = [i for i in impls if os.path.exists(paths[i.name])]
    for op in ("load", "mmap", "mmap_touch"):
        if op not in args.op_list:
            continue
        for impl in have:
            warm_file(paths[impl.name])
        for rep in range(R):
            for impl in have:
                if impl.name in res["errors"].get(op, {}):
                    continue
                fn = impl.load if op == "load" else impl.load_mmap
                post = touch if op == "mmap_touch" else None
                try:
                    secs = timed(fn, paths[impl.name], post=post)
                except Exception as e:
                    fail(op, impl.name, e)
                    continue
                add(op, impl.name, secs)
                log(f"  {op:<10} {impl.name:<12} run {rep + 1}/{R}: {fmt_time(secs)}")
    for p in paths.values():
        rm(p)
    res["elapsed_s"] = time.perf_counter() - t_case
    return res


def _fmt_us(us):
    return f"{us:.0f}" if us >= 1000 else (f"{us:.1f}" if us >= 100 else f"{us:.2f}")


def render(results, meta, libs, args, markdown):
    headers = ["case", "op"]
    for l in libs:
        headers += [l, "us/tensor", "GiB/s"]
    ratio = "torch" in libs and "fastserial" in libs
    if ratio:
        headers.append("torch/fastserial")
    rows = []
    for res in results:
        if res.get("skipped"):
            rows.append([res["label"], "skipped: " + res["skipped"]] + [""] * (len(headers) - 2))
            continue
        for op in OPS:
            if op not in args.op_list:
                continue
            row = [res["label"], OP_LABEL[op]]
            best = {}
            for l in libs:
                if l in res["errors"].get(op, {}):
                    row += ["ERR", "", ""]
                    continue
                d = res["times"].get(op, {}).get(l)
                if d is None:
                    row += ["-", "", ""]
                    continue
                t = best[l] = d["best"]
                row += [
                    fmt_time(t),
                    _fmt_us(t / res["n_tensors"] * 1e6),
                    f"{res['data_bytes'] / GiB / t:.2f}",
                ]
            if ratio:
                row.append(fmt_ratio(best.get("torch"), best.get("fastserial")))
            rows.append(row)
    legend = [
        f"best of {args.repeats} runs, page cache warm, files on {meta['tmpdir']['fstype']}; "
        "us/tensor = time / number of tensors; GiB/s = tensor bytes / time",
        "torch/fastserial = torch time / fastserial time (> 1: fastserial faster)",
        "mmap load does not read the tensor data, so its GiB/s is nominal (bytes made available per second)",
        f"process: torch intra-op threads = {meta['process']['torch_threads']}, glibc mmap threshold "
        + (
            "fixed at 128 KiB + malloc_trim between runs"
            if meta["process"]["mallopt_mmap_threshold"]
            else "default"
        )
        + (
            "; os.sync() (untimed) before every timed save"
            if meta["process"].get("sync_before_saves")
            else ""
        ),
    ]
    fsm = meta["libs"].get("fastserial", {})
    if fsm.get("stand_in"):
        legend.insert(
            0, f"NOTE: the 'fastserial' column is the stand-in module {fsm['impl_module']!r}"
        )
    grouped = {}
    for r in results:
        for op, d in r.get("errors", {}).items():
            for l, m in d.items():
                grouped.setdefault((l, op, m), []).append(r["label"])
    errs = [f"{l} {op}: {m} [{', '.join(labels)}]" for (l, op, m), labels in grouped.items()]
    out = []
    if markdown:
        out += ["## fastserial scaling", ""] + [f"- {l}" for l in meta_lines(meta)] + [""]
        out.append(render_table(headers, rows, markdown=True))
        out.append("")
        out += [f"- {l}" for l in legend + (["errors: " + "; ".join(errs)] if errs else [])]
    else:
        out += ["=" * 78, "fastserial scaling"] + meta_lines(meta) + [""]
        out.append(render_table(headers, rows))
        out.append("")
        out += [f"* {l}" for l in legend + (["errors: " + "; ".join(errs)] if errs else [])]
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    proc_cfg, impls, libs = start_run(args)
    cases = make_cases(args)
    tmpdir = tempfile.mkdtemp(prefix="fastserial-scaling-", dir=args.tmpdir)
    biggest = max((sum(4 * prod(s) for _, s in c["shapes"]) for c in cases), default=0)
    tmpinfo = check_tmpdir(tmpdir, biggest * len(impls))
    meta = system_meta(impls, {"tmpdir": tmpinfo, "repeats": args.repeats, "process": proc_cfg})
    log("\n".join(meta_lines(meta)))
    results = []
    try:
        for c in cases:
            results.append(run_case(c, impls, args, tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    meta["total_elapsed_s"] = time.perf_counter() - t0
    emit_report(render, results, meta, libs, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "cases": results}, f, indent=2)
    log(f"total time {meta['total_elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
