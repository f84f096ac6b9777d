"""Temporary files left by a killed save are removed by the next save to that path."""

import os
import subprocess
import sys

import fastserial
import fastserial.numpy
import numpy as np
import pytest
import torch
from fastserial._fastserial import TEMP_MARKER


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


SAVERS = {
    "fastserial.save": lambda path: fastserial.save({"x": torch.arange(4)}, path),
    "fastserial.numpy.save": lambda path: fastserial.numpy.save({"x": np.arange(4)}, path),
}


@pytest.mark.parametrize("saver", sorted(SAVERS))
def test_next_save_removes_temp_files_of_dead_processes(tmp_path, saver):
    target = tmp_path / "ckpt.pt"
    stale = tmp_path / f".ckpt.pt{TEMP_MARKER}{_dead_pid()}-0"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".ckpt.pt{TEMP_MARKER}{os.getppid()}-0"  # a live process's save
    alive.write_bytes(b"in progress")
    other = tmp_path / f".other.pt{TEMP_MARKER}{_dead_pid()}-0"  # another target's file
    other.write_bytes(b"not ours")

    SAVERS[saver](target)

    assert not stale.exists()
    assert alive.exists()
    assert other.exists()
    assert torch.equal(fastserial.load(target)["x"], torch.arange(4))
