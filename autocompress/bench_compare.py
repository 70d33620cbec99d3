"""Does the benchmark reproduce? Two runs of ``autocompress bench`` (two ``summary.json``) compared figure by
figure: every target's measured value, every front's hypervolume, the baseline and the peers, and each front
point that both runs found (same front, same trial number, same parameters).

Pure functions over the two summaries (:func:`compare_summaries`) and a Markdown rendering
(:func:`comparison_markdown`); the CLI's ``bench-compare`` reads the files and writes the report. Noise is
not assumed: it is read from the runs themselves, as the spread of the fp32 baseline's latency measured
repeatedly within them (``reproducibility`` in each summary) and as the change between the runs of every
model that is the same in both (the baseline and the peers, also in the final timing), so "within noise" means
a latency that moved no more than an unchanged model moved between measurements.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping, Sequence

from .bench import spread
from .bench_report import _num

LATENCIES = ("latency_bs32", "latency_bs1")
FIGURES = ("eval_accuracy", *LATENCIES, "size_mb")
_BASELINE_SPREAD = "fp32 baseline"  # prefix of the baseline's entry in a summary's ``reproducibility``

Summary = Mapping[str, Any]


def change(a: Any, b: Any) -> dict[str, Any]:
    """``a`` and ``b`` with their difference and the difference relative to ``a`` (percent)."""
    x, y = _num(a), _num(b)
    delta = y - x if x is not None and y is not None else None
    rel = delta / abs(x) * 100 if delta is not None and x else None
    return {"a": x, "b": y, "delta": delta, "rel_pct": rel}


def _peer_medians(s: Summary, key: str) -> dict[str, float]:
    """Each peer's ``key`` in run ``s``, at search time and in the final timing: models that are the same in
    every run (all derived from the cached baseline), so any change between runs is the machine's."""
    out: dict[str, float] = {}
    for name, peer in (s.get("peers") or {}).items():
        if isinstance(peer, Mapping):
            if (v := _num(peer.get(key))) is not None:
                out[name] = v
            if (v := _num((peer.get("final") or {}).get(key))) is not None:
                out[f"{name} (final timing)"] = v
    return out


def noise_pct(*summaries: Summary, key: str = "latency_bs32") -> float | None:
    """How far an unchanged model's latency moved on this machine, in percent: the largest of the fp32
    baseline's spread within any run, its median's change between runs, and the change between runs of each
    peer (at search time and in the final timing, where the targets are read). The final timing's peers are
    included because a whole phase can run slow: in the session-20 rerun every peer's final timing was 8-12%
    slower at bs32 while the baseline's repeated timings agreed within 3.5%."""
    spreads, medians = [], []
    for s in summaries:
        for name, figs in (s.get("reproducibility") or {}).items():
            if name.startswith(_BASELINE_SPREAD) and isinstance(figs, Mapping):
                fig = figs.get(key) or {}
                if (v := _num(fig.get("spread_pct"))) is not None:
                    spreads.append(v)
                if (m := _num(fig.get("median"))) is not None:
                    medians.append(m)
    if not spreads:
        return None
    peers = [_peer_medians(s, key) for s in summaries]
    moved = [medians, *([p[name] for p in peers if name in p] for name in set().union(*peers))]
    # spread_pct is (max - min) / median: the change between the runs of one unchanged model
    return max(max(spreads), *(spread(v).get("spread_pct") or 0.0 for v in moved))


def _point_key(p: Mapping[str, Any]) -> tuple[Any, str]:
    return p.get("trial"), str(p.get("params", ""))


def match_points(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Front points of one front in both runs, matched on (trial number, parameters): the same pipeline. Returns
    ``matched`` (pairs, each with the :func:`change` of every figure) and the labels found by one run only."""
    by_b = {_point_key(p): p for p in b}
    keys_a = {_point_key(p) for p in a}
    matched = []
    for p in a:
        q = by_b.get(_point_key(p))
        if q is not None:
            matched.append({"label": p.get("label"), **{k: change(p.get(k), q.get(k)) for k in FIGURES}})
    return {"matched": matched,
            "only_a": [p.get("label") for p in a if _point_key(p) not in by_b],
            "only_b": [q.get("label") for q in b if _point_key(q) not in keys_a]}


def _abs_rel(rows: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    return [abs(v) for r in rows if (v := _num((r.get(key) or {}).get("rel_pct"))) is not None]


def compare_summaries(a: Summary, b: Summary) -> dict[str, Any]:
    """Every figure of run ``a`` next to run ``b``. Accuracy changes are in points (percentage points of held-out
    accuracy); latency and size changes in percent of ``a``."""
    targets = []
    by_name = {t.get("target"): t for t in b.get("targets") or []}
    for t in a.get("targets") or []:
        u = by_name.get(t.get("target"), {})
        targets.append({"target": t.get("target"), "goal": t.get("goal"), **change(t.get("measured"), u.get("measured")),
                        "met_a": t.get("met"), "met_b": u.get("met"), "point_a": t.get("point"), "point_b": u.get("point")})
    hv_a, hv_b = a.get("hypervolume") or {}, b.get("hypervolume") or {}
    hypervolume = {k: change(hv_a.get(k), hv_b.get(k)) for k in dict.fromkeys([*hv_a, *hv_b])}
    base = {k: change((a.get("baseline") or {}).get(k), (b.get("baseline") or {}).get(k)) for k in FIGURES}
    pa, pb = a.get("peers") or {}, b.get("peers") or {}
    peers = {n: {k: change((pa.get(n) or {}).get(k), (pb.get(n) or {}).get(k)) for k in FIGURES}
             for n in dict.fromkeys([*pa, *pb])}
    for n in [n for n in dict.fromkeys([*pa, *pb]) if (pa.get(n) or {}).get("final") or (pb.get(n) or {}).get("final")]:
        fa_, fb_ = (pa.get(n) or {}).get("final") or {}, (pb.get(n) or {}).get("final") or {}
        peers[f"{n} (final timing)"] = {k: change(fa_.get(k), fb_.get(k)) for k in FIGURES}
    fa, fb = a.get("fronts") or {}, b.get("fronts") or {}
    fronts = {n: match_points(fa.get(n) or [], fb.get(n) or []) for n in dict.fromkeys([*fa, *fb])}
    pairs = [m for f in fronts.values() for m in f["matched"]]
    acc = [d for m in pairs if (d := _num(m["eval_accuracy"]["delta"])) is not None]
    points = {"matched": len(pairs),
              "only_a": sum(len(f["only_a"]) for f in fronts.values()),
              "only_b": sum(len(f["only_b"]) for f in fronts.values()),
              "accuracy_identical": sum(1 for d in acc if d == 0.0),
              "accuracy_max_abs_points": max((abs(d) * 100 for d in acc), default=None),
              "size_identical": sum(1 for m in pairs if m["size_mb"]["delta"] == 0.0)}
    for key in LATENCIES:
        rel = _abs_rel(pairs, key)
        points[f"{key}_median_abs_pct"] = statistics.median(rel) if rel else None
        points[f"{key}_max_abs_pct"] = max(rel) if rel else None
    return {"targets": targets, "hypervolume": hypervolume, "baseline": base, "peers": peers, "fronts": fronts,
            "points": points, "noise_pct": {k: noise_pct(a, b, key=k) for k in LATENCIES},
            "commands": [a.get("command"), b.get("command")]}


# ----------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if _num(v) is None else fmt.format(float(v))


def _pct(v: Any) -> str:
    return "n/a" if _num(v) is None else f"{float(v):+.1f}%"


def _met(v: Any) -> str:
    return "met" if v is True else "missed" if v is False else "n/a"


def _figure_rows(name: str, figs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    acc, b32, b1, size = (figs[k] for k in FIGURES)
    acc_d = "n/a" if _num(acc["delta"]) is None else f"{acc['delta'] * 100:+.2f}"
    return [f"| {name} | {_f(acc['a'], '{:.4f}')} / {_f(acc['b'], '{:.4f}')} ({acc_d}) "
            f"| {_f(b32['a'])} / {_f(b32['b'])} ({_pct(b32['rel_pct'])}) "
            f"| {_f(b1['a'])} / {_f(b1['b'])} ({_pct(b1['rel_pct'])}) "
            f"| {_f(size['a'], '{:.2f}')} / {_f(size['b'], '{:.2f}')} |"]


def comparison_markdown(cmp: Mapping[str, Any], *, label_a: str, label_b: str, command: str) -> str:
    """report of :func:`compare_summaries`: run A is ``label_a``, run B ``label_b``; ``command`` made it."""
    noise = cmp["noise_pct"]
    pts = cmp["points"]
    lines = [f"# Reproduction: {label_a} (A) vs {label_b} (B)", "",
             f"Written by `{command}`.", "",
             f"- Run A: `{cmp['commands'][0]}`", f"- Run B: `{cmp['commands'][1]}`", "",
             "Noise, read from the runs themselves (the largest spread of the fp32 baseline's latency measured "
             "repeatedly within either run, or change between the runs of an unchanged model: the baseline, and "
             "each peer at search time and in the final timing): "
             f"bs32 {_f(noise.get('latency_bs32'), '{:.1f}')}%, bs1 {_f(noise.get('latency_bs1'), '{:.1f}')}%.", "",
             "## Targets", "", "| target | goal | A | B | change | A | B |", "|---|---|---|---|---|---|---|"]
    for t in cmp["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {_f(t['a'])} | {_f(t['b'])} | {_pct(t['rel_pct'])} "
                     f"| {_met(t['met_a'])} | {_met(t['met_b'])} |")
    same = sum(1 for t in cmp["targets"] if t["met_a"] is t["met_b"])
    lines += ["", f"Same verdict (met / missed) on {same} of {len(cmp['targets'])} targets.", "",
              "Points the targets were read on:", ""]
    for t in cmp["targets"]:
        if t["point_a"] or t["point_b"]:
            lines.append(f"- {t['target']}: A `{t['point_a']}`, B `{t['point_b']}`")
    lines += ["", "## Hypervolume of each front", "", "| front | A | B | change |", "|---|---|---|---|"]
    lines += [f"| {k} | {_f(v['a'], '{:.4f}')} | {_f(v['b'], '{:.4f}')} | {_pct(v['rel_pct'])} |"
              for k, v in cmp["hypervolume"].items()]
    head = ["| | held-out accuracy A / B (points) | bs32 ms/ex A / B | bs1 ms A / B | size MB A / B |",
            "|---|---|---|---|---|"]
    lines += ["", "## Baseline and peers", "", *head, *_figure_rows("fp32 baseline (search protocol)", cmp["baseline"])]
    for name, figs in cmp["peers"].items():
        lines += _figure_rows(name, figs)
    lines += ["", "## Front points found by both runs (same front, trial and parameters)", "",
              f"{pts['matched']} matched; {pts['only_a']} on a front of A only, {pts['only_b']} of B only. "
              f"Held-out accuracy identical on {pts['accuracy_identical']} of {pts['matched']} "
              f"(largest change {_f(pts['accuracy_max_abs_points'], '{:.2f}')} points); size identical on "
              f"{pts['size_identical']}. Latency change, median / largest: bs32 "
              f"{_f(pts['latency_bs32_median_abs_pct'], '{:.1f}')}% / {_f(pts['latency_bs32_max_abs_pct'], '{:.1f}')}%, "
              f"bs1 {_f(pts['latency_bs1_median_abs_pct'], '{:.1f}')}% / {_f(pts['latency_bs1_max_abs_pct'], '{:.1f}')}%.",
              "", *head]
    for f in cmp["fronts"].values():
        for m in f["matched"]:
            lines += _figure_rows(str(m["label"]), m)
    lines += ["", "Front points found by one run only (a front moves when a latency measured within noise "
              "changes which point dominates, or when a study samples differently after such a change):", ""]
    for name, f in cmp["fronts"].items():
        if f["only_a"] or f["only_b"]:
            lines.append(f"- {name}: A only {', '.join(map(str, f['only_a'])) or '-'}; "
                         f"B only {', '.join(map(str, f['only_b'])) or '-'}")
    return "\n".join(lines) + "\n"
