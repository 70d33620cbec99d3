"""The example third-party plugin (examples/autocompress-layerdrop) works the way a user would install it:
pip-installed into a private folder (never this venv), found through the ``autocompress`` entry-point group
without ``--plugin``, usable from a search spec, and passing autocompress's contract suite."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, write_tiny_spec

EXAMPLE = ROOT / "examples" / "autocompress-layerdrop"
DIST = "autocompress-layerdrop"


def pip_install_target(src: Path, target: Path) -> None:
    """Install the package at ``src`` into ``target`` only: offline, no dependencies, no pip cache, the
    venv's setuptools as build backend. Raises with pip's output when it fails."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"pip install failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def plugin_env(target: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that sees the installed plugin (and nothing else changed)."""
    env = {k: v for k, v in os.environ.items() if k != "AUTOCOMPRESS_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["AUTOCOMPRESS_CACHE"] = str(tmp / "cache")
    env.update(extra)
    return env


def run(args: list[str], *, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _site_dirs() -> list[Path]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return [Path(d) for d in dirs if Path(d).is_dir()]


def _layerdrop_in_site_packages() -> list[str]:
    return sorted(p.name for d in _site_dirs() for p in d.iterdir() if "layerdrop" in p.name.lower())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(target folder holding the installed plugin, copy of the example's source tree).

    The build runs on a copy: setuptools writes build/ and *.egg-info next to the sources, and those must
    not land in the repository."""
    assert not _layerdrop_in_site_packages(), "the example plugin is already installed in this venv"
    root = tmp_path_factory.mktemp("layerdrop")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = root / "target"
    pip_install_target(src, target)
    assert (target / "autocompress_layerdrop" / "layer_drop.py").is_file()
    assert list(target.glob("autocompress_layerdrop-*.dist-info/entry_points.txt"))
    return target, src


def test_install_leaves_the_venv_alone(installed):
    assert _layerdrop_in_site_packages() == []
    import importlib.metadata

    assert all(d.metadata["Name"] != DIST for d in importlib.metadata.distributions())


def test_plugins_command_finds_it_through_the_entry_point(installed, tmp_path):
    target, _ = installed
    cmd = [sys.executable, "-m", "autocompress.cli", "plugins", "--format", "json"]
    data = json.loads(run(cmd, env=plugin_env(target, tmp_path), cwd=tmp_path).stdout)
    by_name = {t["name"]: t for t in data["techniques"]}
    assert data["load_errors"] == []
    row = by_name["layer_drop"]
    assert row["plugin"] == "layer_drop" and row["source"] == f"entry-point ({DIST})"  # not --plugin
    assert {p["name"]: p["domain"] for p in row["params"]} == {
        "drop": "[0.0, 0.75]", "which": "{top, bottom, every_other, middle}"}
    assert "distillation" in row["incompatible_with"]
    assert {"head_pruning", "quantization"} <= set(by_name)

    hidden = json.loads(run(cmd, env=plugin_env(target, tmp_path, AUTOCOMPRESS_PLUGINS="builtin"), cwd=tmp_path).stdout)
    names = {t["name"] for t in hidden["techniques"]}
    assert "layer_drop" not in names and "head_pruning" in names


def test_selection_env_var_with_an_installed_plugin(installed, tmp_path):
    """none / a comma list / builtin plus a name, read from AUTOCOMPRESS_PLUGINS (one process, several loads)."""
    target, _ = installed
    code = (
        "import json, os\n"
        "from autocompress.registry import load_registry\n"
        "out = {}\n"
        "for value in ('none', 'layer_drop', 'builtin,layer_drop', ' layer_drop , head_pruning '):\n"
        "    os.environ['AUTOCOMPRESS_PLUGINS'] = value\n"
        "    out[value] = load_registry().names()\n"
        "print(json.dumps(out))\n"
    )
    got = json.loads(run([sys.executable, "-c", code], env=plugin_env(target, tmp_path), cwd=tmp_path).stdout)
    assert got["none"] == []
    assert got["layer_drop"] == ["layer_drop"]
    assert "layer_drop" in got["builtin,layer_drop"] and "head_pruning" in got["builtin,layer_drop"]
    assert got[" layer_drop , head_pruning "] == ["head_pruning", "layer_drop"]


def test_tiny_search_uses_it_and_the_model_reloads(installed, tmp_path, tiny_model_dir, tiny_data_dir):
    target, _ = installed
    env = plugin_env(target, tmp_path)
    techniques = "  layer_drop: {enabled: true, params: {drop: 0.5, which: [top, every_other]}}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=2, techniques=techniques)
    run([sys.executable, "-m", "autocompress.cli", "search", str(spec)], env=env, cwd=tmp_path)
    d = tmp_path / "results" / "tiny"
    data = json.loads((d / "trials.json").read_text())
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 2
    assert all(t["pipeline"] == ["layer_drop"] and t["params"]["layer_drop"]["drop"] == 0.5 for t in done)
    baseline = json.loads((d / "pareto.json").read_text())["baseline"]["metrics"]
    assert all(t["metrics"]["params"] < baseline["params"] for t in done)  # a layer of the 2 is gone

    kept = next(t for t in json.loads((d / "pareto.json").read_text())["front"] if t.get("model_dir"))
    model_dir = d / kept["model_dir"]
    recipe = json.loads((model_dir / "recipe.json").read_text())
    assert recipe == [{"technique": "layer_drop", "phase": "apply", "params": recipe[0]["params"],
                       "record": {"layers_before": 2, "dropped": [1]}}]
    code = f"import autocompress; m = autocompress.load({str(model_dir)!r}); print(m.config.num_hidden_layers)"
    assert run([sys.executable, "-c", code], env=env, cwd=tmp_path).stdout.strip() == "1"


def test_contract_suite_passes_on_it(installed, tmp_path):
    target, src = installed
    # cwd is a neutral folder, so the package is imported from the install target, not the source copy.
    proc = run([sys.executable, "-m", "pytest", str(src / "tests"), "-q", "-p", "no:cacheprovider"],
               env=plugin_env(target, tmp_path), cwd=tmp_path, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, proc.stdout
    assert f"{target}" in run([sys.executable, "-c", "import autocompress_layerdrop as m; print(m.__file__)"],
                              env=plugin_env(target, tmp_path), cwd=tmp_path).stdout
