"""Profiles as tables: rich for the terminal, markdown for files and the study report.

Every table is first built as plain ``(headers, rows)`` from a profile dict (pure functions), then
rendered, so tests and other front ends reuse the cells without rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .profile import COMPONENTS, LABELS, by_layer

Table = tuple[list[str], list[list[str]]]
_MISSING = "—"


def big(v: float | int | None) -> str:
    if v is None:
        return _MISSING
    v = float(v)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def megabytes(v: float | int | None) -> str:
    return _MISSING if v is None else f"{float(v) / 1e6:.2f}"


def ms(v: float | None) -> str:
    if v is None:
        return _MISSING
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def pct(v: float | None) -> str:
    return _MISSING if v is None else f"{v * 100:.1f}%"


def ratio(v: float | None) -> str:
    return _MISSING if v is None else f"{v:.2f}x"


def _bss(profile: Mapping[str, Any]) -> list[str]:
    return [str(b) for b in profile.get("batch_sizes") or []]


def _shown(profile: Mapping[str, Any]) -> list[str]:
    """Components with anything to show (``other`` only when it has params, bytes, FLOPs or time)."""
    t = profile["totals"]
    return [c for c in COMPONENTS if c != "other" or t[c]["params"] or t[c]["bytes"] or t[c]["flops_per_token"]
            or any(t[c]["time_ms"].values())]


def component_table(profile: Mapping[str, Any]) -> Table:
    """One row per component over all layers, plus the total: value and share of the total per metric."""
    bss = _bss(profile)
    headers = ["component", "params", "%", "MB", "%", "FLOPs/token", "%"]
    for bs in bss:
        headers += [f"ms/ex bs{bs}", "%"]
    rows = []
    for comp in (*_shown(profile), "total"):
        cell = profile["totals"][comp]
        share = cell["share"]
        row = [LABELS.get(comp, comp), big(cell["params"]), pct(share["params"]), megabytes(cell["bytes"]),
               pct(share["bytes"]), big(cell["flops_per_token"]), pct(share["flops_per_token"])]
        for bs in bss:
            row += [ms(cell["time_ms"].get(bs)), pct(share["time_ms"].get(bs))]
        rows.append(row)
    return headers, rows


def _structure(layer: Mapping[str, Any] | None) -> list[str]:
    if layer is None:
        return ["", "", "", ""]
    tokens = (f"{layer['tokens_attention']}→{layer['tokens_ffn']}"
              if layer.get("tokens_attention") is not None and layer.get("tokens_ffn") is not None else _MISSING)
    notes = [f"shares layer {layer['shared_with']}'s weights"] if layer.get("shared_with") is not None else []
    notes += [f"{n} {kind}" for kind, n in sorted((layer.get("modules") or {}).items())]
    return [str(layer["heads"]), str(layer["ffn_width"]), tokens, ", ".join(notes)]


def layer_table(profile: Mapping[str, Any]) -> Table:
    """One row per scope (embeddings, each layer position, head, the rest), summed over components."""
    bss = _bss(profile)
    layers = {entry["layer"]: entry for entry in profile.get("layers") or []}
    headers = ["scope", "heads", "FFN", "tokens attn→FFN", "notes", "params", "MB", "FLOPs/token"]
    headers += [f"ms/ex bs{bs}" for bs in bss]
    rows = []
    for s in by_layer(profile):
        structure = _structure(layers.get(s["layer"])) if s["layer"] is not None else ["", "", "", ""]
        scope = "unattributed" if s["scope"] == "model" else s["scope"]
        rows.append([scope, *structure, big(s["params"]), megabytes(s["bytes"]), big(s["flops_per_token"]),
                     *[ms(s["time_ms"].get(bs)) for bs in bss]])
    return _drop_empty(headers, rows, "notes")


def _drop_empty(headers: list[str], rows: list[list[str]], column: str) -> Table:
    i = headers.index(column)
    if any(row[i] for row in rows):
        return headers, rows
    return headers[:i] + headers[i + 1:], [row[:i] + row[i + 1:] for row in rows]


def detail_table(profile: Mapping[str, Any]) -> Table:
    """Every (scope, component) cell."""
    bss = _bss(profile)
    headers = ["scope", "component", "params", "bytes", "FLOPs/token"] + [f"ms/ex bs{bs}" for bs in bss]
    rows = [[r["scope"], LABELS.get(r["component"], r["component"]), str(r["params"]), str(r["bytes"]),
             big(r["flops_per_token"]), *[ms(r["time_ms"].get(bs)) for bs in bss]] for r in profile["rows"]]
    return headers, rows


def compare_table(comparison: Mapping[str, Any], profile: Mapping[str, Any], reference: Mapping[str, Any]) -> Table:
    """Per component: model value, reference value and model / reference, for every metric."""
    bss = comparison["batch_sizes"]
    metrics = [("params", "params", big), ("MB", "bytes", megabytes), ("FLOPs/token", "flops_per_token", big)]
    headers = ["component"]
    for name, _, _ in metrics:
        headers += [name, "ratio"]
    for bs in bss:
        headers += [f"ms/ex bs{bs}", "ratio"]
    shown = [c for c in COMPONENTS if c in set(_shown(profile)) | set(_shown(reference))]
    rows = []
    for comp in (*shown, "total"):
        a, b, r = profile["totals"][comp], reference["totals"][comp], comparison["ratios"][comp]
        row = [LABELS.get(comp, comp)]
        for _, key, fmt in metrics:
            row += [f"{fmt(b[key])} → {fmt(a[key])}", ratio(r[key])]
        for bs in bss:
            row += [f"{ms(b['time_ms'].get(bs))} → {ms(a['time_ms'].get(bs))}", ratio(r["time_ms"].get(bs))]
        rows.append(row)
    return headers, rows


def compare_layer_table(profile: Mapping[str, Any], reference: Mapping[str, Any]) -> Table:
    """Per scope: structure of reference → model (heads, FFN width, tokens) and the ratio of FLOPs and time."""
    bss = [bs for bs in _bss(profile) if bs in _bss(reference)]
    a = {s["scope"]: s for s in by_layer(profile)}
    b = {s["scope"]: s for s in by_layer(reference)}
    la = {e["layer"]: e for e in profile.get("layers") or []}
    lb = {e["layer"]: e for e in reference.get("layers") or []}
    headers = ["scope", "heads", "FFN", "model tokens attn→FFN", "model notes", "MB ratio", "FLOPs ratio"]
    headers += [f"bs{bs} time ratio" for bs in bss]
    rows = []
    order = list(b) + [s for s in a if s not in b]
    for scope in order:
        sa, sb = a.get(scope), b.get(scope)
        layer = (sa or sb)["layer"]
        xa, xb = _structure(la.get(layer)) if sa else [_MISSING] * 4, _structure(lb.get(layer)) if sb else [_MISSING] * 4
        pair = ([f"{y} → {x}" if x != y else x for x, y in zip(xa[:2], xb[:2])] + [xa[2]]
                if layer is not None else ["", "", ""])
        if sa is None:
            depth = f"depth {len(lb)} → {len(la)}"  # positions beyond the model's depth (e.g. distillation)
            rows.append([scope, *pair, f"no such layer ({depth})", "", "", *["" for _ in bss]])
            continue

        def r(key: str, bs: str | None = None) -> str:
            if sb is None:
                return _MISSING
            x, y = (sa[key], sb[key]) if bs is None else (sa[key].get(bs), sb[key].get(bs))
            return ratio(x / y) if x is not None and y else _MISSING

        rows.append([scope if scope != "model" else "unattributed", *pair, xa[3] if layer is not None else "",
                     r("bytes"), r("flops_per_token"), *[r("time_ms", bs) for bs in bss]])
    return _drop_empty(headers, rows, "model notes")


def summary_lines(profile: Mapping[str, Any]) -> list[str]:
    """What was measured, and how the table's totals check against independent figures."""
    t = profile["totals"]["total"]
    out = [f"{profile['label']}: {profile['inputs']}; device {profile['device']}.",
           f"Parameters {t['params']:,} (the study's param count: {profile['param_count']:,}); tensor bytes "
           f"{t['bytes']:,} (model.safetensors adds an 8-byte length and a JSON header); FLOPs "
           f"{t['flops_per_example']:,.0f} per example (matrix products only, as torch's FLOP counter counts).",
           ]
    for source_note in (profile.get("source") or {}).get("notes") or []:
        out.append(f"Note: {source_note}.")
    for bs, lat in (profile.get("latency") or {}).items():
        paired = lat.get("paired_ratio")
        out.append(f"Batch {bs}: components sum to {ms(lat['components_total_ms'])} ms/example (of which unattributed "
                   f"{ms(lat['unattributed_ms'])}); the whole model timed without hooks (each batch right before its "
                   f"hooked run): {ms(lat['whole_model_ms'])} ms/example (spread {ms(lat['whole_model_spread'][0])}–"
                   f"{ms(lat['whole_model_spread'][1])}); table total / whole model {lat['ratio_to_whole_model']:.3f}"
                   + (f" (median per-pass ratio {paired:.3f})" if paired is not None else "")
                   + f"; median of {lat['passes']} passes over {lat['examples']} examples.")
    return out


# --------------------------------------------------------------------------------------------- rendering


def to_markdown(table: Table) -> str:
    headers, rows = table
    align = ["---" if i == 0 or h in ("notes", "model notes", "component") else "---:" for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_rich(table: Table, title: str | None = None) -> Any:
    from rich.table import Table as RichTable

    headers, rows = table
    t = RichTable(title=title, title_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 or "notes" in h else "right", no_wrap="notes" not in h)
    for row in rows:
        t.add_row(*row)
    return t


def profile_markdown(profile: Mapping[str, Any], *, reference: Mapping[str, Any] | None = None,
                     comparison: Mapping[str, Any] | None = None, plot: str | None = None, detail: bool = False) -> str:
    """A whole profile (and its comparison) as a markdown document."""
    md = [f"# Profile: {profile['label']}", ""]
    if comparison is not None and reference is not None:
        md += [f"Compared with **{reference['label']}** (values reference → model; ratio = model / reference).", "",
               "## By component", "", to_markdown(compare_table(comparison, profile, reference)), "## By layer", "",
               to_markdown(compare_layer_table(profile, reference))]
    md += ["## This model by component", "", to_markdown(component_table(profile)), "## This model by layer", "",
           to_markdown(layer_table(profile))]
    if detail:
        md += ["## Every cell", "", to_markdown(detail_table(profile))]
    md += ["## Measurement", "", *[f"- {line}" for line in summary_lines(profile)]]
    if reference is not None:
        md += [*[f"- Reference: {line}" for line in summary_lines(reference)]]
    if plot:
        md += ["", f"![profile]({plot})"]
    return "\n".join(md) + "\n"


def report_lines(out_dir: str | Path, front: Sequence[Mapping[str, Any]], *, study: str) -> list[str]:
    """The study report's section linking each front trial to its profile against the baseline (written by
    ``autocompress profile STUDY --front``), or giving the command that writes them."""
    from .profile_models import PROFILE_DIR

    if not front:
        return []
    d = Path(out_dir) / PROFILE_DIR
    md = ["## Profiles", "",
          "Where each front trial spends parameters, bytes, FLOPs and time, component by component, against the "
          "baseline:", ""]
    missing = []
    for r in front:
        n = r.get("number")
        if (d / f"trial-{n}.md").is_file():
            png = f" ([plot]({PROFILE_DIR}/trial-{n}.png))" if (d / f"trial-{n}.png").is_file() else ""
            md.append(f"- trial {n}: [profile vs baseline]({PROFILE_DIR}/trial-{n}.md){png}")
        else:
            missing.append(n)
            md.append(f"- trial {n}: not profiled yet (`autocompress profile {study}:{n} --compare {study}:baseline`)")
    if missing:
        md += ["", f"`autocompress profile {study} --front` profiles every front trial against the baseline into "
                   f"`{PROFILE_DIR}/` and links them here."]
    return md + [""]


def terminal_output(result: Mapping[str, Any], *, detail: bool = False) -> list[Any]:
    """What ``autocompress profile`` prints for the result of :func:`autocompress.profile_models.run_profile`:
    rich tables, then the measurement lines."""
    p, ref, cmp = result["profile"], result.get("reference"), result.get("comparison")
    items: list[Any] = []
    if cmp is not None and ref is not None:
        items += [to_rich(compare_table(cmp, p, ref), title=f"{p['label']} vs {ref['label']}: by component "
                                                             f"(reference → model; ratio = model / reference)"),
                  to_rich(compare_layer_table(p, ref), title="by layer (reference → model)")]
    items += [to_rich(component_table(p), title=f"{p['label']}: by component"),
              to_rich(layer_table(p), title=f"{p['label']}: by layer")]
    if detail:
        items.append(to_rich(detail_table(p), title="every cell"))
    items += summary_lines(p) + ([f"Reference: {line}" for line in summary_lines(ref)] if ref is not None else [])
    return items
