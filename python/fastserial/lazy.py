"""``fastserial.open``: one tensor at a time from a checkpoint, without loading it.

::

    with fastserial.open("ckpt.pt", framework="numpy") as ckpt:
        for name in ckpt.keys():
            print(name, ckpt.metadata(name).shape)   # reads no tensor data
        w = ckpt.get_tensor("layer.0.weight")          # reads only this tensor's bytes

Opening parses the checkpoint's pickle (weights-only: a malicious pickle raises
``pickle.UnpicklingError``) and the archive directory, never tensor data. The top
level must be a mapping; nested mappings and sequences are flattened with dots
(``"model.layer.0.weight"``, ``"optimizer.state.0.exp_avg"``). ``get_tensor`` reads the
bytes the tensor spans (not the rest of a shared storage) into fresh memory, so
tensors read separately never share memory, even when they shared a storage in the
file.

A TorchScript archive (``torch.jit.save``) opens too, without torch and without
running its code: the keys are the dotted names of the tensors in its module tree, as
``state_dict()`` names them (``"fc.weight"``, ``"layers.0.bias"``), plus the other
tensor attributes TorchScript saved and its constants (``"CONSTANTS.c0"``); a tensor
held by two attributes is listed under both names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["LazyCheckpoint", "TensorMetadata", "open"]

_FRAMEWORKS = {"torch": "torch", "pt": "torch", "numpy": "numpy", "np": "numpy"}


class TensorMetadata:
    """What the pickle says about one tensor; reading it touches no tensor data.

    ``dtype`` is the framework's dtype (``torch.float32``, or a numpy dtype such as
    ``numpy.float32`` / ``ml_dtypes.bfloat16``); ``torch_dtype`` is torch's name for it
    (``"float32"``). ``nbytes`` is the tensor's own size (``numel * itemsize``);
    ``storage``, ``storage_offset`` and ``storage_nbytes`` say where it lies in the
    storage it shares with other tensors.
    """

    __slots__ = (
        "dtype",
        "name",
        "nbytes",
        "requires_grad",
        "shape",
        "storage",
        "storage_nbytes",
        "storage_offset",
        "stride",
        "torch_dtype",
    )

    def __init__(self, name: str, info, dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.torch_dtype = info.dtype.name
        self.shape = info.shape
        self.stride = info.stride
        self.nbytes = info.nbytes
        self.storage = info.storage.key
        self.storage_offset = info.storage_offset
        self.storage_nbytes = info.storage.nbytes
        self.requires_grad = info.requires_grad

    def __repr__(self) -> str:
        return (
            f"TensorMetadata(name={self.name!r}, dtype={self.dtype}, shape={self.shape}, "
            f"nbytes={self.nbytes})"
        )


class LazyCheckpoint:
    """An open checkpoint whose tensors are read one at a time; see :func:`open`."""

    def __init__(self, f, framework: str = "torch", *, encoding: str = "utf-8") -> None:
        kind = _FRAMEWORKS.get(framework)
        if kind is None:
            raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
        self.framework = kind
        self._torch = None
        if kind == "torch":
            try:
                import torch
            except ImportError as e:
                raise ImportError(
                    "fastserial.open(framework='torch') needs torch; use framework='numpy' "
                    "to read tensors as numpy arrays without it"
                ) from e
            self._torch = torch
        from . import numpy as fsnp

        self._fsnp = fsnp
        self._structure = fsnp.read_structure(f, mode="strict", mmap=True, encoding=encoding)
        try:
            root = self._structure.root
            if not isinstance(root, Mapping) and not (
                self._structure.torchscript and isinstance(root, fsnp.Opaque)
            ):
                raise TypeError(
                    f"{self._structure.file}: fastserial.open needs a checkpoint whose top level "
                    f"is a mapping (a state dict); this one holds a {type(root).__name__}. "
                    "Use fastserial.load or fastserial.numpy.load instead."
                )
            self._tensors: dict[str, Any] = {}
            self._others: dict[str, Any] = {}
            for name, value in self._structure.leaves():
                if type(value) is fsnp.TensorInfo:
                    self._tensors.setdefault(name, value)
                elif type(value) is fsnp.OtherTensorInfo:
                    self._others.setdefault(name, value)
        except BaseException:
            self._structure.close()
            raise

    # -- context manager

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Releases the file; tensors already read stay valid."""
        self._structure.close()

    # -- mapping-like access

    @property
    def file(self) -> str:
        return self._structure.file

    @property
    def format(self) -> str:
        """``"zip"`` (torch >= 1.6), ``"legacy"`` or ``"torchscript"`` (``torch.jit.save``)."""
        return "torchscript" if self._structure.torchscript else self._structure.kind

    @property
    def byteorder(self) -> str:
        return self._structure.byteorder

    def keys(self) -> list[str]:
        """Names of the dense tensors, in the checkpoint's order."""
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _info(self, name: str):
        info = self._tensors.get(name)
        if info is not None:
            return info
        other = self._others.get(name)
        if other is not None:
            raise self._fsnp.UnsupportedTensorError(
                f"{self.file}: '{name}' is {other.kind} ({other.function}); fastserial.open reads "
                "dense tensors only. Load the file with fastserial.load instead."
            )
        raise KeyError(f"{self.file}: no tensor named {name!r}")

    def metadata(self, name: str) -> TensorMetadata:
        """dtype, shape, nbytes and layout of one tensor, without reading its data."""
        info = self._info(name)
        if self._torch is not None:
            dtype = getattr(self._torch, info.dtype.name)
        else:
            dtype = info.dtype.numpy_dtype if info.dtype.numpy_dtype is not None else info.dtype
        return TensorMetadata(name, info, dtype)

    def get_tensor(self, name: str):
        """One tensor, reading only the bytes it spans; a ``torch.Tensor`` or a
        ``numpy.ndarray`` by ``framework``, with the file's strides."""
        info = self._info(name)
        if self._torch is None:
            return self._structure.array(info)
        torch = self._torch
        raw, first = self._structure.read_span(info)
        data = torch.from_numpy(raw)
        dtype = getattr(torch, info.dtype.name)
        t = torch.empty((0,), dtype=dtype).set_(
            data.untyped_storage(), info.storage_offset - first, info.shape, info.stride
        )
        bits = {name: True for name in ("conj", "neg") if getattr(info, name)}
        if bits:  # torch's bits, set as torch.load sets them
            torch._utils.set_tensor_metadata(t, bits)
        if info.requires_grad:
            t.requires_grad_(True)
        return t

    def __repr__(self) -> str:
        return f"<fastserial.open {self.file!r}: {len(self)} tensors, framework={self.framework!r}>"


def open(  # fastserial.open, by analogy with safetensors.safe_open
    f: str | os.PathLike,
    *,
    framework: str = "torch",
    encoding: str = "utf-8",
) -> LazyCheckpoint:
    """Opens a checkpoint for reading one tensor at a time (use it as a context manager).

    ``framework="torch"`` returns ``torch.Tensor`` objects, ``"numpy"`` returns
    ``numpy.ndarray`` and needs no torch. Listing keys and metadata reads no tensor data.
    """
    return LazyCheckpoint(f, framework, encoding=encoding)
