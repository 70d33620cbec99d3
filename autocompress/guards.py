"""Guards that turn a user's mistake or a machine's limit into a clear error before work is lost.

Each check runs before the expensive part it protects (data, baseline fine-tuning, trials) and raises an
:class:`~autocompress.errors.AutocompressError` whose message says what is wrong, where, and the fix:

* one search process per study folder (a lock file held while ``autocompress search`` runs);
* enough free disk for the results folder and the cache;
* every enabled technique supports the model's architecture, and a model that needs its own code is never
  run unless the spec says ``model.trust_remote_code: true``;
* a trial that ran out of memory fails with the fix in its reason (:mod:`objective` records it and gives
  the memory back); a full or read-only disk stops the search instead of failing every later trial;
* a search that finished with no trial meeting the constraints says which constraint and by how much;
* an unexpected exception prints one line and saves its traceback (never the locals) to a file.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ModelError, StudyError

if TYPE_CHECKING:
    from .registry import Registry
    from .space import SearchSpace
    from .spec import Spec

LOCK_FILE = ".search.lock"
# "0"/"off" skips the lock: for worker processes started by a search that already holds it.
LOCK_ENV = "AUTOCOMPRESS_STUDY_LOCK"
DEBUG_ENV = "AUTOCOMPRESS_DEBUG"  # "1": unexpected exceptions show their traceback instead of a file path
MIN_FREE_BYTES = 64 * 2**20  # below this the baseline cache or the first trial's model cannot be written
FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]+@")


# ---------------------------------------------------------------------------------------------- study lock


class StudyLock:
    """An exclusive ``flock`` on ``<study>/.search.lock``, released when this object goes away (the search
    returns or raises) or the process dies (the kernel drops the lock, so ``kill -9`` never leaves it)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            import fcntl

            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the kernel releases it anyway
            pass


_held: dict[str, "weakref.ref[StudyLock]"] = {}


def hold_study_lock(d: Path, spec: "Spec") -> StudyLock | None:
    """Refuse to run a study that another ``autocompress search`` process is running in the same folder.

    Only the default storage (SQLite in the study folder) is locked: a ``search.storage`` URL is shared on
    purpose. The same process may take it again (re-entrant), and ``AUTOCOMPRESS_STUDY_LOCK=0`` skips it for
    worker processes whose parent holds it. Keep the returned object alive while the search runs.
    """
    if spec.search.storage is not None or os.environ.get(LOCK_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return None
    path = d / LOCK_FILE
    key = str(path.resolve())
    mine = _held.get(key, lambda: None)()
    if mine is not None and mine.fd >= 0:
        return mine
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None  # a filesystem without locks (some network mounts): run unlocked, as before
        raise StudyError(
            f"study {spec.study!r} is already being searched by {holder} (lock {str(path)!r}). Two searches "
            "writing one study folder would mark each other's running trials as interrupted and overshoot the "
            "total. Wait for it to finish or stop it (Ctrl-C), then run the same command again to resume; or "
            "give this run another study name (--set study=NEW)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    lock = StudyLock(path, fd)
    _held[key] = weakref.ref(lock)
    return lock


# ---------------------------------------------------------------------------------------------- disk space


def _free_bytes(path: Path) -> int:
    import shutil

    p = Path(path).resolve()
    while not p.exists() and p != p.parent:  # the cache may not exist yet: ask the disk it will be on
        p = p.parent
    return shutil.disk_usage(p).free


def _model_bytes(spec: "Spec") -> int:
    p = Path(spec.model.name).expanduser()
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


def check_free_space(d: Path, spec: "Spec") -> None:
    """Fail before any work when the results folder's or the cache's disk cannot hold a baseline and a few
    trial models (a full disk mid-search would fail trial after trial)."""
    from .data import cache_root

    need = max(MIN_FREE_BYTES, 3 * _model_bytes(spec))
    for where, path, fix in (("results folder", d, "pass --results-dir on a disk with room"),
                             ("cache", cache_root(), "set AUTOCOMPRESS_CACHE to a folder on a disk with room")):
        free = _free_bytes(path)
        if free < need:
            raise StudyError(f"not enough disk space: {free / 1e6:.0f} MB free for the {where} {str(path)!r}, a search "
                             f"needs at least {need / 1e6:.0f} MB (baseline and trial models). Free some space, or "
                             f"{fix}.")


# ---------------------------------------------------------------------------------------------- model checks


def check_model(spec: "Spec", registry: "Registry", space: "SearchSpace") -> None:
    """Before data loading and fine-tuning: refuse a model that needs its own code unless the spec trusts it,
    and an architecture that an enabled technique does not support (naming the technique and why).

    The architecture is built from a local folder's ``config.json`` on PyTorch's meta device (no weights, no
    memory). For a hub id, or a config that cannot be read here, this check steps aside: loading the model
    reports the problem, and the search checks support again on the loaded baseline.
    """
    import json

    from .modeling import CONFIG_FILE, resolve_model_path

    path = resolve_model_path(spec.model.name)
    cfg_file = Path(path) / CONFIG_FILE
    if cfg_file.is_file() and not spec.model.trust_remote_code:
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = None
        if isinstance(cfg, dict) and cfg.get("auto_map") and not _known_model_type(cfg.get("model_type")):
            raise ModelError(
                f"model.name {spec.model.name!r} needs its own Python code (config.json has auto_map "
                f"{sorted(cfg['auto_map'])} and model_type {cfg.get('model_type')!r}, which transformers does not "
                "know). autocompress never runs code shipped with a model unless the spec says so: set "
                "model.trust_remote_code: true only if you trust the code in that folder, or use a standard "
                "architecture such as BERT."
            )
    if not Path(path).is_dir():
        return  # a hub id: fetching its config here would wait on the network twice when offline
    try:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(path, num_labels=2, trust_remote_code=spec.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config,
                                                                   trust_remote_code=spec.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - loading the real model later reports it with the full message
        return
    device = "cpu" if spec.measurement.device == "auto" else spec.measurement.device
    arch = type(model).__name__
    for ts in space.active():
        tech = ts.technique
        try:
            reason = tech.supports(model, device=device)
        except Exception:  # noqa: BLE001 - a plugin that cannot judge a weightless model: checked again later
            continue
        if reason:
            raise ModelError(
                f"technique {tech.name!r} does not support model.name {spec.model.name!r} ({arch}): {reason}. "
                f"Set techniques.{tech.name}.enabled: false, or use a BERT-style model."
            )


def _known_model_type(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


# ---------------------------------------------------------------------------------------------- trial failures


def is_out_of_memory(exc: BaseException) -> bool:
    """Host ``MemoryError``, ``torch.OutOfMemoryError``, or an older torch's RuntimeError saying so."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def fatal_cause(exc: BaseException | None) -> OSError | None:
    """The full disk, quota or read-only filesystem error in ``exc``'s chain: every later trial would fail
    the same way. None for anything else."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def stop_if_fatal(exc: BaseException) -> None:
    """Raise a :class:`StudyError` that stops the search when ``exc`` is a full or read-only disk: recorded as
    a failure, it would be followed by every later trial failing the same way. The trial stays unfinished, so
    the next run retries it (see :func:`search.mark_stale_running`)."""
    err = fatal_cause(exc)
    if err is None:
        return
    raise StudyError(f"{_disk_problem(err)}; the search stopped so that later trials do not fail the same way. "
                     f"Finished trials are saved. {DISK_FIX}, then run the same command again to resume.") from exc


def _disk_problem(err: OSError) -> str:
    where = f" writing {err.filename!r}" if getattr(err, "filename", None) else ""
    return f"the disk is full or read-only{where} ({err.strerror})"


DISK_FIX = "Free some space (or pass --results-dir / set AUTOCOMPRESS_CACHE to a disk with room)"
OOM_FIX = ("Lower recovery.batch_size, model.max_length or the largest of measurement.batch_sizes, or narrow the "
           "technique settings that grow the model")


# ---------------------------------------------------------------------------------------------- resume, results


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...], limit: int = 6) -> list[str]:
    """``key.path: old -> new`` for every leaf that differs under ``keys`` (at most ``limit``)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(dict.fromkeys([*a, *b])):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif a != b:
            out.append(f"{path}: {_short(a)} -> {_short(b)}")

    for key in keys:
        walk(old.get(key), new.get(key), key)
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def discard_if_unstarted(spec: "Spec", d: Path) -> bool:
    """True when the study in ``d`` never started a trial nor measured its baseline (a first run that stopped
    on bad data or a missing model), after deleting it from its storage: a corrected spec then starts afresh
    instead of being refused as a changed search space. False (nothing touched) otherwise."""
    import optuna
    from optuna.trial import TrialState

    from .errors import AutocompressError
    from .search import open_study

    try:
        study = open_study(spec, d, create=False)
    except AutocompressError:
        return True  # the storage has no such study
    if "baseline" in study.user_attrs or any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return False
    optuna.delete_study(study_name=spec.study, storage=study._storage)  # queued search.enqueue pipelines too
    return True


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def infeasible_message(rows: list[Mapping[str, Any]], baseline: Mapping[str, Any], spec: "Spec") -> str | None:
    """When constraints are set and no completed trial meets them: each constraint, how many trials met it,
    the closest any trial came, and the fix; None otherwise."""
    from .search import constraint_values

    done = [r for r in rows if r.get("state") == "COMPLETE" and r.get("metrics")]
    if not done or not baseline or any(r.get("feasible") for r in done):
        return None
    slack: dict[str, list[float]] = {}
    for r in done:
        for key, value in constraint_values(r["metrics"], baseline, spec).items():
            slack.setdefault(key, []).append(value)
    if not slack:
        return None
    units = {"max_accuracy_drop": "accuracy points", "max_latency_ms": "ms/example", "max_size_mb": "MB"}
    parts = []
    for key, values in slack.items():
        best, met = min(values), sum(1 for v in values if v <= 0)
        parts.append(f"constraints.{key}={getattr(spec.constraints, key):g} {units.get(key, '')}: met by {met} of "
                     f"{len(done)}, the closest trial {'within' if best <= 0 else 'over by'} {abs(best):.3g}")
    return (f"no completed trial meets all the constraints, so the Pareto front is empty ({'; '.join(parts)}). "
            f"Every trial is saved: 'autocompress table {spec.study}' lists them all and 'autocompress export "
            f"{spec.study} --trial N' exports one. To search again with looser constraints or more recovery.steps, "
            "give it a new study name (--set study=NEW).")


# ---------------------------------------------------------------------------------------------- top level


def redact(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:PASSWORD@host``) before anything is printed."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def unexpected_error(exc: BaseException) -> tuple[str, int]:
    """The message and exit code for an exception nobody raised on purpose: out of memory and a full disk
    get their fix; anything else is a bug, whose traceback (no locals) goes to a file named in the message."""
    import tempfile
    import traceback

    if is_out_of_memory(exc):
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"out of memory ({type(exc).__name__}: {first}). Lower baseline.batch_size, recovery.batch_size or "
                "model.max_length, or set measurement.device: cpu", 2)
    disk = fatal_cause(exc)
    if disk is not None:
        return f"{_disk_problem(disk)}. {DISK_FIX}, then run the same command again.", 2
    text = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    saved = ""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="autocompress-error-", suffix=".txt", delete=False) as fh:
            fh.write(text)
        saved = f" The traceback is in {fh.name};"
    except OSError:
        saved = " Run again with AUTOCOMPRESS_DEBUG=1 to see the traceback;"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"unexpected {type(exc).__name__}: {redact(first)}.{saved} please report it (a bug in autocompress or "
            "in a plugin).", 1)
