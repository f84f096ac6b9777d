#!/usr/bin/env python3
"""Mutation fuzzer for the native unpickler (rust/src/python/unpickle.rs), run from Python.

cargo-fuzz cannot host the native unpickler (it needs an interpreter and torch), so this
driver does the same job from outside: it mutates real ``data.pkl`` records, puts each
mutant back into a valid archive (names and order kept, CRC32s right, so the damage
reaches the scanner and the unpickler rather than the zip reader), and loads batches of
mutants in child interpreters with ``fastserial.load(..., weights_only=True)`` from a
path and from ``BytesIO``. It checks that:

* nothing crashes or hangs a child (a signal, an abort, a panic that kills it, or a load
  taking more than ``--hang`` seconds: the child dumps its stacks and exits);
* every failure is a typed error: ``fastserial.CheckpointError``,
  ``pickle.UnpicklingError``, or exactly the exception type ``torch.load`` raises for
  the same bytes (computed only when fastserial raises something else).

Seeds: the ``data.pkl`` of every zip fixture in tests/data and of the torch-written
checkpoints of tests/test_native_unpickler_fuzz.py (protocols 2 and 4). Mutations: that
test's mutators (byte flips and edits, opcode insertions, deletions, duplications,
swaps, memo-index, int and FRAME edits, truncation), stacked 1-3 deep, plus splicing
(the head of one pickle, cut at an opcode, joined to the tail of another).

    python fuzz/unpickler_fuzz.py --seconds 300 --seed 1

Deterministic for a seed (mutant ``i`` of a run depends only on the seed and ``i``).
A crash, hang or untyped escape is saved under fuzz/artifacts/unpickler/ (git-ignored)
as ``<kind>-<sha1>.pt`` with a ``.txt`` describing it; replay one with
``python fuzz/unpickler_fuzz.py --replay FILE``. Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import pickletools
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "fuzz" / "artifacts" / "unpickler"
sys.path.insert(0, str(ROOT / "tests"))

_CHILD = r"""
import faulthandler, io, json, pickle, sys, warnings
warnings.simplefilter("ignore")
import fastserial, torch

hang = float(sys.argv[1])
ALLOWED = (fastserial.CheckpointError, pickle.UnpicklingError)

def name(e):
    t = type(e)
    return f"{t.__module__}.{t.__qualname__}"

def torch_outcome(raw):
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
        return "loaded"
    except BaseException as e:  # noqa: BLE001
        return name(e)

for path in sys.argv[2:]:
    raw = open(path, "rb").read()
    out = {}
    for how in ("path", "bytesio"):
        print("START", path, how, flush=True)
        faulthandler.dump_traceback_later(hang, exit=True)
        try:
            fastserial.load(path if how == "path" else io.BytesIO(raw), weights_only=True)
            out[how] = ["loaded"]
        except ALLOWED as e:
            out[how] = ["typed", name(e)]
        except BaseException as e:  # noqa: BLE001 - judged by the parent
            out[how] = ["untyped", name(e), str(e)[:300]]
        finally:
            faulthandler.cancel_dump_traceback_later()
        if out[how][0] == "untyped":
            faulthandler.dump_traceback_later(hang, exit=True)
            out[how].append(torch_outcome(raw))
            faulthandler.cancel_dump_traceback_later()
    print("DONE", json.dumps([path, out]), flush=True)
"""


@dataclasses.dataclass
class Seed:
    name: str
    members: list
    base: object  # test_native_unpickler_fuzz._Base


def _ops(pkl: bytes):
    ops = []
    for op, arg, pos in pickletools.genops(pkl):
        if ops:
            ops[-1][3] = pos
        ops.append([op.name, arg, pos, len(pkl)])
    ops[-1][3] = ops[-1][2] + 1
    return [tuple(op) for op in ops]


def seeds(nuf) -> list:
    out = []
    for name in nuf.BASES:
        b = nuf._base(name)
        out.append(Seed(name, b.members, b))
    for p in sorted((ROOT / "tests" / "data").glob("*.pt")):
        raw = p.read_bytes()
        if raw[:4] != b"PK\x03\x04":
            continue
        try:
            members = nuf._members(raw)
            pkl = dict(members)[nuf._pickle_member(members)]
            ops = _ops(pkl)
        except Exception:  # noqa: BLE001 - a fixture whose pickle genops cannot walk
            continue
        if len(ops) < 3:
            continue
        out.append(Seed(p.name, members, nuf._Base(p.name, members, pkl, ops)))
    return out


def _splice(rng, a, b):
    i = rng.randrange(1, len(a.ops))
    j = rng.randrange(len(b.ops))
    return a.pkl[: a.ops[i][2]] + b.pkl[b.ops[j][2] :], (
        f"splice {a.name}[:{a.ops[i][2]}] + {b.name}[{b.ops[j][2]}:]"
    )


def mutant(nuf, all_seeds: list, seed: int, i: int):
    """(seed, pickle, description) of mutant ``i`` of run ``seed``."""
    rng = random.Random(f"{seed}:{i}")
    s = rng.choice(all_seeds)
    b = s.base
    fns, weights = zip(*nuf._MUTATORS)
    descs = []
    pkl = b.pkl
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        try:
            if rng.random() < 0.12 and len(b.ops) >= 2 and b.ops[-1][3] == len(b.pkl):
                pkl, d = _splice(rng, b, rng.choice(all_seeds).base)
            else:
                pkl, d = rng.choices(fns, weights)[0](rng, b)
        except (IndexError, ValueError):  # an opcode mutator with nothing to work on
            pkl, d = nuf._m_insert_byte(rng, dataclasses.replace(b, pkl=pkl))
        descs.append(d)
        try:  # the next mutation works on the mutant, opcode-aware when it still parses
            b = dataclasses.replace(b, pkl=pkl, ops=_ops(pkl))
        except Exception:  # noqa: BLE001
            b = dataclasses.replace(b, pkl=pkl)
            fns, weights = zip(*nuf._BYTE_MUTATORS)
    return s, pkl, "; ".join(descs)


def _save(kind: str, raw: bytes, text: str) -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{kind}-{hashlib.sha1(raw).hexdigest()[:16]}.pt"
    path.write_bytes(raw)
    path.with_suffix(".txt").write_text(text + "\n")
    return path


def run_batch(paths: list, hang: float, timeout: float):
    """Runs the child over ``paths``; returns (results by path, the path being loaded
    when the child died or None, its return code, the tail of its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(hang), *paths],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ":".join(p for p in sys.path if p)},
    )
    results, current = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            current = line.split(" ")[1]
        elif line.startswith("DONE "):
            path, out = json.loads(line[5:])
            results[path] = out
            current = None
    dead = current if proc.returncode != 0 else None
    if proc.returncode != 0 and dead is None:
        remaining = [p for p in paths if p not in results]
        dead = remaining[0] if remaining else None
    return results, dead, proc.returncode, proc.stderr[-3000:]


def judge(out: dict):
    """None when every load of one mutant is acceptable, else why not."""
    for how, o in out.items():
        if o[0] == "untyped" and o[1] != o[3]:
            return f"{how}: {o[1]}: {o[2]} (torch.load: {o[3]})"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=250, help="mutants per child interpreter")
    ap.add_argument("--hang", type=float, default=30, help="seconds one load may take")
    ap.add_argument("--max-mutants", type=int, default=0, help="stop after this many (0: no limit)")
    ap.add_argument("--replay", type=pathlib.Path, help="load one saved checkpoint in a child")
    args = ap.parse_args(argv)

    if args.replay:
        results, dead, rc, err = run_batch([str(args.replay)], args.hang, 600)
        print(json.dumps(results, indent=1), f"exit status {rc}", err, sep="\n")
        return 0 if rc == 0 and all(judge(o) is None for o in results.values()) else 1

    import test_native_unpickler_fuzz as nuf  # the mutators and archive helpers

    all_seeds = seeds(nuf)
    print(f"{len(all_seeds)} seed pickles: {', '.join(s.name for s in all_seeds)}", flush=True)
    start = time.monotonic()
    tally = {"mutants": 0, "loads": 0, "loaded": 0, "typed": 0, "torch_same": 0, "children": 0}
    found = []
    same_types: dict = {}  # untyped exceptions torch.load raises too, by type
    i = 0
    with tempfile.TemporaryDirectory(prefix="unpickler-fuzz-") as tmp:
        while time.monotonic() - start < args.seconds:
            if args.max_mutants and i >= args.max_mutants:
                break
            batch, meta = [], {}
            for _ in range(args.batch):
                s, pkl, desc = mutant(nuf, all_seeds, args.seed, i)
                path = str(pathlib.Path(tmp) / f"m{i:07d}.pt")
                raw = nuf._checkpoint(s.members, pkl)
                pathlib.Path(path).write_bytes(raw)
                batch.append(path)
                meta[path] = (i, s.name, desc, raw)
                i += 1
            while batch:
                tally["children"] += 1
                results, dead, rc, err = run_batch(
                    batch, args.hang, args.hang * 4 + 60 + len(batch)
                )
                for path, out in results.items():
                    tally["mutants"] += 1
                    for o in out.values():
                        tally["loads"] += 1
                        kind = o[0] if o[0] != "untyped" or o[1] != o[3] else "torch_same"
                        tally[kind] = tally.get(kind, 0) + 1
                        if kind == "torch_same":
                            same_types[o[1]] = same_types.get(o[1], 0) + 1
                    problem = judge(out)
                    if problem is not None:
                        n, base, desc, raw = meta[path]
                        saved = _save(
                            "escape",
                            raw,
                            f"seed {args.seed} mutant {n} of {base} [{desc}]: {problem}",
                        )
                        found.append(f"untyped escape, mutant {n} ({saved}): {problem}")
                if dead is not None:
                    n, base, desc, raw = meta[dead]
                    kind = (
                        "hang" if "Timeout" in err or "most recent call first" in err else "crash"
                    )
                    saved = _save(
                        kind,
                        raw,
                        f"seed {args.seed} mutant {n} of {base} [{desc}]: child exit status {rc}\n{err}",
                    )
                    found.append(f"{kind}, mutant {n} ({saved}): exit status {rc}")
                    tally["mutants"] += 1
                    batch = batch[batch.index(dead) + 1 :]
                else:
                    batch = []
            rate = tally["mutants"] / max(time.monotonic() - start, 1e-9)
            print(
                f"{time.monotonic() - start:7.1f}s  {tally}  {rate:.1f} mutants/s  found {len(found)}",
                flush=True,
            )
    print(
        f"seed {args.seed}: {tally['mutants']} mutants, {tally['loads']} loads in "
        f"{time.monotonic() - start:.0f} s; {len(found)} problems"
    )
    if same_types:
        print(f"  untyped, but the type torch.load raises for the same bytes: {same_types}")
    for f in found:
        print("  " + f)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
