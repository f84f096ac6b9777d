"""Safe (weights_only=True) versus unsafe (weights_only=False) load time, in one process.

The safe path must not be slower than the unsafe one by more than a few percent on a
state dict with many small tensors, where per-tensor overhead dominates. Both loads
read the same file from the page cache; they alternate, after warm-up rounds, and the
best of N is reported (plus the median, to show the noise)::

    python bench/safe_vs_unsafe.py                    # 20,000 tensors, 9 rounds
    python bench/safe_vs_unsafe.py --tensors 100000 --rounds 15 --numel 64
    python bench/safe_vs_unsafe.py --saver torch      # a file written by torch.save

Prints the times and the ratio safe/unsafe; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

try:
    import fastserial
except ImportError:  # an in-tree build that is not installed
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    )
    import fastserial


def state_dict(tensors: int, numel: int) -> dict:
    """A transformer-like state dict: weights, biases and norms, ``tensors`` entries."""
    out = {}
    for i in range(tensors):
        kind = ("weight", "bias", "norm.weight", "norm.bias")[i % 4]
        out[f"layers.{i // 4}.{kind}"] = torch.randn(numel)
    return out


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--numel", type=int, default=16, help="elements per tensor")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--saver", choices=("fastserial", "torch"), default="fastserial")
    parser.add_argument("--mmap", action="store_true", help="load with mmap=True")
    args = parser.parse_args()

    torch.set_num_threads(1)
    sd = state_dict(args.tensors, args.numel)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state_dict.pt")
        (fastserial.save if args.saver == "fastserial" else torch.save)(sd, path)
        size = os.path.getsize(path)
        del sd

        def safe():
            return fastserial.load(path, weights_only=True, mmap=args.mmap)

        def unsafe():
            return fastserial.load(path, weights_only=False, mmap=args.mmap)

        for _ in range(args.warmup):
            timed(safe)
            timed(unsafe)
        safe_times, unsafe_times = [], []
        for i in range(args.rounds):
            # Alternate which goes first, so drift does not favour one side.
            order = (safe, unsafe) if i % 2 == 0 else (unsafe, safe)
            for fn in order:
                (safe_times if fn is safe else unsafe_times).append(timed(fn))

    best_safe, best_unsafe = min(safe_times), min(unsafe_times)
    print(
        f"fastserial {fastserial.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}"
    )
    print(
        f"state dict: {args.tensors:,} tensors x {args.numel} float32, file {size / 2**20:.1f} MiB, "
        f"saved by {args.saver}{', mmap=True' if args.mmap else ''}"
    )
    print(f"rounds: {args.rounds} (after {args.warmup} warm-up), best / median")
    print(
        f"  weights_only=True : {best_safe * 1e3:8.2f} ms / {statistics.median(safe_times) * 1e3:8.2f} ms"
    )
    print(
        f"  weights_only=False: {best_unsafe * 1e3:8.2f} ms / {statistics.median(unsafe_times) * 1e3:8.2f} ms"
    )
    print(
        f"  ratio safe/unsafe : {best_safe / best_unsafe:8.3f} (best)   "
        f"{statistics.median(safe_times) / statistics.median(unsafe_times):.3f} (median)"
    )


if __name__ == "__main__":
    main()
