"""slurm/sslray.sbatch's Ray bring-up, run without Slurm (SSLRAY_SLURM_LOCAL=1): a head and a worker node started
with `ray start --block` as the script starts them on Slurm nodes, then `sslray run --address` on that cluster.
Slurm itself (srun, scontrol) is not installed here; the srun lines are the only part not exercised."""
import shutil
import socket
import subprocess
import tempfile

import pytest

from test_ray_study import ENV, ROOT, TINY_BASE, kill_session, write_study

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_script_brings_up_head_and_worker_and_runs_the_study(tmp_path):
    study = {"name": "slurm", "base": TINY_BASE, "grid": {"method.name": ["supervised", "fixmatch"]}, "seeds": [0],
             "storage": str(tmp_path / "store")}
    path = write_study(tmp_path, study)
    ray_tmp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**ENV, "SSLRAY_SLURM_LOCAL": "1", "SSLRAY_SLURM_WORKERS": "1", "SSLRAY_RAY_PORT": str(free_port()),
           "SSLRAY_RAY_TMP": ray_tmp, "SLURM_CPUS_PER_TASK": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "sslray.sbatch"), path], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_session(proc.pid)  # whatever the script left (it stops its own Ray nodes on exit)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    assert "2 of 2 node(s) up" in out, out[-4000:]
    assert "2 trials run (2 ok, 0 failed)" in out, out[-4000:]
