"""Workers on several machines share a study through PostgreSQL: a real server, started by the test on loopback.

The server is Debian's ``postgresql`` package (``initdb``/``pg_ctl``), run in a temporary directory on a free
port; the driver is ``psycopg2`` (``pip install 'autocompress[postgres]'``). The test skips, saying which,
when either is missing. Two ``autocompress search`` processes with separate results folders and caches (as
on two machines) run one study to its total: no lost, duplicated or stuck trials, and seeded pipelines run
once although both processes queue them.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import write_tiny_spec


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install 'autocompress[postgres]'")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package "
                    "(apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root and runuser (util-linux) is missing to start PostgreSQL as 'postgres'")
        as_user = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="autocompress-pg-"))
    data = root / "data"
    if as_user:
        shutil.chown(root, "postgres")
    port = _free_port()
    log = root / "server.log"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "autocompress", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-p {port} -h 127.0.0.1 -k {root}", "start"], check=True, capture_output=True, timeout=90)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc}: {detail.decode(errors='replace')[-500:]}")
    try:
        con = psycopg2.connect(host="127.0.0.1", port=port, user="autocompress", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE study")
        con.close()
        yield f"postgresql+psycopg2://autocompress@127.0.0.1:{port}/study"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _trials(url: str, study: str) -> list[dict]:
    import optuna

    loaded = optuna.load_study(study_name=study, storage=url)
    return [{"number": t.number, "state": t.state.name, "user": t.user_attrs, "params": t.params}
            for t in loaded.get_trials(deepcopy=False)]


def test_two_machines_share_a_postgresql_study(tmp_path, tiny_model_dir, tiny_data_dir, postgres_url):
    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=6)
    text = spec.read_text()
    spec.write_text(text[: text.index("search:")] + (
        "search:\n  trials: 6\n  sampler: random\n  enqueue:\n"
        "    - {head_pruning: {fraction: 0.5}}\n"
        "    - {quantization: {}}\n"))
    procs = []
    for machine in ("a", "b"):  # separate results folders and caches, as on two machines
        env = {**os.environ, "AUTOCOMPRESS_CACHE": str(tmp_path / f"cache-{machine}")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "autocompress.cli", "search", str(spec), "--storage", postgres_url,
             "--results-dir", str(tmp_path / f"results-{machine}")],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 400
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=max(10, deadline - time.time()))
        outs.append(err)
        assert p.returncode == 0, err[-3000:]
    rows = _trials(postgres_url, "tiny")
    states = [r["state"] for r in rows]
    assert states.count("COMPLETE") == 6, states
    assert not {"RUNNING", "WAITING"} & set(states)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    for index in range(2):  # both processes queued the seeded pipelines; each ran once
        assert sum(r["user"].get("enqueued") == index for r in done) == 1
    # The machines' samplers are seeded differently: no continuous value is proposed twice. (Whole parameter
    # sets may coincide by chance when they are all categorical, as in any random search.)
    fractions = [r["params"]["head_pruning.fraction"] for r in done
                 if "enqueued" not in r["user"] and "head_pruning.fraction" in r["params"]]
    assert len(fractions) == len(set(fractions)), fractions
    assert len({r["user"]["worker"].rsplit(":", 1)[1] for r in done}) == 2   # both machines ran trials
    # Either machine's results folder shows the whole study.
    front = subprocess.run([sys.executable, "-m", "autocompress.cli", "pareto", "tiny", "--format", "json",
                            "--results-dir", str(tmp_path / "results-a")], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "AUTOCOMPRESS_CACHE": str(tmp_path / "cache-a")})
    assert front.returncode == 0, front.stderr
    assert json.loads(front.stdout)
    trials_json = json.loads((tmp_path / "results-a" / "tiny" / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials_json].count("COMPLETE") == 6
