"""``autocompress new-plugin``: the generated package installs, is found through its entry point and
passes the contract suite before its author changes anything; bad names and existing folders are refused
with the fix."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from autocompress.errors import PluginError
from autocompress.scaffold import names_for, new_plugin, validate_name
from test_example_plugin import pip_install_target, plugin_env, run

PUBLIC = {"autocompress", "autocompress.technique", "autocompress.surgery", "autocompress.testing"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autocompress.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_generated_package_passes_the_contract_suite(tmp_path):
    proc = cli("new-plugin", "ffn_magnitude", "--out", "gen", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pkg = tmp_path / "gen" / "autocompress-ffn-magnitude"
    assert "pip install -e . && pytest" in proc.stdout and "TODO" in proc.stdout
    for rel in ("pyproject.toml", "README.md", ".gitignore", "autocompress_ffn_magnitude/__init__.py",
                "autocompress_ffn_magnitude/plugin.py", "tests/test_contract.py"):
        assert (pkg / rel).is_file(), rel
        assert "$" not in (pkg / rel).read_text(), f"{rel}: an unfilled template placeholder"
    assert 'ffn_magnitude = "autocompress_ffn_magnitude.plugin"' in (pkg / "pyproject.toml").read_text()

    # Build from a copy (setuptools writes build/ and *.egg-info beside the sources), install into a
    # private folder, then run the generated tests from a neutral folder against the installed package.
    import shutil

    src = tmp_path / "src"
    shutil.copytree(pkg, src)
    target = tmp_path / "target"
    pip_install_target(src, target)
    env = plugin_env(target, tmp_path)
    listed = run([sys.executable, "-m", "autocompress.cli", "plugins", "--format", "json"], env=env, cwd=tmp_path)
    assert '"name": "ffn_magnitude"' in listed.stdout and "entry-point (autocompress-ffn-magnitude)" in listed.stdout
    work = tmp_path / "work"
    work.mkdir()
    proc = run([sys.executable, "-m", "pytest", str(pkg / "tests"), "-q", "-p", "no:cacheprovider"], env=env,
               cwd=work, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, proc.stdout


def test_generated_plugin_uses_only_the_public_api(tmp_path):
    pkg = new_plugin("my_pruning", out=tmp_path)
    for rel in ("autocompress_my_pruning/plugin.py", "tests/test_contract.py"):
        tree = ast.parse((pkg / rel).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        ours = {m for m in imported if m and (m.startswith("autocompress.") or m == "autocompress")}
        assert ours <= PUBLIC, f"{rel} imports non-public modules {sorted(ours - PUBLIC)}"
        assert not any(m and m.startswith("plugins") for m in imported)
    plugin = (pkg / "autocompress_my_pruning/plugin.py").read_text()
    assert "class MyPruning(Technique)" in plugin and 'name = "my_pruning"' in plugin
    assert plugin.count("TODO") >= 2  # the docstring and the transform block


def test_existing_folder_is_refused_and_left_alone(tmp_path):
    pkg = new_plugin("my_pruning", out=tmp_path)
    marker = pkg / "plugin_changed_by_author.txt"
    marker.write_text("mine")
    with pytest.raises(PluginError, match="already exists.*--out DIR"):
        new_plugin("my_pruning", out=tmp_path)
    assert marker.read_text() == "mine"
    proc = cli("new-plugin", "my_pruning", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "--out DIR" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,fragment", [
    ("My-Pruning", "Try 'my_pruning'"),
    ("2bit", "starting with a letter"),
    ("", "give a technique name"),
    ("class", "Python keyword"),
    ("x" * 41, "at most 40"),
    ("head_pruning", "already installed (from autocompress)"),
])
def test_bad_names_are_refused_with_the_fix(name, fragment, tmp_path):
    with pytest.raises(PluginError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_name(name)
    with pytest.raises(PluginError):
        new_plugin(name, out=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_derived_names():
    assert names_for("ffn_magnitude") == {"name": "ffn_magnitude", "dist": "autocompress-ffn-magnitude",
                                          "package": "autocompress_ffn_magnitude", "class_name": "FfnMagnitude"}
