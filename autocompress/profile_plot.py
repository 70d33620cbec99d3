"""The profile plot: one panel per metric (parameters, bytes, FLOPs per token, time per batch size), one
stacked bar per model, one segment per component. Data first (:func:`plot_data`, plain lists), drawing
second (:func:`draw_png`, matplotlib's Agg canvas, imported only when drawing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import AutocompressError
from .profile import COMPONENTS, LABELS

# Fixed colours per component, so the same component looks the same in every plot.
COLOURS = {"embeddings": "#8c564b", "qkv": "#1f77b4", "attention_core": "#aec7e8", "attention_output": "#17becf",
           "ffn": "#ff7f0e", "layer_norm": "#2ca02c", "classifier": "#9467bd", "other": "#c7c7c7"}


def plot_data(profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Panels of stacked bars: ``{"models": [labels], "panels": [{"title", "unit", "segments":
    {component: [value per model]}}]}``; time panels only for batch sizes every profile was timed at."""
    if not profiles:
        raise ValueError("plot_data needs at least one profile")
    shared = [bs for bs in (str(b) for b in profiles[0].get("batch_sizes") or [])
              if all(bs in {str(b) for b in p.get("batch_sizes") or []} for p in profiles)]
    specs = [("parameters", "millions", "params", None, 1e6), ("stored bytes", "MB", "bytes", None, 1e6),
             ("FLOPs per token", "MFLOPs", "flops_per_token", None, 1e6)]
    specs += [(f"time at batch {bs}", "ms per example", "time_ms", bs, 1.0) for bs in shared]
    panels = []
    for title, unit, key, bs, scale in specs:
        segments = {}
        for comp in COMPONENTS:
            values = []
            for p in profiles:
                cell = p["totals"][comp][key]
                values.append(float(cell.get(bs, 0.0) if bs is not None else cell) / scale)
            if any(values):
                segments[comp] = values
        panels.append({"title": title, "unit": unit, "segments": segments})
    return {"models": [str(p["label"]) for p in profiles], "seq_len": [p["seq_len"] for p in profiles],
            "panels": panels}


def draw_png(data: Mapping[str, Any], path: str | Path, *, dpi: int = 130) -> Path:
    """Write the stacked-bar plot of :func:`plot_data` to ``path`` (PNG)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels, models = data["panels"], data["models"]
    fig = Figure(figsize=(2.1 * max(1, len(models)) * len(panels) / 1.6 + 1.5, 5.2))
    FigureCanvasAgg(fig)
    names = ["\n".join(textwrap.wrap(m.replace("+", " + "), 22)[:6]) for m in models]  # wrap between techniques
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        bottom = [0.0] * len(models)
        for comp, values in panel["segments"].items():
            ax.bar(range(len(models)), values, bottom=bottom, color=COLOURS.get(comp, "#7f7f7f"),
                   label=LABELS.get(comp, comp), width=0.6)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel["unit"], fontsize=8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(names, fontsize=6.5)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    found = {lab: h for ax in fig.axes for h, lab in zip(*ax.get_legend_handles_labels())}
    handles = {LABELS[c]: found[LABELS[c]] for c in COMPONENTS if LABELS[c] in found}  # stacking order
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 8), fontsize=7,
               frameon=False)
    seq = sorted(set(data.get("seq_len") or []))
    fig.suptitle(f"Where the model spends its parameters, bytes, FLOPs and time ({'/'.join(map(str, seq))} tokens)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise AutocompressError(f"--plot {str(path)!r}: the plot is a PNG; give a path ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    except OSError as exc:
        raise AutocompressError(f"cannot write the plot {str(path)!r}: {exc}; check the folder is writable") from None
    return path
