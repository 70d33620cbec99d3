"""Per-component timing of a forward pass (part of :mod:`autocompress.profile`).

Forward pre/post hooks on the few modules that bound components record a timestamp (``perf_counter`` on
CPU; CUDA events on GPU, read after one synchronise per pass). Each timed module's *exclusive* time (its
own time minus that of the timed modules inside it) goes to its component: the attention core is the
self-attention module minus its Q/K/V projections, the embeddings are the embedding module minus its
LayerNorm, and whatever runs outside every timed module (masks, the encoder loop, residual adds between
sublayers, token selection) is ``other``. So the parts add up to the hooked forward time, which is
compared with the same model timed without hooks: every batch runs unhooked and hooked back to back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from .profile import _Positions, _unique_modules, classify, is_norm

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded


def timing_nodes(model: "nn.Module") -> list[tuple[str, "nn.Module", str]]:
    """``(path, module, component)`` of the modules timed: each module whose component differs from its
    parent's (its exclusive time is that component's), e.g. ``attention.self`` (core) and its Q/K/V, but
    not the Linear inside ``attention.output``. The root is timed too (its exclusive time is ``other``)."""
    comps = {path: classify(path, norm=is_norm(m)) for path, m in _unique_modules(model)}
    nodes = [("", model, "other")]
    for path, module in _unique_modules(model):
        parent = path.rpartition(".")[0]
        if comps[path] != "other" and comps[path] != comps.get(parent, "other"):
            nodes.append((path, module, comps[path]))
    return nodes


class _Clock:
    """Timestamps: ``perf_counter`` on CPU; CUDA events on GPU (read after one synchronise per pass, so
    timing does not serialise the kernel queue at every module)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def mark(self) -> Any:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1000.0


class _Recorder:
    """Forward hooks on the timing nodes recording (component, scope, start, end, parent) per call. Hooks are
    attached only around hooked forwards (:meth:`attached`), so unhooked forwards in between run plain."""

    def __init__(self, model: "nn.Module", device: str) -> None:
        self.model = model
        self.clock = _Clock(device)
        self.nodes = timing_nodes(model)
        self.calls: list[list[Any]] = []  # [component, scope, start, end, parent index]
        self.stack: list[int] = []

    def attach(self) -> list[Any]:
        positions = _Positions(self.model)
        handles: list[Any] = list(positions.handles)
        for path, module, component in self.nodes:
            handles.append(module.register_forward_pre_hook(self._pre(path, component, positions)))
            handles.append(module.register_forward_hook(self._post))
        return handles

    def _pre(self, path: str, component: str, positions: _Positions) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            parent = self.stack[-1] if self.stack else -1
            self.stack.append(len(self.calls))
            self.calls.append([component, positions.scope(path), self.clock.mark(), None, parent])
        return hook

    def _post(self, *_: Any) -> None:
        self.calls[self.stack.pop()][3] = self.clock.mark()

    def take_ms(self) -> dict[tuple[str, str], float]:
        """Exclusive time per (scope, component) of every call recorded since the last take; then forget them."""
        self.clock.sync()
        inclusive = [self.clock.ms(c[2], c[3]) for c in self.calls]
        exclusive = list(inclusive)
        for i, c in enumerate(self.calls):
            if c[4] >= 0:
                exclusive[c[4]] -= inclusive[i]
        out: dict[tuple[str, str], float] = {}
        for c, ms in zip(self.calls, exclusive):
            out[(c[1], c[0])] = out.get((c[1], c[0]), 0.0) + ms
        self.calls, self.stack = [], []
        return out


def time_components(model: "nn.Module", enc: "Encoded", *, batch_size: int, device: str = "cpu", warmup: int = 1,
                    repeats: int = 5, pad_token_id: int = 0) -> dict[str, Any]:
    """Passes over ``enc`` at ``batch_size`` in which every batch runs twice, back to back: without hooks,
    timed by :func:`autocompress.measure.latency_ms_per_example` exactly as the study times latency, then
    with hooks. A slow spell on a shared machine so hits both alike. Returns, per pass, the whole-model
    time and the hooked total (ms per example), and the parts by (scope, component) of the pass with the
    median hooked total (so the parts add up to it)."""
    import torch

    from .data import Encoded, batches
    from .measure import latency_ms_per_example

    n = len(enc)
    chunks = []
    for start in range(0, n, batch_size):
        sub = Encoded(enc.input_ids[start:start + batch_size], None if enc.token_type_ids is None else
                      enc.token_type_ids[start:start + batch_size], enc.labels[start:start + batch_size], 0)
        batch = next(batches(sub, batch_size=batch_size, device=device, pad_token_id=pad_token_id))
        chunks.append((sub, {k: v for k, v in batch.items() if k != "labels"}))
    recorder = _Recorder(model, device)
    model.eval()
    whole, passes = [], []
    for i in range(warmup + repeats):
        plain, parts = 0.0, {}
        for sub, batch in chunks:
            plain += latency_ms_per_example(model, sub, batch_size=batch_size, device=device, warmup=0, repeats=1,
                                            pad_token_id=pad_token_id)["median"] * len(sub)
            handles = recorder.attach()
            try:
                with torch.inference_mode():
                    model(**batch)
            finally:
                for h in handles:
                    h.remove()
            for key, ms in recorder.take_ms().items():
                parts[key] = parts.get(key, 0.0) + ms
        if i >= warmup:
            whole.append(plain / n)
            passes.append({k: v / n for k, v in parts.items()})
    totals = [sum(p.values()) for p in passes]
    middle = sorted(range(len(passes)), key=lambda i: totals[i])[(len(passes) - 1) // 2]
    return {"parts": passes[middle], "hooked_totals": totals, "whole_model": whole}
