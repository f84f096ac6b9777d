"""Reference tests: the manifest checker driven by real torch.load.

These prove that ``assert_matches_manifest`` and our reading of the manifest
are correct (torch 2.13 wrote the fixtures), and that the checker is able to
fail.  They do not import fastserial.  Run them alone with
``python3 -m pytest tests/test_reference.py`` (or ``-k reference``).
"""

import collections
import copy
import io
import os
import pickle

import pytest
import torch
from conftest import (
    LOAD_MODES,
    assert_matches_manifest,
    expected_for,
    fixture_entries,
    fixture_names,
    fixture_path,
    load_with_mode,
    manifest_weights_only,
    tensor_bytes,
)

BENIGN = fixture_names()
EVIL = fixture_names(malicious=True)


def test_reference_manifest_is_complete():
    on_disk = sorted(p.name for p in fixture_path("x").parent.glob("*.pt"))
    assert on_disk == sorted(fixture_entries()), "manifest and tests/data/*.pt disagree"
    assert BENIGN and EVIL


@pytest.mark.parametrize("mode", LOAD_MODES)
@pytest.mark.parametrize("name", BENIGN)
def test_reference_torch_load_matches_manifest(name, mode):
    obj = load_with_mode(
        torch.load, fixture_path(name), mode, weights_only=manifest_weights_only(name)
    )
    assert_matches_manifest(obj, expected_for(name))


@pytest.mark.parametrize("encoding", ["utf-8", "latin1", "bytes"])
def test_reference_torch_py2_strings_encodings(encoding):
    name = "py2_strings.pt"
    obj = torch.load(fixture_path(name), weights_only=False, encoding=encoding)
    assert_matches_manifest(obj, expected_for(name, encoding))


@pytest.mark.parametrize("name", EVIL)
def test_reference_torch_refuses_evil(name):
    env_var = fixture_entries()[name]["env_var"]
    os.environ.pop(env_var, None)
    try:
        with pytest.raises(pickle.UnpicklingError, match="getattr"):
            torch.load(fixture_path(name))
        assert env_var not in os.environ
    finally:
        os.environ.pop(env_var, None)


# --------------------------------------------------------------------------
# The checker must be able to fail: mutate a correctly loaded object and make
# sure each kind of difference is reported.
# --------------------------------------------------------------------------


def _load(name):
    return torch.load(fixture_path(name), weights_only=manifest_weights_only(name))


def _mutations():
    def value_change(name="views.pt"):
        obj = _load(name)
        obj["numbers"][0] += 1
        return name, obj

    def shape_change():
        obj = _load("views.pt")
        obj["matrix"] = obj["matrix"].reshape(6, 4)
        return "views.pt", obj

    def sharing_broken():
        obj = _load("views.pt")
        obj["evens"] = obj["numbers"].clone()[1::2]
        return "views.pt", obj

    def storage_shrunk():
        obj = _load("views.pt")
        obj["small_view_of_large"] = obj["small_view_of_large"].clone()
        return "views.pt", obj

    def stride_change():
        obj = _load("views.pt")
        obj["transposed"] = obj["transposed"].contiguous()
        return "views.pt", obj

    def dict_instead_of_ordereddict():
        obj = _load("state_dict.pt")
        return "state_dict.pt", dict(obj)

    def metadata_dropped():
        obj = _load("state_dict.pt")
        new = collections.OrderedDict(obj)
        return "state_dict.pt", new

    def list_instead_of_tuple():
        obj = _load("nested.pt")
        obj["tuple"] = list(obj["tuple"])
        return "nested.pt", obj

    def int_instead_of_bool():
        obj = _load("nested.pt")
        obj["list"][4] = 1
        return "nested.pt", obj

    def negative_zero_lost():
        obj = _load("nested.pt")
        obj["float_special"][1] = 0.0
        return "nested.pt", obj

    def dtype_change():
        obj = _load("dtypes.pt")
        obj["bfloat16"] = obj["bfloat16"].view(torch.float16)
        return "dtypes.pt", obj

    def float8_bits():
        obj = _load("dtypes.pt")
        obj["float8_e5m2"].view(torch.uint8)[0] ^= 1
        return "dtypes.pt", obj

    def requires_grad_lost():
        obj = _load("parameters.pt")
        obj["t"] = obj["t"].detach()
        return "parameters.pt", obj

    def parameter_became_tensor():
        obj = _load("parameters.pt")
        obj["frozen"] = obj["frozen"].data
        return "parameters.pt", obj

    def quantized_zero_point():
        obj = _load("quantized.pt")
        q = obj["q"]
        obj["q"] = torch._make_per_tensor_quantized_tensor(
            q.int_repr(), q.q_scale(), q.q_zero_point() + 1
        )
        return "quantized.pt", obj

    def sparse_values():
        obj = _load("sparse.pt")
        coo = obj["coo"]
        obj["coo"] = torch.sparse_coo_tensor(coo._indices(), coo._values() * 2, coo.shape)
        return "sparse.pt", obj

    def module_weight():
        obj = _load("module.pt")
        with torch.no_grad():
            obj.weight[0, 0] += 1
        return "module.pt", obj

    return [
        value_change,
        shape_change,
        sharing_broken,
        storage_shrunk,
        stride_change,
        dict_instead_of_ordereddict,
        metadata_dropped,
        list_instead_of_tuple,
        int_instead_of_bool,
        negative_zero_lost,
        dtype_change,
        float8_bits,
        requires_grad_lost,
        parameter_became_tensor,
        quantized_zero_point,
        sparse_values,
        module_weight,
    ]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_reference_checker_rejects_mutation(mutate):
    name, obj = mutate()
    with pytest.raises(AssertionError):
        assert_matches_manifest(obj, expected_for(name))


def test_reference_checker_rejects_spurious_sharing():
    # Two manifest storages (#0 and #1) with identical contents: loading them
    # as one shared storage must be reported, and only that.
    entry = dict(expected_for("views.pt")["items"])["numbers"]
    other = dict(entry, storage=1)
    expect = {"kind": "list", "items": [entry, other]}
    numbers = _load("views.pt")["numbers"]
    assert_matches_manifest([numbers, numbers.clone()], expect)
    with pytest.raises(AssertionError, match="must be distinct"):
        assert_matches_manifest([numbers, numbers], expect)
    with pytest.raises(AssertionError, match="must be distinct"):
        assert_matches_manifest([numbers, numbers.view(3, 3)[0:3].reshape(9)], expect)


def test_reference_checker_rejects_wrong_py2_encoding():
    obj = torch.load(fixture_path("py2_strings.pt"), weights_only=False, encoding="latin1")
    with pytest.raises(AssertionError):
        assert_matches_manifest(obj, expected_for("py2_strings.pt", "utf-8"))


def test_reference_checker_does_not_mutate_manifest():
    before = copy.deepcopy(fixture_entries())
    assert_matches_manifest(_load("nested.pt"), expected_for("nested.pt"))
    assert fixture_entries() == before


def test_reference_checker_accepts_bytesio_roundtrip_of_torch_save():
    # torch.save -> torch.load keeps everything the manifest describes
    # (including sharing and whole-storage saving), which the save tests rely on.
    for name in BENIGN:
        obj = _load(name)
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=manifest_weights_only(name))
        assert_matches_manifest(again, expected_for(name))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.complex64, torch.bool, torch.uint16, torch.float8_e5m2],
    ids=str,
)
def test_reference_tensor_bytes_is_layout_independent(dtype):
    # Values, not memory layout: every view must hash like its contiguous copy,
    # including size-1 dims with odd strides that .contiguous() leaves alone.
    t = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    for view in (t, t[1:], t[..., ::2], t.transpose(0, 2), t[:, 1:2], t[1:, :, ::3], t[0, 0, 0]):
        dense = torch.empty(view.shape, dtype=dtype)
        dense.copy_(view)
        assert tensor_bytes(view) == tensor_bytes(dense)
        assert len(tensor_bytes(view)) == view.numel() * view.element_size()
    assert tensor_bytes(t[1:, :, ::3]) != tensor_bytes(t[:1, :, ::3]) or dtype == torch.bool
