"""Live progress of ``sslray run``: a tqdm display on a terminal (run in a real pseudo-terminal), one line per event
when stdout is a pipe; Ray's token-auth start-up notice reaches neither unless --verbose."""
import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("RAY_AUTH_MODE", None)  # Ray's default (token auth on): its notice is what must not reach the user
pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE = {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                 "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
        "model": {"name": "small", "width": 8}, "train": {"iterations": 4, "eval_every": 2}, "run": {"threads": 1}}


def _study(tmp_path, name: str) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "base": BASE, "grid": {"method.name": ["supervised"]},
                                 "seeds": [0, 1], "storage": str(tmp_path / name),
                                 "report": {"rows": "method.name"}}))
    return str(p)


def _run_in_pty(argv: list[str], timeout: float = 400) -> tuple[int, str]:
    """The command with stdout and stderr on a pseudo-terminal (what a user's shell gives it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160 x 40 terminal
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.wait(30), out.decode(errors="replace")


def test_progress_on_a_terminal(tmp_path):
    rc, out = _run_in_pty([sys.executable, "-m", "sslray", "run", _study(tmp_path, "tty"), "--num-cpus", "1"])
    assert rc == 0, out[-3000:]
    assert "trials:" in out and "100%" in out  # the tqdm bar over the study's trials
    assert "done 2, running 0, queued 0, failed 0" in out
    assert "iteration 4/4" in out and "val/miou" in out  # a running trial's line
    assert "ETA " in out  # from the measured step times
    assert "Token authentication is enabled" not in out



def test_not_a_terminal_gets_one_line_per_event():
    """A pipe or a file (CI logs, nohup) gets the plain callback; its lines are what test_ray_study's runs print."""
    from sslray import ray_adapter

    assert type(ray_adapter.progress_callback(2, {}, "val/miou", {"": 4}, 1, file=io.StringIO())).__name__ == \
        "_Progress"
    with open(os.devnull, "w") as f:
        assert type(ray_adapter.progress_callback(2, {}, "val/miou", {"": 4}, 1, file=f)).__name__ == "_Progress"
