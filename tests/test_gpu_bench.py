"""benchmarks/gpu.py (the device script) end to end in its CPU smoke mode: every variant, the JSON it writes."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("sslray_gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~20 s on 2 cores: ten variants, then three Cityscapes-sized PNG fixtures for the data paths
def test_device_script_smoke_on_cpu(tmp_path):
    gpu = _load()
    out = tmp_path / "gpu.json"
    got = gpu.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(got))
    assert got["device"] == "cpu" and got["smoke"] and got["skipped_for_budget"] == []
    v = got["variants"]
    assert set(v) == {"fp32_eager", "bf16", "channels_last", "fused_optimizer", "cudnn_benchmark", "auto",
                      "auto-bf16", "auto-channels_last", "auto-fused_optimizer", "auto-cudnn_benchmark"}
    assert v["fp32_eager"]["speedup_vs_fp32_eager"] == 1.0
    assert v["bf16"]["settings"]["precision"] == "bf16" and v["channels_last"]["settings"]["channels_last"]
    assert v["fused_optimizer"]["settings"]["optimizer_impl"] == "fused"
    assert v["auto"]["settings"]["precision"] == "fp32"  # auto on CPU: the fp32 step
    assert v["auto"]["host_syncs"]["per_step"] == 0
    assert all(r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["mfu"] is None for r in v.values())
    assert got["step"]["flops_per_step"] > 0 and got["step"]["classes"] == 21
    data = got["data"]
    assert data["crop"] == 801 and data["loader_path"]["samples_per_s_per_worker"] > 0
    assert data["device_path"]["device_part"]["samples_per_s"] > 0


def test_peak_table_and_model_switch():
    gpu = _load()
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H200") == 989e12 and gpu.peak_flops("cpu") is None
    from sslray.models import list_models

    if "dpt" in list_models():  # UniMatch V2's model: accepted with its ViT defaults
        args = gpu.parse(["--device", "cpu", "--model", "dpt"])
        assert (args.model, args.backbone, args.crop) == ("dpt", "dinov2_tiny", 28)
    else:
        with pytest.raises(SystemExit):
            gpu.parse(["--device", "cpu", "--model", "dpt"])
