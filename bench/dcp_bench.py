"""torch.distributed.checkpoint: torch's FileSystemWriter/Reader vs fastserial.dcp.

    python bench/dcp_bench.py [--mib 256] [--repeats 3] [--dir DIR]

Saves a state dict of ``--mib`` MiB (8 DTensors sharded by rows over 2 ranks, plus 64
small replicated tensors) with 2 ranks (gloo on the CPU, one process per rank), then
loads it at world size 2, at world size 1 (this process, plain tensors) and at world
size 4 (resharded: each rank needs half of one saved chunk), with each library's writer
and reader; and converts it to one torch.save file (``dcp_to_torch_save``). Saves fsync
(both libraries' default). The page cache is warm for the loads (each reads what was
just written), the same for both libraries. Times are the best of ``--repeats``,
measured on rank 0 between barriers. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
LIBS = ("torch", "fastserial")
N_BIG = 8
N_SMALL = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _classes(lib: str):
    import torch.distributed.checkpoint as dcp

    if lib == "torch":
        return dcp.FileSystemWriter, dcp.FileSystemReader
    import fastserial.dcp as fdcp

    return fdcp.FileSystemWriter, fdcp.FileSystemReader


def _shapes(mib: int) -> dict:
    rows = mib * (1 << 20) // 4 // 2048 // N_BIG
    shapes = {f"layers.{i}.weight": (rows, 2048) for i in range(N_BIG)}
    shapes.update({f"layers.{i}.bias": (4096,) for i in range(N_SMALL)})
    return shapes


def _full(name: str, shape):
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


# --------------------------------------------------------------------------- ranks


def _rank_main(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    shapes = _shapes(args.mib)

    def state(values: bool) -> dict:
        sd = {}
        for name, shape in shapes.items():
            full = _full(name, shape) if values else torch.empty(shape)
            if len(shape) == 2:
                local = full.chunk(world)[rank].clone()
                sd[name] = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
                )
            else:
                sd[name] = full
        return sd

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            dist.barrier()
            t = time.perf_counter()
            fn()
            dist.barrier()
            best = min(best, time.perf_counter() - t)
        return best

    times = {}
    if args.phase == "save2":
        sd = state(True)
        for lib in LIBS:
            writer_cls, reader_cls = _classes(lib)
            path = os.path.join(args.dir, lib)
            times[f"save/{lib}"] = timed(
                lambda w=writer_cls, p=path: dcp.save(sd, storage_writer=w(p))
            )
        del sd
    dst = state(False)
    for lib in LIBS:
        _, reader_cls = _classes(lib)
        path = os.path.join(args.dir, lib)
        times[f"load{world}/{lib}"] = timed(
            lambda r=reader_cls, p=path: dcp.load(dst, storage_reader=r(p))
        )
    if rank == 0:
        with open(os.path.join(args.dir, f"times-{args.phase}.json"), "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()


def _launch(args, phase: str, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, __file__, "--rank-phase", phase, "--dir", args.dir]
    cmd += ["--mib", str(args.mib), "--repeats", str(args.repeats)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{phase}: ranks exited with {codes}")
    with open(os.path.join(args.dir, f"times-{phase}.json")) as f:
        return json.load(f)


def _single_process(args) -> dict:
    import fastserial.dcp as fdcp
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import format_utils

    shapes = _shapes(args.mib)
    times = {}
    for lib in LIBS:
        _, reader_cls = _classes(lib)
        path = os.path.join(args.dir, lib)
        dst = {name: torch.empty(shape) for name, shape in shapes.items()}
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            dcp.load(dst, storage_reader=reader_cls(path), no_dist=True)
            best = min(best, time.perf_counter() - t)
        times[f"load1/{lib}"] = best
        ok = all(torch.equal(dst[n], _full(n, s)) for n, s in shapes.items())
        if not ok:
            raise SystemExit(f"{lib}: the world-size-1 load differs from what was saved")
        del dst
        convert = format_utils.dcp_to_torch_save if lib == "torch" else fdcp.dcp_to_torch_save
        out = os.path.join(args.dir, f"{lib}.pt")
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            convert(path, out)
            best = min(best, time.perf_counter() - t)
            os.unlink(out)
        times[f"to_torch_save/{lib}"] = best
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--rank-phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_phase:
        args.phase = args.rank_phase
        _rank_main(args)
        return
    own_dir = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="dcp-bench-")
    try:
        log(f"[dcp_bench] {args.mib} MiB, 2 ranks, best of {args.repeats}, in {args.dir}")
        times = _launch(args, "save2", 2)
        log("[dcp_bench] world size 1 loads and conversions")
        times.update(_single_process(args))
        log("[dcp_bench] world size 4 loads")
        times.update(_launch(args, "load4", 4))
    finally:
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
    import fastserial
    import torch

    print(
        f"DCP benchmark: {args.mib} MiB ({N_BIG} row-sharded DTensors + {N_SMALL} small "
        f"replicated tensors), saved by 2 ranks (gloo, CPU), best of {args.repeats}"
    )
    print(
        f"torch {torch.__version__}, fastserial {fastserial.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, fastserial threads "
        f"{fastserial.get_num_threads()}; saves fsync; loads from a warm page cache"
    )
    print()
    print(f"| {'operation':<48} | {'torch':>9} | {'fastserial':>10} | {'speed-up':>8} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 12}|{'-' * 10}|")
    rows = [
        ("save, world size 2", "save"),
        ("load, world size 2", "load2"),
        ("load, world size 1 (whole chunks)", "load1"),
        ("load, world size 4 (half chunks, resharded)", "load4"),
        ("dcp_to_torch_save (fastserial fsyncs, torch not)", "to_torch_save"),
    ]
    gib = args.mib / 1024
    for label, key in rows:
        t, f = times[f"{key}/torch"], times[f"{key}/fastserial"]
        print(f"| {label:<48} | {t:8.3f}s | {f:9.3f}s | {t / f:7.2f}x |")
    print()
    t, f = times["save/torch"], times["save/fastserial"]
    print(f"save throughput: torch {gib / t:.2f} GiB/s, fastserial {gib / f:.2f} GiB/s")


if __name__ == "__main__":
    main()
