"""``autocompress search SPEC --workers N``: N processes on this machine share one study.

The command's own process sets the study up (storage, seeded pipelines, the fine-tuned baseline, measured
once), then starts N workers: fresh Python processes (``python -m autocompress.workers``), each running the
same trial loop as a one-process search (:func:`search.run_search`) against the study's storage. Optuna's
storage is the only thing they share; :mod:`parallel` keeps the total exact and detects dead workers.

Devices: with CUDA, one GPU per worker (``cuda:0``, ``cuda:1``, ...; round robin when there are more workers
than GPUs); on CPU, the cores are split (``cores // N`` threads each, unless ``measurement.threads`` is set).
Latency is measured where the trial ran and recorded with it. On CPU the workers share the machine, so each
trial's latency is timed while other workers train: noisier than a one-process search (the report says so).

Ctrl-C / SIGTERM reach every worker (each records its running trial as interrupted); run the same command
again to resume. A worker killed outright (``kill -9``, the OOM killer) is not restarted: the others go on,
and its trial is failed as stale once its heartbeat is ``search.heartbeat_grace`` s old, then retried.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import AutocompressError, StudyError

PAYLOAD_ENV = "AUTOCOMPRESS_WORKER_PAYLOAD"
# Set in every worker's environment: the command that started it (a study lock must let its workers in).
WORKER_OF_ENV = "AUTOCOMPRESS_WORKER_OF"


@dataclass
class WorkerRole:
    """One worker's share of the machine."""

    index: int
    count: int
    device: str
    threads: int
    parent_pid: int | None = None

    def parent_alive(self) -> bool:
        """False once the command that started this worker is gone (then it stops after its trial)."""
        return self.parent_pid is None or os.getppid() == self.parent_pid


def plan_workers(spec: Any, *, log: Callable[[str], None] | None = None) -> list[WorkerRole]:
    """A device and a thread count for each of ``search.workers`` workers."""
    import torch

    from .modeling import pick_device

    n = spec.search.workers
    requested = spec.measurement.device
    threads = spec.measurement.threads or max(1, (os.cpu_count() or 1) // n)
    device = pick_device(requested)  # validates the request (cuda asked without CUDA -> clear error)
    if requested in ("auto", "cuda") and device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        devices = [f"cuda:{i % gpus}" for i in range(n)]
        if n > gpus and log:
            log(f"{n} workers on {gpus} GPU(s): some GPUs run two trials at once, and their latencies are timed "
                f"under that contention; use --workers {gpus} for clean GPU timings")
    else:
        devices = [device] * n  # cpu, or one explicit cuda:N that every worker shares
    return [WorkerRole(i, n, devices[i], threads, os.getpid()) for i in range(n)]


def _plugins(registry: Any) -> list[str]:
    """The --plugin modules of this command, for the workers to load too."""
    seen: dict[str, None] = {}
    for rt in registry.techniques.values():
        if rt.source == "--plugin":
            seen[rt.plugin] = None
    return list(seen)


def run_workers(spec: Any, roles: list[WorkerRole], *, registry: Any, d: Path, study: Any,
                results_dir: str | Path, command: str, log: Callable[[str], None]) -> Path:
    """Start the workers, wait for them, then write the results; Ctrl-C stops them all cleanly."""
    from .results import write_results
    from .search import StudyInterrupted, finished_count

    base = {"spec": spec.model_dump(mode="json"), "plugins": _plugins(registry),
            "results_dir": str(Path(results_dir).resolve()), "command": command}
    procs: list[subprocess.Popen] = []
    for role in roles:
        env = {**os.environ, PAYLOAD_ENV: json.dumps({**base, "role": asdict(role)}), WORKER_OF_ENV: str(os.getpid())}
        # A session of its own: a terminal's Ctrl-C reaches this process only, which forwards it once.
        procs.append(subprocess.Popen([sys.executable, "-m", "autocompress.workers"], env=env,
                                      start_new_session=True))
    log(f"Started {len(procs)} workers on one study: " + ", ".join(
        f"#{r.index} pid {p.pid} ({r.device}, {r.threads} thread{'s' if r.threads > 1 else ''})"
        for r, p in zip(roles, procs)))
    if roles[0].device == "cpu" and len(roles) > 1:
        log("Workers share this machine's CPU: each trial's latency is timed while other workers train, so it "
            "is noisier than with one worker")
    try:
        codes = _wait(procs, spec, log)
    except KeyboardInterrupt:
        log("Stopping the workers; each records its running trial as interrupted")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _wait(procs, spec, log, deadline=time.monotonic() + 120)
        write_results(d, study=study, spec=spec)
        raise StudyInterrupted(finished_count(study), spec.search.trials, command) from None
    write_results(d, study=study, spec=spec)
    done = finished_count(study)
    if done < spec.search.trials:
        raise StudyError(f"the workers stopped with {done}/{spec.search.trials} trials finished (exit codes "
                         f"{codes}); see their messages above, then run the same command again to resume:\n  {command}")
    return d


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _wait(procs: list[subprocess.Popen], spec: Any, log: Callable[[str], None],
          deadline: float | None = None) -> list[int | None]:
    """Wait for every worker (killing the rest at ``deadline``); report each one that fails."""
    reported: set[int] = set()
    while True:
        for i, p in enumerate(procs):
            code = p.poll()
            if code not in (None, 0, 130) and i not in reported:
                reported.add(i)
                log(f"worker #{i} (pid {p.pid}) {_describe_exit(code)}; the others go on, and its running trial "
                    f"is retried once its heartbeat is {spec.search.heartbeat_grace} s old")
        if all(p.poll() is not None for p in procs):
            return [p.returncode for p in procs]
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)


def main() -> None:
    """A worker process: the payload (spec, plugins, role) comes from the starting command's environment."""
    from .cli import _terminate
    from .registry import load_registry
    from .search import StudyInterrupted, run_search
    from .spec import load_spec

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    payload = json.loads(os.environ.pop(PAYLOAD_ENV))
    role = WorkerRole(**payload["role"])

    def log(message: str) -> None:
        print(f"[worker {role.index}] {message}", file=sys.stderr, flush=True)

    registry = load_registry(extra_plugins=payload["plugins"])
    for plugin, reason in registry.load_errors:
        log(f"warning: plugin {plugin!r} was not loaded: {reason}")
    try:
        spec = load_spec(data=payload["spec"])
        run_search(spec, registry=registry, results_dir=payload["results_dir"], command=payload["command"],
                   log=log, worker=role)
    except (StudyInterrupted, KeyboardInterrupt):
        sys.exit(130)
    except AutocompressError as exc:
        log(f"error: {exc}")
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
