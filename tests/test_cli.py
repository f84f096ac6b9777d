"""The fastserial command line: inspect, convert, verify, end to end."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import fastserial
import fastserial.numpy as fsnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import (
    expected_for,
    fixture_entries,
    fixture_names,
    fixture_path,
    run_python,
    subprocess_env,
    tensor_bytes,
)
from fastserial.cli import Progress, main

BENIGN = fixture_names()
EVIL = fixture_names(malicious=True)


class Tty(io.StringIO):
    def isatty(self):
        return True


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def manifest_tensors(expect, prefix=""):
    """Dotted name -> manifest tensor entry, flattened the way inspect names them."""
    out = {}
    if isinstance(expect, dict):
        kind = expect["kind"]
        if kind in ("tensor", "parameter"):
            out[prefix] = expect
        elif kind in ("dict", "OrderedDict"):
            for k, v in expect["items"]:
                out.update(manifest_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
        elif kind in ("list", "tuple"):
            for i, v in enumerate(expect["items"]):
                out.update(manifest_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
        elif kind == "module":
            out.update(manifest_tensors(expect["state_dict"], "_parameters"))
    return out


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("name", [n for n in BENIGN if n not in ("sparse.pt", "quantized.pt")])
def test_inspect_json_matches_manifest(name):
    code, out, _ = cli("inspect", fixture_path(name), "--json")
    assert code == 0
    report = json.loads(out)
    expected = manifest_tensors(expected_for(name))
    got = {t["name"]: t for t in report["tensors"]}
    assert list(got) == list(expected)
    storage_of = {}
    for key, exp in expected.items():
        t = got[key]
        assert (t["dtype"], t["shape"], t["stride"], t["storage_offset"], t["storage_nbytes"]) == (
            exp["dtype"],
            exp["shape"],
            exp["stride"],
            exp["storage_offset"],
            exp["storage_nbytes"],
        )
        storage_of.setdefault(exp["storage"], set()).add(t["storage"])
    assert all(len(keys) == 1 for keys in storage_of.values())  # same storage, same key
    assert len({next(iter(k)) for k in storage_of.values()}) == len(storage_of)
    zip_file = name not in ("legacy.pt", "py2_strings.pt")
    assert report["format"] == ("zip" if zip_file else "legacy")
    assert report["byteorder"] == ("big" if name == "big_endian.pt" else "little")
    assert report["weights_only"] is fixture_entries()[name].get("weights_only", True) or name in (
        "py2_strings.pt"
    )
    assert report["total"]["tensors"] == len(expected)
    by_dtype = collections.Counter(e["dtype"] for e in expected.values())
    assert {d: v["tensors"] for d, v in report["totals"].items()} == dict(by_dtype)


def test_inspect_table():
    code, out, _ = cli("inspect", fixture_path("views.pt"))
    assert code == 0
    assert "zip (torch >= 1.6), folder 'views/'" in out and "byteorder little" in out
    assert "torch._utils._rebuild_tensor_v2" in out and "weights-only: loadable" in out
    assert "NAME" in out and "DTYPE" in out and "STORAGE" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "int64" in lines["evens"] and "[4]" in lines["evens"] and "shared by 2" in lines["evens"]
    assert "offset 1" in lines["evens"]
    assert "[2, 3, 4, 5]" in lines["channels_last"]
    assert lines["total"].split()[1:3] == ["8", "204"]
    assert "8 tensors in 5 storages" in out


def test_inspect_shows_unsafe_pickles_without_running_them():
    for name in EVIL:
        code, out, _ = cli("inspect", fixture_path(name))
        assert code == 0
        assert "NOT loadable" in out and "builtins.getattr" in out
        assert "FASTSERIAL_PWNED" not in os.environ
    code, out, _ = cli("inspect", fixture_path("module.pt"))
    assert "torch.nn.modules.linear.Linear" in out and "NOT loadable" in out
    assert "_parameters.weight" in out and "in_features = 4" in out


def test_inspect_reports_sparse_and_other_values():
    _, out, _ = cli("inspect", fixture_path("sparse.pt"))
    assert "coo: a sparse tensor (torch._utils._rebuild_sparse_tensor)" in out
    _, out, _ = cli("inspect", fixture_path("nested.pt"))
    assert "other values:" in out and "big_int = 1180591620717411303424" in out


def test_inspect_reads_metadata_only(tmp_path):
    # Every storage overwritten: inspect still lists everything, untroubled by the
    # now-wrong CRC32s, because it never reads tensor data.
    src = fixture_path("views.pt")
    data = bytearray(src.read_bytes())
    archive = fastserial._fastserial.Archive.open_path(str(src))
    for record in archive.names():
        if record.startswith("data/"):
            offset, size, _, _ = archive.info(record)
            data[offset : offset + size] = b"\x5a" * size
    path = tmp_path / "views.pt"
    path.write_bytes(bytes(data))
    code, out, _ = cli("inspect", path, "--json")
    assert code == 0 and json.loads(out)["total"]["tensors"] == 8
    code, _, _ = cli("verify", path)
    assert code == 1


def test_inspect_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.int64)},
        tmp_path / "m.safetensors",
        metadata={"format": "np"},
    )
    code, out, _ = cli("inspect", tmp_path / "m.safetensors", "--json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "safetensors"
    assert {t["name"]: (t["dtype"], t["shape"]) for t in report["tensors"]} == {
        "w": ("float32", [2, 3]),
        "b": ("int64", [3]),
    }


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", BENIGN)
def test_verify_intact_fixtures(name):
    code, out, _ = cli("verify", fixture_path(name))
    assert code == 0, out
    assert out.startswith(f"OK {fixture_path(name)}")


def _corrupt(src, dst, record, at=0):
    data = bytearray(src.read_bytes())
    offset = fastserial._fastserial.Archive.open_path(str(src)).info(record)[0]
    data[offset + at] ^= 0xFF
    dst.write_bytes(bytes(data))


def test_verify_names_the_corrupted_record(tmp_path):
    bad = tmp_path / "bad.pt"
    _corrupt(fixture_path("state_dict.pt"), bad, "data/7", at=100)
    code, out, _ = cli("verify", bad)
    assert code == 1
    assert "FAIL" in out and "record 'state_dict/data/7'" in out and "CRC32 mismatch" in out


def test_verify_truncated_file(tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(fixture_path("state_dict.pt").read_bytes()[:3000])
    code, out, _ = cli("verify", bad)
    assert code == 1 and "cannot open the checkpoint" in out


def test_verify_truncated_legacy_file(tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(fixture_path("legacy.pt").read_bytes()[:-10])
    code, out, _ = cli("verify", bad)
    assert code == 1 and "ends" in out


def _rewrite(src, dst, replace: dict):
    archive = fastserial._fastserial.Archive.open_path(str(src))
    writer = fastserial._fastserial.ArchiveWriter(str(dst), archive.prefix)
    for name in archive.names():
        if name == ".data/serialization_id":
            writer.write_record(name, writer.serialization_id().encode())
        else:
            writer.write_record(name, replace.get(name, archive.read(name)))
    writer.finish(fsync=False)


def test_verify_checks_record_sizes_and_tensor_bounds(tmp_path):
    short = tmp_path / "short.pt"
    _rewrite(fixture_path("state_dict.pt"), short, {"data/1": b"\0" * 12})
    code, out, _ = cli("verify", short)
    assert code == 1 and "'state_dict/data/1' holds 12 bytes but the pickle declares 128" in out

    src = tmp_path / "ok.pt"
    fsnp.save({"x": np.arange(4, dtype=np.float32)}, src)
    archive = fastserial._fastserial.Archive.open_path(str(src))
    pkl = archive.read("data.pkl")
    assert pkl.count(b"K\x04\x85") == 1  # the shape (4,)
    oob = tmp_path / "oob.pt"
    _rewrite(src, oob, {"data.pkl": pkl.replace(b"K\x04\x85", b"K(\x85")})  # shape (40,)
    code, out, _ = cli("verify", oob)
    assert code == 1 and "reaches past the end of its 16-byte storage" in out


def test_verify_shows_progress_on_a_terminal():
    out, err = io.StringIO(), Tty()
    assert main(["verify", str(fixture_path("edge.pt"))], out=out, err=err) == 0
    assert "verifying edge.pt" in err.getvalue() and "100.0%" in err.getvalue()
    _, _, plain_err = cli("verify", fixture_path("edge.pt"))
    assert plain_err == ""


# --------------------------------------------------------------------------- convert


def test_convert_pt_to_safetensors_and_back(tmp_path):
    from safetensors import safe_open

    st = tmp_path / "state.safetensors"
    code, out, err = cli("convert", fixture_path("state_dict.pt"), st)
    assert code == 0 and "wrote" in out and "9 tensors" in out
    assert "_metadata" in err  # reported, not silently dropped
    reference = torch.load(fixture_path("state_dict.pt"), weights_only=True)
    with safe_open(str(st), framework="pt") as f:
        assert sorted(f.keys()) == sorted(reference)
        assert f.metadata() == {"format": "pt"}
        for key in reference:
            assert torch.equal(f.get_tensor(key), reference[key]), key
    back = tmp_path / "back.pt"
    code, _, _ = cli("convert", st, back)
    assert code == 0
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == set(reference)
    for key in reference:
        assert torch.equal(loaded[key], reference[key]), key


def test_convert_every_dtype_safetensors_supports(tmp_path):
    st, back = tmp_path / "d.safetensors", tmp_path / "d.pt"
    code, _, err = cli("convert", fixture_path("dtypes.pt"), st)
    assert code == 0
    assert "'complex128' (complex128): safetensors has no such dtype" in err
    reference = torch.load(fixture_path("dtypes.pt"), weights_only=True)
    assert cli("convert", st, back)[0] == 0  # float8 comes back through the header offsets
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == set(reference) - {"complex128"}
    for key, t in loaded.items():
        assert t.dtype == reference[key].dtype and tensor_bytes(t) == tensor_bytes(
            reference[key]
        ), key


def test_convert_shared_tensors(tmp_path):
    src, st = tmp_path / "tied.pt", tmp_path / "tied.safetensors"
    emb = torch.randn(5, 3)
    torch.save(
        {"embed.weight": emb, "lm_head.weight": emb, "row": emb[1], "other": torch.ones(2)}, src
    )
    code, _, err = cli("convert", src, st)
    assert code == 0
    assert "'lm_head.weight' is the same tensor as 'embed.weight'" in err and "kept one copy" in err
    assert "'row' views the storage of 'embed.weight': written as an independent copy" in err
    from safetensors.torch import load_file

    got = load_file(st)
    assert sorted(got) == ["embed.weight", "other", "row"]
    assert torch.equal(got["embed.weight"], emb) and torch.equal(got["row"], emb[1])


def test_convert_reports_non_tensor_values(tmp_path):
    st = tmp_path / "n.safetensors"
    code, _, err = cli("convert", fixture_path("nested.pt"), st)
    assert code == 0
    assert "non-tensor values not written" in err
    assert "'big_int' = 1180591620717411303424 (int): not a tensor" in err
    assert "'tuple.1.1.0'" not in err  # a tensor, written


def test_convert_legacy_to_zip(tmp_path):
    out = tmp_path / "modern.pt"
    code, _, _ = cli("convert", fixture_path("legacy.pt"), out)
    assert code == 0
    reference = torch.load(fixture_path("legacy.pt"), weights_only=True)
    got = torch.load(out, weights_only=True)
    assert fsnp.read_structure(out).kind == "zip"
    for key in reference:
        assert torch.equal(got[key], reference[key])
    assert got["evens"].untyped_storage().data_ptr() == got["numbers"].untyped_storage().data_ptr()


def test_convert_errors(tmp_path):
    code, _, err = cli("convert", fixture_path("views.pt"), fixture_path("views.pt"))
    assert code == 1 and "same file" in err
    code, _, err = cli("convert", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 1 and "nothing to convert" in err
    code, _, err = cli("convert", fixture_path(EVIL[0]), tmp_path / "x.safetensors")
    assert code == 1 and "refused global" in err and "FASTSERIAL_PWNED" not in os.environ
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_shows_progress_on_a_terminal(tmp_path):
    err = Tty()
    src = tmp_path / "big.pt"
    fsnp.save({"w": np.zeros(1 << 16, ml_dtypes.bfloat16)}, src)
    assert (
        main(["convert", str(src), str(tmp_path / "b.safetensors")], out=io.StringIO(), err=err)
        == 0
    )
    assert "reading big.pt" in err.getvalue() and "100.0%" in err.getvalue()
    assert "writing b.safetensors" in err.getvalue()


def test_progress_bar():
    stream = Tty()
    with Progress(2048, "work", stream) as bar:
        bar.update(1024)
    text = stream.getvalue()
    assert (
        "work [" in text and "100.0%" in text and "2.0 KiB/2.0 KiB" in text and text.endswith("\n")
    )
    quiet = io.StringIO()
    with Progress(10, "work", quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- entry points


def test_python_dash_m_and_without_torch(tmp_path):
    hide = textwrap.dedent(
        """
        import sys, runpy
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is hidden in this test")
        sys.meta_path.insert(0, _NoTorch())
        sys.argv = ["fastserial"] + sys.argv[1:]
        runpy.run_module("fastserial", run_name="__main__")
        """
    )
    proc = run_python(hide, "inspect", fixture_path("dtypes.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tensors"]) == 19
    proc = run_python(hide, "convert", fixture_path("dtypes.pt"), tmp_path / "d.safetensors")
    assert proc.returncode == 0, proc.stderr
    proc = run_python(hide, "verify", fixture_path("dtypes.pt"))
    assert proc.returncode == 0 and proc.stdout.startswith("OK")

    proc = subprocess.run(
        [sys.executable, "-m", "fastserial", "verify", str(fixture_path("edge.pt"))],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK")
    proc = subprocess.run(
        [sys.executable, "-m", "fastserial"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


def test_console_script():
    from fastserial.__main__ import main as entry

    assert entry(["verify", str(fixture_path("edge.pt"))]) == 0
    script = shutil.which("fastserial")
    if script is None:
        pytest.skip("the fastserial console script is not installed")
    proc = subprocess.run(
        [script, "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"the installed console script does not run here: {proc.stderr[-200:]}")
    assert proc.stdout.startswith("fastserial ")
