"""--backend ray on a real Ray cluster started on loopback: ``ray start --head`` plus a worker node.

Modelled on Ray Tune's own fault-tolerance tests: a trial whose worker process dies is retried under
``FailureConfig(max_failures)``, and an experiment interrupted with SIGINT is finished by ``Tuner.restore``.
The study is the same Optuna storage and results folder as the optuna backend's, read by ``autocompress pareto``.
Skips when Ray is not installed (``pip install 'autocompress[ray]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import write_tiny_spec

pytest.importorskip("ray.tune", reason="Ray Tune is not installed: pip install 'autocompress[ray]'")

CRASH_ONCE_PLUGIN = """
import os
from pathlib import Path
from autocompress import hookimpl
from autocompress.technique import Stage, Technique

MARKER = Path(MARKER_PATH)

class CrashOnce(Technique):
    name = "crash_once"
    stage = Stage.STRUCTURE
    def apply(self, model, *, params, ctx):
        if not MARKER.exists():      # the first trial to get here loses its worker process, once
            MARKER.write_text(str(os.getpid()))
            os._exit(1)
        return {}

@hookimpl
def register_techniques(register):
    register(CrashOnce())
"""

SLOW_PLUGIN = """
import time
from autocompress import hookimpl
from autocompress.technique import Stage, Technique

class Slow(Technique):
    name = "slow_noop"
    stage = Stage.TRAINING
    def training_hooks(self, model, *, params, ctx):
        time.sleep(4)
        return None

@hookimpl
def register_techniques(register):
    register(Slow())
"""

# A loopback test cluster: no token to distribute (Ray 2.5x+ enables token auth by default).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_log(path: Path, proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}):\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up in {timeout} s:\n{path.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node (2 CPUs) and a worker node (1 CPU) on 127.0.0.1, stopped (only these) afterwards."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    if not os.path.exists(ray_bin):
        ray_bin = shutil.which("ray") or pytest.skip("the ray command is not installed")
    root = Path(tempfile.mkdtemp(prefix="acray-"))  # short: Ray's socket paths must stay under 107 characters
    port = _free_port()
    env = {**os.environ, **RAY_ENV}
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        with open(root / "head.log", "w") as log:
            procs.append(subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2",
                                           "--include-dashboard=false", f"--temp-dir={root}", *common],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        _wait_log(root / "head.log", procs[0], "will now block forever")
        with open(root / "worker.log", "w") as log:
            procs.append(subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *common],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        _wait_log(root / "worker.log", procs[1], "will now block forever")
        yield f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):  # `ray start --block` stops the processes it started when terminated
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def env(tmp_path):
    return {**RAY_ENV, "AUTOCOMPRESS_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _trials(db: Path) -> list[dict]:
    con = sqlite3.connect(db, timeout=30)
    try:
        out = []
        for tid, number, state in con.execute("select trial_id, number, state from trials order by number"):
            user = {k: json.loads(v) for k, v in con.execute(
                "select key, value_json from trial_user_attributes where trial_id=?", (tid,))}
            out.append({"number": number, "state": state, "user": user})
        return out
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _cli(*args: str, cwd: Path, env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autocompress.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=timeout)


def test_trial_device_follows_rays_gpu_assignment():
    from autocompress.ray_backend import trial_device

    assert trial_device("auto", []) == "cpu"
    assert trial_device("auto", ["3"]) == "cuda"        # Ray's CUDA_VISIBLE_DEVICES makes its GPU cuda:0
    assert trial_device("cpu", ["0"]) == "cpu"           # an explicit device wins


def test_ray_cluster_runs_the_search_and_retries_a_dead_worker(tmp_path, tiny_model_dir, tiny_data_dir, env, ray_cluster):
    marker = tmp_path / "crashed-once"
    plugin = tmp_path / "crash_once.py"
    plugin.write_text(CRASH_ONCE_PLUGIN.replace("MARKER_PATH", repr(str(marker))))
    techniques = "  crash_once: {enabled: true}\n  quantization: {enabled: search}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=3, techniques=techniques)
    proc = _cli("search", str(spec), "--plugin", str(plugin), "--backend", "ray", "--ray-address", ray_cluster,
                "--cpus-per-trial", "1", "--max-concurrent", "2", "--max-failures", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = tmp_path / "results" / "tiny"
    rows = _trials(d / "study.db")
    states = [r["state"] for r in rows]
    assert states.count("COMPLETE") == 3 and not {"RUNNING", "WAITING"} & set(states), states
    assert marker.is_file()                                         # a worker process did die ...
    assert [r["user"].get("ray_failures") for r in rows if r["state"] == "COMPLETE"].count(1) == 1  # ... once, retried
    assert all("cpu" in r["user"]["device"] for r in rows if r["state"] == "COMPLETE")
    assert any((d / "ray").glob("tune-3/experiment_state-*.json"))  # Tune's experiment lives in the study folder
    front = _cli("pareto", "tiny", "--format", "json", cwd=tmp_path, env=env)
    assert front.returncode == 0, front.stderr
    pareto = json.loads((d / "pareto.json").read_text())
    assert json.loads(front.stdout) and pareto["front"]
    kept = [p for p in pareto["front"] if p.get("model_dir")]
    assert kept and all((d / p["model_dir"] / "model.safetensors").is_file() for p in kept)


def test_interrupted_ray_experiment_is_restored(tmp_path, tiny_model_dir, tiny_data_dir, env, ray_cluster):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN)
    techniques = "  slow_noop: {enabled: true}\n  quantization: {enabled: search}\n"
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=3, techniques=techniques)
    args = ["search", str(spec), "--plugin", str(plugin), "--backend", "ray", "--ray-address", ray_cluster,
            "--max-concurrent", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "autocompress.cli", *args], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "results" / "tiny" / "study.db"
    deadline = time.time() + 300
    while time.time() < deadline:
        states = [r["state"] for r in _trials(db)] if db.is_file() else []
        if states.count("COMPLETE") >= 1 and "RUNNING" in states:
            break
        if proc.poll() is not None:
            pytest.fail(f"search ended early ({proc.returncode}):\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the Ray search never had a finished and a running trial")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Resume with the same command" in stderr
    before = _trials(db)
    assert "RUNNING" not in {r["state"] for r in before}
    kept = {r["number"] for r in before if r["state"] == "COMPLETE"}
    again = _cli(*args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Restoring the Ray Tune experiment" in again.stderr
    after = _trials(db)
    complete = {r["number"] for r in after if r["state"] == "COMPLETE"}
    assert len(complete) == 3 and kept <= complete
    assert "RUNNING" not in {r["state"] for r in after}
