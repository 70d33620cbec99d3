"""Several processes on one Optuna study: shared storage, heartbeats, stale trials, no lost or duplicated trials.

Every process that runs trials (``--workers N`` on one machine, or separate ``autocompress search`` commands on
several machines pointed at one ``--storage`` URL) runs the same loop against Optuna's RDB storage:

- **Storage.** SQLite in the study folder on one machine (Optuna serialises writers; a busy writer waits up to
  60 s), PostgreSQL or MySQL through an Optuna storage URL across machines. Optuna 5's JournalStorage has no
  heartbeat, so it could not tell a killed worker from a slow one: it is not used.
- **Heartbeats.** A thread records the running trial's heartbeat every ``search.heartbeat_interval`` s. A RUNNING
  trial whose heartbeat is older than ``search.heartbeat_grace`` s lost its worker (``kill -9``, out of host
  memory, machine gone): any worker fails it and queues it again with the same parameters (Optuna's
  ``RetryHeartbeatStaleTrialCallback``), at most ``search.max_failures`` times; after that it is recorded as a
  failure that counts.
- **Exact totals.** A worker starts a trial only while finished + running trials stay below the total; two
  workers that ask at the same moment are ordered by trial number, and the later one is recorded as a skipped
  ``surplus`` trial (PRUNED, not counted). A seeded (``search.enqueue``) pipeline queued twice (two processes
  extending the grid at once) runs in its lowest-numbered copy only.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Mapping

from .errors import StudyError

_SQLALCHEMY_DRIVERS = {"postgresql": ("psycopg2", "postgres"), "mysql": ("pymysql", None)}


def redact(url: str) -> str:
    """A storage URL with its password hidden (for messages and logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: show the scheme only
        return url.split("://", 1)[0] + "://..."


def make_storage(url: str, spec: Any, *, writer: bool):
    """Optuna's RDB storage for ``url``; writers get heartbeats (stale-trial detection)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        # Readers (`autocompress pareto`/`show`, optuna-dashboard) and other workers hold the file briefly while
        # a trial is recorded; wait for them (sqlite's default is 5 s) rather than fail the write with "locked".
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if writer:
        kwargs.update(heartbeat_interval=spec.search.heartbeat_interval, grace_period=spec.search.heartbeat_grace)
        # Optuna warns that heartbeats are meant for Study.optimize: our ask/tell loop keeps them itself
        # (Heartbeat below) and fails stale trials itself (fail_stale_trials).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)
        # Heartbeats and the retry callback are marked experimental in Optuna; the warnings say nothing to a user.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return _create_rdb_storage(url, kwargs)
    except ImportError as exc:
        scheme = url.split(":", 1)[0].split("+")[0]
        driver, extra = _SQLALCHEMY_DRIVERS.get(scheme, (exc.name or "its driver", None))
        fix = f"pip install 'autocompress[{extra}]'" if extra else f"install the Python driver {driver}"
        raise StudyError(f"search.storage {redact(url)!r} needs the database driver {driver!r}, which is not "
                         f"installed ({exc}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors for bad URLs and unreachable servers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"cannot open the study storage search.storage={redact(url)!r}: {first}. Check the URL "
                         "(e.g. postgresql+psycopg2://USER@HOST:5432/DB), that the server runs and accepts this "
                         "machine, and the password (~/.pgpass keeps it out of the URL)") from None


def _create_rdb_storage(url: str, kwargs: dict[str, Any]):
    """RDBStorage, retried when processes starting together race to create Optuna's tables (PostgreSQL then
    fails one of them with a unique violation on its catalog; the second attempt finds the tables made)."""
    import random

    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())


def worker_label() -> str:
    """host:pid of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ----------------------------------------------------------------------------------------------------------
# Stale trials
# ----------------------------------------------------------------------------------------------------------


def record_stale(study: Any, trial: Any, *, why: str, max_failures: int) -> bool:
    """Fail a RUNNING ``trial`` (a FrozenTrial) whose worker is gone and queue it again with the same
    parameters, up to ``max_failures`` times; returns False when another worker got there first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage, tid = study._storage, trial._trial_id
    attempts = len(trial.system_attrs.get("retry_history", [])) + 1
    retry = attempts <= max_failures
    if retry:
        reason = (f"interrupted: {why}; queued again with the same parameters (attempt {attempts + 1} of at most "
                  f"{max_failures + 1})")
    else:
        reason = (f"{why}, on {attempts} attempt(s); not retried again (search.max_failures={max_failures}). "
                  "Killed by the OS for memory? Lower recovery.batch_size or run fewer workers")
    try:
        # Attributes first: a finished trial can no longer be changed.
        if retry:
            storage.set_trial_user_attr(tid, "interrupted", True)
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        if not storage.set_trial_state_values(tid, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False  # another worker recorded it already
    if retry:
        # The copy made from the trial as it was (no fail_reason/interrupted), with its params and user attrs
        # (so a seeded pipeline keeps its search.enqueue index); system attrs keep the retry history.
        RetryHeartbeatStaleTrialCallback(max_retry=max_failures)(study, trial)
    return True


def fail_stale_trials(study: Any, spec: Any, *, log: Callable[[str], None] | None = None) -> int:
    """Fail (and retry) every RUNNING trial whose heartbeat is older than the grace period."""
    storage = study._storage
    if not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return 0
    n = 0
    for tid in storage._get_stale_trial_ids(study._study_id):
        trial = storage.get_trial(tid)
        why = (f"its worker {trial.user_attrs.get('worker', '?')} sent no heartbeat for over "
               f"{spec.search.heartbeat_grace} s (killed or crashed mid-trial)")
        if record_stale(study, trial, why=why, max_failures=spec.search.max_failures):
            n += 1
            if log:
                log(f"trial {trial.number} is stale: {why}")
    return n


class Heartbeat:
    """Records the current trial's heartbeat from a daemon thread until :meth:`stop`."""

    def __init__(self, study: Any) -> None:
        self.storage = study._storage
        self.interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.trial_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, trial: Any) -> None:
        if not self.interval:
            return
        self.trial_id = trial._trial_id
        self.storage.record_heartbeat(self.trial_id)  # at once: a trial is never RUNNING without one for long
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="autocompress-heartbeat", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.trial_id is not None:
                    self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; only a long silence marks a trial stale
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ----------------------------------------------------------------------------------------------------------
# Turns: finished + running never exceeds the total
# ----------------------------------------------------------------------------------------------------------


def is_finished(t: Any) -> bool:
    """A trial that counts towards the total: complete, or failed for a reason of its own (an interrupted one
    is run again and does not count)."""
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))


def _counts(trials: list[Any]) -> tuple[int, int]:
    from optuna.trial import TrialState

    finished = sum(1 for t in trials if is_finished(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


def next_turn(study: Any, spec: Any, *, log: Callable[[str], None], poll: float | None = None,
              sleep: Callable[[float], None] = time.sleep) -> int | None:
    """Finished trials so far when this worker may start one more; None once the total is reached. Waits
    (``sleep``) while the trials running in other workers would complete the total (one of them may still
    fail as stale, and then its retry is this worker's to run)."""
    total = spec.search.total_trials
    poll = poll if poll is not None else min(2.0, float(spec.search.heartbeat_interval))
    said = False
    while True:
        fail_stale_trials(study, spec, log=log)
        finished, running = _counts(study.get_trials(deepcopy=False))
        if finished >= total:
            return None
        if finished + running < total:
            return finished
        if not said:
            log(f"{finished}/{total} finished; the rest are running in other workers: waiting for them")
            said = True
        sleep(poll)


def _counts_as_copy(t: Any) -> bool:
    from optuna.trial import TrialState

    if t.user_attrs.get("skipped") or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
        return False
    return t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL)


def skip_reason(study: Any, trial: Any, total: int) -> str | None:
    """Why the just-asked ``trial`` must not run (another copy of its seeded pipeline, or the total already
    taken by other workers' trials), or None."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    me = trial.number
    index = trial.user_attrs.get("enqueued")
    if index is not None:
        for t in trials:
            if t.number < me and t.user_attrs.get("enqueued") == index and _counts_as_copy(t):
                return f"duplicate: seeded pipeline search.enqueue[{index}] runs in trial {t.number}"
    finished, _ = _counts(trials)
    ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < me)
    if finished + ahead >= total:
        return f"surplus: other workers' trials already make up the requested {total}"
    return None


#: Proposals in a row that repeat a tried pipeline before one is run anyway (the space may be exhausted).
MAX_REPEATS_IN_A_ROW = 50


def repeat_of(study: Any, trial: Any, pipeline: Mapping[str, Any]) -> int | None:
    """The number of an earlier trial at the same fidelity that ran (or runs) exactly ``pipeline``, or None.
    Only sampled trials are checked: a seeded or promoted trial repeats a pipeline on purpose. A repeat would
    cost a full trial to learn nothing new (training is deterministic), and on small categorical spaces
    (quantization: 6 settings) samplers propose them often, so they are skipped and not counted."""
    attrs = trial.user_attrs
    if "enqueued" in attrs or "promoted_from" in attrs:
        return None
    from optuna.trial import TrialState

    fidelity = attrs.get("fidelity")
    for t in study.get_trials(deepcopy=False):
        # A failed pipeline may be proposed again: some failures (out of memory beside other jobs) are transient.
        if (t.number == trial.number or t.state not in (TrialState.COMPLETE, TrialState.RUNNING)
                or t.user_attrs.get("fidelity") != fidelity):
            continue
        if t.user_attrs.get("params") == pipeline:
            return t.number
    return None


def free_device_memory(device: str) -> None:
    """After a failed trial (CUDA out of memory above all), give the cached blocks back for the next one."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class results_lock:
    """Serialise rewriting the results folder between workers on this machine (flock; a no-op where there
    is none). Every file is rewritten whole from the storage, so the last writer leaves a complete folder."""

    def __init__(self, d: Any) -> None:
        self.path = os.path.join(str(d), ".results.lock")
        self.fh: Any = None

    def __enter__(self) -> "results_lock":
        try:
            import fcntl

            self.fh = open(self.path, "a")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            self.fh = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock
