"""Missing optional packages give one line naming the extra to install (issue 16),
and the normal paths stay quiet under ``-W error``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

#: Runs the rest of a child's script with ``names`` made unimportable.
_BLOCK = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"blocked for the test: {{name}}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, blocked: set, *args: str) -> subprocess.CompletedProcess:
    script = _BLOCK.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, *args, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_cli_convert_to_safetensors_without_safetensors(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    dst = tmp_path / "m.safetensors"
    r = _run(
        f"""
        from fastserial.cli import main
        raise SystemExit(main(["convert", {str(src)!r}, {str(dst)!r}]))
        """,
        {"safetensors"},
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert 'pip install "fastserial[safetensors]"' in lines[0]
    assert "Traceback" not in r.stderr
    assert not dst.exists()


def test_cli_inspect_of_a_checkpoint_needs_no_torch(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    r = _run(
        f"""
        from fastserial.cli import main
        raise SystemExit(main(["inspect", {str(src)!r}]))
        """,
        {"torch", "safetensors"},
    )
    assert r.returncode == 0, r.stderr
    assert "w" in r.stdout


def test_load_without_torch_names_the_extra(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    r = _run(
        f"""
        import fastserial
        try:
            fastserial.load({str(src)!r})
        except ImportError as e:
            print(type(e).__name__, e)
        import fastserial.numpy as fsnp
        print(fsnp.load({str(src)!r})["w"].tolist())
        """,
        {"torch"},
    )
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("MissingDependencyError") and 'pip install "fastserial[torch]"' in first
    assert second == "[1.0, 1.0]"


def test_save_and_load_are_quiet_under_warnings_as_errors(tmp_path):
    path = tmp_path / "sd.pt"
    r = _run(
        f"""
        import io, torch, fastserial
        sd = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict()
        fastserial.save(sd, {str(path)!r})
        for got in (fastserial.load({str(path)!r}), fastserial.load({str(path)!r}, mmap=True),
                    torch.load({str(path)!r})):
            assert got.keys() == sd.keys()
            assert all(torch.equal(got[k], sd[k]) for k in sd)
        buf = io.BytesIO()
        fastserial.save(sd, buf)
        fastserial.load(io.BytesIO(buf.getvalue()), map_location="cpu")
        print("ok")
        """,
        set(),
        "-W",
        "error",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
