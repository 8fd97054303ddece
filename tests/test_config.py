"""Typed config: defaults, presets, unknown keys, dotted overrides, trial identity."""
import pytest
import yaml

from sslray.config import ConfigError, TrialConfig, apply_overrides, flatten


def test_defaults_round_trip():
    cfg = TrialConfig()
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.data.dataset == "synthetic" and cfg.method.name == "supervised"
    assert set(cfg.method.terms) == {"x"}


def test_unimatch_preset_weights():
    m = TrialConfig.from_dict({"method": {"name": "unimatch"}}).method
    assert {k: t.weight for k, t in m.terms.items()} == {"x": 1.0, "u_s1": 0.25, "u_s2": 0.25, "u_fp": 0.5}
    assert m.global_div == 2.0 and m.teacher.kind == "self" and m.conf_thresh == 0.95


def test_presets_compose_and_user_overrides_merge():
    m = TrialConfig.from_dict({"method": {"name": "fixmatch+meanteacher", "conf_thresh": 0.9,
                                          "terms": {"u_mse": {"weight": 100}}}}).method
    assert m.teacher.kind == "ema" and m.conf_thresh == 0.9
    assert set(m.terms) == {"x", "u_s1", "u_mse"} and m.terms["u_mse"].weight == 100.0


@pytest.mark.parametrize("d, key", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr"),
    ({"bogus": 1}, "bogus"),
    ({"data": {"aug": {"jiter": 1}}}, "data.aug.jiter"),
    ({"method": {"name": "unimatch", "terms": {"u_fp": {"wieght": 1}}}}, "method.terms.u_fp.wieght"),
    ({"method": {"terms": {"nope": {}}}}, "method.terms.nope"),
    ({"method": {"name": "nomethod"}}, "method.name"),
    ({"method": {"teacher": {"kind": "ghost"}}}, "method.teacher.kind"),
    ({"method": {"name": "meanteacher", "teacher": {"bn_stats": "frozen"}}}, "method.teacher.bn_stats"),
    ({"method": {"name": "meanteacher", "teacher": {"ema_buffers": False}}}, "method.teacher.ema_buffers"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"train": {"iterations": 0}}, "train.iterations"),
    ({"train": {"iterations": 1.5}}, "train.iterations"),
    ({"data": {"aug": {"gray_p": 1.5}}}, "data.aug.gray_p"),
    ({"seed": -1}, "seed"),
    ({"method": {"name": "fixmatch", "terms": {"x": {"criterion": "focal"}}}}, "method.terms.x.criterion"),
    ({"method": {"name": "fixmatch", "terms": {"u_s1": {"weight": -1}}}}, "method.terms.u_s1.weight"),
    ({"model": {"aspp_rates": "6,12"}}, "model.aspp_rates"),
    ({"data": "synthetic"}, "data"),
])
def test_errors_name_source_and_dotted_key(d, key):
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_dict(d, source="study.yaml")
    assert e.value.key == key
    assert str(e.value).startswith(f"study.yaml: {key}: ")
    assert "\n" not in str(e.value)


def test_from_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        TrialConfig.from_yaml(str(p))
    p.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: <root>: invalid YAML"):
        TrialConfig.from_yaml(str(p))
    p.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        TrialConfig.from_yaml(str(p))
    with pytest.raises(ConfigError, match="cannot read file"):
        TrialConfig.from_yaml(str(tmp_path / "missing.yaml"))


def test_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"method": {"name": "unimatch"}, "optim": {"lr": 0.02}}))
    cfg = TrialConfig.from_yaml(str(p), ["method.terms.u_fp.weight=0.3", "optim.lr=1e-3", "data.partition=1_8",
                                         "data.aug.scale=[0.75, 1.5]"])
    assert cfg.method.terms["u_fp"].weight == 0.3 and cfg.optim.lr == 1e-3
    assert cfg.data.partition == "1_8" and cfg.data.aug.scale == (0.75, 1.5)
    with pytest.raises(ConfigError, match=r"c\.yaml \(--set\): optim\.lr\.x: optim\.lr is a value"):
        TrialConfig.from_yaml(str(p), ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="optim.momentom: unknown key"):
        TrialConfig.from_yaml(str(p), ["optim.momentom=0.5"])
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


def test_trial_id_stable_and_sensitive():
    base = TrialConfig.from_dict({"method": {"name": "fixmatch"}})
    # Pinned: a change here means every stored result would be orphaned; bump IDENTITY_VERSION on purpose.
    assert base.trial_id() == TrialConfig.from_dict({"method": {"name": "fixmatch"}}).trial_id()
    assert len(base.trial_id()) == 64
    # Not identity: where and how it runs, and its display name.
    assert base.replace(**{"run.out_dir": "/x", "run.device": "cpu", "run.num_workers": 3,
                           "name": "other"}).trial_id() == base.trial_id()
    # Identity: anything that changes the result; int vs float spelling does not matter.
    assert base.replace(**{"seed": 1}).trial_id() != base.trial_id()
    assert base.replace(**{"method.terms.u_s1.weight": 0.5}).trial_id() != base.trial_id()
    assert base.replace(**{"optim.lr": 1}).trial_id() == base.replace(**{"optim.lr": 1.0}).trial_id()


def test_flatten():
    flat = flatten(TrialConfig().to_dict())
    assert flat["optim.lr"] == 0.01 and flat["method.terms.x.weight"] == 1.0
    assert flat["data.aug.scale"] == [0.5, 2.0]


def test_switching_preset_on_resolved_config_rederives_method():
    cfg = TrialConfig()  # supervised, resolved
    mt = cfg.replace(**{"method.name": "meanteacher", "method.conf_thresh": 0.8})
    assert mt.method.teacher.kind == "ema" and set(mt.method.terms) == {"x", "u_s1"}
    assert mt.method.conf_thresh == 0.8 and mt.method.global_div == 2.0
    assert cfg.with_overrides(["method.name=unimatch"]).method == TrialConfig.from_dict(
        {"method": {"name": "unimatch"}}).method


def test_yaml_scalars_follow_yaml_1_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  partition: 1_8\nrun:\n  progress: off\noptim:\n  lr: 1e-3\n")
    cfg = TrialConfig.from_yaml(str(p), ["run.checkpoint=false"])
    assert cfg.data.partition == "1_8" and cfg.run.progress == "off" and cfg.optim.lr == 1e-3
    assert cfg.run.checkpoint is False


def _imported_modules(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("lower, upper", [("methods/*.py", ("sslray.config", "sslray.models")),
                                          ("layers.py", ("sslray.config", "sslray.models", "sslray.methods")),
                                          ("study.py", ("sslray.report", "sslray.tables", "sslray.plots"))])
def test_imports_go_one_way(lower, upper):
    """config imports the method registry, never the reverse (methods take layer helpers from sslray.layers); the
    report imports the study, never the reverse (paper numbers are read beside the study loader)."""
    from pathlib import Path

    import sslray

    root = Path(sslray.__file__).parent
    for path in root.glob(lower):
        back = [m for m in _imported_modules(path) if m.startswith(upper)]
        assert back == [], (path.name, back)


def test_config_error_survives_pickling():
    """Ray and DataLoader workers send a trial's exception back pickled; it must arrive as the same one line."""
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError("study.yaml", "optim.lr", "expected a number")))
    assert isinstance(e, ConfigError) and (e.source, e.key, e.message) == ("study.yaml", "optim.lr", "expected a number")
    assert str(e) == "study.yaml: optim.lr: expected a number"
