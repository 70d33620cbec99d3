"""Hardening (issue 6), safety: no unpickling and no model code unless asked (checked on the package source),
no locals or secrets in what an unexpected error prints, plugins that fail to load are isolated."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import autocompress.cli
import autocompress.search
from hardening_helpers import cli, hardening_cache, tiny_spec  # noqa: F401 - cli, hardening_cache: fixtures

ROOT = Path(__file__).resolve().parents[1]
# What must never appear in code that reads files a user could be handed (models, studies, caches, specs).
UNSAFE = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|\b(c?pickle|dill|joblib)\.loads?\("),
    "torch.load": re.compile(r"\btorch\.load\(|weights_only\s*=\s*False"),
    "yaml.load": re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all)\(|\b(Unsafe|Full)?Loader\b"),
    "numpy pickles": re.compile(r"allow_pickle\s*=\s*True|\bread_pickle\("),
    "trust_remote_code": re.compile(r"trust_remote_code\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![.\w])(?<!def )(eval|exec)\("),
}


def unsafe_lines(text: str) -> list[tuple[str, int, str]]:
    hits = []
    for lineno, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        for name, pattern in UNSAFE.items():
            if pattern.search(code):
                hits.append((name, lineno, line.strip()))
    return hits


def test_the_patterns_catch_unsafe_code():
    bad = ("import pickle\nx = torch.load(f, weights_only=False)\ny = yaml.load(s)\nnp.load(p, allow_pickle=True)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\neval(s)\n")
    assert {name for name, _, _ in unsafe_lines(bad)} == set(UNSAFE)
    assert not unsafe_lines("model.eval()\nyaml.safe_load(s)\nnp.load(p, allow_pickle=False)\n"
                            "from_pretrained(p, trust_remote_code=model.trust_remote_code)\n")


def test_package_source_has_no_unsafe_deserialisation():
    files = sorted((ROOT / "autocompress").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    assert len(files) > 20
    found = [f"{f.relative_to(ROOT)}:{n}: {name}: {line}" for f in files
             for name, n, line in unsafe_lines(f.read_text(encoding="utf-8"))]
    assert not found, "unsafe calls:\n" + "\n".join(found)
    # Every numpy load of a cache file refuses pickles explicitly.
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if "np.load(" in line:
                assert "allow_pickle=False" in line, f"{f}: {line}"


def test_typer_never_shows_locals():
    assert autocompress.cli.app.pretty_exceptions_show_locals is False


def test_unexpected_error_prints_one_line_no_locals_no_secret(cli, tmp_path, tiny_model_dir, tiny_data_dir,
                                                              monkeypatch):
    def boom(spec, **kwargs):
        secret_local = "hunter2-local"  # noqa: F841 - would show in a locals-printing traceback
        raise RuntimeError(f"cannot reach {spec.search.storage}")

    monkeypatch.setattr(autocompress.search, "run_search", boom)
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    res = cli("search", spec, "--set", "search.storage=postgresql://me:s3cret@db.example:5432/studies")
    assert res.code == 1, res.text
    assert "Traceback" not in res.text and "s3cret" not in res.text and "hunter2" not in res.text
    assert "error: unexpected RuntimeError: cannot reach postgresql://me:***@db.example:5432/studies" in res.err
    assert "please report it" in res.err
    saved = Path(re.search(r"The traceback is in (\S+);", res.err).group(1))
    text = saved.read_text()
    saved.unlink()
    assert "Traceback" in text and "boom" in text and "s3cret" not in text and "hunter2" not in text
    # AUTOCOMPRESS_DEBUG=1 lets a developer see the real exception
    monkeypatch.setenv("AUTOCOMPRESS_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["autocompress", "search", str(spec)])
    with pytest.raises(RuntimeError, match="cannot reach"):
        autocompress.cli.main()


BROKEN_IMPORT = "import not_a_module_anywhere\n"
BROKEN_REGISTER = """
from autocompress import hookimpl

@hookimpl
def register_techniques(register):
    raise RuntimeError("registration exploded")
"""


def test_plugins_that_fail_to_load_are_isolated(cli, tmp_path, tiny_model_dir, tiny_data_dir):
    (tmp_path / "broken_import.py").write_text(BROKEN_IMPORT)
    (tmp_path / "broken_register.py").write_text(BROKEN_REGISTER)
    plugins = ["--plugin", tmp_path / "broken_import.py", "--plugin", tmp_path / "broken_register.py"]
    res = cli("plugins", *plugins)
    assert res.code == 0, res.text
    assert "not loaded: ModuleNotFoundError: No module named 'not_a_module_anywhere'" in res.err
    assert "register_techniques raised RuntimeError: registration exploded" in res.err
    assert "head_pruning" in res.out and "quantization" in res.out  # the rest keep working
    # A spec that needs the technique of a plugin that did not load: named, with the load error above it.
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, techniques="  broken_tech: {}\n")
    res = cli("search", spec, *plugins)
    assert res.code == 2 and "Traceback" not in res.text
    assert "warning: plugin" in res.err and "unknown technique 'broken_tech'" in res.err


def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback():
    """The console script's entry point catches a Ctrl-C that lands before the CLI's handlers exist."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Interrupting:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'autocompress.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupting())\n"
        "from autocompress.entry import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "Interrupted.", proc.stderr
    assert "Traceback" not in proc.stderr
