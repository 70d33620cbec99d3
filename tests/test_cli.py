"""End to end through the real CLI on a tiny random BERT and tiny generated data (seconds)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_spec

SLOW_PLUGIN = """
import time
from autocompress import hookimpl
from autocompress.technique import Stage, Technique

class Slow(Technique):
    name = "slow_noop"
    stage = Stage.TRAINING
    def training_hooks(self, model, *, params, ctx):
        time.sleep(1.5)   # gives the test a window to interrupt mid-trial
        return None

@hookimpl
def register_techniques(register):
    register(Slow())
"""

FAILING_PLUGIN = """
from autocompress import hookimpl
from autocompress.technique import FloatParam, Stage, Technique

class Flaky(Technique):
    name = "flaky"
    stage = Stage.STRUCTURE
    params = (FloatParam("x", 0.0, 1.0, 0.5),)
    def apply(self, model, *, params, ctx):
        raise RuntimeError("flaky technique exploded on purpose")

@hookimpl
def register_techniques(register):
    register(Flaky())
"""


def cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "autocompress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def trial_states(results: Path, study: str) -> list[tuple[int, str]]:
    con = sqlite3.connect(results / study / "study.db")
    try:
        return con.execute("select number, state from trials order by number").fetchall()
    except sqlite3.OperationalError:  # the storage is still being created
        return []
    finally:
        con.close()


@pytest.fixture
def env(tmp_path):
    return {"AUTOCOMPRESS_CACHE": str(tmp_path / "cache")}


def test_search_pareto_show_end_to_end(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=5)
    proc = cli("search", str(spec), cwd=tmp_path, env=env)
    assert "Baseline: val acc" in proc.stderr
    d = tmp_path / "results" / "tiny"
    for f in ("spec.resolved.yaml", "trials.csv", "trials.json", "pareto.json", "pareto.png", "pareto.html", "report.md", "study.db"):
        assert (d / f).is_file(), f
    trials = json.loads((d / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials].count("COMPLETE") == 5
    # an all-off pipeline is the baseline, and a repeat of a tried pipeline teaches nothing: skipped (PRUNED),
    # not run and not counted
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    assert all(t["pipeline"] == [] or "pipeline again" in t["fail_reason"] for t in trials if t["state"] == "PRUNED")
    front = json.loads(cli("pareto", "tiny", "--format", "json", cwd=tmp_path, env=env).stdout)
    assert front and all("trial" in r or "number" in r for r in front)
    # front models are kept and reload to the same predictions as measured
    pareto = json.loads((d / "pareto.json").read_text())
    kept = [p for p in pareto["front"] if p.get("model_dir")]
    assert kept
    shown = cli("show", "tiny", str(kept[0]["number"]), cwd=tmp_path, env=env).stdout
    assert f"Trial {kept[0]['number']}" in shown and "accuracy" in shown
    # resolved spec is saved; report names the command
    assert "search" in (d / "report.md").read_text()
    # re-running the same command does nothing more
    again = cli("search", str(spec), cwd=tmp_path, env=env)
    assert "already has 5 finished trials" in again.stderr
    assert [s for _, s in trial_states(tmp_path / "results", "tiny")].count("COMPLETE") == 5


def test_resume_to_a_larger_total_keeps_finished_trials(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=2)
    cli("search", str(spec), cwd=tmp_path, env=env)
    first = json.loads((tmp_path / "results/tiny/trials.json").read_text())["trials"]
    cli("search", str(spec), "--set", "trials=4", cwd=tmp_path, env=env)
    after = json.loads((tmp_path / "results/tiny/trials.json").read_text())["trials"]
    assert [t["state"] for t in after].count("COMPLETE") == 4
    assert [t["metrics"] for t in after[: len(first)]] == [t["metrics"] for t in first]


def test_failing_trial_is_recorded_and_study_goes_on(tmp_path, tiny_model_dir, tiny_data_dir, env):
    plugin = tmp_path / "flaky.py"
    plugin.write_text(FAILING_PLUGIN)
    techniques = "  flaky: {enabled: search}\n  quantization: {enabled: true}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=6, techniques=techniques)
    cli("search", str(spec), "--plugin", str(plugin), cwd=tmp_path, env=env)
    trials = json.loads((tmp_path / "results/tiny/trials.json").read_text())["trials"]
    states = [t["state"] for t in trials]
    assert states.count("FAIL") + states.count("COMPLETE") == 6 and "FAIL" in states and "COMPLETE" in states
    failed = next(t for t in trials if t["state"] == "FAIL")
    assert "flaky technique exploded on purpose" in failed["fail_reason"]
    shown = cli("show", "tiny", str(failed["number"]), cwd=tmp_path, env=env)
    assert "flaky technique exploded on purpose" in shown.stdout
    assert "flaky technique exploded on purpose" in (tmp_path / "results/tiny/report.md").read_text()


def test_ctrl_c_then_rerun_completes_without_redoing_trials(tmp_path, tiny_model_dir, tiny_data_dir, env):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN)
    techniques = "  slow_noop: {enabled: true}\n  quantization: {enabled: search}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=4, techniques=techniques)
    args = [sys.executable, "-m", "autocompress.cli", "search", str(spec), "--plugin", str(plugin)]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "results" / "tiny" / "study.db"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until one trial finished and the next is running
        if db.is_file():
            states = [s for _, s in trial_states(tmp_path / "results", "tiny")]
            if states.count("COMPLETE") >= 1 and states[-1] == "RUNNING":
                break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("search never reached a running second trial")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Resume with the same command" in stderr
    before = trial_states(tmp_path / "results", "tiny")
    finished_before = [n for n, s in before if s == "COMPLETE"]
    assert "RUNNING" not in {s for _, s in before}
    cli("search", str(spec), "--plugin", str(plugin), cwd=tmp_path, env=env)
    after = trial_states(tmp_path / "results", "tiny")
    complete = [n for n, s in after if s == "COMPLETE"]
    assert len(complete) == 4
    assert set(finished_before) <= set(complete)  # finished trials kept, not redone
    assert [s for _, s in after].count("FAIL") == 1  # only the interrupted trial, recorded as such


def test_changed_search_space_refuses_to_resume(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)
    cli("search", str(spec), cwd=tmp_path, env=env)
    proc = cli("search", str(spec), "--set", "recovery.steps=9", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    assert "different search spec" in proc.stderr and "--set study=NEW" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_input_gives_clear_error_and_exit_code(tmp_path, tiny_model_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tmp_path / "no-such-data", trials=1)
    proc = cli("search", str(spec), cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "no-such-data" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("search", str(tmp_path / "missing.yaml"), cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = cli("pareto", "nothing-here", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "no study 'nothing-here'" in proc.stderr


def test_enqueued_pipelines_run_first_exactly_as_given(tmp_path, tiny_model_dir, tiny_data_dir, env):
    extra = ("search:\n  trials: 3\n  sampler: random\n  enqueue:\n"
             "    - {head_pruning: {fraction: 0.5}}\n"
             "    - {quantization: {}}\n"
             "    - {head_pruning: {fraction: 0.25}, quantization: null}\n")
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=3)
    text = spec.read_text()
    spec.write_text(text[: text.index("search:")] + extra)
    cli("search", str(spec), cwd=tmp_path, env=env)
    trials = json.loads((tmp_path / "results" / "tiny" / "trials.json").read_text())["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert [t["pipeline"] for t in done] == [["head_pruning"], ["quantization"], ["head_pruning", "quantization"]]
    assert done[0]["params"]["head_pruning"]["fraction"] == 0.5
    assert done[2]["params"]["head_pruning"]["fraction"] == 0.25


def test_bad_enqueued_pipeline_is_a_spec_error(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)
    text = spec.read_text()
    spec.write_text(text[: text.index("search:")] + "search:\n  enqueue:\n    - {head_pruning: {fraction: 0.95}}\n")
    proc = cli("search", str(spec), cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "search.enqueue[0].head_pruning.fraction" in proc.stderr and "0.95" in proc.stderr


def test_table_command_writes_markdown(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=2)
    cli("search", str(spec), cwd=tmp_path, env=env)
    cli("table", "tiny", "--out", "t.md", cwd=tmp_path, env=env)
    text = (tmp_path / "t.md").read_text()
    assert "Reproduce: `autocompress search" in text and "bs8 speed-up" in text
    assert text.count("\n| ") >= 3  # header + 2 trials


def test_pre_distilled_student_grouped_batches_and_averaged_baseline_end_to_end(tmp_path, tiny_model_dir,
                                                                                 tiny_data_dir, env):
    """The options of the SST-2 benchmark spec through the real CLI: a baseline averaged over its last
    checkpoints, length-grouped batches, and a student pre-distilled once and reused by later trials."""
    techniques = "  distillation: {enabled: true, params: {depth: 0.5, alpha: [0.0, 0.9], pretrain_steps: 5}}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=3, techniques=techniques)
    text = spec.read_text().replace(
        "baseline: {max_steps: 40, batch_size: 16, learning_rate: 3.0e-3}",
        "baseline: {max_steps: 40, batch_size: 16, learning_rate: 3.0e-3, select_checkpoints: 4, "
        "average_checkpoints: 2, group_by_length: true}").replace(
        "recovery: {steps: 4, batch_size: 16}", "recovery: {steps: 4, batch_size: 16, group_by_length: true}")
    spec.write_text(text)
    out = cli("search", str(spec), cwd=tmp_path, env=env)
    log = out.stdout + out.stderr
    assert "kept the mean of the checkpoints of steps 30, 40: validation accuracy" in log
    # The one-time pre-distillation is announced in the search's log, once for the three trials.
    assert log.count("distillation: pre-distilling the 1-layer student for 5 steps") == 1, log
    trials = json.loads((tmp_path / "results" / "tiny" / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    bdir = next((tmp_path / "cache" / "baselines").iterdir())
    stats = json.loads((bdir / "train_stats.json").read_text())
    assert stats["average"]["steps"] == [30, 40] and 0.0 <= stats["average"]["score"] <= 1.0
    from safetensors import safe_open

    keys = []
    for f in (bdir / "cache").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys.append((st.metadata() or {}).get("key", ""))
    students = [k for k in keys if k.startswith("distillation/pre-distilled student/layers [0] of 2/5 steps")]
    assert len(students) == 1, keys  # one student for the three trials (the trials' alphas differ)


def test_baseline_command_fine_tunes_once_and_warms_the_cache_search_reuses(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                            env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)
    first = cli("baseline", str(spec), "--set", "baseline.select_checkpoints=2", cwd=tmp_path, env=env)
    assert "Fine-tuning the baseline" in first.stderr
    lines = first.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["checkpoint of step 20", "checkpoint of step 40"], first.stdout
    assert any(ln.startswith("Baseline: val acc ") and " eval acc " in ln for ln in lines)
    key = next((tmp_path / "cache" / "baselines").iterdir()).name
    assert f"(key {key})" in first.stdout
    again = cli("baseline", str(spec), "--set", "baseline.select_checkpoints=2", cwd=tmp_path, env=env)
    assert "Reusing the cached fine-tuned baseline" in again.stderr and "Fine-tuning" not in again.stderr
    searched = cli("search", str(spec), "--set", "baseline.select_checkpoints=2", cwd=tmp_path, env=env)
    assert "Reusing the cached fine-tuned baseline" in searched.stdout + searched.stderr
    bad = cli("baseline", str(tmp_path / "missing.yaml"), cwd=tmp_path, env=env, check=False)
    assert bad.returncode != 0 and "missing.yaml" in bad.stderr
