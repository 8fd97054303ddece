"""The GPU path on CPU: no host read in the step, the NaN guarantee kept, throughput settings, packing checks."""
import pytest
import torch

from sslray import trainer
from sslray.config import ConfigError, TrialConfig
from sslray.methods import Method, NonFiniteLossError
from sslray.throughput import FiniteGuard, count_host_reads, memory_check, memory_estimate_mb, optimizer_kwargs, resolve
from sslray.trainer import Runtime, fit

TINY = {
    "name": "tiny",
    "data": {"partition": "4", "batch_size_x": 2, "batch_size_u": 2, "crop_size": 32,
             "synthetic": {"size": 32, "num_train": 12, "num_val": 2}},
    "model": {"width": 8},
    "optim": {"lr": 0.05, "head_lr_mult": 1.0},
    "train": {"iterations": 6, "eval_every": 6},
    "run": {"log_every": 3, "progress": "off", "threads": 1, "checkpoint": False},
}


def tiny(**dotted) -> TrialConfig:
    return TrialConfig.from_dict(TINY).replace(**dotted)


def test_counter_sees_a_host_read():
    """The instrument itself can fail: the old per-step check (float of the loss, a bool of isfinite) counts."""
    loss = torch.tensor(1.0)
    with count_host_reads() as counts:
        bool(torch.isfinite(loss))
        float(loss)
        loss.item()
    assert counts == {"__bool__": 1, "__float__": 1, "item": 1}
    assert not isinstance(torch.Tensor.item, type(test_counter_sees_a_host_read))  # restored


def _reads_per_step(tmp_path, monkeypatch, method: str, **dotted) -> list[dict]:
    steps = []

    def counted(*args, **kwargs):
        with count_host_reads() as counts:
            step(*args, **kwargs)
        steps.append(dict(counts))

    step = trainer._train_step
    monkeypatch.setattr(trainer, "_train_step", counted)
    fit(tiny(**{"method.name": method, "method.conf_thresh": 0.5, **dotted}), Runtime(), None, out_dir=str(tmp_path))
    return steps


@pytest.mark.parametrize("method,dotted", [
    ("supervised", {}), ("fixmatch", {}), ("unimatch", {}), ("meanteacher", {}), ("ipixmatch", {}),
    ("guidedmix", {}), ("guidedmix_paper", {}),
    ("pcr_base", {}), ("pcr", {}),  # k-means warm-up at step 0, then the momentum update; u_drop on
    ("pcr", {"method.terms.x.ohem_min_kept": 100}),  # OHEM's mining branch (pcr's default keeps every pixel here)
])
def test_step_reads_nothing_back(tmp_path, monkeypatch, method, dotted):
    """No Python-level host read in any step of these methods (guidedmix, pcr_base and pcr read 1, 2 and 5 per
    step before their lambda, warm-up flag, U2PL count and OHEM count stayed on the device)."""
    assert _reads_per_step(tmp_path, monkeypatch, method, **dotted) == [{}] * 6


def test_mllc_reads_only_its_cpu_knn_kernel(tmp_path, monkeypatch):
    """MLLC's only reads are the numpy kNN kernel's zero-copy views of CPU tensors: 3 per graph build, 6 builds per
    step (x + s1 together, the teacher's weak view and mix partner, 2 rounds each). The device path (topk, torch
    multiply: what a GPU runs) reads nothing."""
    from sslray.methods import mllc

    assert _reads_per_step(tmp_path / "np", monkeypatch, "mllc") == [{"numpy": 18}] * 6
    monkeypatch.setattr(mllc, "NUMPY_ON_CPU", False)
    assert _reads_per_step(tmp_path / "torch", monkeypatch, "mllc") == [{}] * 6


def _poison(monkeypatch, at: int, term: str | None):
    """Method.losses returning NaN for ``term`` (None: an inf total with finite terms) at iteration ``at``."""
    losses, seen = Method.losses, []

    def poisoned(self, out, iteration=None):
        seen.append(out.iteration)
        got = losses(self, out, iteration)
        if out.iteration == at:
            if term is None:
                got["loss"] = got["loss"] * float("inf")
            else:
                got[f"loss/{term}"] = got[f"loss/{term}"] * float("nan")
                got["loss"] = got["loss"] + got[f"loss/{term}"]
        return got

    monkeypatch.setattr(Method, "losses", poisoned)
    return seen


@pytest.mark.parametrize("every,last_step", [(0, 7), (2, 5)])
def test_nan_named_exactly_at_the_next_check(tmp_path, monkeypatch, every, last_step):
    """NaN at iteration 5 in u_s1: read back at the evaluation after step 7 (``finite_check_every: 0``) or after
    step 5 (every 2 steps), never checkpointed or reported, and named as iteration 5, term u_s1, either way."""
    stepped = _poison(monkeypatch, 5, "u_s1")
    seen = []
    cfg = tiny(**{"method.name": "fixmatch", "method.conf_thresh": 0.0, "train.iterations": 8,
                  "train.eval_every": 4, "run.log_every": 100, "run.finite_check_every": every})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 5: term 'u_s1' = nan") as e:
        fit(cfg, Runtime(), lambda m, c: seen.append(m["iteration"]), out_dir=str(tmp_path))
    assert (e.value.iteration, e.value.term) == (5, "u_s1")
    assert seen == [4] and stepped[-1] == last_step


def test_guard_first_bad_iteration_wins_and_total_named():
    g = FiniteGuard()
    ok = {"loss": torch.tensor(1.0), "loss/x": torch.tensor(1.0)}
    g.watch(ok, 0)
    g.check()
    g.watch({"loss": torch.tensor(float("inf")), "loss/x": torch.tensor(2.0)}, 1)
    g.watch({"loss": torch.tensor(float("nan")), "loss/x": torch.tensor(float("nan"))}, 2)
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: term 'total' = inf"):
        g.check()


def test_settings_resolve_auto_per_device():
    cfg = tiny()
    cpu = resolve(cfg, torch.device("cpu")).describe()
    assert cpu == {"precision": "fp32", "channels_last": False, "optimizer_impl": "foreach", "compile": False,
                   "cudnn_benchmark": False}
    on = resolve(cfg.replace(**{"train.amp": "bf16", "run.channels_last": "on", "run.optimizer_impl": "fused"}),
                 torch.device("cpu")).describe()
    assert on["precision"] == "bf16" and on["channels_last"] and on["optimizer_impl"] == "fused"
    assert optimizer_kwargs("auto", torch.device("cuda")) == {"fused": True}
    with pytest.raises(ConfigError, match="run.channels_last: expected one of"):
        tiny(**{"run.channels_last": "yes"})
    with pytest.raises(ConfigError, match="run.finite_check_every: expected a non-negative"):
        tiny(**{"run.finite_check_every": -1})


def test_throughput_settings_train_on_cpu(tmp_path):
    """bf16 autocast, channels_last and the fused optimizer together train a step (CPU supports all three)."""
    cfg = tiny(**{"method.name": "unimatch", "train.amp": "bf16", "run.channels_last": "on",
                  "run.optimizer_impl": "fused", "train.iterations": 2, "train.eval_every": 2})
    out = fit(cfg, Runtime(), None, out_dir=str(tmp_path))
    assert out["iteration"] == 2 and 0 <= out["val/miou"] <= 100


# Stated tolerances of a bf16 step against fp32 on the same weights and batch (bf16 keeps 8 mantissa bits): the
# supervised term within 1 %, the total within 3 %, pseudo-labels agreeing on >= 95 % of pixels (the unlabeled terms
# move more: an untrained net's near-tied logits flip argmaxes; measured on CPU: DeepLabV3+ R-18 total -1.9 %,
# x +0.7 %, 97.6 % agreement; the small model 0.1 %, 0 %, 99.2 %).
BF16_TOL = {"loss": 0.03, "loss/x": 0.01, "agree": 0.95}


@pytest.mark.parametrize("model", [{"model.name": "small"},
                                   {"model.name": "deeplabv3plus", "model.backbone": "resnet18"}])
def test_bf16_step_loss_close_to_fp32(tmp_path, model):
    """The same weights and batch through one UniMatch step under fp32 and under bf16 autocast (CPU bf16)."""
    got = {}
    for amp in ("none", "bf16"):
        cfg = tiny(**{"method.name": "unimatch", "method.conf_thresh": 0.5, "train.amp": amp, **model})
        parts = trainer._build(cfg, Runtime(), str(tmp_path / amp))
        batches = trainer._streams(parts, 0)()
        torch.manual_seed(0)  # the same FP dropout masks
        out = parts.ts.step(*batches, iteration=0)
        got[amp] = ({k: float(v.detach()) for k, v in parts.method.losses(out).items()}, out.mask_u_w)
    (fp32, labels32), (bf16, labels16) = got["none"], got["bf16"]
    for k in ("loss", "loss/x"):
        assert bf16[k] == pytest.approx(fp32[k], rel=BF16_TOL[k]), k
    assert (labels32 == labels16).float().mean() >= BF16_TOL["agree"]


# ------------------------------------------------------------------------------------------- trial packing

def test_memory_check_refuses_with_the_numbers():
    """Pure arithmetic with a device total given (an 80 GiB H100): a 30 GiB trial does not fit a quarter."""
    from sslray.throughput import DoesNotFit

    memory_check(15000, 0.25, 81920)  # fits 20480 MiB
    with pytest.raises(DoesNotFit, match=r"trial needs ~30720 MiB but its share 0\.25 x 81920 MiB = 20480 MiB; "
                                         r"at most 2 such trials fit one GPU"):
        memory_check(30720, 0.25, 81920)
    with pytest.raises(DoesNotFit, match="does not fit one whole GPU"):
        memory_check(90000, 1, 81920)
    # the parameter-state lower bound: 60 M params x 4 copies x 4 B = 916 MiB (+10 %); a probe's peak wins
    assert memory_estimate_mb(60_000_000) == pytest.approx(60e6 * 16 / 2**20 * 1.1)
    assert memory_estimate_mb(60_000_000, probe_peak_mb=5000) == pytest.approx(5500)


def test_memory_guard_is_off_on_cpu():
    from sslray.throughput import MemoryGuard

    g = MemoryGuard(0.25, torch.device("cpu"))
    assert not g.active
    with g.probing(first=True):
        pass


def _study(tmp_path, resources):
    import yaml

    from sslray.study import load_study

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "base": {"train": {"iterations": 2}}, "seeds": [0, 1, 2, 3, 4],
                                 "resources": resources}))
    return load_study(str(p))


def test_quarter_gpu_packs_four_trials_per_gpu(tmp_path):
    from sslray.ray_adapter import max_concurrent, trial_resources

    s = _study(tmp_path, {"gpus_per_worker": 0.25, "cpus_per_worker": 1})
    assert trial_resources(s) == {"cpu": 1, "gpu": 0.25}
    assert max_concurrent(s, {"CPU": 16.0, "GPU": 1.0}, 10) == 4
    assert max_concurrent(s, {"CPU": 16.0, "GPU": 2.0}, 5) == 5


@pytest.mark.parametrize("resources, needle", [
    ({"gpus_per_worker": 1.5}, "resources.gpus_per_worker: expected a fraction in (0, 1] or a whole number of "
                               "GPUs, got 1.5"),
    ({"gpus_per_worker": 0.33333}, "resources.gpus_per_worker: expected a fraction with at most 4 decimals"),
    ({"gpus_per_worker": 0.5, "workers": 2}, "resources.gpus_per_worker: a fraction of a GPU (0.5) packs "
                                             "single-worker trials; with workers: 2 every worker needs a whole GPU"),
])
def test_fractional_gpus_validated(tmp_path, resources, needle):
    with pytest.raises(ConfigError) as e:
        _study(tmp_path, resources)
    assert needle in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "s.yaml"))


def test_gpu_memory_fraction_range():
    with pytest.raises(ConfigError, match=r"run.gpu_memory_fraction: expected a fraction in \[0, 1\], got 1.5"):
        tiny(**{"run.gpu_memory_fraction": 1.5})


class _SizeReads:
    """Counts the aten ops whose output size depends on the data (a device sync on a GPU that
    :func:`count_host_reads` cannot see from Python): ``nonzero``, ``masked_select``, a boolean-mask index."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                masked = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
                if masked or name in ("aten.nonzero", "aten.masked_select"):
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("method", ["guidedmix", "pcr", "mllc"])
def test_heads_index_nothing_of_data_dependent_size(tmp_path, monkeypatch, method):
    """PCR's prototype update and MLLC's counters / prototype sums are fixed-size (they used 7 and 10 boolean-mask
    indexes per step); PCR's k-means warm-up (step 0 here) keeps its variable-size bank push."""
    steps = []

    def counted(*args, **kwargs):
        probe = _SizeReads()
        with probe.mode:
            step(*args, **kwargs)
        steps.append(probe.counts)

    step = trainer._train_step
    monkeypatch.setattr(trainer, "_train_step", counted)
    fit(tiny(**{"method.name": method, "method.conf_thresh": 0.5}), Runtime(), None, out_dir=str(tmp_path))
    assert steps[1:] == [{}] * 5 and (method == "pcr" or steps[0] == {})
