"""Atomic writes: temporaries that killed processes left behind are removed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dstmtl.study._atomic import write_bytes


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name != "posix", reason="the PID check needs a POSIX os.kill")
def test_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    host = socket.gethostname()
    target = tmp_path / "images.npy"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = tmp_path / f".images.npy.{host}.{_dead_pid()}.tmp"
        alive = tmp_path / f".images.npy.{host}.{running.pid}.tmp"
        elsewhere = tmp_path / f".images.npy.other-host.{_dead_pid()}.tmp"
        other_file = tmp_path / f".labels.npy.{host}.{_dead_pid()}.tmp"
        for leftover in (killed, alive, elsewhere, other_file):
            leftover.write_bytes(b"partial")

        write_bytes(target, b"whole")

        assert target.read_bytes() == b"whole"
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
            path.name for path in (target, alive, elsewhere, other_file)
        )
    finally:
        running.kill()
        running.wait()
