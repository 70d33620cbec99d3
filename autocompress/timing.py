"""Where a trial's time goes: the wall time spent in model compute (forward passes, backward, optimiser
step) against the trial's wall time, so the engine's own overhead (copying, saving, counting FLOPs, data
batching, Python between the steps) is measured rather than guessed (``metrics["compute_seconds"]``).

Forward passes are timed with a pre/post hook pair on the *root* modules a trial watches (the compressed
model and the teacher), so every call counts whoever makes it (training, evaluation, latency timing, a
technique's importance pass), and nested calls count once. Backward and the optimiser step are added by
:func:`autocompress.train.fine_tune` through :func:`add_compute`. On CUDA the hooks synchronise, so the
time is the device's; that synchronisation is itself part of what a trial costs.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Any, Iterator

_current: contextvars.ContextVar["ComputeClock | None"] = contextvars.ContextVar("autocompress_clock", default=None)


class ComputeClock:
    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles: list[Any] = []

    def watch(self, *models: Any) -> None:
        for m in models:
            if m is not None:
                self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]

    def _sync(self, module: Any) -> None:
        import torch

        p = next(module.parameters(), None)
        if p is not None and p.device.type == "cuda":
            torch.cuda.synchronize(p.device)

    def _pre(self, module: Any, args: Any) -> None:
        if self._depth == 0:
            self._sync(module)
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._sync(module)
            self.seconds += time.perf_counter() - self._start

    def add(self, seconds: float) -> None:
        self.seconds += float(seconds)

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Forward passes in the block are bookkeeping, not compute (FLOP counting runs the model under a
        counter that is far slower than the model itself)."""
        before = self.seconds
        try:
            yield
        finally:
            self.seconds = before

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0


@contextlib.contextmanager
def compute_clock(*models: Any) -> Iterator[ComputeClock]:
    """Time compute of ``models`` (and what :func:`add_compute` reports) inside the block."""
    clock = ComputeClock()
    clock.watch(*models)
    token = _current.set(clock)
    try:
        yield clock
    finally:
        _current.reset(token)
        clock.close()


def excluded() -> Any:
    """:meth:`ComputeClock.excluded` of the active clock (a no-op without one)."""
    clock = _current.get()
    return clock.excluded() if clock is not None else contextlib.nullcontext()


def add_compute(seconds: float) -> None:
    """Credit compute time measured outside a forward pass (backward, optimiser step) to the active clock."""
    clock = _current.get()
    if clock is not None:
        clock.add(seconds)
