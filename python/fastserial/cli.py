"""The ``fastserial`` command: ``inspect``, ``convert`` and ``verify`` checkpoints.

None of them needs torch, and none runs code from a checkpoint: ``inspect`` and
``verify`` parse the pickle with inert placeholders for anything outside the
weights-only allow-list; ``convert`` loads weights-only. A TorchScript archive
(``torch.jit.save``) is read the same way: its scripted modules are placeholders, its
tensors are listed under their state-dict names, and its code is never read.

    fastserial inspect ckpt.pt [--json]
    fastserial convert ckpt.pt model.safetensors
    fastserial verify ckpt.pt
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tarfile
import threading
import time
from typing import Any, TextIO

from ._fastserial import CheckpointError
from ._optional import MissingDependencyError, require

__all__ = ["Progress", "main"]

_EXIT_OK = 0
_EXIT_FAIL = 1


# --------------------------------------------------------------------------- progress


class Progress:
    """A dependency-free progress bar on ``stream`` (stderr), drawn only on a terminal.

    ``total=None`` shows a spinner with the elapsed time instead of a bar.
    """

    WIDTH = 28

    def __init__(
        self,
        total: int | None,
        label: str,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = total
        self.label = label
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False
        self._frame = 0

    def update(self, n: int = 0) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or (self.total is not None and self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = (
                f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                f"{human_bytes(self.done)}/{human_bytes(self.total)} {elapsed:.1f}s"
            )
        else:
            spinner = "|/-\\"[self._frame % 4]
            self._frame += 1
            text = f"\r{self.label} {spinner} {elapsed:.1f}s"
        self.stream.write(text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled:
            if self.total is not None:
                self.done = max(self.done, self.total)
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _short_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception as e:  # noqa: BLE001 - a placeholder's repr must never stop a report
        text = f"<unprintable {type(value).__name__}: {e}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- inspect


def _fsnp():
    from . import numpy as fsnp

    return fsnp


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def inspect_report(path: str) -> dict:
    """Everything ``fastserial inspect`` shows, as plain data (what ``--json`` prints)."""
    if _is_safetensors(path):
        return _inspect_safetensors(path)
    fsnp = _fsnp()
    s = fsnp.read_structure(path, mode="opaque", collect=True)
    try:
        report: dict[str, Any] = {
            "file": s.file,
            "size": os.path.getsize(path),
            "format": "torchscript" if s.torchscript else s.kind,
            "prefix": s.prefix,
            "byteorder": s.byteorder,
        }
        unsafe_opcodes: list[str] = []
        if s.kind == "zip":
            scan = _native_scan(s)
            unsafe_opcodes = scan["unsafe_opcodes"]
        globals_ = [_display_global(g, s.protocol) for g in s.globals]
        refused = [g for g in globals_ if not fsnp.is_allowed_global(*g.rsplit(".", 1))]
        report["pickle"] = {
            "protocol": s.protocol,
            "globals": globals_,
            "not_allowed_globals": refused,
            "unsafe_opcodes": unsafe_opcodes,
        }
        # torch.load(weights_only=True) refuses every TorchScript archive.
        report["weights_only"] = (
            s.kind != "tar" and not s.torchscript and not refused and not unsafe_opcodes
        )
        tensors, others, objects = [], [], []
        users: dict[Any, int] = {}
        if s.error is None:
            for name, value in s.leaves():
                if type(value) is fsnp.TensorInfo:
                    tensors.append((name or "<root>", value))
                    users[value.storage.key] = users.get(value.storage.key, 0) + 1
                elif type(value) is fsnp.OtherTensorInfo:
                    others.append({"name": name, "kind": value.kind, "function": value.function})
                elif type(value) is fsnp.StorageInfo:
                    objects.append(
                        {
                            "name": name,
                            "type": "storage",
                            "value": f"{value.nbytes} bytes (storage {value.key})",
                        }
                    )
                else:
                    objects.append(
                        {"name": name, "type": _type_name(value), "value": _short_repr(value)}
                    )
        report["tensors"] = [_tensor_entry(n, t, users) for n, t in tensors]
        report["other_tensors"] = others
        report["objects"] = objects
        totals: dict[str, dict[str, int]] = {}
        for _, t in tensors:
            entry = totals.setdefault(
                t.dtype.name, {"tensors": 0, "elements": 0, "nbytes": 0, "storage_nbytes": 0}
            )
            entry["tensors"] += 1
            entry["elements"] += t.numel
            entry["nbytes"] += t.nbytes
        counted: set = set()
        for _, t in tensors:
            if t.storage.key not in counted:
                counted.add(t.storage.key)
                totals[t.dtype.name]["storage_nbytes"] += t.storage.nbytes
        report["totals"] = totals
        report["total"] = {
            "tensors": len(tensors),
            "elements": sum(t.numel for _, t in tensors),
            "nbytes": sum(t.nbytes for _, t in tensors),
            "storages": len(s.storages),
            "storage_nbytes": sum(i.nbytes for i in s.storages.values() if i.parent is None),
        }
        report["problems"] = list(s.problems)
        report["error"] = None if s.error is None else f"{type(s.error).__name__}: {s.error}"
        report["notes"] = []
        if s.kind == "tar":
            report["notes"].append(
                "the pre-0.4 tar format builds its tensors only when loaded "
                "(weights_only=False): inspect lists none"
            )
        if s.torchscript:
            report["notes"].append(_TORCHSCRIPT_NOTE)
        return report
    finally:
        s.close()


#: What inspect says about a TorchScript archive.
_TORCHSCRIPT_NOTE = (
    "a TorchScript archive (torch.jit.save): torch.load(weights_only=True) refuses it, "
    "and torch.jit.load runs its code; its tensors are listed under their state-dict "
    "names (constants as CONSTANTS.c0, ...) without running anything, and "
    "fastserial.numpy.load / fastserial.open read them without torch"
)


def _native_scan(s) -> dict:
    from . import _fastserial as native

    return native.scan_pickle(s.archive.read("data.pkl"), s.file)


def _display_global(full: str, protocol: int | None) -> str:
    """Python-2 names as the unpickler maps them (``__builtin__.set`` -> ``builtins.set``)."""
    if protocol is not None and protocol >= 3:
        return full
    module, _, name = full.rpartition(".")
    from ._torch_io import _py2_name

    module, name = _py2_name(module, name)
    return f"{module}.{name}"


def _type_name(value: Any) -> str:
    t = type(value)
    fsnp = _fsnp()
    if isinstance(value, fsnp.Opaque):
        return value._global
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


def _tensor_entry(name: str, t, users: dict) -> dict:
    return {
        "name": name,
        "dtype": t.dtype.name,
        "shape": list(t.shape),
        "stride": list(t.stride),
        "storage_offset": t.storage_offset,
        "nbytes": t.nbytes,
        "storage": str(t.storage.key),
        "storage_nbytes": t.storage.nbytes,
        "storage_users": users.get(t.storage.key, 1),
        "requires_grad": t.requires_grad,
        "parameter": t.parameter,
    }


_ST_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(fh.read(n), parse_int=_header_int)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _header_int(text: str) -> int:
    """JSON integers of a safetensors header: sizes and offsets, at most 20 digits
    (a hostile header's 4,000-digit numbers are refused before any arithmetic)."""
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


#: Most dimensions a safetensors tensor may declare here.
_ST_MAX_DIMS = 64


def _safetensors_entry(path: str, name: str, entry, data_size: int) -> tuple[str, list, int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, each checked before use:
    the shape is a short list of non-negative ints, the offsets lie in the file and
    span exactly the shape's bytes."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: safetensors entry {name!r}: {what}")

    if not isinstance(entry, dict):
        raise bad("is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise bad(f"unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > _ST_MAX_DIMS:
        raise bad(f"shape must be a list of at most {_ST_MAX_DIMS} integers")
    if any(type(n) is not int or n < 0 for n in shape):
        raise bad("shape entries must be non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad(f"data_offsets must be [begin, end] inside the {data_size}-byte data")
    numel = 1
    for n in shape:
        numel *= n
        if numel > data_size * 8:  # more elements than bits in the file: cannot fit
            raise bad(f"shape {shape[:8]} declares more elements than the file holds")
    return _ST_DTYPES[dtype], shape, offsets[0], offsets[1]


def _inspect_safetensors(path: str) -> dict:
    header, start = _safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the safetensors __metadata__ is not a JSON object")
    data_size = max(os.path.getsize(path) - start, 0)
    tensors, totals = [], {}
    for name, entry in header.items():
        dtype, shape, begin, end = _safetensors_entry(path, name, entry, data_size)
        numel = 1
        for n in shape:
            numel *= n
        tensors.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "nbytes": end - begin,
                "storage": "-",
                "storage_nbytes": end - begin,
                "storage_users": 1,
            }
        )
        t = totals.setdefault(
            dtype, {"tensors": 0, "elements": 0, "nbytes": 0, "storage_nbytes": 0}
        )
        t["tensors"] += 1
        t["elements"] += numel
        t["nbytes"] += end - begin
        t["storage_nbytes"] += end - begin
    return {
        "file": path,
        "size": os.path.getsize(path),
        "format": "safetensors",
        "prefix": None,
        "byteorder": "little",
        "pickle": None,
        "weights_only": True,
        "tensors": tensors,
        "other_tensors": [],
        "objects": [
            {"name": f"__metadata__.{k}", "type": "str", "value": _short_repr(v)}
            for k, v in meta.items()
        ],
        "totals": totals,
        "total": {
            "tensors": len(tensors),
            "elements": sum(t["elements"] for t in totals.values()),
            "nbytes": sum(t["nbytes"] for t in tensors),
            "storages": len(tensors),
            "storage_nbytes": sum(t["nbytes"] for t in tensors),
        },
        "problems": [],
        "error": None,
        "notes": [],
    }


def _print_table(rows: list[list[str]], out: TextIO, right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


_FORMATS = {
    "zip": "zip (torch >= 1.6)",
    "legacy": "legacy (torch < 1.6, _use_new_zipfile_serialization=False)",
    "tar": "tar (torch < 0.4)",
    "torchscript": "TorchScript archive (torch.jit.save; zip)",
    "safetensors": "safetensors",
}


def _print_report(r: dict, out: TextIO) -> None:
    prefix = f", folder '{r['prefix']}/'" if r.get("prefix") else ""
    out.write(
        f"{r['file']}: {_FORMATS.get(r['format'], r['format'])}{prefix}, "
        f"{human_bytes(r['size'])}, byteorder {r['byteorder']}\n"
    )
    p = r.get("pickle")
    if p is not None:
        proto = "?" if p["protocol"] is None else p["protocol"]
        out.write(
            f"pickle: protocol {proto}, {len(p['globals'])} globals: "
            f"{', '.join(p['globals']) or '-'}\n"
        )
        if r["weights_only"]:
            out.write("weights-only: loadable (every global is on the allow-list)\n")
        else:
            refused = p["not_allowed_globals"]
            torchscript = r["format"] == "torchscript"
            if torchscript:  # its own classes are named by the first reason
                refused = [g for g in refused if not _fsnp()._is_torchscript_global(g)]
            why = [
                "a TorchScript archive, which torch.load refuses under weights_only=True"
                if torchscript
                else "",
                f"globals outside the allow-list: {', '.join(refused)}" if refused else "",
                f"opcodes {', '.join(p['unsafe_opcodes'])}" if p["unsafe_opcodes"] else "",
            ]
            reason = "; ".join(w for w in why if w) or "tar format"
            out.write(f"weights-only: NOT loadable ({reason}); shown without running it\n")
    tensors = r["tensors"]
    if tensors:
        out.write("\n")
        rows = [["NAME", "DTYPE", "SHAPE", "SIZE", "STORAGE"]]
        for t in tensors:
            storage = str(t["storage"])
            if t["storage_users"] > 1:
                storage += f" (shared by {t['storage_users']})"
            if "storage_offset" in t and (
                t["storage_offset"] or t["nbytes"] != t["storage_nbytes"]
            ):
                storage += f" offset {t['storage_offset']} of {human_bytes(t['storage_nbytes'])}"
            rows.append(
                [t["name"], t["dtype"], _shape(t["shape"]), human_bytes(t["nbytes"]), storage]
            )
        _print_table(rows, out, right={3})
        out.write("\n")
        rows = [["DTYPE", "TENSORS", "ELEMENTS", "SIZE", "STORAGE"]]
        for dtype, t in sorted(r["totals"].items(), key=lambda kv: -kv[1]["nbytes"]):
            rows.append(
                [
                    dtype,
                    str(t["tensors"]),
                    f"{t['elements']:,}",
                    human_bytes(t["nbytes"]),
                    human_bytes(t["storage_nbytes"]),
                ]
            )
        tot = r["total"]
        rows.append(
            [
                "total",
                str(tot["tensors"]),
                f"{tot['elements']:,}",
                human_bytes(tot["nbytes"]),
                human_bytes(tot["storage_nbytes"]),
            ]
        )
        _print_table(rows, out, right={1, 2, 3, 4})
        out.write(f"{tot['tensors']} tensors in {tot['storages']} storages\n")
    else:
        out.write("\nno dense tensors\n")
    out.writelines(
        f"{o['name']}: {o['kind']} ({o['function']}), not listed above\n"
        for o in r["other_tensors"]
    )
    if r["objects"]:
        out.write("\nother values:\n")
        out.writelines(
            f"  {o['name'] or '<root>'} = {o['value']}  ({o['type']})\n" for o in r["objects"][:50]
        )
        if len(r["objects"]) > 50:
            out.write(f"  ... and {len(r['objects']) - 50} more\n")
    out.writelines(f"note: {note}\n" for note in r["notes"])
    out.writelines(f"problem: {problem}\n" for problem in r["problems"])
    if r["error"]:
        out.write(f"error: {r['error']}\n")


def _write_json(report: dict, out: TextIO) -> None:
    """Indented JSON with one line per tensor (json's indenting encoder is pure Python,
    too slow for checkpoints with many tensors)."""
    out.write("{\n")
    for i, (key, value) in enumerate(report.items()):
        comma = "," if i < len(report) - 1 else ""
        if isinstance(value, list) and value:
            items = ",\n".join(f"    {json.dumps(v)}" for v in value)
            out.write(f"  {json.dumps(key)}: [\n{items}\n  ]{comma}\n")
        else:
            out.write(f"  {json.dumps(key)}: {json.dumps(value)}{comma}\n")
    out.write("}\n")


def _cmd_inspect(args, out: TextIO, err: TextIO) -> int:
    report = inspect_report(args.path)
    if args.json:
        _write_json(report, out)
    else:
        _print_report(report, out)
    return _EXIT_FAIL if report["error"] else _EXIT_OK


# --------------------------------------------------------------------------- verify


_VERIFY_CHUNK = 256 << 20


def verify_checkpoint(path: str, progress: Progress | None = None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` for a checkpoint: CRC32 of every record (zip), that every
    storage record exists with the size the pickle declares, and that every tensor
    lies inside its storage. No problems means intact."""
    fsnp = _fsnp()
    problems: list[str] = []
    notes: list[str] = []
    try:
        s = fsnp.read_structure(path, mode="opaque", collect=True)
    except (CheckpointError, pickle.UnpicklingError, OSError, ValueError) as e:
        return [f"cannot open the checkpoint: {e}"], notes
    try:
        problems += s.problems
        if s.error is not None:
            problems.append(f"the pickle cannot be read: {type(s.error).__name__}: {s.error}")
        if s.kind == "zip":
            archive = s.archive
            names = archive.names()
            sizes = [archive.info(n)[1] for n in names]
            if progress is not None:
                progress.total = sum(sizes)
            chunk: list[str] = []
            chunk_bytes = 0
            for name, size in zip(names, sizes):
                chunk.append(name)
                chunk_bytes += size
                if chunk_bytes >= _VERIFY_CHUNK or name == names[-1]:
                    problems += [
                        p if p.startswith("record") else f"record '{r}': {p}"
                        for r, p in archive.verify(chunk)
                    ]
                    if progress is not None:
                        progress.update(chunk_bytes)
                    chunk, chunk_bytes = [], 0
            notes.append(f"{len(names)} records checked against their CRC32")
        elif s.kind == "legacy":
            notes.append(
                "the legacy format has no checksums: checked its structure and bounds only"
            )
        else:
            problems += _verify_tar(path)
            notes.append("the tar format: checked the archive's members only")
        tensors = sum(1 for _, v in s.leaves() if type(v) is fsnp.TensorInfo)
        notes.append(
            f"{tensors} tensors in {len(s.storages)} storages checked against their bounds"
        )
        refused = [g for g in s.globals if not fsnp.is_allowed_global(*g.rsplit(".", 1))]
        if s.torchscript:
            notes.append(
                "a TorchScript archive (torch.jit.save): torch.load(weights_only=True) "
                "refuses it; its data.pkl and constants.pkl were read without running anything"
            )
            refused = [g for g in refused if not fsnp._is_torchscript_global(g)]
        if refused:
            notes.append(
                "the pickle uses globals outside the weights-only allow-list "
                f"({', '.join(refused)}); a weights-only load refuses it"
            )
    finally:
        s.close()
    return problems, notes


def _verify_tar(path: str) -> list[str]:
    try:
        with tarfile.open(path, mode="r:") as tar:
            names = tar.getnames()
    except tarfile.TarError as e:
        return [f"unreadable tar archive: {e}"]
    return [f"member '{m}' is missing" for m in ("storages", "tensors", "pickle") if m not in names]


def _cmd_verify(args, out: TextIO, err: TextIO) -> int:
    progress = Progress(None, f"verifying {os.path.basename(args.path)}", err)
    problems, notes = verify_checkpoint(args.path, progress)
    progress.close()
    if problems:
        out.write(f"FAIL {args.path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}\n")
        out.writelines(f"  {p}\n" for p in problems)
        return _EXIT_FAIL
    out.write(f"OK {args.path}\n")
    out.writelines(f"  {n}\n" for n in notes)
    return _EXIT_OK


# --------------------------------------------------------------------------- convert


_SAFETENSORS_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "complex64",
    }
)


def _read_torch_tensors(src: str, notes: list[str], progress_stream: TextIO):
    """Flattened dense tensors of a torch checkpoint, read one at a time (weights-only).
    Aliases of one tensor are kept once; everything left out goes into ``notes``."""
    fsnp = _fsnp()
    s = fsnp.read_structure(src, mode="strict", mmap=True)
    try:
        kept: list[tuple[str, Any]] = []
        seen: dict[tuple, str] = {}
        storage_owner: dict[Any, str] = {}
        skipped: list[str] = []
        for name, value in s.leaves():
            name = name or "tensor"
            if type(value) is fsnp.TensorInfo:
                sig = (
                    value.storage.key,
                    value.storage_offset,
                    value.shape,
                    value.stride,
                    value.dtype.name,
                )
                if sig in seen:
                    notes.append(
                        f"'{name}' is the same tensor as '{seen[sig]}' (shared storage): "
                        f"kept one copy, under '{seen[sig]}'"
                    )
                    continue
                seen[sig] = name
                owner = storage_owner.setdefault(value.storage.key, name)
                if owner != name:
                    notes.append(
                        f"'{name}' views the storage of '{owner}': written as an independent copy"
                    )
                kept.append((name, value))
            elif type(value) is fsnp.OtherTensorInfo:
                skipped.append(f"'{name}' ({value.kind}): safetensors holds dense tensors only")
            else:
                skipped.append(
                    f"'{name}' = {_short_repr(value, 50)} ({_type_name(value)}): not a tensor"
                )
        meta = getattr(s.root, "_metadata", None)
        if meta is not None:
            skipped.append("the state dict's _metadata (module versions): not a tensor")
        if skipped:
            notes.append(
                f"{len(skipped)} non-tensor value{'s' if len(skipped) > 1 else ''} not written:"
            )
            notes.extend(f"  {x}" for x in skipped)
        total = sum(t.nbytes for _, t in kept)
        arrays = []
        with Progress(total, f"reading {os.path.basename(src)}", progress_stream) as bar:
            for name, t in kept:
                arrays.append((name, t.dtype.name, s.array(t)))
                bar.update(t.nbytes)
        return arrays
    finally:
        s.close()


def _read_safetensors(src: str, notes: list[str], progress_stream: TextIO):
    import numpy as np

    safe_open = require("safetensors", "reading a .safetensors file").safe_open

    fsnp = _fsnp()
    header, data_start = _safetensors_header(src)
    meta = {k: v for k, v in (header.pop("__metadata__", None) or {}).items() if k != "format"}
    if meta:
        notes.append(
            f"safetensors metadata not carried into the checkpoint: {_short_repr(meta, 200)}"
        )
    arrays = []
    data_size = max(os.path.getsize(src) - data_start, 0)
    entries = {name: _safetensors_entry(src, name, e, data_size) for name, e in header.items()}
    total = sum(end - begin for _, _, begin, end in entries.values())
    with (
        safe_open(src, framework="numpy") as f,
        Progress(total, f"reading {os.path.basename(src)}", progress_stream) as bar,
    ):
        names = f.keys()
        for name in names:
            torch_name, shape, begin, end = entries[name]
            dtype = fsnp.dtype_from_torch_name(torch_name)
            if dtype.numpy_dtype is None:
                raise CheckpointError(
                    f"{src}: tensor '{name}' has dtype {torch_name}, which "
                    "fastserial.numpy cannot represent"
                )
            try:
                array = f.get_tensor(name)
            except (AttributeError, TypeError, ValueError):
                # safetensors' numpy framework lacks the float8 types: read the bytes at the
                # offsets its header gives.
                array = np.fromfile(
                    src, dtype=np.uint8, count=end - begin, offset=data_start + begin
                ).view(dtype.numpy_dtype)
                array = array.reshape(shape)
            arrays.append((name, dtype.name, array))
            bar.update(end - begin)
    return arrays


def _write_safetensors(arrays, dst: str, notes: list[str], progress_stream: TextIO) -> int:
    import numpy as np

    safetensors = require("safetensors", "writing a .safetensors file")
    if not hasattr(safetensors, "TensorSpec"):
        raise RuntimeError(
            "writing .safetensors needs a safetensors version with TensorSpec "
            "(pip install -U safetensors)"
        )
    keep_alive, specs = [], {}
    for name, dtype, array in arrays:
        if dtype not in _SAFETENSORS_DTYPES:
            notes.append(f"'{name}' ({dtype}): safetensors has no such dtype; not written")
            continue
        data = array if array.flags.c_contiguous else np.array(array, order="C")  # keeps 0-d
        keep_alive.append(data)
        specs[name] = safetensors.TensorSpec(
            dtype=dtype,
            shape=list(data.shape),
            data_ptr=data.ctypes.data if data.nbytes else 0,
            data_len=data.nbytes,
        )
    failure: list[BaseException] = []

    def write():
        try:
            safetensors.serialize_file(specs, dst, metadata={"format": "pt"})
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(e)

    # serialize_file is one call: show a spinner while it runs (it releases the GIL).
    worker = threading.Thread(target=write, daemon=True)
    with Progress(None, f"writing {os.path.basename(dst)}", progress_stream) as bar:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
            bar.update()
    if failure:
        raise failure[0]
    return len(specs)


def _cmd_convert(args, out: TextIO, err: TextIO) -> int:
    src, dst = args.input, args.output
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("input and output are the same file")
    notes: list[str] = []
    fsnp = _fsnp()
    if _is_safetensors(src) and _is_safetensors(dst):
        raise ValueError("both files are .safetensors: nothing to convert")
    if not _is_safetensors(src) and not _is_safetensors(dst):
        # torch -> torch (legacy -> zip, big-endian -> native, ...): the whole structure.
        obj = fsnp.load(src, mmap=True)
        if isinstance(obj, fsnp.Opaque):  # only a TorchScript archive's root is one
            raise ValueError(
                f"{src} is a TorchScript archive (torch.jit.save): its modules cannot be "
                "saved as a checkpoint; convert it to .safetensors (its tensors, by "
                "state-dict name) or read it with fastserial.numpy.load / fastserial.open"
            )
        count = _save_with_progress(fsnp, obj, dst, err)
    elif _is_safetensors(dst):
        arrays = _read_torch_tensors(src, notes, err)
        count = _write_safetensors(arrays, dst, notes, err)
    else:
        arrays = _read_safetensors(src, notes, err)
        count = _save_with_progress(fsnp, {name: a for name, _, a in arrays}, dst, err)
    err.writelines(f"note: {n}\n" for n in notes)
    out.write(f"wrote {dst}: {count} tensors, {human_bytes(os.path.getsize(dst))}\n")
    return _EXIT_OK


def _save_with_progress(fsnp, obj, dst: str, err: TextIO) -> int:
    counter = {"n": 0, "bytes": 0}
    import numpy as np

    for _, v in fsnp.iter_leaves(obj):
        if isinstance(v, np.ndarray):
            counter["n"] += 1
            counter["bytes"] += v.nbytes
    with Progress(counter["bytes"], f"writing {os.path.basename(dst)}", err) as bar:
        fsnp._save(obj, dst, progress=bar.update)
    return counter["n"]


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastserial",
        description="Inspect, convert and verify PyTorch checkpoints (torch is not needed).",
    )
    parser.add_argument("--version", action="version", version=f"fastserial {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "inspect",
        help="list tensors, dtypes, shapes and sharing; reads no data",
        description="List every tensor (name, dtype, shape, size, storage "
        "sharing), totals per dtype, the format and the pickle's "
        "globals. Reads metadata only and runs nothing from the file.",
    )
    p.add_argument("path", help="a .pt/.pth/.bin checkpoint or a .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "convert",
        help=".pt <-> .safetensors (by extension)",
        description="Convert between torch checkpoints and .safetensors by file "
        "extension (or re-save a torch checkpoint in the current "
        "format). Shared tensors are kept once; values that are not "
        "tensors are reported.",
    )
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser(
        "verify",
        help="check every CRC32 and tensor bound; exit 1 if damaged",
        description="Check every record's CRC32 and every tensor's bounds. "
        "Exit status 0 only for an intact checkpoint.",
    )
    p.add_argument("path")
    return parser


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


_COMMANDS = {"inspect": _cmd_inspect, "verify": _cmd_verify, "convert": _cmd_convert}


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Runs the command line; returns the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args, out, err)
    except BrokenPipeError:  # `fastserial inspect big.pt | head`
        _silence_stdout()
        return _EXIT_FAIL
    except MissingDependencyError as e:
        err.write(f"fastserial {args.command}: {e}\n")
        return _EXIT_FAIL
    except (
        CheckpointError,
        pickle.UnpicklingError,
        NotImplementedError,
        OSError,
        ValueError,
        RuntimeError,
        TypeError,
        KeyError,
    ) as e:
        err.write(f"fastserial {args.command}: error: {e}\n")
        return _EXIT_FAIL
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
