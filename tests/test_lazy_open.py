"""fastserial.open: keys, metadata and one tensor at a time, for torch and numpy."""

from __future__ import annotations

import collections
import os
import pickle
import textwrap

import fastserial
import fastserial.numpy as fsnp
import numpy as np
import pytest
import torch
from conftest import fixture_names, fixture_path, run_python, tensor_bytes

HIDE_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is hidden in this test")
    sys.meta_path.insert(0, _NoTorch())
    """
)

MAPPINGS = [
    "state_dict.pt",
    "dtypes.pt",
    "views.pt",
    "parameters.pt",
    "edge.pt",
    "big_endian.pt",
    "no_byteorder.pt",
    "legacy.pt",
    "nested.pt",
]


def flat_tensors(obj, prefix=""):
    """Dotted names -> tensors of a torch.load result, the way fastserial.open names them."""
    out = {}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        items = enumerate(obj)
    else:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        return out
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@pytest.mark.parametrize("name", MAPPINGS)
def test_torch_framework_matches_torch_load(name):
    reference = flat_tensors(torch.load(fixture_path(name), weights_only=False))
    with fastserial.open(fixture_path(name)) as ckpt:
        assert ckpt.keys() == list(reference)
        assert len(ckpt) == len(reference) and all(k in ckpt for k in reference)
        for key, ref in reference.items():
            meta = ckpt.metadata(key)
            assert (meta.dtype, meta.shape, meta.nbytes) == (
                ref.dtype,
                tuple(ref.shape),
                ref.numel() * ref.element_size(),
            )
            assert meta.stride == ref.stride() and meta.storage_offset == ref.storage_offset()
            t = ckpt.get_tensor(key)
            assert type(t) is torch.Tensor and t.dtype == ref.dtype
            assert t.shape == ref.shape and t.stride() == ref.stride(), key
            assert tensor_bytes(t) == tensor_bytes(ref), key
            assert t.requires_grad == ref.requires_grad


@pytest.mark.parametrize("name", MAPPINGS)
def test_numpy_framework_matches_numpy_load(name):
    reference = dict(fsnp.iter_leaves(fsnp.load(fixture_path(name))))
    reference = {k: v for k, v in reference.items() if isinstance(v, np.ndarray)}
    with fastserial.open(fixture_path(name), framework="numpy") as ckpt:
        assert ckpt.keys() == list(reference)
        for key, ref in reference.items():
            meta = ckpt.metadata(key)
            assert meta.dtype == ref.dtype and meta.shape == ref.shape and meta.nbytes == ref.nbytes
            arr = ckpt.get_tensor(key)
            assert isinstance(arr, np.ndarray) and arr.dtype == ref.dtype and arr.shape == ref.shape
            assert arr.strides == ref.strides, key
            assert np.ascontiguousarray(arr).tobytes() == np.ascontiguousarray(ref).tobytes(), key


def test_metadata_reads_no_tensor_data(tmp_path):
    # Overwrite every storage with garbage: listing and metadata still work, because
    # they never touch those bytes (the CRC32s no longer match either).
    path = tmp_path / "garbled.pt"
    data = bytearray(fixture_path("state_dict.pt").read_bytes())
    archive = fastserial._fastserial.Archive.open_path(str(fixture_path("state_dict.pt")))
    for record in archive.names():
        if record.startswith("data/"):
            offset, size, _crc, _ = archive.info(record)
            data[offset : offset + size] = b"\xa5" * size
    path.write_bytes(bytes(data))
    with fastserial.open(path, framework="numpy") as ckpt:
        meta = ckpt.metadata("0.weight")
        assert (meta.torch_dtype, meta.shape, meta.nbytes) == ("float32", (32, 16), 2048)
        assert meta.storage_nbytes == 2048


def test_get_tensor_reads_only_its_own_bytes():
    with fastserial.open(fixture_path("views.pt"), framework="numpy") as ckpt:
        meta = ckpt.metadata("small_view_of_large")
        assert meta.storage_nbytes == 7992 and meta.nbytes == 40
        arr = ckpt.get_tensor("small_view_of_large")
        assert arr.base.nbytes == 40  # not the 7992-byte storage it views
        assert arr.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        evens = ckpt.get_tensor("evens")
        assert evens.base.nbytes == 7 * 8 and evens.tolist() == [2, 4, 6, 8]


def test_tensors_read_separately_never_share_memory():
    with fastserial.open(fixture_path("views.pt"), framework="numpy") as ckpt:
        a, b = ckpt.get_tensor("numbers"), ckpt.get_tensor("evens")
        a[:] = 0
        assert b.tolist() == [2, 4, 6, 8]
        assert ckpt.metadata("evens").storage == ckpt.metadata("numbers").storage


def test_nested_mappings_are_flattened(tmp_path):
    path = tmp_path / "nested.pt"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    fsnp.save(
        {
            "model": collections.OrderedDict(w=w, b=np.ones(2)),
            "step": 7,
            "optimizer": {"state": {0: {"exp_avg": np.zeros(3)}}},
        },
        path,
    )
    with fastserial.open(path, framework="numpy") as ckpt:
        assert ckpt.keys() == ["model.w", "model.b", "optimizer.state.0.exp_avg"]
        assert ckpt.get_tensor("model.w").tolist() == w.tolist()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="framework"):
        fastserial.open(fixture_path("views.pt"), framework="jax")
    path = tmp_path / "list.pt"
    fsnp.save([np.zeros(2)], path)
    with pytest.raises(TypeError, match="mapping"):
        fastserial.open(path)
    with fastserial.open(fixture_path("views.pt")) as ckpt, pytest.raises(KeyError, match="nope"):
        ckpt.get_tensor("nope")
    with fastserial.open(fixture_path("sparse.pt")) as ckpt:
        assert ckpt.keys() == []
        with pytest.raises(fsnp.UnsupportedTensorError, match="sparse"):
            ckpt.get_tensor("coo")


@pytest.mark.parametrize("name", fixture_names(malicious=True) + ["module.pt"])
def test_unsafe_pickles_are_refused(name):
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        fastserial.open(fixture_path(name))
    assert "FASTSERIAL_PWNED" not in os.environ


def test_closed_checkpoint_keeps_tensors_valid():
    ckpt = fastserial.open(fixture_path("state_dict.pt"))
    t = ckpt.get_tensor("0.bias")
    ckpt.close()
    assert t.shape == (32,) and torch.isfinite(t).all()


def test_numpy_framework_without_torch():
    code = HIDE_TORCH + textwrap.dedent(
        """
        import sys
        import fastserial
        with fastserial.open(sys.argv[1], framework="numpy") as ckpt:
            arr = ckpt.get_tensor("bfloat16")
            print(ckpt.keys()[:3], ckpt.metadata("bfloat16").dtype, arr.dtype)
        try:
            fastserial.open(sys.argv[1])
        except ImportError as e:
            print("torch framework:", e)
        assert "torch" not in sys.modules
        """
    )
    proc = run_python(code, fixture_path("big_endian.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "['float16', 'bfloat16', 'float32'] bfloat16 bfloat16" in proc.stdout
    assert "torch framework: fastserial.open(framework='torch') needs torch" in proc.stdout
