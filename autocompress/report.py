"""Study outputs: trials.csv/json, pareto.json, pareto.png/html and report.md.

Data is computed by pure functions (``trials_table_rows``, ``plot_data``, ``front_table``) and only then
written or drawn, so tests and other front ends (CLI tables, notebooks) reuse the numbers without
matplotlib or plotly. The drawing libraries are imported inside the drawing functions because
``import autocompress`` must stay light. Every figure in the outputs comes from the arguments.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from .errors import StudyError
from .pareto import (
    _finite,
    baseline_metrics,
    front_knee,
    front_rows,
    latency_names,
    normalize_objectives,
    relative_to_baseline,
)

Objectives = Sequence[tuple[str, str]]
Rows = Sequence[Mapping[str, Any]]
# Cost metrics plotted against quality when the study has a single objective (so the plot still shows a trade-off).
_COST_METRICS = ("size_mb", "params", "flops")
_EXTRA_QUALITY = ("f1", "mcc")
_QUALITY = ("accuracy", *_EXTRA_QUALITY)
_MISSING = "—"
_STATE_WORDS = {"COMPLETE": "complete", "FAIL": "failed", "RUNNING": "running", "PRUNED": "pruned"}
_REL_WORDS = {"acc_delta": "Δ val acc", "eval_acc_delta": "Δ eval acc"}


# ------------------------------------------------------------------------------------------- formatting


def metric_label(name: str) -> str:
    """Axis/column label with units: 'latency at batch 32 (ms/example)', 'size (MB)', 'validation accuracy'."""
    if name.startswith("latency_bs"):
        return f"latency at batch {name.removeprefix('latency_bs')} (ms/example)"
    fixed = {"size_mb": "size (MB)", "params": "parameters", "flops": "FLOPs per example"}
    base = name.removeprefix("eval_")
    if name in fixed or base not in _QUALITY:
        return fixed.get(name, name)
    return f"{'evaluation' if name.startswith('eval_') else 'validation'} {base if base == 'accuracy' else base.upper()}"


def _fmt_metric(name: str, v: Any) -> str:
    if name.removeprefix("eval_") in _QUALITY:
        return f"{float(v):.4f}" if _finite(v) else _MISSING
    return _fmt("big" if name in ("params", "flops") else "num", v) if _finite(v) else str(v)


def pipeline_str(pipeline: Sequence[str] | None) -> str:
    return "+".join(pipeline) if pipeline else "(none)"


def _param_value(v: Any) -> str:
    if isinstance(v, float) and not isinstance(v, bool):
        # Two decimals reads well for fractions (0.30); anything that would lose digits keeps 4 significant.
        return f"{v:.2f}" if 0.01 <= abs(v) < 1e4 and abs(v - round(v, 2)) < 1e-9 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_param_value(x) for x in v)
    return str(v)


def params_summary(params: Mapping[str, Any] | None) -> str:
    """'head_pruning.fraction=0.30 quantization.per_channel=True' (nested dicts flattened with dots)."""
    parts: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            parts.append(f"{prefix}={_param_value(value)}")

    walk("", params or {})
    return " ".join(parts)


def _fmt(kind: str, v: Any) -> str:
    """Cell text for a number of one kind ('num', 'big', 'pct', 'pts', 'x'); '—' when missing or non-finite."""
    if not _finite(v):
        return _MISSING
    v = float(v)
    if kind == "big":  # parameter and FLOP counts: 22.70M reads better than 22700000
        div, unit = next(((d, u) for d, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(v) >= d), (1, ""))
        return f"{v / div:.2f}{unit}" if unit else f"{v:.0f}"
    if kind in ("pct", "pts", "x"):
        return f"{v * 100:.2f}" if kind == "pct" else f"{v:+.2f}" if kind == "pts" else f"{v:.2f}x"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null because strict JSON has no NaN."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)  # Paths, enums, devices: readable beats a crash while writing results


def _write_text(path: Path, text: str) -> Path:
    # Write then rename, so a reader (or a crash mid-write) never sees half a results file.
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise StudyError(f"cannot write {path}: {e}. Check that the results directory is writable and has space.") from e
    return path


def _write_json(path: Path, obj: Any) -> Path:
    return _write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _numbers(front: Rows | None, rows: Rows, objectives: Objectives) -> set[Any]:
    front = front_rows(rows, objectives) if front is None else front
    return {r.get("number") for r in front}


# ------------------------------------------------------------------------------------------ trial table


def trials_table_rows(
    rows: Rows, baseline: Mapping[str, Any], objectives: Objectives, *, front: Rows | None = None
) -> list[dict[str, Any]]:
    """One flat dict per trial, with the same keys in the same order for every row (CSV needs that).

    ``on_front`` marks membership of ``front`` (default: ``front_rows(rows, objectives)``, feasible only).
    ``params`` is the readable parameter summary; the parameter count is ``n_params``.
    """
    objectives = normalize_objectives(objectives)
    base = baseline_metrics(baseline)
    on_front = _numbers(front, rows, objectives)
    all_metrics = [base] + [r.get("metrics") or {} for r in rows]
    quality = ["accuracy"] + [q for q in _EXTRA_QUALITY if any(q in m or "eval_" + q in m for m in all_metrics)]
    lats = latency_names(*all_metrics)
    out = []
    for r in rows:
        m = r.get("metrics") or {}
        # Derived figures are rounded: float noise like -0.7299999999999973 helps no one reading the CSV.
        rel = {k: None if v is None else round(v, 4) for k, v in relative_to_baseline(m, base).items()}
        flat: dict[str, Any] = {"number": r.get("number"), "state": r.get("state"),
                                "pipeline": pipeline_str(r.get("pipeline")), "params": params_summary(r.get("params"))}
        for q in quality:
            short = "acc" if q == "accuracy" else q
            flat[q], flat["eval_" + q] = m.get(q), m.get("eval_" + q)
            flat[f"{short}_delta"], flat[f"eval_{short}_delta"] = rel.get(f"{short}_delta"), rel.get(f"eval_{short}_delta")
        for lat in lats:
            speedup = "speedup_" + lat.removeprefix("latency_")
            flat[lat], flat[speedup] = m.get(lat), rel.get(speedup)
        flat.update(size_mb=m.get("size_mb"), size_reduction=rel.get("size_reduction"), n_params=m.get("params"),
                    flops=m.get("flops"), feasible=r.get("feasible"), on_front=r.get("number") in on_front,
                    duration_s=r.get("duration_s"), fail_reason=r.get("fail_reason"), device=r.get("device"),
                    model_dir=r.get("model_dir"))
        out.append(flat)
    return out


def write_trials(
    rows: Rows, baseline: Mapping[str, Any], objectives: Objectives, out_dir: str | Path, *, front: Rows | None = None
) -> tuple[Path, Path]:
    """trials.csv (the flat table) and trials.json (objectives, baseline, flat table and the full trial rows)."""
    objectives = normalize_objectives(objectives)
    out_dir = Path(out_dir)
    table = trials_table_rows(rows, baseline, objectives, front=front)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in t.items()} for t in table)
    csv_path = _write_text(out_dir / "trials.csv", buf.getvalue())
    doc = {"objectives": _objective_list(objectives), "baseline": baseline, "table": table, "trials": list(rows)}
    return csv_path, _write_json(out_dir / "trials.json", doc)


def _objective_list(objectives: Objectives) -> list[dict[str, str]]:
    return [{"name": n, "direction": d} for n, d in objectives]


def write_pareto_json(
    front: Rows, baseline: Mapping[str, Any], objectives: Objectives, out_dir: str | Path,
    *, extra: Mapping[str, Any] | None = None,
) -> Path:
    """pareto.json: objectives, baseline, the knee's trial number and each front trial with relative figures.

    ``extra`` (study name, spec fingerprint, protocol, ...) is merged at the top level; it may not
    reuse the file's own keys, so nothing is silently overwritten.
    """
    objectives = normalize_objectives(objectives)
    base = baseline_metrics(baseline)
    knee = front_knee(front, objectives)
    keys = ("number", "pipeline", "params", "metrics", "feasible", "model_dir", "device", "duration_s")
    core: dict[str, Any] = {
        "objectives": _objective_list(objectives),
        "baseline": {"metrics": base, "device": baseline.get("device")},
        "knee": knee.get("number") if knee else None,
        "front": [{**{k: r.get(k) for k in keys}, "relative": relative_to_baseline(r.get("metrics") or {}, base)}
                  for r in front],
    }
    clash = sorted(set(extra or {}) & set(core))
    if clash:
        raise ValueError(f"write_pareto_json: extra keys {clash} would overwrite pareto.json's own keys; rename them")
    return _write_json(Path(out_dir) / "pareto.json", {**(extra or {}), **core})


# ----------------------------------------------------------------------------------------------- plots


def plot_data(
    rows: Rows, baseline: Mapping[str, Any], objectives: Objectives, *, front: Rows | None = None, title: str = ""
) -> dict[str, Any]:
    """What the Pareto plots show, as plain lists (no drawing library needed).

    The quality objective (accuracy, else the first maximized one) is plotted against each other
    objective. Points are the COMPLETE trials measured on both axes (failed trials are not shown);
    ``on_front`` marks the full multi-objective front (``front``, default feasible-only ``front_rows``),
    while ``pair_front`` is the non-dominated set of feasible trials *in this pair's two objectives*,
    sorted by x and drawn as a step line (``step`` "post" when x is minimized, "pre" when maximized,
    so the line bounds the region the front dominates).
    """
    objectives = normalize_objectives(objectives)
    directions = dict(objectives)
    names = list(directions)
    y = "accuracy" if "accuracy" in directions else next((n for n, d in objectives if d == "maximize"), "accuracy")
    base = baseline_metrics(baseline)
    xs = [n for n in names if n != y]
    if not xs:  # a single objective: show what it costs instead
        seen = latency_names(base, *[r.get("metrics") or {} for r in rows]) + list(_COST_METRICS)
        xs = [n for n in seen if any(_finite((r.get("metrics") or {}).get(n)) for r in rows)][:3]
    y_dir = directions.get(y, "maximize")
    on_front = _numbers(front, rows, objectives)
    complete = [r for r in rows if r.get("state") == "COMPLETE"]
    pairs = []
    for x in xs:
        x_dir = directions.get(x, "minimize")
        pts = [r for r in complete if all(_finite((r.get("metrics") or {}).get(k)) for k in (x, y))]
        pf = sorted(front_rows(pts, [(x, x_dir), (y, y_dir)]), key=lambda r: float(r["metrics"][x]))
        bx, by = base.get(x), base.get(y)
        pairs.append({
            "x": x, "y": y, "x_direction": x_dir, "y_direction": y_dir,
            "x_label": metric_label(x), "y_label": metric_label(y),
            "points": {
                "x": [float(r["metrics"][x]) for r in pts], "y": [float(r["metrics"][y]) for r in pts],
                "number": [r.get("number") for r in pts], "pipeline": [pipeline_str(r.get("pipeline")) for r in pts],
                "params": [params_summary(r.get("params")) for r in pts],
                "label": [f"#{r.get('number')} {pipeline_str(r.get('pipeline'))}" for r in pts],
                "feasible": [r.get("feasible", True) is not False for r in pts],
                "on_front": [r.get("number") in on_front for r in pts],
            },
            "pair_front": {"x": [float(r["metrics"][x]) for r in pf], "y": [float(r["metrics"][y]) for r in pf],
                           "number": [r.get("number") for r in pf]},
            "step": "post" if x_dir == "minimize" else "pre",
            "baseline": {"x": float(bx), "y": float(by)} if _finite(bx) and _finite(by) else None,
        })
    n_failed = sum(r.get("state") == "FAIL" for r in rows)
    return {"title": title, "pairs": pairs, "n_complete": len(complete), "n_failed": n_failed, "n_total": len(rows)}


def _groups(p: Mapping[str, list[Any]]) -> dict[str, list[int]]:
    """Point indices per style; dominated and infeasible trials are context, drawn faint."""
    idx = range(len(p["x"]))
    return {"dominated": [j for j in idx if p["feasible"][j] and not p["on_front"][j]],
            "infeasible": [j for j in idx if not p["feasible"][j]],
            "front": [j for j in idx if p["feasible"][j] and p["on_front"][j]]}


def _grid(n: int) -> tuple[int, int]:
    ncols = max(1, min(n, 3))
    return max(1, math.ceil(n / ncols)), ncols


def draw_png(data: Mapping[str, Any], path: str | Path, *, dpi: int = 150) -> Path:
    """Static Pareto plot, one subplot per pair (matplotlib's Agg canvas directly: no pyplot state, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = data.get("pairs") or []
    nrows, ncols = _grid(len(pairs))
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows))
    FigureCanvasAgg(fig)
    if not pairs:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no objectives to plot", ha="center", va="center")
        ax.set_axis_off()
    for i, pair in enumerate(pairs):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        p, g, pf = pair["points"], _groups(pair["points"]), pair["pair_front"]

        def pick(key: str, xy: str) -> list[float]:
            return [p[xy][j] for j in g[key]]

        ax.scatter(pick("dominated", "x"), pick("dominated", "y"), s=22, c="0.55", alpha=0.4, label="dominated trial")
        ax.scatter(pick("infeasible", "x"), pick("infeasible", "y"), s=26, c="tab:red", marker="x", alpha=0.4,
                   label="infeasible trial")
        if pf["x"]:
            ax.step(pf["x"], pf["y"], where=pair["step"], color="tab:blue", alpha=0.7, lw=1.5,
                    label="best trade-off in this pair")
        ax.scatter(pick("front", "x"), pick("front", "y"), s=46, c="tab:blue", edgecolors="black", linewidths=0.6, zorder=3,
                   label="Pareto front (all objectives)")
        for j in g["front"]:
            ax.annotate(f"#{p['number'][j]}", (p["x"][j], p["y"][j]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if pair["baseline"]:
            ax.scatter([pair["baseline"]["x"]], [pair["baseline"]["y"]], s=220, marker="*", c="gold", edgecolors="black",
                       zorder=4, label="baseline")
        ax.set_xlabel(pair["x_label"])
        ax.set_ylabel(pair["y_label"])
        ax.grid(alpha=0.3)
    # One legend for the figure, below the plots, so it never covers points.
    handles = {lab: h for ax in fig.axes for h, lab in zip(*ax.get_legend_handles_labels())}
    per_row = min(len(handles), 2 + ncols) or 1
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=per_row, fontsize=8, frameon=False)
    counts = f"{data.get('n_complete', 0)} complete, {data.get('n_failed', 0)} failed (not shown)"
    fig.suptitle(f"{data.get('title') or 'Pareto front'} — {counts}", fontsize=10)
    legend_in = 0.3 * math.ceil(len(handles) / per_row) + 0.1 if handles else 0  # inches kept free for the legend
    fig.tight_layout(rect=(0, legend_in / (4.2 * nrows), 1, 1))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    except OSError as e:
        raise StudyError(f"cannot write {path}: {e}. Check that the results directory is writable.") from e
    return path


def draw_html(data: Mapping[str, Any], path: str | Path) -> Path:
    """Interactive Pareto plot: one self-contained HTML file for all pairs; hover shows trial, pipeline, params.

    plotly.js is embedded (~4 MB) rather than linked from a CDN because results must open offline.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = data.get("pairs") or []
    nrows, ncols = _grid(len(pairs))
    titles = [f"{p['y_label']} vs {p['x_label']}" for p in pairs] or None
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=titles)
    hover = "trial #%{customdata[0]}<br>%{customdata[1]}<br>%{customdata[2]}<br>x=%{x:.4g}, y=%{y:.4g}<extra></extra>"
    styles = {"dominated": ("dominated trial", dict(color="rgba(120,120,120,0.45)", size=7)),
              "infeasible": ("infeasible trial", dict(color="rgba(214,39,40,0.45)", size=8, symbol="x")),
              "front": ("Pareto front (all objectives)",
                        dict(color="rgb(31,119,180)", size=10, line=dict(color="black", width=1)))}
    for i, pair in enumerate(pairs):
        at = dict(row=i // ncols + 1, col=i % ncols + 1)
        p, g, pf = pair["points"], _groups(pair["points"]), pair["pair_front"]
        if pf["x"]:
            line = dict(shape="hv" if pair["step"] == "post" else "vh", color="rgba(31,119,180,0.6)")
            fig.add_trace(go.Scatter(x=pf["x"], y=pf["y"], mode="lines", line=line, name="best trade-off in this pair",
                                     legendgroup="pair", showlegend=i == 0, hoverinfo="skip"), **at)
        for kind, (name, marker) in styles.items():
            if g[kind]:
                custom = [[p["number"][j], p["pipeline"][j], p["params"][j] or "(no parameters)"] for j in g[kind]]
                fig.add_trace(go.Scatter(x=[p["x"][j] for j in g[kind]], y=[p["y"][j] for j in g[kind]], mode="markers",
                                         marker=marker, name=name, legendgroup=kind, showlegend=i == 0,
                                         customdata=custom, hovertemplate=hover), **at)
        if pair["baseline"]:
            star = dict(symbol="star", size=16, color="gold", line=dict(color="black", width=1))
            fig.add_trace(go.Scatter(x=[pair["baseline"]["x"]], y=[pair["baseline"]["y"]], mode="markers", marker=star,
                                     name="baseline", legendgroup="baseline", showlegend=i == 0,
                                     hovertemplate="baseline<br>x=%{x:.4g}, y=%{y:.4g}<extra></extra>"), **at)
        fig.update_xaxes(title_text=pair["x_label"], **at)
        fig.update_yaxes(title_text=pair["y_label"], **at)
    fig.update_layout(title=data.get("title") or "Pareto front", template="plotly_white", height=450 * nrows,
                      width=min(1600, 520 * ncols))
    return _write_text(Path(path), fig.to_html(include_plotlyjs=True, full_html=True))


# ------------------------------------------------------------------------------------------ front table


def _front_columns(baseline: Mapping[str, Any], rows: Rows, objectives: Objectives) -> list[tuple[str, str, str]]:
    """(header, record key, format kind) per column; only the first latency batch size gets a speedup column."""
    base = baseline_metrics(baseline)
    names = {n for n, _ in objectives}
    # The reported figure is the evaluation split; fall back to validation only when it was not measured.
    split = "eval" if _finite(base.get("eval_accuracy")) else "val"
    cols = [("trial", "trial", "str"), ("val acc (%)", "accuracy", "pct"), ("eval acc (%)", "eval_accuracy", "pct"),
            (f"Δ {split} acc (pts)", "eval_acc_delta" if split == "eval" else "acc_delta", "pts")]
    for q in (q for q in _EXTRA_QUALITY if q in names):
        cols += [(f"val {q} (%)", q, "pct"), (f"eval {q} (%)", "eval_" + q, "pct")]
    for i, lat in enumerate(latency_names(base, *[r.get("metrics") or {} for r in rows])):
        bs = lat.removeprefix("latency_")
        first = [(f"latency {bs} (ms/ex)", lat, "num"), (f"speedup {bs}", "speedup_" + bs, "x")]
        cols += first if i == 0 else [(f"{bs} (ms/ex)", lat, "num")]
    cols += [("size (MB)", "size_mb", "num"), ("reduction", "size_reduction", "x")]
    cols += [(label, key, "big") for key, label in (("params", "params"), ("flops", "FLOPs")) if key in names]
    return cols + [("pipeline", "pipeline", "str")]


def front_table(
    front: Rows, baseline: Mapping[str, Any], objectives: Objectives, *,
    fmt: Literal["table", "json", "markdown"] = "table", include_baseline: bool = True, title: str | None = None,
) -> Any:
    """The front as a rich ``Table`` ("table"), a markdown string ("markdown") or a list of dicts ("json").

    The first row is the baseline (deltas 0, ratios 1x) unless ``include_baseline`` is false, so every
    compressed figure has its reference beside it. "json" keeps raw numbers; the others format them.
    """
    objectives = normalize_objectives(objectives)
    if fmt not in ("table", "json", "markdown"):
        raise ValueError(f"fmt must be 'table', 'markdown' or 'json', got {fmt!r}")
    base = baseline_metrics(baseline)
    cols = _front_columns(baseline, front, objectives)
    src = ([("baseline", base, "(uncompressed)")] if include_baseline and base else []) + [
        (r.get("number"), r.get("metrics") or {}, pipeline_str(r.get("pipeline"))) for r in front]
    recs = [{"trial": t, **dict(m), **relative_to_baseline(m, base), "pipeline": pipe} for t, m, pipe in src]
    if fmt == "json":
        return [_jsonable({key: rec.get(key) for _, key, _ in cols}) for rec in recs]
    cells = [[_MISSING if rec.get(k) is None else str(rec[k]) if kind == "str" else _fmt(kind, rec[k])
              for _, k, kind in cols] for rec in recs]
    if fmt == "markdown":
        head = ["| " + " | ".join(h for h, _, _ in cols) + " |",
                "|" + "|".join("---" if k in ("trial", "pipeline") else "---:" for _, k, _ in cols) + "|"]
        return "\n".join(head + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]) + "\n"
    from rich.table import Table

    table = Table(title=title)
    for h, key, _ in cols:
        table.add_column(h, justify="left" if key in ("trial", "pipeline") else "right", no_wrap=key != "pipeline")
    for row in cells:
        table.add_row(*row)
    return table


# ------------------------------------------------------------------------------------------- report.md


def _bullets(d: Mapping[str, Any]) -> list[str]:
    return [f"- **{str(k).replace('_', ' ')}**: " + (str(v) if isinstance(v, (str, int, float, bool)) or v is None
                                                     else json.dumps(_jsonable(v))) for k, v in d.items()]


def write_report_md(
    out_dir: str | Path, *, spec_summary: Mapping[str, Any], baseline: Mapping[str, Any], rows: Rows, front: Rows,
    objectives: Objectives, protocol: Mapping[str, Any], commands: Sequence[str], notes: Sequence[str],
) -> Path:
    """report.md: how it was produced, where and how it was measured, the baseline, the front, the failures.

    Every number comes from the arguments; links to pareto.png/html appear only for files that exist.
    """
    objectives = normalize_objectives(objectives)
    out_dir = Path(out_dir)
    base = baseline_metrics(baseline)
    states = Counter(str(r.get("state")) for r in rows)
    failed = [r for r in rows if r.get("state") == "FAIL"]
    infeasible = [r for r in rows if r.get("state") == "COMPLETE" and r.get("feasible") is False]
    md = [f"# autocompress report: {spec_summary.get('study') or out_dir.name}", ""]
    if spec_summary.get("description"):
        md += [str(spec_summary["description"]), ""]
    counts = ", ".join(f"{n} {_STATE_WORDS.get(s, s.lower())}" for s, n in sorted(states.items()))
    md += [f"{len(rows)} trials ({counts}); "
           f"{len(infeasible)} complete but infeasible. {len(front)} trial(s) on the Pareto front over "
           + ", ".join(f"{n} ({d})" for n, d in objectives) + ".", ""]
    knee = front_knee(front, objectives)
    if knee:
        rel = relative_to_baseline(knee.get("metrics") or {}, base)
        figs = [f"{_REL_WORDS.get(k, k.replace('_', ' '))} {_fmt('pts', v) + ' pts' if 'delta' in k else _fmt('x', v)}"
                for k, v in rel.items() if v is not None]
        md += [f"Knee of the front (best balance, see `autocompress.pareto.knee_index`): trial #{knee.get('number')} "
               f"({pipeline_str(knee.get('pipeline'))}): " + "; ".join(figs) + ".", ""]
    md += ["## How this was produced", "", "```", *commands, "```", "", "## Search", "", *_bullets(spec_summary), ""]
    device = baseline.get("device") or protocol.get("device")
    md += ["## Machine and measurement protocol", ""]
    md += ([f"- **device**: {device}"] if device and "device" not in protocol else []) + [*_bullets(protocol), ""]
    md += ["## Baseline", "", "| metric | value |", "|---|---:|"]
    md += [f"| {metric_label(k)} | {_fmt_metric(k, v)} |" for k, v in base.items()
           if k != "device" and not k.endswith("_spread") and k != "size_bytes"]
    spreads = [f"bs{k[len('latency_bs'):-len('_spread')]} {v[0]:.3g}–{v[1]:.3g}" for k, v in base.items()
               if k.endswith("_spread") and isinstance(v, (list, tuple)) and len(v) == 2]
    md += (["", f"Latency spread over timed passes (min–max ms/example): {', '.join(spreads)}."] if spreads else []) + [""]
    md += ["## Pareto front", "",
           "Trials were **selected on the validation split** carved from the training data (\"val\"); the **reported "
           "figure is the held-out evaluation split** (\"eval\"), which the search never selected on. Deltas are in "
           "accuracy points against the baseline; speedup and reduction are baseline / trial.", ""]
    if front:
        md += [front_table(front, baseline, objectives, fmt="markdown"), "| trial | parameters |", "|---|---|"]
        md += [f"| {r.get('number')} | {params_summary(r.get('params')) or '(none)'} |" for r in front] + [""]
    else:
        md += ["_No completed, feasible trial has every objective measured, so there is no front._", ""]
    from .profile_render import report_lines  # links to per-trial profiles (autocompress profile STUDY --front)

    md += report_lines(out_dir, front, study=str(spec_summary.get("study") or out_dir.name))
    md += ["## Trials", "", "| state | count |", "|---|---:|", *[f"| {s} | {n} |" for s, n in sorted(states.items())], "",
           "PRUNED trials are sampled pipelines that would teach nothing new: every technique off (the baseline "
           "itself), or a pipeline an earlier trial already ran (`repeat_of`). They are skipped, not run and not "
           "counted towards the requested total.", "",
           "Full table: [trials.csv](trials.csv) ([trials.json](trials.json)); front: [pareto.json](pareto.json).", ""]
    if failed:
        md += ["### Failed trials", ""] + [f"- trial {r.get('number')} ({pipeline_str(r.get('pipeline'))}): "
                                           f"{r.get('fail_reason') or 'no reason recorded'}" for r in failed] + [""]
    if infeasible:
        md += ["### Infeasible trials (violate a constraint)", "", ", ".join(f"#{r.get('number')}" for r in infeasible), ""]
    has_png, has_html = (out_dir / "pareto.png").exists(), (out_dir / "pareto.html").exists()
    md += ["## Plots", "", "![Pareto front](pareto.png)" if has_png else "_pareto.png was not drawn._", "",
           "Interactive version (hover for trial, pipeline and parameters): [pareto.html](pareto.html)" if has_html
           else "_pareto.html was not drawn._", ""]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return _write_text(out_dir / "report.md", "\n".join(md))


def write_all(
    out_dir: str | Path, *, rows: Rows, baseline: Mapping[str, Any], objectives: Objectives,
    spec_summary: Mapping[str, Any] | None = None, protocol: Mapping[str, Any] | None = None,
    commands: Sequence[str] = (), notes: Sequence[str] = (), extra: Mapping[str, Any] | None = None,
    feasible_only: bool = True, plots: bool = True,
) -> list[dict[str, Any]]:
    """Write trials.csv/json, pareto.json, pareto.png/html and report.md into ``out_dir``; return the front.

    A plot that cannot be drawn (missing or broken plotting library) does not cost the tables and the
    report: the stale file is removed and the reason goes into the report's notes.
    """
    objectives = normalize_objectives(objectives)
    out_dir = Path(out_dir)
    spec_summary, notes = dict(spec_summary or {}), list(notes)
    front = front_rows(rows, objectives, feasible_only=feasible_only)
    write_trials(rows, baseline, objectives, out_dir, front=front)
    write_pareto_json(front, baseline, objectives, out_dir, extra=extra)
    if plots:
        data = plot_data(rows, baseline, objectives, front=front, title=str(spec_summary.get("study") or ""))
        for name, draw in (("pareto.png", draw_png), ("pareto.html", draw_html)):
            try:
                draw(data, out_dir / name)
            except StudyError:
                raise
            except Exception as e:  # noqa: BLE001 - reported in the notes; the tables are still worth writing
                (out_dir / name).unlink(missing_ok=True)
                notes.append(f"{name} could not be drawn: {type(e).__name__}: {e}")
    write_report_md(out_dir, spec_summary=spec_summary, baseline=baseline, rows=rows, front=front, objectives=objectives,
                    protocol=dict(protocol or {}), commands=list(commands), notes=notes)
    return front
