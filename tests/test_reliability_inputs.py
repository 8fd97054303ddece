"""Reliability suite, bad input and security: the malformed-study corpus, plugins, code in data, paths.

``tests/data/bad_studies/*.yaml`` holds one malformed study per file. Each opens with ``# expect: <text>``, the part
of the one-line error after ``sslray: error: <file>: `` (a dotted key, then the message), and may add
``# expect-validate: <text>`` where ``sslray validate`` reads the file differently (it tells studies from trial
configs by their keys), and ``# only: run`` for what only ``sslray run`` can know: whether this machine can hold one
trial. Every file must make ``sslray validate`` and ``sslray run`` exit 2 with exactly that line, and nothing may
start: no storage directory, no Ray, no code named by the file. The oversized file is generated here, not committed.
"""
import ast
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sslray import cli, config

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "data" / "bad_studies").glob("*.yaml"))
pytestmark = pytest.mark.reliability


def expectation(path: Path) -> dict[str, str]:
    """The ``# key: value`` header lines of a corpus file."""
    out = {}
    for line in path.read_bytes().split(b"\n"):
        text = line.decode("ascii", errors="replace")
        if not text.startswith("# "):
            break
        key, _, value = text[2:].partition(": ")
        out[key] = value
    return out


def one_error_line(code: int, capsys) -> str:
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_corpus_covers_the_issue():
    assert len(CORPUS) >= 30
    names = {p.stem.split("_")[0] for p in CORPUS}
    assert {"type", "unknown", "empty", "search", "dist", "seed", "partition", "resources", "yaml", "duplicate",
            "alias", "tag", "module", "path", "encoding"} <= names
    for p in CORPUS:
        assert "expect" in expectation(p), p


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_validate_rejects_with_one_line(path, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a YAML payload that ran would leave its file here
    exp = expectation(path)
    code = cli.main(["validate", str(path)])
    if exp.get("only") == "run":  # valid as a file; only a cluster (or this machine) can refuse it
        assert code == 0, capsys.readouterr()
        return
    line = one_error_line(code, capsys)
    assert line.startswith(f"sslray: error: {path}: {exp.get('expect-validate', exp['expect'])}"), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_run_rejects_with_one_line_and_starts_nothing(path, capsys, monkeypatch, tmp_path):
    import ray

    monkeypatch.chdir(tmp_path)  # the default storage, runs/<name>, would appear here
    line = one_error_line(cli.main(["run", str(path), "--num-cpus", "2"]), capsys)
    assert line.startswith(f"sslray: error: {path}: {expectation(path)['expect']}"), line
    assert list(tmp_path.iterdir()) == []
    assert not ray.is_initialized()


@pytest.mark.slow
def test_run_in_a_subprocess_exits_2_and_starts_no_ray(tmp_path):
    """A handful through the real ``sslray run`` process: the exit code, the one line, no Ray session on disk."""
    picks = ["tag_python_apply", "resources_more_cpus_than_exist", "path_out_dir_base"]
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    procs = {}
    for name in picks:
        cwd = tmp_path / name
        cwd.mkdir()
        path = ROOT / "tests" / "data" / "bad_studies" / f"{name}.yaml"
        procs[name] = (path, cwd, subprocess.Popen([sys.executable, "-m", "sslray", "run", str(path)], cwd=cwd,
                                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for name, (path, cwd, proc) in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, (name, out, err)
            assert out == "" and err.count("\n") == 1, (name, out, err)
            assert err.startswith(f"sslray: error: {path}: {expectation(path)['expect']}"), err
            assert list(cwd.iterdir()) == []
        assert os.listdir(ray_tmp) == []  # Ray writes its session there the moment it starts
    finally:
        os.rmdir(ray_tmp)


@pytest.mark.parametrize("kind", ["study", "trial config"])
def test_huge_file_is_refused_before_parsing(kind, tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    head = "name: huge\nbase: {}\n" if kind == "study" else "seed: 1\n"
    with open(path, "w") as f:  # 1.5 MiB of comments: cheap to refuse, slow to parse if it were read
        f.write(head + ("# padding " * 100 + "\n") * 1600)
    size = path.stat().st_size
    line = one_error_line(cli.main(["validate", str(path)]), capsys)
    assert line == f"sslray: error: {path}: <root>: file is {size} bytes; YAML files are limited to 1048576 bytes (1 MiB)"
    if kind == "study":
        line = one_error_line(cli.main(["run", str(path), "--dry-run"]), capsys)
        assert line.endswith(f"file is {size} bytes; study files are limited to 1048576 bytes (1 MiB)")


# --------------------------------------------------------------------------------------------------
# plugins: the only way a study's code gets imported


PLUGIN_SOURCE = '''"""Registers one method preset; imported only when the user names it with --plugin."""
import pathlib

pathlib.Path(__file__).with_name("imported").touch()


def register():
    from sslray.methods import METHOD_PRESETS

    METHOD_PRESETS["plugin_fixmatch"] = dict(METHOD_PRESETS["fixmatch"], conf_thresh=0.8)
'''


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """A plugin module on sys.path; the registries and the loaded-plugin set are restored afterwards."""
    from sslray.methods import METHOD_PRESETS

    d = tmp_path / "plugins"
    d.mkdir()
    (d / "sslray_test_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(d))
    saved = copy.deepcopy(METHOD_PRESETS)
    yield d
    METHOD_PRESETS.clear()
    METHOD_PRESETS.update(saved)
    config._PLUGINS_LOADED.discard("sslray_test_plugin")
    sys.modules.pop("sslray_test_plugin", None)


def test_a_study_cannot_import_code_without_the_plugin_flag(plugin_dir, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("name: p\nbase: {model: {width: 8}, method: {name: plugin_fixmatch}}\n")
    line = one_error_line(cli.main(["validate", str(study)]), capsys)
    assert line.startswith(f"sslray: error: {study}: base.method.name: unknown method 'plugin_fixmatch'")
    assert not (plugin_dir / "imported").exists() and "sslray_test_plugin" not in sys.modules

    assert cli.main(["validate", str(study), "--plugin", "sslray_test_plugin"]) == 0
    assert capsys.readouterr().out == f"{study}: ok (study p, 1 trials)\n"
    assert (plugin_dir / "imported").exists()


@pytest.mark.parametrize("module, message", [
    ("os; rm -rf /", "expected an importable module name like mypkg.sslray_ext"),
    ("../evil.py", "expected an importable module name like mypkg.sslray_ext"),
    ("/tmp/evil", "expected an importable module name like mypkg.sslray_ext"),
    ("sslray_no_such_plugin", "cannot import: No module named 'sslray_no_such_plugin'"),
    ("json", "has no register() function"),
])
@pytest.mark.parametrize("command", ["validate", "run", "train"])
def test_bad_plugin_flag_is_refused(module, message, command, capsys):
    args = {"validate": ["validate", str(ROOT / "studies" / "smoke.yaml")],
            "run": ["run", str(ROOT / "studies" / "smoke.yaml"), "--dry-run"], "train": ["train"]}[command]
    line = one_error_line(cli.main([*args, "--plugin", module]), capsys)
    assert line == f"sslray: error: --plugin: {module}: {message}"


# --------------------------------------------------------------------------------------------------
# code in data: what the package itself may do with inputs


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_sslray_never_evaluates_or_unpickles_inputs():
    """Static guard over the package: no eval/exec/compile/__import__, no pickle; YAML only through the safe,
    duplicate-refusing loader; imports by name only in load_plugins; torch.load executes pickles only for the
    trainer's own checkpoints."""
    problems = []
    for path in sorted((ROOT / "sslray").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        funcs = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "cloudpickle") for n in names):
                    problems.append(f"{path}:{node.lineno}: imports a pickle module")
            if isinstance(node, ast.Attribute) and ast.unparse(node) in (
                    "yaml.unsafe_load", "yaml.full_load", "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.Loader"):
                problems.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        for call, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno}: {name}"
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name in ("eval", "exec", "compile", "__import__"):
                problems.append(where)
            elif name.endswith("import_module") and funcs.get(id(call)) != "load_plugins":
                problems.append(where)
            elif name == "yaml.load" and keywords.get("Loader") != "_UniqueKeyLoader":
                problems.append(where)
            elif name == "torch.load" and keywords.get("weights_only") != "True" and \
                    funcs.get(id(call)) != "load_checkpoint":
                problems.append(where)
    assert problems == []


# --------------------------------------------------------------------------------------------------
# paths: every write of a study stays under its storage


def test_labels_and_names_cannot_become_paths(tmp_path):
    from sslray.storage import StudyStorage
    from sslray.study import load_study

    study = tmp_path / "study.yaml"
    study.write_text("name: paths\nbase: {model: {width: 8}}\n"
                     "ablation: {variants: {'../../escape': {optim.lr: 0.5}, '/etc/passwd': {optim.lr: 0.2}}}\n")
    storage = tmp_path / "store"
    for t in load_study(str(study)).trials():
        assert "/" not in t.config.name and ".." not in t.config.name.split("-")
        d = StudyStorage(str(storage)).trial_dir(t.trial_id).resolve()
        assert d.parent == (storage / "trials").resolve()


def test_storage_may_be_absolute_but_not_climb(tmp_path, capsys):
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"name: s\nbase: {{}}\nstorage: {tmp_path / 'elsewhere' / 'store'}\n")
    assert cli.main(["validate", str(ok)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: s\nbase: {{}}\nstorage: {tmp_path}/x/../../y\n")
    line = one_error_line(cli.main(["validate", str(bad)]), capsys)
    assert line == (f"sslray: error: {bad}: storage: '{tmp_path}/x/../../y' climbs out with '..'; write the directory "
                    "you mean (absolute, or relative to where sslray runs) or pass --storage")
    capsys.readouterr()
    line = one_error_line(cli.main(["run", str(ROOT / "studies" / "smoke.yaml"), "--dry-run", "--set",
                                    f"run.out_dir={tmp_path}"]), capsys)
    assert line.startswith(f"sslray: error: {ROOT / 'studies' / 'smoke.yaml'} (--set): run.out_dir: set by the study")


def test_a_trial_whose_code_differs_from_the_driver_refuses_to_run(tmp_path):
    """A node with other sslray code or plugins computes another trial id for the same config; its row would land
    where the driver never looks (and the trial would run again on every resume), so the trial stops first."""
    from sslray import ray_adapter
    from sslray.config import TrialConfig

    cfg = TrialConfig.from_dict({"model": {"width": 8}})
    planned = "0" * 64  # what the driver planned under its (different) code
    spec = ray_adapter.TrialSpec(study="s", storage=str(tmp_path), config=cfg.to_dict(), trial_id=planned)
    with pytest.raises(RuntimeError, match=rf"^trial 000000000000 resolves to {cfg.short_id()} on this node: its "
                                           "sslray code or plugins differ from the driver's$"):
        ray_adapter.trial_driver({"sslray": spec})
    assert list(tmp_path.iterdir()) == []
