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
