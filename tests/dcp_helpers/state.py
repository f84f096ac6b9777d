"""The state dicts the DCP tests save and expect, identical in every process."""

from __future__ import annotations

import torch

#: name -> (shape, dtype). Row and column counts chosen so torch.chunk gives every rank a
#: chunk at world sizes 2 and 4, some of them uneven (7 rows: 4+3, 2+2+2+1).
SHARDED = {
    "layer.w": ((10, 8), torch.float32),
    "layer.b16": ((7, 7), torch.bfloat16),
    "ids": ((8,), torch.int64),
    "big": ((130, 256), torch.float32),  # blobs over 64 KiB: windowed parsing, row reads
}
PLAIN = {
    "rep": ((3, 3), torch.float64),
    "scalar": ((), torch.float32),
}


def full_tensors(version: int = 0) -> dict:
    """Deterministic values (bitwise the same in every process)."""
    g = torch.Generator().manual_seed(1234 + version)
    out = {}
    for name, (shape, dtype) in {**SHARDED, **PLAIN}.items():
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
    return out


def extras(version: int = 0) -> dict:
    """Non-tensor values: DCP saves them as BYTE_IO blobs."""
    return {"step": 100 + version, "opt": {"lr": 0.5 / (1 + version), "names": ["a", "b"]}}


def plain_state(version: int = 0) -> dict:
    """The whole state as plain tensors (what a world-size-1 load fills)."""
    sd = dict(full_tensors(version))
    sd.update(extras(version))
    return sd


def empty_plain_state() -> dict:
    """Zeroed destinations for a world-size-1 load."""
    sd = {n: torch.zeros(s, dtype=d) for n, (s, d) in {**SHARDED, **PLAIN}.items()}
    sd.update({"step": -1, "opt": {"lr": -1.0, "names": []}})
    return sd


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` calls -0.0 and 0.0 equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )
