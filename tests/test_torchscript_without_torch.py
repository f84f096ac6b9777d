"""A TorchScript archive's tensors through the torch-free front ends (issue 12):
``fastserial.numpy.load``, ``fastserial.open`` and ``fastserial inspect`` / ``verify``
read ``torch.jit.save`` output without torch, without importing anything named
``__torch__`` and without reading the archive's code; ``fastserial.load`` still hands
it to ``torch.jit.load``."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile

import fastserial
import fastserial.numpy as fsnp
import numpy as np
import pytest
import torch
from fastserial.cli import inspect_report, main

#: Runs the rest of a child's script with torch (and anything under it) unimportable.
_NO_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "__torch__"}:
                raise ImportError(f"blocked for the test: {name}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.conv = torch.nn.Conv1d(2, 3, 2)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)])
        self.register_buffer("steps", torch.arange(6, dtype=torch.int64).reshape(2, 3))
        self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())
        self.register_buffer("u16", torch.arange(8).to(torch.uint16))
        self.register_buffer("u16_view", self.u16[2:6])  # shares u16's storage
        self.scale = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        self.tied = self.scale  # one parameter under two names
        self.plain = torch.tensor([1.5, 2.5])  # a tensor attribute, not in state_dict

    def forward(self, x):
        y = self.block(x)
        for layer in self.layers:
            y = layer(y)
        return y + self.scale.sum() + self.tied.sum() + self.plain.sum()


class Traced(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), 2.0))
        self.k = torch.tensor([5.0, 6.0, 7.0])  # tracing turns it into CONSTANTS.c0

    def forward(self, x):
        return x * self.w + self.k


class Holder(torch.nn.Module):
    def __init__(self, dtypes):
        super().__init__()
        for i, dtype in enumerate(dtypes):
            self.register_buffer(f"b{i}", torch.arange(-3.0, 5.0).reshape(2, 4).to(dtype))
        self.tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
        self.items = [torch.ones(1), torch.full((2,), 7.0)]
        self.ints = [1, 2]
        self.device = torch.device("cpu")

    def forward(self, x):
        return x + self.tensors["a"] + self.items[0]


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated in favour of export
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial running statistics
        net.block.bn.running_mean.uniform_()
        net.block.bn.running_var.uniform_(1, 2)
        net.block.bn.num_batches_tracked.fill_(7)
    module = _quietly(torch.jit.script, net)
    path = tmp_path_factory.mktemp("ts") / "scripted.pt"
    _quietly(torch.jit.save, module, str(path))
    return path, module


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    module = _quietly(torch.jit.trace, Traced(), torch.ones(3))
    path = tmp_path_factory.mktemp("ts") / "traced.pt"
    _quietly(torch.jit.save, module, str(path), _extra_files={"meta.txt": "x"})
    return path, module


def _quietly_jit(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load's
        return fn(*args, **kwargs)


def _expected(module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _assert_same(array: np.ndarray, tensor: torch.Tensor, name: str) -> None:
    assert isinstance(array, np.ndarray), name
    assert fsnp.torch_dtype_for(array.dtype).name == str(tensor.dtype).removeprefix("torch."), name
    assert array.shape == tuple(tensor.shape), name
    assert array.strides == tuple(s * tensor.element_size() for s in tensor.stride()), name
    expected = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert np.ascontiguousarray(array).tobytes() == expected, name


# --------------------------------------------------------------------------- numpy.load


@pytest.mark.parametrize("mmap", [False, True])
def test_numpy_load_gives_the_module_tree_with_arrays(scripted, mmap):
    path, module = scripted
    root = fsnp.load(path, mmap=mmap)
    assert isinstance(root, fsnp.Opaque)
    assert root.global_name.startswith("__torch__.") and root.global_name.endswith("Net")
    assert root.args == () and isinstance(root.state, dict)
    block = root.state["block"]
    assert isinstance(block, fsnp.Opaque) and block.global_name.endswith("Block")
    lin = block.state["lin"]
    assert lin.global_name.startswith("__torch__.torch.nn.modules.linear")
    _assert_same(lin.state["weight"], module.block.lin.weight, "block.lin.weight")
    assert root.state["training"] is True
    assert repr(root) == f"<{root.global_name} (not loaded)>"

    leaves = dict(fsnp.iter_leaves(root))
    expected = _expected(module)
    for name, tensor in expected.items():
        _assert_same(leaves[name], tensor, name)
    _assert_same(leaves["plain"], module.plain, "plain")
    tensors = {n for n, v in leaves.items() if isinstance(v, np.ndarray)}
    assert tensors == set(expected) | {"plain"}
    assert root.constants == ()


def test_numpy_load_keeps_sharing(scripted):
    path, _module = scripted
    leaves = dict(fsnp.iter_leaves(fsnp.load(path)))
    assert leaves["scale"] is leaves["tied"]
    assert leaves["u16_view"].base is leaves["u16"].base
    leaves["u16"][3] = 999
    assert leaves["u16_view"][1] == 999
    assert not np.shares_memory(leaves["steps"], leaves["u16"])


def test_numpy_load_reads_constants(traced):
    path, module = traced
    root = fsnp.load(path)
    assert set(root.state) == {"w", "training", "_is_full_backward_hook"}
    _assert_same(root.state["w"], module.w, "w")
    assert len(root.constants) == 1
    np.testing.assert_array_equal(root.constants[0], np.array([5.0, 6.0, 7.0], np.float32))


def test_numpy_load_reads_torchscript_dtypes_and_containers(tmp_path):
    dtypes = [
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.complex64,
        torch.bool,
        torch.int8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ]

    module = _quietly(torch.jit.script, Holder(dtypes))
    path = tmp_path / "dtypes.pt"
    _quietly(torch.jit.save, module, str(path))
    # What TorchScript's pickler writes beyond torch.save's globals, all handled:
    used = set(inspect_report(str(path))["pickle"]["globals"])
    assert {
        "torch.UInt16Storage",
        "torch.Float8_e4m3fnStorage",
        "torch.jit._pickle.restore_type_tag",
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_tensorlist",
    } <= used
    state = fsnp.load(path).state
    for i in range(len(dtypes)):
        _assert_same(state[f"b{i}"], getattr(module, f"b{i}"), f"b{i}")
    assert set(state["tensors"]) == {"a", "b"} and type(state["tensors"]) is dict
    _assert_same(state["tensors"]["b"], module.tensors["b"], "tensors.b")
    assert type(state["items"]) is list
    _assert_same(state["items"][1], module.items[1], "items.1")
    assert state["ints"] == [1, 2]
    assert str(state["device"]) == "cpu"


def test_weights_only_and_trusting_loads_agree(scripted):
    path, _module = scripted
    strict = dict(fsnp.iter_leaves(fsnp.load(path)))
    trusting = dict(fsnp.iter_leaves(fsnp.load(path, weights_only=False)))
    assert strict.keys() == trusting.keys()
    for name, value in strict.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, trusting[name])


# --------------------------------------------------------------------------- fastserial.open


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_open_names_tensors_like_state_dict(scripted, framework):
    path, module = scripted
    expected = _expected(module)
    with fastserial.open(path, framework=framework) as ckpt:
        assert ckpt.format == "torchscript"
        keys = ckpt.keys()
        assert set(keys) == set(expected) | {"plain"}
        assert [k for k in keys if k in expected] == [k for k in expected if k in keys]
        for name, tensor in expected.items():
            got = ckpt.get_tensor(name)
            if framework == "numpy":
                _assert_same(got, tensor, name)
            else:
                assert got.dtype == tensor.dtype and got.stride() == tensor.stride(), name
                assert torch.equal(got, tensor.detach()), name
            meta = ckpt.metadata(name)
            assert meta.shape == tuple(tensor.shape) and meta.torch_dtype == str(
                tensor.dtype
            ).removeprefix("torch.")
        # One storage in the file, under both names.
        assert ckpt.metadata("scale").storage == ckpt.metadata("tied").storage
        assert ckpt.metadata("u16_view").storage == ckpt.metadata("u16").storage
        assert ckpt.metadata("u16_view").storage_offset == 2


def test_open_lists_constants(traced):
    path, _module = traced
    with fastserial.open(path, framework="numpy") as ckpt:
        assert ckpt.keys() == ["w", "CONSTANTS.c0"]
        np.testing.assert_array_equal(ckpt.get_tensor("CONSTANTS.c0"), [5.0, 6.0, 7.0])


# --------------------------------------------------------------------------- command line


def test_inspect_lists_the_tensors(scripted):
    path, module = scripted
    report = inspect_report(str(path))
    assert report["format"] == "torchscript"
    assert report["weights_only"] is False
    assert report["error"] is None and report["problems"] == []
    assert any("torch.load(weights_only=True) refuses it" in n for n in report["notes"])
    by_name = {t["name"]: t for t in report["tensors"]}
    expected = _expected(module)
    assert set(by_name) == set(expected) | {"plain"}
    for name, tensor in expected.items():
        entry = by_name[name]
        assert entry["dtype"] == str(tensor.dtype).removeprefix("torch."), name
        assert entry["shape"] == list(tensor.shape), name
        assert entry["stride"] == list(tensor.stride()), name
        assert entry["nbytes"] == tensor.numel() * tensor.element_size(), name
    assert by_name["scale"]["storage_users"] == 2 and by_name["u16"]["storage_users"] == 2
    assert by_name["scale"]["requires_grad"] is True


def test_inspect_text_and_json(scripted, traced):
    path, _module = scripted
    out = io.StringIO()
    assert main(["inspect", str(path)], out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert "TorchScript archive" in text
    assert "weights-only: NOT loadable (a TorchScript archive, which torch.load refuses" in text
    assert "block.bn.running_var" in text and "layers.1.bias" in text
    out = io.StringIO()
    assert main(["inspect", "--json", str(traced[0])], out=out, err=io.StringIO()) == 0
    report = json.loads(out.getvalue())
    assert report["format"] == "torchscript" and report["weights_only"] is False
    assert [(t["name"], t["storage"]) for t in report["tensors"]] == [
        ("w", "0"),
        ("CONSTANTS.c0", "constants/0"),
    ]


def _flip_first_byte(path, record: str) -> None:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(record)
    data = bytearray(path.read_bytes())
    n, extra = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + n + extra] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record", ["traced/data/0", "traced/constants/0"])
def test_verify(traced, tmp_path, record):
    path = tmp_path / "t.pt"
    path.write_bytes(traced[0].read_bytes())
    out = io.StringIO()
    assert main(["verify", str(path)], out=out, err=io.StringIO()) == 0
    assert "2 tensors in 2 storages checked against their bounds" in out.getvalue()
    assert "TorchScript archive" in out.getvalue()
    _flip_first_byte(path, record)
    out = io.StringIO()
    assert main(["verify", str(path)], out=out, err=io.StringIO()) == 1
    assert f"record '{record}': CRC32 mismatch" in out.getvalue()


def test_convert_to_safetensors_and_refusal_to_pt(traced, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    dst = tmp_path / "t.safetensors"
    assert main(["convert", str(traced[0]), str(dst)], out=io.StringIO(), err=io.StringIO()) == 0
    assert sorted(load_file(str(dst))) == ["CONSTANTS.c0", "w"]
    err = io.StringIO()
    assert main(["convert", str(traced[0]), str(tmp_path / "t2.pt")], io.StringIO(), err) == 1
    assert "is a TorchScript archive" in err.getvalue()
    assert not (tmp_path / "t2.pt").exists()


# --------------------------------------------------------------------------- nothing runs


def test_nothing_is_imported_in_process(scripted):
    path, _module = scripted
    before = set(sys.modules)
    fsnp.load(path)
    with fastserial.open(path, framework="numpy") as ckpt:
        ckpt.get_tensor("block.lin.weight")
    inspect_report(str(path))
    assert "__torch__" not in sys.modules
    assert not {m for m in set(sys.modules) - before if m.startswith(("__torch__", "torch"))}


def test_without_torch(scripted, traced):
    """The three front ends in a process where torch cannot be imported."""
    path, module = scripted
    expected = {
        name: [str(t.dtype).removeprefix("torch."), list(t.shape), t.detach().double().tolist()]
        for name, t in _expected(module).items()
    }
    code = f"""
        import io, json, sys
        import numpy as np
        import fastserial, fastserial.numpy as fsnp
        from fastserial.cli import main
        path = {str(path)!r}
        root = fsnp.load(path)
        leaves = {{n: v for n, v in fsnp.iter_leaves(root) if isinstance(v, np.ndarray)}}
        with fastserial.open(path, framework="numpy") as ckpt:
            opened = {{n: ckpt.get_tensor(n) for n in ckpt.keys()}}
        out = io.StringIO()
        rc = main(["inspect", "--json", path], out=out, err=io.StringIO())
        report = json.loads(out.getvalue())
        constants = fsnp.load({str(traced[0])!r}).constants
        def describe(arrays):
            return {{
                n: [fsnp.torch_dtype_for(a.dtype).name, list(a.shape), a.astype(float).tolist()]
                for n, a in arrays.items()
            }}
        print(json.dumps({{
            "numpy": describe(leaves),
            "open": describe(opened),
            "inspect": [[t["name"], t["dtype"], t["shape"]] for t in report["tensors"]],
            "rc": rc,
            "format": report["format"],
            "constants": [c.tolist() for c in constants],
            "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "__torch__")),
        }}))
    """
    r = subprocess.run(
        [sys.executable, "-c", _NO_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert got["rc"] == 0 and got["format"] == "torchscript"
    for front in ("numpy", "open"):
        assert {n: v for n, v in got[front].items() if n in expected} == expected, front
        assert set(got[front]) == set(expected) | {"plain"}, front
    inspected = {n: [d, s] for n, d, s in got["inspect"]}
    assert {n: inspected[n] for n in expected} == {n: v[:2] for n, v in expected.items()}
    assert got["constants"] == [[5.0, 6.0, 7.0]]


def _with_data_pkl(src, dst, data_pkl: bytes) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name in z.namelist():
            out.writestr(name, data_pkl if name.endswith("/data.pkl") else z.read(name))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_globals_outside_the_allow_list_are_still_refused(traced, tmp_path):
    """Only TorchScript's own names get placeholders: any other global in a
    TorchScript archive is refused by the weights-only loads, never run."""
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _with_data_pkl(traced[0], path, pickle.dumps({"x": _Evil(str(marker))}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        fsnp.load(path)
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        fastserial.open(path, framework="numpy")
    report = inspect_report(str(path))
    assert report["pickle"]["not_allowed_globals"] == [f"{os.mkdir.__module__}.mkdir"]
    out = io.StringIO()
    main(["inspect", str(path)], out=out, err=io.StringIO())
    assert f"globals outside the allow-list: {os.mkdir.__module__}.mkdir" in out.getvalue()
    assert main(["verify", str(path)], out=io.StringIO(), err=io.StringIO()) == 0
    assert not marker.exists()


# --------------------------------------------------------------------------- torch front end


def test_torch_front_end_still_dispatches_to_jit_load(scripted):
    path, module = scripted
    for load in (torch.load, fastserial.load):
        with pytest.warns(UserWarning, match="TorchScript archive"):
            with pytest.raises(RuntimeError, match="TorchScript"):
                load(path, weights_only=True)
    with pytest.warns(UserWarning, match="TorchScript archive"):
        loaded = _quietly_jit(fastserial.load, path, weights_only=False)
    assert isinstance(loaded, torch.jit.ScriptModule)
    for name, tensor in _expected(module).items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
