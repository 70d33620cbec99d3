"""Shared helpers for the hardening tests (issue 6): run the real CLI entry point in this process and
capture what a user sees (stdout, stderr, exit code), on the tiny model and data from conftest."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import write_tiny_spec

__all__ = ["Result", "cli", "hardening_cache", "read_trials", "tiny_spec", "write_tiny_spec"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture(scope="session")
def hardening_cache(tmp_path_factory) -> Path:
    """One cache for these tests: the tiny baseline is fine-tuned once, not per test."""
    return tmp_path_factory.mktemp("hardening-cache")


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path, hardening_cache):
    """``cli(*args)`` runs ``autocompress ARGS`` through :func:`autocompress.cli.main` in ``tmp_path``."""
    import autocompress.cli as cli_module

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(hardening_cache))
    monkeypatch.delenv("AUTOCOMPRESS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Result:
        capsys.readouterr()
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["autocompress", *map(str, args)])
        try:
            cli_module.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def tiny_spec(tmp_path: Path, model_dir: Path, data_dir: Path, **kw) -> Path:
    return write_tiny_spec(tmp_path, model_dir, data_dir, **kw)


def read_trials(study_dir: Path) -> list[dict]:
    return json.loads((study_dir / "trials.json").read_text())["trials"]


def db_trials(study_dir: Path) -> list[tuple[int, str, list[float]]]:
    """``(number, state, values)`` straight from the study's SQLite storage."""
    con = sqlite3.connect(study_dir / "study.db")
    try:
        rows = con.execute("select trial_id, number, state from trials order by number").fetchall()
        values = {}
        for tid, obj, value in con.execute("select trial_id, objective, value from trial_values order by objective"):
            values.setdefault(tid, []).append(value)
        return [(number, state, values.get(tid, [])) for tid, number, state in rows]
    except sqlite3.OperationalError:  # the search is still creating the storage
        return []
    finally:
        con.close()
