"""torch's process-wide serialization settings hold for fastserial too (issue 12):
mmap options, ``torch.utils.serialization.config.load.mmap``, and the lazy load's
handling of globals that read tensor data (issue 13)."""

from __future__ import annotations

import collections
import io
import mmap

import fastserial
import pytest
import torch

try:
    from torch.utils.serialization import config
except ImportError:  # torch < 2.7 has no serialization config
    config = None

needs_config = pytest.mark.skipif(config is None, reason="torch < 2.7: no serialization config")


@pytest.fixture
def restore_config():
    if config is None:
        yield
        return
    saved = (config.load.mmap, config.load.mmap_flags)
    yield
    config.load.mmap, config.load.mmap_flags = saved


def _first(path) -> float:
    return torch.load(path)["w"][0].item()


@pytest.mark.parametrize("loader", ["torch", "fastserial"])
def test_map_shared_writes_reach_the_file(tmp_path, restore_config, loader):
    """``set_default_mmap_options(MAP_SHARED)`` made on torch: both loaders map the
    file shared, so a write to a tensor lands in the file."""
    load = torch.load if loader == "torch" else fastserial.load
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        sd = load(path, mmap=True)
        sd["w"][0] = 7.0
        del sd
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    assert _first(path) == 7.0


@pytest.mark.parametrize("loader", ["torch", "fastserial"])
def test_map_private_by_default(tmp_path, loader):
    load = torch.load if loader == "torch" else fastserial.load
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    sd = load(path, mmap=True)
    sd["w"][0] = 7.0
    del sd
    assert _first(path) == 0.0


def test_fastserial_mmap_options_are_torchs(restore_config):
    fastserial.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        assert torch.serialization.get_default_mmap_options() == mmap.MAP_SHARED
        assert fastserial.get_default_mmap_options() == mmap.MAP_SHARED
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    assert fastserial.get_default_mmap_options() == mmap.MAP_PRIVATE


@needs_config
@pytest.mark.parametrize("loader", ["torch", "fastserial"])
def test_config_load_mmap_makes_mmap_the_default(tmp_path, restore_config, loader):
    """``config.load.mmap = True``: a load without ``mmap=`` maps the file (seen
    through a shared mapping, where a write reaches the file)."""
    load = torch.load if loader == "torch" else fastserial.load
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    config.load.mmap = True
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        sd = load(path)
        sd["w"][0] = 5.0
        del sd
        sd = load(path, mmap=False)  # an explicit False still reads eagerly
        sd["w"][0] = 6.0
        del sd
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    assert _first(path) == 5.0


class _SizeOf:
    """Pickles as ``torch.Size(t)``: a call that reads a tensor's elements."""

    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        return (torch.Size, (self.t,))


class _CounterOf:
    def __init__(self, d):
        self.d = d

    def __reduce__(self):
        return (collections.Counter, (self.d,))


class _ComplexOf:
    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        return (complex, (self.t,))


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"t": torch.tensor([2, 3]), "s": _SizeOf(torch.tensor([2, 3]))},
        lambda: (lambda t: [t, _SizeOf(t)])(torch.tensor([7, 1, 4])),
        lambda: (lambda t: {"c": _CounterOf({"a": t}), "t": t})(torch.tensor([5.0])),
        lambda: (lambda t: [t, _ComplexOf(t)])(torch.tensor(2.5)),
        lambda: (lambda t: [t, _SizeOf(t)])(torch.arange(40000)),  # not packed
    ],
    ids=["size", "size-shared", "counter", "complex", "size-big"],
)
@pytest.mark.parametrize("mode", ["path", "bytesio", "mmap"])
def test_calls_that_read_tensor_data_see_the_files_values(make, mode, tmp_path):
    """torch.Size(t), Counter({..: t}), complex(t) run while the pickle is read: the
    tensors they read hold the file's bytes, as in torch.load (issue 13: they used to
    read memory not yet filled)."""
    path = tmp_path / "x.pt"
    torch.save(make(), path)
    want = torch.load(path)
    if mode == "path":
        got = fastserial.load(path)
    elif mode == "bytesio":
        got = fastserial.load(io.BytesIO(path.read_bytes()))
    else:
        got = fastserial.load(path, mmap=True)
    assert repr(got) == repr(want)
