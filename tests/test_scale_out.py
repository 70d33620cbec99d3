"""Scale-out on one Optuna study: --workers N, shared storages, fault tolerance (tiny model, real processes).

Modelled on Optuna's own heartbeat/retry tests: real worker processes on a real SQLite storage, SIGINT and
SIGKILL delivered mid-trial, then the storage is inspected for lost, duplicated or stuck trials.
"""

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
import os, pathlib, time
from autocompress import hookimpl
from autocompress.technique import Stage, Technique

class Slow(Technique):
    name = "slow_noop"
    stage = Stage.TRAINING
    def training_hooks(self, model, *, params, ctx):
        # A file per worker while it sleeps: a test that signals mid-trial waits for one, so the signal
        # lands inside this window and not while a trial is already finishing (slow on a loaded machine).
        mark = pathlib.Path(MARKS) / str(os.getpid())
        mark.parent.mkdir(exist_ok=True)
        mark.write_text("")
        time.sleep(SECONDS)   # a window to interrupt or kill a worker mid-trial
        mark.unlink()
        return None

@hookimpl
def register_techniques(register):
    register(Slow())
"""


def cli(*args: str, cwd: Path, env: dict, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "autocompress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def spawn(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autocompress.cli", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trials(db: Path) -> list[dict]:
    """Every trial with its state, user attributes and system attributes, read with plain sqlite3."""
    if not db.is_file():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        rows = con.execute("select trial_id, number, state from trials order by number").fetchall()
        out = []
        for tid, number, state in rows:
            user = {k: json.loads(v) for k, v in con.execute(
                "select key, value_json from trial_user_attributes where trial_id=?", (tid,))}
            system = {k: json.loads(v) for k, v in con.execute(
                "select key, value_json from trial_system_attributes where trial_id=?", (tid,))}
            params = dict(con.execute("select param_name, param_value from trial_params where trial_id=?", (tid,)))
            out.append({"number": number, "state": state, "user": user, "system": system, "params": params})
        return out
    except sqlite3.OperationalError:  # the storage is still being created
        return []
    finally:
        con.close()


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"search exited ({proc.returncode}) before {what}\n{err[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting until {what}")


@pytest.fixture
def env(tmp_path):
    return {"AUTOCOMPRESS_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def sleeping(tmp_path: Path) -> Path:
    """Where the slow plugin marks each worker that is inside its sleep."""
    return tmp_path / "sleeping"


def slow_setup(tmp_path: Path, model_dir: Path, data_dir: Path, *, trials_: int, seconds: float,
               search_extra: str = "") -> tuple[Path, Path]:
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN.replace("SECONDS", str(seconds)).replace("MARKS", repr(str(sleeping(tmp_path)))))
    techniques = "  slow_noop: {enabled: true}\n  quantization: {enabled: search}\n"
    spec = write_tiny_spec(tmp_path, model_dir, data_dir, trials=trials_, techniques=techniques)
    text = spec.read_text()
    spec.write_text(text.replace(f"search: {{trials: {trials_}, sampler: random, seed: 0}}",
                                 f"search: {{trials: {trials_}, sampler: random, seed: 0{search_extra}}}"))
    return spec, plugin


def test_workers_share_one_study_without_lost_or_duplicated_trials(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=7)
    text = spec.read_text()
    spec.write_text(text[: text.index("search:")] + (
        "search:\n  trials: 7\n  sampler: random\n  enqueue:\n"
        "    - {head_pruning: {fraction: 0.5}}\n"
        "    - {quantization: {}}\n"
        "    - {head_pruning: {fraction: 0.25}, quantization: null}\n"))
    proc = cli("search", str(spec), "--workers", "3", cwd=tmp_path, env=env)
    assert "Started 3 workers" in proc.stderr
    rows = trials(tmp_path / "results" / "tiny" / "study.db")
    states = [r["state"] for r in rows]
    assert states.count("COMPLETE") == 7, states            # the total, exactly
    assert not {"RUNNING", "WAITING"} & set(states)         # nothing lost or left behind
    done = [r for r in rows if r["state"] == "COMPLETE"]
    for index in range(3):                                   # each seeded pipeline ran exactly once
        assert sum(r["user"].get("enqueued") == index for r in done) == 1, index
    # Workers' samplers are seeded differently: no continuous value is proposed twice (all-categorical
    # parameter sets may coincide by chance, as in any random search).
    fractions = [r["params"]["head_pruning.fraction"] for r in done
                 if "enqueued" not in r["user"] and "head_pruning.fraction" in r["params"]]
    assert len(fractions) == len(set(fractions)), f"workers proposed identical values (same seed?): {fractions}"
    assert len({r["user"]["worker"] for r in done}) >= 2    # the work really was shared
    front = json.loads(cli("pareto", "tiny", "--format", "json", cwd=tmp_path, env=env).stdout)
    assert front


def test_sigint_with_workers_then_same_command_finishes(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec, plugin = slow_setup(tmp_path, tiny_model_dir, tiny_data_dir, trials_=4, seconds=5.0)
    args = ("search", str(spec), "--plugin", str(plugin), "--workers", "2")
    proc = spawn(*args, cwd=tmp_path, env=env)
    db = tmp_path / "results" / "tiny" / "study.db"

    def one_done_one_running():  # running: a worker is inside its 5 s of "training"
        return any(r["state"] == "COMPLETE" for r in trials(db)) and _sleeping_trial(db, tmp_path)

    wait_for(one_done_one_running, proc, "a trial finished and another is running")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert "Resume with the same command" in stderr
    before = trials(db)
    assert "RUNNING" not in {r["state"] for r in before}, before
    interrupted = [r for r in before if r["user"].get("interrupted")]
    assert interrupted and all("interrupted" in r["user"]["fail_reason"] for r in interrupted)
    kept = {r["number"] for r in before if r["state"] == "COMPLETE"}
    cli(*args, cwd=tmp_path, env=env)
    after = trials(db)
    complete = {r["number"] for r in after if r["state"] == "COMPLETE"}
    assert len(complete) == 4 and kept <= complete           # total honoured, finished trials kept
    assert not {"RUNNING", "WAITING"} & {r["state"] for r in after}


def _sleeping_trial(db: Path, tmp_path: Path):
    """A running trial whose worker is inside the slow plugin's sleep (marked by its pid), or None."""
    marks = sleeping(tmp_path)
    pids = {m.name for m in marks.iterdir()} if marks.is_dir() else set()
    for r in trials(db):
        worker = str(r["user"].get("worker", ""))
        if r["state"] == "RUNNING" and r["user"].get("pipeline") and worker.rsplit(":", 1)[-1] in pids:
            return r
    return None


def test_kill_9_of_a_worker_mid_trial_is_detected_and_retried(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec, plugin = slow_setup(tmp_path, tiny_model_dir, tiny_data_dir, trials_=4, seconds=3.0,
                              search_extra=", heartbeat_interval: 1, heartbeat_grace: 4")
    proc = spawn("search", str(spec), "--plugin", str(plugin), "--workers", "2", cwd=tmp_path, env=env)
    db = tmp_path / "results" / "tiny" / "study.db"
    victim = wait_for(lambda: _sleeping_trial(db, tmp_path), proc, "a worker runs a trial")
    os.kill(int(victim["user"]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr                      # the other worker finished the study
    assert "was killed by SIGKILL" in stderr
    rows = {r["number"]: r for r in trials(db)}
    dead = rows[victim["number"]]
    assert dead["state"] == "FAIL" and dead["user"]["interrupted"] is True
    assert "no heartbeat" in dead["user"]["fail_reason"] and "queued again" in dead["user"]["fail_reason"]
    retries = [r for r in rows.values() if r["system"].get("failed_trial") == victim["number"]]
    assert len(retries) == 1 and retries[0]["state"] == "COMPLETE"
    assert retries[0]["params"] == dead["params"]            # the same trial, run again
    states = [r["state"] for r in rows.values()]
    assert states.count("COMPLETE") == 4 and "RUNNING" not in states and "WAITING" not in states


def test_kill_9_then_same_command_retries_stale_trial(tmp_path, tiny_model_dir, tiny_data_dir, env):
    # An explicit storage URL: several machines may share it, so a RUNNING trial is only stale once its
    # heartbeat is old (no "every RUNNING trial is dead" shortcut).
    spec, plugin = slow_setup(tmp_path, tiny_model_dir, tiny_data_dir, trials_=3, seconds=3.0,
                              search_extra=", heartbeat_interval: 1, heartbeat_grace: 4")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ("search", str(spec), "--plugin", str(plugin), "--storage", storage)
    proc = spawn(*args, cwd=tmp_path, env=env)
    db = tmp_path / "shared.db"

    def second_running():
        rows = trials(db)
        return any(r["state"] == "COMPLETE" for r in rows) and _sleeping_trial(db, tmp_path)

    victim = wait_for(second_running, proc, "one trial finished and another runs")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert [r["state"] for r in trials(db) if r["number"] == victim["number"]] == ["RUNNING"]
    proc = cli(*args, cwd=tmp_path, env=env)
    assert f"trial {victim['number']} is stale" in proc.stderr
    rows = {r["number"]: r for r in trials(db)}
    assert rows[victim["number"]]["state"] == "FAIL" and rows[victim["number"]]["user"]["interrupted"] is True
    retry = [r for r in rows.values() if r["system"].get("failed_trial") == victim["number"]]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE"
    assert [r["state"] for r in rows.values()].count("COMPLETE") == 3


def test_exception_nan_and_out_of_memory_fail_only_their_trial(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    import torch

    from autocompress import engine
    from autocompress.registry import load_registry
    from autocompress.results import load_results
    from autocompress.search import run_search
    from autocompress.spec import load_spec

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    real, calls = engine.run_trial, []

    def flaky(prep, pipeline, *, save_dir, log=None, **options):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in the pipeline")
        metrics = real(prep, pipeline, save_dir=save_dir, log=log, **options)
        if len(calls) == 2:
            metrics["accuracy"] = float("nan")
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return metrics

    monkeypatch.setattr(engine, "run_trial", flaky)
    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=5,
                                     techniques="  quantization: {enabled: true}\n"))
    d = run_search(spec, registry=load_registry(), results_dir=tmp_path / "results", command="test", log=lambda m: None)
    rows = load_results(d).rows
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert [r["state"] for r in rows].count("COMPLETE") == 2 and len(failed) == 3   # the study went on
    reasons = [r["fail_reason"] for r in failed]
    assert "RuntimeError: boom in the pipeline" in reasons[0]
    assert "accuracy measured as non-finite" in reasons[1]
    assert reasons[2].startswith("out of memory on cpu") and "Tried to allocate" in reasons[2]
    assert not any(r["interrupted"] for r in failed)          # failures count towards the total
    report = (d / "report.md").read_text()
    assert all(reason.split(":")[0] in report for reason in reasons)
    assert not any((d / "trials" / str(r["number"])).exists() for r in failed)


def test_stale_trial_is_retried_up_to_max_failures(tmp_path):
    import optuna

    from autocompress.parallel import record_stale
    from autocompress.search import finished_count, mark_stale_running

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"])
    first = study.ask()
    first.suggest_float("x", 0, 1)
    assert mark_stale_running(study, max_failures=1) == 1     # attempt 1 of 2: queued again
    retry = study.ask()
    frozen = study._storage.get_trial(retry._trial_id)
    assert frozen.params == first.params and frozen.system_attrs["failed_trial"] == first.number
    assert record_stale(study, frozen, why="killed", max_failures=1)
    final = study._storage.get_trial(retry._trial_id)
    assert "not retried again" in final.user_attrs["fail_reason"] and "interrupted" not in final.user_attrs
    assert finished_count(study) == 1                          # the give-up counts; the first try does not
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert not record_stale(study, frozen, why="killed", max_failures=1)   # already recorded: no second copy


def test_surplus_trial_of_a_second_worker_is_skipped(tmp_path):
    import optuna

    from autocompress.parallel import skip_reason

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"])
    done = study.ask()
    study.tell(done, 1.0)
    a, b = study.ask(), study.ask()                            # two workers ask at once for the last slot
    assert skip_reason(study, a, total=2) is None
    assert skip_reason(study, b, total=2).startswith("surplus")
    assert skip_reason(study, b, total=3) is None


def test_plan_workers_one_gpu_each_or_split_cpu(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    import torch

    from autocompress.errors import ModelError
    from autocompress.spec import load_spec
    from autocompress.workers import plan_workers

    spec_path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)

    def plan(n, device="auto", **kw):
        return plan_workers(load_spec(spec_path, overrides=[f"search.workers={n}", f"measurement.device={device}"]), **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [r.device for r in plan(2)] == ["cuda:0", "cuda:1"]          # one trial per GPU
    notes: list[str] = []
    assert [r.device for r in plan(3, log=notes.append)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert "3 workers on 2 GPU(s)" in notes[0]
    assert [r.device for r in plan(2, "cuda:1")] == ["cuda:1", "cuda:1"]   # an explicit device is honoured
    assert [r.device for r in plan(2, "cpu")] == ["cpu", "cpu"]
    assert plan(2, "cpu")[0].threads == max(1, (os.cpu_count() or 1) // 2)  # the cores are split
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [r.device for r in plan(2)] == ["cpu", "cpu"]
    with pytest.raises(ModelError, match="no CUDA device"):
        plan(2, "cuda")


def test_mixed_hardware_is_said_not_hidden():
    from autocompress.results import mixed_devices_note

    base = {"device": "cuda:0 (NVIDIA H100)"}
    same = [{"state": "COMPLETE", "device": "cuda:1 (NVIDIA H100)"}, {"state": "FAIL", "device": "cpu (Xeon)"}]
    assert mixed_devices_note(same, base) is None               # another index of the same GPU model
    mixed = same + [{"state": "COMPLETE", "device": "cuda:0 (NVIDIA A10G)"}]
    note = mixed_devices_note(mixed, base)
    assert "different hardware" in note and "NVIDIA A10G" in note and "1 trial(s) on cuda (NVIDIA H100)" in note


def test_device_flag_is_not_part_of_the_study_fingerprint(tmp_path, tiny_model_dir, tiny_data_dir):
    from autocompress.search import space_fingerprint
    from autocompress.spec import load_spec

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    assert space_fingerprint(load_spec(path)) == space_fingerprint(load_spec(path, overrides=["measurement.device=cpu"]))
    assert space_fingerprint(load_spec(path)) != space_fingerprint(load_spec(path, overrides=["recovery.steps=9"]))


def test_import_autocompress_stays_light():
    code = ("import sys, autocompress, autocompress.cli, autocompress.search, autocompress.workers, "
            "autocompress.parallel, autocompress.objective\n"
            "assert 'ray' not in sys.modules, 'Ray imported'\nassert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_storage_url_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data_dir, env):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)
    proc = cli("search", str(spec), "--storage", "postgresql+psycopg2://me:secret@127.0.0.1:1/none",
               cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr and "search.storage" in proc.stderr


def test_latency_on_cuda_is_synchronised_on_the_trials_device(tiny_model, monkeypatch):
    import torch

    from autocompress import data, measure
    from autocompress.tiny import tiny_vocab

    synced: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    real = data.batches
    monkeypatch.setattr(data, "batches", lambda enc, **kw: real(enc, **{**kw, "device": "cpu"}))  # no GPU here
    ids = [torch.randint(5, len(tiny_vocab()), (n,)).numpy() for n in (6, 9, 12, 7)]
    enc = data.Encoded(ids, None, torch.zeros(4, dtype=torch.long).numpy(), 0)
    measure.latency_ms_per_example(tiny_model, enc, batch_size=2, device="cuda:1", warmup=1, repeats=2)
    assert synced == [torch.device("cuda:1")] * 6   # before and after each of the 3 passes
