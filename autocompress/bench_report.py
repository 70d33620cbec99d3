"""The benchmark's figures as pure functions over plain rows: hypervolume of each front against one fixed
reference point, the issue's targets with their measured values, plot data, and report.md. Drawing is kept
apart (:func:`draw_png`), and nothing here measures or trains: :mod:`autocompress.bench` does that.

A *point* is a dict with ``eval_accuracy`` (held-out, 0-1), ``latency_bs{N}`` (ms/example), ``size_mb`` and a
``label``; the baseline is a point too. Hypervolume is computed in a space normalised by the baseline, so
fronts of different searches compare on one scale: (accuracy drop in points, latency / baseline latency,
size / baseline size), all minimised, against :data:`REFERENCE` = (5 points, 1.0, 1.0): a point adds volume
only if it is faster *and* smaller than the baseline and loses fewer than 5 points.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .pareto import hypervolume
from .report import params_summary

REFERENCE = (5.0, 1.0, 1.0)  # (accuracy drop in points, latency ratio, size ratio)
MAX_DROP = 1.0  # the targets are read at <= 1.0 point of held-out accuracy below the fp32 baseline

Point = Mapping[str, Any]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def drop_points(point: Point, base: Point) -> float | None:
    a, b = _num(point.get("eval_accuracy")), _num(base.get("eval_accuracy"))
    return None if a is None or b is None else (b - a) * 100.0


def normalised(point: Point, base: Point, *, latency: str) -> tuple[float, float, float] | None:
    """(drop in points, latency ratio, size ratio) of ``point``, or ``None`` if a figure is missing."""
    d = drop_points(point, base)
    lat, blat = _num(point.get(latency)), _num(base.get(latency))
    size, bsize = _num(point.get("size_mb")), _num(base.get("size_mb"))
    if d is None or not lat or not blat or not size or not bsize:
        return None
    return d, lat / blat, size / bsize


def front_hypervolume(points: Sequence[Point], base: Point, *, latency: str) -> float:
    """Hypervolume of ``points`` in the normalised space against :data:`REFERENCE` (larger is better)."""
    rows = [p for p in (normalised(q, base, latency=latency) for q in points) if p is not None]
    return hypervolume(np.array(rows, dtype=float).reshape(-1, 3), np.array(REFERENCE)) if rows else 0.0


def within_drop(points: Sequence[Point], base: Point, max_drop: float = MAX_DROP) -> list[Point]:
    return [p for p in points if (d := drop_points(p, base)) is not None and d <= max_drop + 1e-9]


def _best(points: Sequence[Point], key: Any, *, largest: bool) -> tuple[float | None, Point | None]:
    scored = [(v, p) for p in points if (v := key(p)) is not None]
    if not scored:
        return None, None
    v, p = (max if largest else min)(scored, key=lambda s: s[0])
    return v, p


def _target(name: str, goal: str, measured: float | None, ok: bool | None, point: Point | None = None,
            note: str = "") -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": measured, "met": bool(ok) if ok is not None else False,
            "point": point.get("label") if point else None, "note": note}


def evaluate_targets(joint: Sequence[Point], singles: Mapping[str, Sequence[Point]], base: Point,
                     peers: Mapping[str, Point], *, joint_minutes: float | None, overhead: float | None,
                     latency: str = "latency_bs32") -> list[dict[str, Any]]:
    """Each target of the benchmark issue with its measured value, read on the joint front at
    <= :data:`MAX_DROP` points of held-out drop. ``peers`` holds ``onnxruntime_int8`` when it was measured.
    ``latency`` is the throughput batch size's metric (the issue's is batch 32)."""
    ok_points = within_drop(joint, base)
    out = []
    bs = latency.removeprefix("latency_")
    # Speed is read from the final, interleaved timing (bench_timing.final_timing) when the run took one: every
    # point and peer timed in the same rounds. Otherwise from the search-time figures (each timed on its own).
    final = isinstance((peers.get("pytorch_fp32") or {}).get("final"), Mapping)
    when = "final interleaved timing" if final else "search-time timing"

    def pt(q: Point) -> Point:  # a point's (or the baseline's) PyTorch figures
        return (q.get("final") or {}).get("pytorch") or {} if final else q

    def ort(q: Point) -> Point:  # a point's ONNX Runtime figures
        return (q.get("final") or {}).get("onnxruntime") or {} if final else q.get("onnxruntime") or {}

    def peer(name: str) -> Point:
        p = peers.get(name) or {}
        return p.get("final") or {} if final else p

    ref = peer("pytorch_fp32") if final else base
    b32, b1 = _num(ref.get(latency)), _num(ref.get("latency_bs1"))

    def ratio(num: float | None, figures: Callable[[Point], Point], key: str) -> Any:
        return lambda p: (num / v) if num and (v := _num(figures(p).get(key))) else None

    v, p = _best(ok_points, ratio(b32, pt, latency), largest=True)
    out.append(_target(f"{bs} throughput vs fp32 PyTorch", ">= 4x", v, v is not None and v >= 4.0, p, when))
    ort8 = _num(peer("onnxruntime_int8").get(latency))
    v, p = _best(ok_points, ratio(ort8, pt, latency), largest=True)
    out.append(_target(f"{bs} throughput vs ONNX Runtime dynamic int8 of the baseline", ">= 3x", v,
                       v is not None and v >= 3.0, p, when if ort8 else "ONNX Runtime int8 peer not measured"))
    v, p = _best(ok_points, lambda q: _num(pt(q).get("latency_bs1")), largest=False)
    out.append(_target("bs1 latency (ms/sentence)", "<= 1.5", v, v is not None and v <= 1.5, p,
                       f"{when}; fp32 baseline: {b1:.2f} ms" if b1 else when))
    # The same two targets in the runtime a user deploys to: the joint front's points as exported to ONNX Runtime
    # (taken when the front is timed there), against the ONNX Runtime int8 peer. A point's int8 layers can run
    # bit-exact to fbgemm or on ONNX Runtime's own int8 kernels (a slightly different model, with its own
    # accuracy measured in ONNX Runtime); each variant within the drop competes.
    in_ort = [q for q in ok_points if ort(q)]
    for q in joint:
        fused = q.get("onnxruntime_fused") or {}
        figures = ((q.get("final") or {}).get("onnxruntime_fused") or {}) if final else {}
        if figures and _num(fused.get("eval_accuracy")) is not None:
            in_ort += within_drop([{"label": f"{q.get('label')} (ONNX Runtime int8 kernels)",
                                    "eval_accuracy": fused["eval_accuracy"], "final": {"onnxruntime": figures}}], base)
    timed = bool(in_ort)
    why = "" if timed else "no joint point within 1 point was timed in ONNX Runtime"
    v, p = _best(in_ort, ratio(ort8, ort, latency), largest=True)
    out.append(_target(f"{bs} throughput vs ONNX Runtime dynamic int8 of the baseline, both in ONNX Runtime", ">= 3x",
                       v, v is not None and v >= 3.0, p, why or (when if ort8 else "ONNX Runtime int8 peer not measured")))
    v, p = _best(in_ort, lambda q: _num(ort(q).get("latency_bs1")), largest=False)
    ortb1 = _num(peer("onnxruntime_fp32").get("latency_bs1"))
    out.append(_target("bs1 latency (ms/sentence) in ONNX Runtime", "<= 1.5", v, v is not None and v <= 1.5, p,
                       why or (f"{when}; fp32 baseline in ONNX Runtime: {ortb1:.2f} ms" if ortb1 else when)))
    bsize = _num(base.get("size_mb"))
    v, p = _best(ok_points, ratio(bsize, lambda q: q, "size_mb"), largest=True)
    out.append(_target("size vs fp32 baseline", ">= 10x smaller", v, v is not None and v >= 10.0, p))
    hv_joint = front_hypervolume(joint, base, latency=latency)
    hv_single = {k: front_hypervolume(v, base, latency=latency) for k, v in singles.items()}
    best_single = max(hv_single.values(), default=0.0)
    out.append(_target("joint front hypervolume > every single-technique front", "> " + f"{best_single:.4f}",
                       hv_joint, hv_joint > best_single,
                       note=f"best single: {max(hv_single, key=hv_single.get)}" if hv_single else ""))
    out.append(_target("joint search wall time (minutes)", "<= 45", joint_minutes,
                       joint_minutes is not None and joint_minutes <= 45.0))
    out.append(_target("engine overhead (share of trial wall time)", "<= 10%", overhead,
                       overhead is not None and overhead <= 0.10))
    bacc = _num(base.get("eval_accuracy"))
    out.append(_target("fp32 baseline held-out accuracy", ">= 89.0", bacc * 100 if bacc else None,
                       bacc is not None and bacc * 100 >= 89.0))
    return out


# ----------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None with fewer than 3 pairs or no spread."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 3 or a.size != b.size:
        return None

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for value in np.unique(v):  # average rank over ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def selection_agreement(rows: Sequence[Mapping[str, Any]], base: Point, *, near: float = 2.0) -> dict[str, Any]:
    """How well the validation accuracy the search selects on ranks finished trials for held-out accuracy:
    Spearman over every trial measured on both, and over the competitive ones (validation accuracy within
    ``near`` points of the baseline's), where a noisy validation split decides what reaches the front."""
    pairs = [(float(m["accuracy"]), float(m["eval_accuracy"])) for r in rows if r.get("state") == "COMPLETE"
             for m in [r.get("metrics") or {}] if _num(m.get("accuracy")) is not None
             and _num(m.get("eval_accuracy")) is not None]
    out: dict[str, Any] = {"trials": len(pairs), "spearman": spearman(*zip(*pairs)) if pairs else None,
                           "near_points": near}
    b = _num(base.get("accuracy"))
    close = [p for p in pairs if b is not None and p[0] >= b - near / 100]
    out.update(near_trials=len(close), spearman_near=spearman(*zip(*close)) if close else None)
    return out


def plot_data(fronts: Mapping[str, Sequence[Point]], peers: Mapping[str, Point], *, latency: str) -> dict[str, Any]:
    """Series for the two panels (accuracy vs latency, accuracy vs size): one per front, sorted along x, and
    the peers as single labelled points. A front is three-dimensional, so in each panel only some of its
    points are non-dominated in that plane: ``frontier`` flags them (the line is drawn through those only)."""
    def series(points: Sequence[Point], x: str) -> dict[str, list[Any]]:
        pts = sorted((p for p in points if _num(p.get(x)) and _num(p.get("eval_accuracy")) is not None),
                     key=lambda p: (float(p[x]), -float(p["eval_accuracy"])))
        ys = [float(p["eval_accuracy"]) * 100 for p in pts]
        best, frontier = -np.inf, []
        for y in ys:  # sorted by x: a point is on the plane's frontier when it beats every point left of it
            frontier.append(bool(y > best))
            best = max(best, y)
        return {"x": [float(p[x]) for p in pts], "y": ys, "labels": [str(p.get("label", "")) for p in pts],
                "frontier": frontier}

    panels = []
    for x, title in ((latency, f"{latency.replace('latency_bs', 'latency at batch ')} (ms/example)"),
                     ("size_mb", "size (MB)")):
        panels.append({"x_metric": x, "title": title,
                       "fronts": {name: series(pts, x) for name, pts in fronts.items()},
                       "peers": {name: {"x": float(p[x]), "y": float(p["eval_accuracy"]) * 100}
                                 for name, p in peers.items() if _num(p.get(x)) and _num(p.get("eval_accuracy")) is not None}})
    return {"panels": panels}


def draw_png(data: Mapping[str, Any], path: Any, *, dpi: int = 130) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = data["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2))
    for ax, panel in zip(np.atleast_1d(axes), panels):
        for i, (name, s) in enumerate(panel["fronts"].items()):
            joint = name == "joint"
            color = "black" if joint else plt.get_cmap("tab10")(i % 10)
            ax.scatter(s["x"], s["y"], s=46 if joint else 16, color=color, zorder=5 if joint else 3,
                       alpha=1.0 if joint else 0.8, label=name)
            keep = [k for k, f in enumerate(s.get("frontier", [True] * len(s["x"]))) if f]
            ax.plot([s["x"][k] for k in keep], [s["y"][k] for k in keep], color=color, lw=2.2 if joint else 1.0,
                    alpha=1.0 if joint else 0.7, zorder=4 if joint else 2)
        peer_colors = ["#444444", "#b8860b", "#8b008b", "#008b8b", "#cd5c5c", "#2e8b57"]
        for j, (name, p) in enumerate(panel["peers"].items()):
            ax.scatter([p["x"]], [p["y"]], marker="*", s=170, color=peer_colors[j % len(peer_colors)],
                       edgecolor="white", zorder=6, label=name)
        ax.set_xscale("log")
        ax.set_xlabel(panel["title"])
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(True, alpha=0.3)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(6, max(1, len(labels))), frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) + 5) // 6), 1, 1))  # room below for the legend
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".2f", suffix: str = "") -> str:
    n = _num(v)
    return "-" if n is None else f"{n:{fmt}}{suffix}"


def point_row(name: str, p: Point, base: Point, *, latency: str = "latency_bs32") -> str:
    d = drop_points(p, base)
    cells = [name, _f(_num(p.get("eval_accuracy")) and p["eval_accuracy"] * 100),
             "-" if d is None else f"{(-d if abs(d) > 5e-5 else 0.0):+.2f}"]
    for key in (latency, "latency_bs1", "size_mb"):
        v, bv = _num(p.get(key)), _num(base.get(key))
        cells += [_f(v), "-" if not v or not bv else f"{bv / v:.2f}x"]
    ort = p.get("onnxruntime") or {}
    cells += [_f(ort.get(latency)), _f(ort.get("latency_bs1"))]
    return "| " + " | ".join(cells) + " |"


def header(latency: str) -> str:
    bs = latency.removeprefix("latency_")
    return (f"| point | acc | Δ pts | {bs} ms/ex | {bs} × | bs1 ms | bs1 × | size MB | size × | ORT {bs} | ORT bs1 |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


RUNTIME_NAMES = {"pytorch": "PyTorch", "onnxruntime": "ORT", "onnxruntime_fused": "ORT, ORT's int8 kernels"}


def final_timing_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model of the final interleaved timing: name, runtime, held-out accuracy, the figures and the
    bs-N ratios to the fp32 PyTorch peer timed in the same rounds (pure: reads the summary)."""
    latency = summary.get("latency_metric", "latency_bs32")
    peers = summary.get("peers") or {}
    ref = (peers.get("pytorch_fp32") or {}).get("final") or {}
    rows = [{"name": str(p.get("label", k)), "accuracy": p.get("eval_accuracy"), "figures": p["final"]}
            for k, p in peers.items() if isinstance(p.get("final"), Mapping)]
    for p in (summary.get("fronts") or {}).get("joint", []):
        for runtime, figures in (p.get("final") or {}).items():
            acc = (p.get("onnxruntime_fused") or {}).get("eval_accuracy") if runtime == "onnxruntime_fused" \
                else p.get("eval_accuracy")
            rows.append({"name": f"{p.get('label')} ({RUNTIME_NAMES.get(runtime, runtime)})", "accuracy": acc,
                         "figures": figures})
    for r in rows:
        f = r["figures"]
        r["ratios"] = {k: (b / v) if (b := _num(ref.get(k))) and (v := _num(f.get(k))) else None
                       for k in (latency, "latency_bs1")}
    return rows


def _final_md(summary: Mapping[str, Any]) -> list[str]:
    final = summary.get("final_timing")
    if not final:
        return []
    latency = summary.get("latency_metric", "latency_bs32")
    bs = latency.removeprefix("latency_")
    lines = ["", f"## Final timing (the speed targets are read here): {final['protocol']}", "",
             "Ratios are to the PyTorch fp32 peer of the same rounds; min-max is over the rounds.", "",
             f"| model | held-out acc | {bs} ms/ex | min-max | {bs} × | bs1 ms | min-max | bs1 × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in final_timing_rows(summary):
        cells = [r["name"], _f(_num(r["accuracy"]) and r["accuracy"] * 100)]
        for key in (latency, "latency_bs1"):
            lo, hi = (r["figures"].get(f"{key}_spread") or [None, None])[:2]
            ratio = r["ratios"].get(key)
            span = "-" if _num(lo) is None or _num(hi) is None else f"{_f(lo)}-{_f(hi)}"
            cells += [_f(r["figures"].get(key)), span, "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _training_md(summary: Mapping[str, Any]) -> list[str]:
    """How the fp32 baseline was fine-tuned: the spec's recipe and what it chose on validation (a summary
    written before this section existed has none)."""
    t = summary.get("baseline_training")
    if not t:
        return []
    recipe = ", ".join(f"{k}={v}" for k, v in (t.get("recipe") or {}).items()) or "the defaults"
    return (["", "## fp32 baseline: how it was fine-tuned", "",
             f"Recipe (the spec's `baseline` section, options other than the defaults): {recipe}; cached under key "
             f"`{t.get('key')}`. Every choice below was made on the validation split, never on the held-out one.", ""]
            + [f"- {line}" for line in t.get("lines") or []])


def report_md(summary: Mapping[str, Any]) -> str:
    base, latency = summary["baseline"], summary.get("latency_metric", "latency_bs32")
    lines = [f"# {summary['title']}", "", summary.get("intro", ""), "",
             f"Command: `{summary['command']}`", "", f"Machine: {summary['machine']}", "",
             "## Targets (joint front, at <= 1.0 point held-out drop)", "",
             "| target | goal | measured | met | point | note |", "|---|---|---:|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {_f(t['measured'], '.4g')} | {'yes' if t['met'] else '**no**'} "
                     f"| {t['point'] or ''} | {t['note']} |")
    lines += _final_md(summary)
    prof = summary.get("profile")
    if prof:
        lines += ["", f"Where the time of the fastest joint point within 1 point ({prof['point']}) goes, component by "
                      f"component against the baseline: [{prof['file']}]({prof['file']})."]
    lines += ["", "## Hypervolume (normalised: drop in points, latency ratio, size ratio; reference "
              f"{REFERENCE})", "", "| front | points | hypervolume |", "|---|---:|---:|"]
    for name, hv in summary["hypervolume"].items():
        lines.append(f"| {name} | {len(summary['fronts'].get(name, []))} | {hv:.4f} |")
    lines += ["", "## Peers (the baseline as users deploy it today)", "", header(latency)]
    for name, p in summary["peers"].items():
        lines.append(point_row(str(p.get("label", name)), p, base, latency=latency))
    lines += _training_md(summary)
    for name, pts in summary["fronts"].items():
        lines += ["", f"## Front: {name}", "", header(latency)]
        lines += [point_row(str(p.get("label")), p, base, latency=latency) for p in pts]
    lines += ["", "## Wall time per phase", "", "| phase | minutes |", "|---|---:|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in summary["phases_seconds"].items()]
    rep = summary.get("reproducibility") or {}
    if rep:
        lines += ["", "## Reproducibility (figures measured more than once)", "",
                  "| figure | metric | n | min | median | max | spread |", "|---|---|---:|---:|---:|---:|---:|"]
        for fig, metrics in rep.items():
            for metric, s in metrics.items():
                if s.get("n"):
                    lines.append(f"| {fig} | {metric} | {s['n']} | {_f(s['min'], '.4g')} | {_f(s['median'], '.4g')} "
                                 f"| {_f(s['max'], '.4g')} | {_f(s.get('spread_pct'), '.1f', '%')} |")
    sel = summary.get("selection") or {}
    if sel.get("trials"):
        lines += ["", "## Selection: does validation rank trials like the held-out split?", "",
                  f"Spearman rank correlation of validation and held-out accuracy over the {sel['trials']} finished "
                  f"trials of all studies: {_f(sel.get('spearman'))}; over the {sel.get('near_trials')} within "
                  f"{sel.get('near_points'):g} points of the baseline's validation accuracy (where it decides "
                  f"what reaches the front): {_f(sel.get('spearman_near'))}."]
    b = summary.get("budget") or {}
    if b:
        f = b.get("fidelity")
        lines += ["", "## Budget", "",
                  f"- trials per single technique: {b.get('trials_per_technique')}; joint trials: {b.get('joint_trials')}"
                  + (f" (screened at {f['screen_steps']} recovery steps; retrained at {b.get('recovery_steps')}: "
                     f"{f['promote']} in the joint search, {b.get('promoted_per_technique')} per single technique)"
                     if f else f" (each with {b.get('recovery_steps')} recovery steps)"),
                  f"- techniques: {', '.join(b.get('techniques') or [])}"]
        warm = b.get("warm_starts") or []
        if warm:
            lines.append(f"- the joint study was seeded with {len(warm)} pipelines from the single fronts: the best "
                         "front's points as they are, then that front's in-target pick composed with each other "
                         "technique's pick (they are among its trials, enqueued first; `autocompress bench` builds "
                         "them with `compose_warm_starts`):")
            lines += [f"  - {' + '.join(w)}: `{params_summary(w)}`" for w in warm]
    if summary.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"
