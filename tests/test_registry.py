from __future__ import annotations

import json
import subprocess
import sys

from autocompress.registry import load_registry

GOOD_PLUGIN = """
from autocompress import hookimpl
from autocompress.technique import FloatParam, Stage, Technique

class Noop(Technique):
    name = "noop_{suffix}"
    stage = Stage.TRAINING
    params = (FloatParam("strength", 0.0, 1.0, 0.5),)

@hookimpl
def register_techniques(register):
    register(Noop())
"""


def test_builtins_register_through_entry_points():
    reg = load_registry(selection="builtin")
    assert {"head_pruning", "quantization"} <= set(reg.names())
    assert reg.techniques["head_pruning"].source == "builtin"
    assert reg.load_errors == []


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    # A real installed distribution: a dist-info folder with entry_points.txt on sys.path.
    (tmp_path / "thirdparty_tech.py").write_text(GOOD_PLUGIN.format(suffix="ep"))
    dist = tmp_path / "thirdparty_tech-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-tech\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[autocompress]\nthirdparty = thirdparty_tech\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry(selection="all")
    assert reg.techniques["noop_ep"].plugin == "thirdparty"
    assert reg.techniques["noop_ep"].source.startswith("entry-point")
    assert "noop_ep" not in load_registry(selection="builtin").names()


def test_failing_plugins_are_reported_not_fatal(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs a library that is not installed')\n")
    invalid = tmp_path / "invalid.py"
    invalid.write_text(
        "from autocompress import hookimpl\n@hookimpl\ndef register_techniques(register):\n    register('not a technique')\n"
    )
    good = tmp_path / "good.py"
    good.write_text(GOOD_PLUGIN.format(suffix="file"))
    reg = load_registry(selection="builtin", extra_plugins=[str(broken), str(invalid), str(good), "no.such.module"])
    errors = dict(reg.load_errors)
    assert "needs a library that is not installed" in errors[str(broken)]
    assert f"plugin {str(invalid)!r} registered 'not a technique' (str)" in errors[str(invalid)]
    assert "ModuleNotFoundError" in errors["no.such.module"]
    assert {"head_pruning", "quantization", "noop_file"} <= set(reg.names())


def test_duplicate_technique_name_is_reported(tmp_path):
    dup = tmp_path / "dup.py"
    dup.write_text(GOOD_PLUGIN.format(suffix="x").replace('"noop_x"', '"quantization"'))
    reg = load_registry(selection="builtin", extra_plugins=[str(dup)])
    assert any("already registered" in reason for _, reason in reg.load_errors)
    assert reg.techniques["quantization"].source == "builtin"


def test_plugins_command_json(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(GOOD_PLUGIN.format(suffix="cli"))
    out = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "plugins", "--format", "json", "--plugin", str(good)],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    by_name = {t["name"]: t for t in data["techniques"]}
    assert by_name["noop_cli"]["source"] == "--plugin"
    hp = {p["name"]: p for p in by_name["head_pruning"]["params"]}
    assert hp["fraction"]["type"] == "float" and hp["fraction"]["domain"] == "[0.0, 0.9]"
    assert by_name["quantization"]["stage"] == "post_training"


def test_import_autocompress_is_light():
    code = "import sys, autocompress; bad = [m for m in ('torch', 'ray', 'transformers', 'optuna') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_never_imports_plugins():
    from pathlib import Path

    core = Path(__file__).parents[1] / "autocompress"
    for f in core.glob("*.py"):
        for line in f.read_text().splitlines():
            assert not line.strip().startswith(("import plugins", "from plugins")), f"{f.name}: {line}"


# -- plugin selection and isolation through installed entry points (AUTOCOMPRESS_PLUGINS) ---------------------


def _fake_dist(root, *, dist: str, module: str, source: str, ep_name: str) -> None:
    """An installed distribution on sys.path: a module plus a dist-info folder with its entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[autocompress]\n{ep_name} = {module}\n")


def test_entry_point_that_raises_on_import_is_named_and_the_rest_load(tmp_path, monkeypatch):
    _fake_dist(tmp_path, dist="crashy-tech", module="crashy_tech_mod", ep_name="crashy",
               source="raise RuntimeError('crashy needs CUDA 99')\n")
    _fake_dist(tmp_path, dist="fine-tech", module="fine_tech_mod", ep_name="fine",
               source=GOOD_PLUGIN.format(suffix="fine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AUTOCOMPRESS_PLUGINS", raising=False)
    reg = load_registry()
    errors = dict(reg.load_errors)
    assert "RuntimeError: crashy needs CUDA 99" in errors["crashy"] and "crashy_tech_mod.py:1" in errors["crashy"]
    assert {"noop_fine", "head_pruning", "quantization"} <= set(reg.names())


def test_register_hook_that_raises_or_hands_back_a_class_is_named(tmp_path):
    raising = tmp_path / "raising.py"
    raising.write_text("from autocompress import hookimpl\n@hookimpl\ndef register_techniques(register):\n"
                       "    raise KeyError('missing config')\n")
    klass = tmp_path / "klass.py"
    klass.write_text(GOOD_PLUGIN.format(suffix="klass").replace("register(Noop())", "register(Noop)"))
    reg = load_registry(selection="none", extra_plugins=[str(raising), str(klass)])
    errors = dict(reg.load_errors)
    assert errors[str(raising)].startswith("register_techniques raised KeyError: 'missing config'")
    assert "registered the class Noop; register an instance: register(Noop())" in errors[str(klass)]
    assert reg.names() == []


def test_selection_env_var(tmp_path, monkeypatch):
    _fake_dist(tmp_path, dist="sel-tech", module="sel_tech_mod", ep_name="sel", source=GOOD_PLUGIN.format(suffix="sel"))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = {}
    for value in ("all", "builtin", "none", "sel", "builtin, sel", "head_pruning,sel"):
        monkeypatch.setenv("AUTOCOMPRESS_PLUGINS", value)
        loaded[value] = set(load_registry().names())
    assert {"noop_sel", "head_pruning"} <= loaded["all"]
    assert "noop_sel" not in loaded["builtin"] and "head_pruning" in loaded["builtin"]
    assert loaded["none"] == set()
    assert loaded["sel"] == {"noop_sel"}
    assert loaded["builtin, sel"] == loaded["all"]
    assert loaded["head_pruning,sel"] == {"head_pruning", "noop_sel"}
    monkeypatch.setenv("AUTOCOMPRESS_PLUGINS", "none")
    assert "noop_file" in load_registry(extra_plugins=[_good_file(tmp_path)]).names()  # --plugin always loads


def _good_file(tmp_path) -> str:
    path = tmp_path / "good_file.py"
    path.write_text(GOOD_PLUGIN.format(suffix="file"))
    return str(path)


def test_installed_plugin_named_again_with_plugin_loads_once_without_error():
    # A contract test lists its plugin module (plugins = [...]) whether or not the package is installed.
    reg = load_registry(selection="builtin", extra_plugins=["plugins.head_pruning"])
    assert reg.load_errors == []
    assert reg.techniques["head_pruning"].source == "builtin"
