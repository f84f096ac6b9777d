"""SourceChangeWarning: a legacy checkpoint of a whole module, loaded with
weights_only=False after the module's class changed, warns as torch.load does."""

from __future__ import annotations

import importlib
import sys
import warnings

import fastserial
import pytest
import torch

_SOURCE = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x){extra}
"""


@pytest.fixture
def net_module(tmp_path, monkeypatch):
    name = "fastserial_source_change_net"
    path = tmp_path / f"{name}.py"
    path.write_text(_SOURCE.format(extra=""))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)

    def change():
        path.write_text(_SOURCE.format(extra=" * 2"))
        importlib.invalidate_caches()
        return importlib.reload(module)

    yield module, change
    sys.modules.pop(name, None)


def _warnings_of(load, path) -> list:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load(path, weights_only=False)
    return [w for w in seen if issubclass(w.category, torch.serialization.SourceChangeWarning)]


@pytest.mark.parametrize("saver", ["torch", "fastserial"])
def test_changed_module_source_warns_like_torch(net_module, tmp_path, saver):
    module, change = net_module
    path = tmp_path / "net.pt"
    save = torch.save if saver == "torch" else fastserial.save
    save(module.Net(), path, _use_new_zipfile_serialization=False)
    assert _warnings_of(torch.load, path) == [] == _warnings_of(fastserial.load, path)
    change()
    theirs = _warnings_of(torch.load, path)
    ours = _warnings_of(fastserial.load, path)
    assert len(theirs) == 1 and len(ours) == 1
    assert str(ours[0].message) == str(theirs[0].message)
    assert "source code of class" in str(ours[0].message)
