"""View and storage-sharing semantics (the examples from PyTorch's serialization docs).

Every test runs over the four save/load pairings; the torch.save/torch.load
pairing is the reference proving the expectations are torch's own.
"""

import io

import fastserial
import pytest
import torch

PAIRS = {
    "fs_save-fs_load": (fastserial.save, fastserial.load),
    "torch_save-fs_load": (torch.save, fastserial.load),
    "fs_save-torch_load": (fastserial.save, torch.load),
    "torch_save-torch_load": (torch.save, torch.load),  # reference
}


@pytest.fixture(params=list(PAIRS))
def pair(request):
    return PAIRS[request.param]


@pytest.fixture(params=["path", "bytesio", "mmap"])
def roundtrip(request, pair, tmp_path):
    """roundtrip(obj) -> (loaded, file size) using the pairing and load mode."""
    save, load = pair
    mode = request.param
    counter = iter(range(1000))

    def do(obj, **load_kwargs):
        if mode == "bytesio":
            buf = io.BytesIO()
            save(obj, buf)
            size = len(buf.getvalue())
            buf.seek(0)
            return load(buf, **load_kwargs), size
        path = tmp_path / f"ckpt{next(counter)}.pt"
        save(obj, path)
        kwargs = dict(load_kwargs, mmap=True) if mode == "mmap" else load_kwargs
        return load(path, **kwargs), path.stat().st_size

    return do


def _storage_ptr(t):
    return t.untyped_storage().data_ptr()


def test_docs_numbers_evens(roundtrip):
    numbers = torch.arange(1, 10)
    evens = numbers[1::2]
    (loaded_numbers, loaded_evens), _ = roundtrip([numbers, evens])
    assert loaded_evens.storage_offset() == 1 and loaded_evens.stride() == (2,)
    assert _storage_ptr(loaded_numbers) == _storage_ptr(loaded_evens)
    loaded_evens *= 2
    assert torch.equal(loaded_numbers, torch.tensor([1, 4, 3, 8, 5, 12, 7, 16, 9]))
    # the originals are untouched
    assert torch.equal(numbers, torch.arange(1, 10))


def test_small_view_saves_whole_storage_and_clone_does_not(roundtrip):
    large = torch.arange(1, 1000)
    small = large[0:5]
    (loaded_small,), view_size = roundtrip([small])
    assert view_size > 999 * 8
    assert loaded_small.untyped_storage().nbytes() == 999 * 8
    assert torch.equal(loaded_small, torch.arange(1, 6))

    (loaded_clone,), clone_size = roundtrip([small.clone()])
    assert loaded_clone.untyped_storage().nbytes() == 5 * 8
    assert torch.equal(loaded_clone, torch.arange(1, 6))
    # only 5 elements stored: smaller by (almost) the 994 dropped elements
    assert clone_size < 999 * 8
    assert view_size - clone_size >= (999 - 5) * 8 - 128


def test_same_tensor_twice_stays_one_object(roundtrip):
    w = torch.randn(4, 3)
    loaded, _ = roundtrip({"encoder.weight": w, "decoder.weight": w})
    assert loaded["encoder.weight"] is loaded["decoder.weight"]
    loaded["encoder.weight"][0, 0] = 123.0
    assert loaded["decoder.weight"][0, 0].item() == 123.0


def test_tied_module_weights_share_storage(roundtrip):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    # state_dict() detaches: two distinct tensor objects on one storage
    assert sd["emb.weight"] is not sd["head.weight"]
    loaded, _ = roundtrip(sd)
    assert type(loaded) is type(sd) and list(loaded) == list(sd)
    assert torch.equal(loaded["emb.weight"], emb.weight.detach())
    assert _storage_ptr(loaded["emb.weight"]) == _storage_ptr(loaded["head.weight"])
    loaded["emb.weight"][2, 1] = -7.0
    assert loaded["head.weight"][2, 1].item() == -7.0


def test_two_parameters_sharing_storage(roundtrip):
    base = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    p1 = torch.nn.Parameter(base)
    p2 = torch.nn.Parameter(base[1:], requires_grad=False)
    loaded, _ = roundtrip({"p1": p1, "p2": p2})
    l1, l2 = loaded["p1"], loaded["p2"]
    assert type(l1) is torch.nn.Parameter and type(l2) is torch.nn.Parameter
    assert l1.requires_grad and not l2.requires_grad
    assert torch.equal(l1.detach(), base) and torch.equal(l2.detach(), base[1:])
    assert l2.storage_offset() == 4
    assert _storage_ptr(l1) == _storage_ptr(l2)
    with torch.no_grad():
        l2[0, 0] = 99.0
    assert l1[1, 0].item() == 99.0


def test_transpose_and_expand_keep_strides(roundtrip):
    m = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    obj = {"m": m, "t": m.t(), "col": m[:, 1], "exp": torch.tensor([1, 2, 3]).expand(5, 3)}
    loaded, _ = roundtrip(obj)
    for k, v in obj.items():
        assert loaded[k].stride() == v.stride(), k
        assert loaded[k].storage_offset() == v.storage_offset(), k
        assert torch.equal(loaded[k], v), k
    assert _storage_ptr(loaded["m"]) == _storage_ptr(loaded["t"]) == _storage_ptr(loaded["col"])
    assert loaded["exp"].untyped_storage().nbytes() == 3 * 8


@pytest.mark.parametrize("save", [torch.save, fastserial.save], ids=["torch", "fastserial"])
def test_views_of_one_storage_with_different_dtypes_are_refused(save):
    # torch.save refuses tensors viewing the same data as different dtypes
    # (the format records one dtype per storage); a drop-in must refuse too.
    base = torch.arange(8, dtype=torch.int32)
    with pytest.raises(RuntimeError):
        save({"base": base, "bytes": base.view(torch.uint8)}, io.BytesIO())
