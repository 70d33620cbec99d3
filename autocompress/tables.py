"""A per-trial comparison table relative to the baseline (``autocompress table``): what each pipeline
did to accuracy, latency at every measured batch size, size, parameters and FLOPs.

Rows are computed by a pure function (:func:`comparison_rows`) and rendered separately, so benchmarks,
notebooks and tests reuse the numbers. Every figure comes from the study's stored trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .pareto import baseline_metrics, latency_names, relative_to_baseline

_MISSING = "—"


def _setting(params: Mapping[str, Any]) -> str:
    from .report import params_summary

    return params_summary(params) or "(defaults)"


def comparison_rows(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per finished trial (complete or failed), in trial order, with metrics relative to the
    baseline (``relative_to_baseline`` keys) and, for failed trials, the reason."""
    out = []
    for r in rows:
        if r["state"] not in ("COMPLETE", "FAIL") or (r["state"] == "FAIL" and r.get("interrupted")):
            continue
        rel = relative_to_baseline(r.get("metrics") or {}, baseline) if r["state"] == "COMPLETE" else {}
        out.append({
            "number": r["number"],
            "state": r["state"],
            "pipeline": list(r.get("pipeline") or []),
            "setting": _setting(r.get("params") or {}),
            "fail_reason": r.get("fail_reason"),
            "metrics": dict(r.get("metrics") or {}),
            **rel,
        })
    return out


def _cell(kind: str, v: Any) -> str:
    if v is None:
        return _MISSING
    if kind == "pts":
        return f"{v:+.2f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "pct":
        return f"{v * 100:.2f}"
    return str(v)


def render_markdown(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any], *, title: str,
                    command: str, claims: Mapping[str, Sequence[str]] | None = None,
                    notes: Sequence[str] = ()) -> str:
    """A markdown table (one line per trial, grouped by pipeline) plus the baseline and the command."""
    base = baseline_metrics(baseline)
    lats = latency_names(base)
    lines = [f"# {title}", "", f"Reproduce: `{command}`", ""]
    acc = base.get("eval_accuracy")
    lines.append(
        "Baseline: "
        + ", ".join(filter(None, [
            f"dev accuracy {acc * 100:.2f}" if acc is not None else None,
            f"validation accuracy {base['accuracy'] * 100:.2f}" if "accuracy" in base else None,
            *(f"{lat.removeprefix('latency_')} {base[lat]:.2f} ms/example" for lat in lats),
            f"{base['size_mb']:.1f} MB" if "size_mb" in base else None,
            f"{base['params'] / 1e6:.2f}M parameters" if "params" in base else None,
        ]))
        + (f" (measured on {baseline.get('device')})" if baseline.get("device") else "")
    )
    lines += ["", "Accuracy deltas are points (x100) on the held-out dev split and on the validation split "
                  "carved from train; speed-ups and reductions are baseline / trial (>1 is better).", ""]
    head = ["trial", "pipeline", "setting", "dev acc Δ", "val acc Δ",
            *(f"{lat.removeprefix('latency_')} speed-up" for lat in lats), "size ×", "params ×", "FLOPs ×"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r["pipeline"], r["number"]))
    for r in order:
        pipe = "+".join(r["pipeline"]) or "(none)"
        if r["state"] == "FAIL":
            cells = [str(r["number"]), pipe, r["setting"], f"failed: {r.get('fail_reason') or '?'}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [str(r["number"]), pipe, r["setting"], _cell("pts", r.get("eval_acc_delta")),
                     _cell("pts", r.get("acc_delta")),
                     *(_cell("x", r.get("speedup_" + lat.removeprefix("latency_"))) for lat in lats),
                     _cell("x", r.get("size_reduction")), _cell("x", r.get("params_reduction")),
                     _cell("x", r.get("flops_reduction"))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if claims:
        lines += ["", "What each technique claims to reduce (its `reduces` declaration; anything else it "
                      "does not save):", ""]
        lines += [f"- `{name}`: {', '.join(sorted(c)) or 'nothing (accuracy only)'}" for name, c in sorted(claims.items())]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def study_table(study_dir: str | Path, *, title: str | None = None, notes: Sequence[str] = ()) -> str:
    """The comparison table of a study folder, as markdown."""
    from .registry import load_registry
    from .results import load_results

    res = load_results(study_dir)
    rows = comparison_rows(res.rows, res.baseline)
    reg = load_registry()
    used = {name for r in rows for name in r["pipeline"]}
    claims = {n: sorted(reg.get(n).reduces) for n in used if n in reg.techniques}
    return render_markdown(rows, res.baseline, title=title or f"{res.spec.study}: trials relative to the baseline",
                           command=res.command, claims=claims, notes=notes)


def write_table(study_dir: str | Path, out: str | Path, *, title: str | None = None,
                notes: Sequence[str] = ()) -> Path:
    """Render the comparison table of a study folder to ``out`` (markdown)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(study_table(study_dir, title=title, notes=notes), encoding="utf-8")
    return out
