"""The training loop end to end on tiny synthetic data: golden losses, resume, every method, DDP, the CLI."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from sslray.cli import main as cli_main
from sslray.config import TrialConfig
from sslray.methods import NonFiniteLossError, list_methods
from sslray.trainer import Runtime, fit

TINY = {
    "name": "tiny",
    "data": {"partition": "4", "batch_size_x": 4, "batch_size_u": 4, "crop_size": 32,
             "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
    "model": {"width": 8},
    "optim": {"lr": 0.05, "head_lr_mult": 1.0},
    "train": {"iterations": 4, "eval_every": 2},
    "run": {"log_every": 1, "progress": "off", "threads": 1},
}


def tiny(**dotted) -> TrialConfig:
    return TrialConfig.from_dict(TINY).replace(**dotted)



def run(cfg, tmp_path, name="run", **kw):
    reports = []
    out = fit(cfg, Runtime(), lambda m, c: reports.append((m, c)), out_dir=str(tmp_path / name), **kw)
    return out, reports


class Crash(Exception):
    pass


def crash_then_resume(cfg, tmp_path, at: int, name="cut"):
    """Train ``cfg`` into ``tmp_path/name`` until the report at iteration ``at`` (checkpoint written), crash
    there, then resume from that checkpoint; returns (final metrics, reports of the resumed run, the state
    of the checkpoint the resume started from)."""
    def crash(metrics, ckpt):
        if metrics["iteration"] == at:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, Runtime(), crash, out_dir=str(tmp_path / name))
    mid = checkpoint(tmp_path / name)
    out, reports = run(cfg, tmp_path, name, resume_from="auto")
    return out, [m for m, _ in reports], mid


def checkpoint(out_dir) -> dict:
    return torch.load(os.path.join(out_dir, "checkpoint", "state.pt"), weights_only=False)


# Pinned on torch 2.15 CPU. A change means the step's arithmetic changed: check why before re-pinning.
# Re-pinned (issue 5) when the blur became UniMatch's PIL GaussianBlur and the weak view started resizing only the
# kept crop (image values within 2 of the full resize, see tests/test_data_transforms.py).
# Re-measured (issue 11) when the CutMix box started drawing its area once per box (UniMatch): fixmatch was
# [1.1168, 1.0280, 0.9653, 1.0647], unimatch [0.9698, 0.8777, 0.9246, 0.8658]; supervised (no box) unchanged.
GOLDEN = {
    "supervised": [1.7043, 1.5287, 1.4747, 1.4824],
    "fixmatch": [1.0990, 1.0556, 0.9881, 1.0804],
    "unimatch": [0.9742, 0.8792, 0.9310, 0.8666],
}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_golden_losses(method, tmp_path):
    cfg = tiny(**{"method.name": method, "method.conf_thresh": 0.5, "train.eval_every": 1})
    _, reports = run(cfg, tmp_path)  # eval_every=1: one report, with its train loss, per iteration
    losses = [m["train/loss"] for m, _ in reports]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN[method]), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_and_reports(method, tmp_path):
    out, reports = run(tiny(**{"method.name": method, "method.conf_thresh": 0.0}), tmp_path)
    assert [m["iteration"] for m, _ in reports] == [2, 4]
    last = reports[-1][0]
    for key in ("val/miou", "val/pixel_acc", "val/iou/background", "train/loss", "train/loss/x", "time/step_s",
                "time/images_per_s", "mem/peak_mb", "best/val/miou"):
        assert key in last, key
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m, _ in reports)
    if method != "supervised":
        assert 0.0 <= last["train/mask_ratio"] <= 1.0 and 0.0 <= last["train/pseudo_acc"] <= 1.0
    assert os.path.exists(reports[-1][1])
    assert out["val/miou"] == last["val/miou"]


def test_fit_returns_metrics_and_history_apart(tmp_path):
    out, reports = run(tiny(), tmp_path)
    assert "history" not in out.metrics and dict(out) == out.metrics  # reads as the final metrics
    assert [h["iteration"] for h in out.history] == [m["iteration"] for m, _ in reports] == [2, 4]
    assert out.history[-1]["val/miou"] == out["val/miou"] and "val/confusion" not in out.history[-1]


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(**{"method.name": "unimatch", "method.conf_thresh": 0.5, "train.iterations": 6,
                  "train.eval_every": 3})
    full, full_reports = run(cfg, tmp_path, "full")
    resumed, resumed_reports, _ = crash_then_resume(cfg, tmp_path, at=3)
    assert [m["iteration"] for m in resumed_reports] == [6]
    assert resumed["val/confusion"] == full["val/confusion"]
    assert resumed_reports[-1]["train/loss"] == pytest.approx(full_reports[-1][0]["train/loss"], rel=1e-6)
    a, b = checkpoint(tmp_path / "full")["model"], checkpoint(tmp_path / "cut")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ema_teacher_resume_and_eval(tmp_path):
    cfg = tiny(**{"method.name": "meanteacher", "train.eval_model": "teacher"})
    out, _ = run(cfg, tmp_path)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["teacher_student"]["teacher"]["updates"] == 4


def test_resume_refuses_another_trial(tmp_path):
    run(tiny(), tmp_path, "a")
    with pytest.raises(ValueError, match="belongs to trial"):
        fit(tiny(seed=3), Runtime(), None, resume_from=str(tmp_path / "a" / "checkpoint"), out_dir=str(tmp_path / "b"))


def test_nonfinite_loss_stops_with_iteration_and_term(tmp_path):
    cfg = tiny(**{"method.name": "fixmatch", "optim.lr": 1e12, "train.iterations": 20, "train.eval_every": 20})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration \d+: term '(x|u_s1|total)'"):
        run(cfg, tmp_path)


def test_splits_written_with_sha(tmp_path):
    run(tiny(), tmp_path)
    lab = (tmp_path / "run" / "splits" / "labeled.txt").read_text().splitlines()
    unl = (tmp_path / "run" / "splits" / "unlabeled.txt").read_text().splitlines()
    assert len(lab) == 4 and len(unl) == 20 and not set(lab) & set(unl)
    assert lab[0].startswith("images/") and lab[0].split()[1].startswith("masks/")


def _write(tmp_path, d, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_cli_train_writes_summary(tmp_path, capsys):
    cfg = _write(tmp_path, {**TINY, "method": {"name": "fixmatch"}})
    rc = cli_main(["train", cfg, "--out", str(tmp_path / "o"), "--set", "train.iterations=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "final: miou" in out and "per-class IoU: background" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["config"]["train"]["iterations"] == 2
    assert summary["trial_id"] == TrialConfig.from_dict(summary["config"]).trial_id()
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_bad_config_one_line_exit_2(tmp_path, capsys):
    cfg = _write(tmp_path, {"optim": {"lrr": 1}})
    assert cli_main(["train", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sslray: error: {cfg}: optim.lrr: unknown key (expected one of: lr, head_lr_mult, momentum, "
                   "weight_decay, poly_power, optimizer)"]
    assert cli_main(["validate", cfg]) == 2


def test_cli_nan_exit_1_and_summary_failed(tmp_path, capsys):
    cfg = _write(tmp_path, {**TINY, "optim": {"lr": 1e12}, "train": {"iterations": 20, "eval_every": 20}})
    assert cli_main(["train", cfg, "--out", str(tmp_path / "o")]) == 1
    assert "non-finite loss at iteration" in capsys.readouterr().err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_processes_match_single(tmp_path):
    """torchrun, 2 gloo processes, same global batch: metrics match the single process within tolerance."""
    d = {**TINY, "method": {"name": "fixmatch", "conf_thresh": 0.5},
         "train": {"iterations": 4, "eval_every": 4}, "run": {**TINY["run"], "log_every": 1}}
    cfg = _write(tmp_path, d)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "sslray", "train", cfg, "--out", str(tmp_path / "s")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                          "-m", "sslray", "train", cfg, "--out", str(tmp_path / "d")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    p = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert p["world_size"] == 2 and s["world_size"] == 1
    assert p["trial_id"] == s["trial_id"]  # the worker count is not part of the identity
    # Every validation pixel counted exactly once across the two ranks.
    assert sum(map(sum, p["metrics"]["val/confusion"])) == sum(map(sum, s["metrics"]["val/confusion"]))
    # BatchNorm sees half batches per rank, so the numbers agree closely, not bit for bit.
    assert p["metrics"]["train/loss"] == pytest.approx(s["metrics"]["train/loss"], rel=0.1)
    assert abs(p["metrics"]["val/miou"] - s["metrics"]["val/miou"]) < 10


def test_resume_from_final_checkpoint_returns_final_metrics(tmp_path):
    full, _ = run(tiny(), tmp_path)
    again, reports = run(tiny(), tmp_path, resume_from="auto")  # same out_dir: the checkpoint is at the end
    assert reports == [] and again["resumed_from"] == 4
    assert again["val/confusion"] == full["val/confusion"] and again["val/miou"] == full["val/miou"]
