"""The ``autocompress`` command line (typer)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import AutocompressError
from .guards import DEBUG_ENV, infeasible_message, redact, unexpected_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold secrets (storage URLs with passwords)
    help="Search for compressed BERT classifiers: technique plugins, Optuna multi-objective search, Pareto fronts.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # no hard wraps: paths and commands stay copy-pasteable

PluginOpt = typer.Option(None, "--plugin", "-p", help="Load a plugin module (dotted name or .py path); repeatable.")
ResultsOpt = typer.Option(Path("results"), "--results-dir", help="Folder that holds one sub-folder per study.")


def _log(message: str) -> None:
    err.print(message, markup=False, highlight=False)


def _registry(plugins: Optional[List[str]]):
    from .registry import load_registry

    reg = load_registry(extra_plugins=plugins or ())
    for plugin, reason in reg.load_errors:
        err.print(f"[yellow]warning:[/] plugin {escape(repr(plugin))} was not loaded: {escape(reason)}", highlight=False)
    return reg


@app.command()
def search(
    spec_file: Path = typer.Argument(..., help="Search spec YAML (see search_spaces/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a spec key: KEY=VALUE (e.g. trials=40, recovery.steps=50)."),
    data: Optional[str] = typer.Option(None, "--data", help="Task data directory or file (sets data.path)."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Total finished trials wanted (sets search.trials)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Worker processes on this machine sharing the study, one trial each (one per GPU with CUDA)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by workers on several machines, e.g. postgresql+psycopg2://USER@HOST/DB (default: SQLite in the study folder)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda or cuda:N (sets measurement.device)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="optuna (worker processes) or ray (Ray Tune trials; pip install 'autocompress[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join: auto, or HOST:PORT (default: start Ray on this machine)."),
    cpus_per_trial: Optional[float] = typer.Option(None, "--cpus-per-trial", help="Ray: CPUs reserved per trial (fractions allowed)."),
    gpus_per_trial: Optional[float] = typer.Option(None, "--gpus-per-trial", help="Ray: GPUs per trial (0.5 = two trials share a GPU); > 0 runs trials on CUDA."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Ray: at most this many trials at once."),
    max_failures: Optional[int] = typer.Option(None, "--max-failures", help="Times a trial whose worker died (kill -9, out of memory, node lost) is run again."),
    results_dir: Path = ResultsOpt,
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Run (or resume) a compression search. Re-running the same command resumes to the requested total."""
    from .search import run_search
    from .spec import load_spec

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.path={json.dumps(data)}")
    if trials is not None:
        overrides.append(f"search.trials={trials}")
    for key, value in (("search.workers", workers), ("search.storage", storage), ("measurement.device", device),
                       ("search.backend", backend), ("search.ray.address", ray_address),
                       ("search.ray.cpus_per_trial", cpus_per_trial), ("search.ray.gpus_per_trial", gpus_per_trial),
                       ("search.ray.max_concurrent", max_concurrent), ("search.max_failures", max_failures)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    registry = _registry(plugin)
    spec = load_spec(spec_file, overrides=overrides)
    command = "autocompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    d = run_search(spec, registry=registry, results_dir=results_dir, command=command, log=_log)
    _print_front(d, fmt="table")
    _warn_mixed_devices(d)
    err.print(f"Results: {d}/ (report.md, pareto.png, pareto.html, trials.csv)", highlight=False)
    _fail_if_infeasible(d)


@app.command()
def bench(
    spec_file: Path = typer.Argument(..., help="Search spec YAML of the joint search (e.g. search_spaces/sst2-minilm.yaml)."),
    data: Optional[str] = typer.Option(None, "--data", help="Task data directory or file (sets data.path)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a spec key: KEY=VALUE."),
    trials_per_technique: int = typer.Option(6, "--trials-per-technique", help="Trial budget of each single-technique search."),
    joint_trials: Optional[int] = typer.Option(None, "--joint-trials", help="Trial budget of the joint search (default: the spec's search.trials)."),
    techniques: Optional[str] = typer.Option(None, "--techniques", help="Comma-separated techniques to benchmark (default: all the spec enables)."),
    onnx_front: bool = typer.Option(True, "--onnx-front/--no-onnx-front", help="Export the joint front to ONNX and time it in ONNX Runtime too."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Benchmark folder (default: results/<study>)."),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Joint search vs one search per technique vs the baseline as deployed today (PyTorch / ONNX Runtime,
    fp32 / dynamic int8): writes report.md, summary.json and bench.png. Re-running resumes every study."""
    from .bench import run_bench
    from .spec import load_spec

    overrides = list(set_ or []) + ([f"data.path={json.dumps(data)}"] if data is not None else [])
    registry = _registry(plugin)
    spec = load_spec(spec_file, overrides=overrides)
    names = [t.strip() for t in techniques.split(",") if t.strip()] if techniques else None
    command = "autocompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_bench(spec, registry=registry, out_dir=out_dir or Path("results") / spec.study,
              trials_per_technique=trials_per_technique, joint_trials=joint_trials, techniques=names,
              onnx_front=onnx_front, data=data, command=command, log=_log)


@app.command()
def baseline(
    spec_file: Path = typer.Argument(..., help="Search spec YAML whose model, data and baseline recipe to use."),
    data: Optional[str] = typer.Option(None, "--data", help="Task data directory or file (sets data.path)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a spec key: KEY=VALUE (e.g. baseline.learning_rate=5e-5)."),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Fine-tune (or reuse the cached) baseline of a spec and show how good it is: each checkpoint's validation
    accuracy, then the kept model's validation and held-out scores, latency and size. It warms the cache that
    search and bench reuse; compare recipes on validation, not on the held-out split."""
    from .baseline import read_training, training_lines
    from .engine import measure_baseline, prepare
    from .search import _baseline_line
    from .spec import load_spec

    overrides = list(set_ or []) + ([f"data.path={json.dumps(data)}"] if data is not None else [])
    registry = _registry(plugin)
    spec = load_spec(spec_file, overrides=overrides)
    prep = prepare(spec, registry, log=_log)
    lines = training_lines(read_training(prep.baseline_dir))
    lines += [_baseline_line(measure_baseline(prep), spec), f"Cached in {prep.baseline_dir} (key {prep.baseline_key})"]
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


@app.command("bench-compare")
def bench_compare(
    run_a: Path = typer.Argument(..., help="Benchmark folder (or its summary.json) of run A, e.g. results/sst2-minilm."),
    run_b: Path = typer.Argument(..., help="Benchmark folder (or its summary.json) of run B: the same command rerun with another --out."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the Markdown here (default: print it)."),
) -> None:
    """Does the benchmark reproduce? Every target, hypervolume, peer and shared front point of two runs of
    `autocompress bench`, side by side, with the noise read from the runs: the baseline's repeated timings and
    how far each peer moved between them."""
    from .bench_compare import compare_summaries, comparison_markdown
    from .errors import StudyError
    from .report import _write_text

    summaries = []
    for name, p in (("RUN_A", run_a), ("RUN_B", run_b)):
        f = p / "summary.json" if p.is_dir() else p
        try:
            summaries.append(json.loads(f.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise StudyError(f"{name}: no benchmark summary at {f}. Pass a folder written by `autocompress bench` "
                             "(it holds summary.json) or the summary.json itself.") from None
        except (OSError, json.JSONDecodeError) as e:
            raise StudyError(f"{name}: cannot read {f} as a benchmark summary ({e}). Rerun `autocompress bench` "
                             "to rewrite it.") from None
    command = "autocompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = comparison_markdown(compare_summaries(*summaries), label_a=str(run_a), label_b=str(run_b), command=command)
    if out_file is None:
        typer.echo(text, nl=False)
    else:
        _write_text(out_file, text)
        _log(f"Wrote {out_file}")


def _fail_if_infeasible(d: Path) -> None:
    """Finished, but no trial meets the constraints: say so, and exit non-zero (NoFeasibleTrial)."""
    from .errors import NoFeasibleTrial
    from .results import load_results

    res = load_results(d)
    problem = infeasible_message(res.rows, res.baseline, res.spec)
    if problem:
        raise NoFeasibleTrial(problem)


@app.command()
def plugins(
    format: str = typer.Option("table", "--format", "-f", help="table or json"),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """List every registered technique with its plugin, stage and parameters."""
    from rich.table import Table

    from .registry import describe

    reg = _registry(plugin)
    rows = describe(reg)
    if format == "json":
        print(json.dumps({"techniques": rows, "load_errors": [{"plugin": p, "reason": r} for p, r in reg.load_errors]}, indent=2))
        return
    if format != "table":
        raise typer.BadParameter(f"--format {format!r}: use 'table' or 'json'")
    for row in rows:
        t = Table(title=f"{row['name']}  [dim]({row['source']}: {row['plugin']}, stage {row['stage']})[/]", title_justify="left")
        for col in ("parameter", "type", "range / choices", "default", "help"):
            t.add_column(col)
        for p in row["params"]:
            t.add_row(p["name"], p["type"], p["domain"], str(p["default"]), p["help"])
        out.print(t)
        if row["description"]:
            out.print(f"  {row['description']}", highlight=False)
        if row["incompatible_with"]:
            for other, why in row["incompatible_with"].items():
                out.print(f"  incompatible with {other}: {why}", highlight=False)
        onnx = row["onnx"]
        if onnx["defaults"] is not None:
            out.print(f"  ONNX export (--onnx): no: {onnx['defaults']}", highlight=False)
        else:
            out.print("  ONNX export (--onnx): yes" + "".join(f"; not with {k}: {why}" for k, why in onnx["refused"].items()),
                      highlight=False)
    if not rows:
        out.print("No techniques registered.")


@app.command("new-plugin")
def new_plugin(
    name: str = typer.Argument(..., help="Technique name (lower_case_with_underscores), e.g. my_pruning."),
    out_dir: Path = typer.Option(Path("."), "--out", "-o", help="Folder to create the package in."),
) -> None:
    """Create a technique plugin package that passes the contract suite; replace its TODO transform."""
    from .scaffold import created_files, names_for
    from .scaffold import new_plugin as make_plugin

    target = make_plugin(name, out=out_dir)
    module = target / names_for(name)["package"] / "plugin.py"
    out.print(f"Created {target}/ (technique {name!r}):", highlight=False)
    for rel in created_files(target):
        out.print(f"  {rel}", highlight=False, markup=False)
    out.print(f"Next: cd {shlex.quote(str(target))} && pip install -e . && pytest\n"
              f"Then replace the block marked TODO in {module} (guide: docs/plugins.md).", highlight=False, markup=False,
              soft_wrap=True)  # no hard wraps: the command and path stay copy-pasteable


def _print_front(d: Path, *, fmt: str) -> None:
    from .report import front_table
    from .results import load_results

    res = load_results(d)
    if fmt == "json":
        print(json.dumps(front_table(res.front, res.baseline, res.objectives, fmt="json"), indent=2, default=str))
    else:
        out.print(front_table(res.front, res.baseline, res.objectives, fmt="table"))


def _study_path(study: str, results_dir: Path) -> Path:
    from .errors import StudyError
    from .search import study_dir

    p = Path(study)
    if p.is_dir() and (p / "study.json").is_file():
        return p
    d = study_dir(results_dir, study)
    if not (d / "study.json").is_file():
        raise StudyError(f"no study {study!r} under {str(results_dir)!r} (looked for {d}/study.json); run 'autocompress search SPEC' first")
    return d


@app.command()
def pareto(
    study: str = typer.Argument(..., help="Study name (under --results-dir) or its folder."),
    format: str = typer.Option("table", "--format", "-f", help="table or json"),
    results_dir: Path = ResultsOpt,
) -> None:
    """Show the Pareto front of a study and (re)write its plots and report."""
    from .results import refresh

    if format not in ("table", "json"):
        raise typer.BadParameter(f"--format {format!r}: use 'table' or 'json'")
    d = _study_path(study, results_dir)
    refresh(d)
    _print_front(d, fmt=format)
    if format == "table":
        err.print(f"Plots: {d / 'pareto.png'}, {d / 'pareto.html'}", highlight=False)
    _warn_mixed_devices(d)


def _warn_mixed_devices(d: Path) -> None:
    from .results import load_results, mixed_devices_note

    res = load_results(d)
    note = mixed_devices_note(res.rows, res.baseline)
    if note:
        err.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command()
def show(
    study: str = typer.Argument(..., help="Study name (under --results-dir) or its folder."),
    trial: int = typer.Argument(..., help="Trial number."),
    results_dir: Path = ResultsOpt,
) -> None:
    """Show one trial: pipeline, parameters, metrics relative to the baseline, or why it failed."""
    from .errors import StudyError
    from .pareto import relative_to_baseline
    from .results import load_results

    res = load_results(_study_path(study, results_dir))
    row = next((r for r in res.rows if r["number"] == trial), None)
    if row is None:
        raise StudyError(f"study has no trial {trial}; trials are numbered 0..{len(res.rows) - 1}")
    out.print(f"[bold]Trial {trial}[/] — {row['state']}" + (" (on the front)" if any(f['number'] == trial for f in res.front) else ""))
    out.print(f"pipeline: {' -> '.join(row['pipeline']) or '(no technique: the baseline)'}", highlight=False)
    for tech, params in row["params"].items():
        out.print(f"  {tech}: " + ", ".join(f"{k}={v}" for k, v in params.items()), highlight=False)
    if row.get("fail_reason"):
        out.print(f"[red]failed:[/] {row['fail_reason']}", highlight=False)
    if row["metrics"]:
        for k, v in row["metrics"].items():
            b = res.baseline.get(k)
            extra = f"   (baseline {b:.4g})" if isinstance(b, (int, float)) and isinstance(v, (int, float)) else ""
            out.print(f"  {k}: {v:.4g}{extra}" if isinstance(v, (int, float)) else f"  {k}: {v}", highlight=False)
        rel = {k: v for k, v in relative_to_baseline(row["metrics"], res.baseline).items() if v is not None}
        out.print("relative to baseline: " + ", ".join(
            f"{k} {v:+.2f} pts" if "delta" in k else f"{k} {v:.2f}x" for k, v in rel.items()), highlight=False)
    model_dir = row.get("model_dir")
    if model_dir and (res_dir := _study_path(study, results_dir) / model_dir).is_dir():
        out.print(f"model: {res_dir}", highlight=False)


@app.command()
def table(
    study: str = typer.Argument(..., help="Study name (under --results-dir) or its folder."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write markdown here (default: print it)."),
    title: Optional[str] = typer.Option(None, "--title", help="Heading of the table."),
    results_dir: Path = ResultsOpt,
) -> None:
    """Every trial relative to the baseline: accuracy delta, speed-up per batch size, size/params/FLOPs."""
    from .tables import study_table, write_table

    d = _study_path(study, results_dir)
    if output is not None:
        err.print(f"Wrote {write_table(d, output, title=title)}", highlight=False)
    else:
        out.print(study_table(d, title=title), markup=False, highlight=False)


@app.command()
def export(
    study: str = typer.Argument(..., help="Study name (under --results-dir) or its folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be new or empty, unless --force)."),
    trial: Optional[int] = typer.Option(None, "--trial", "-t", help="Export this trial number."),
    pick: Optional[str] = typer.Option(None, "--pick", help="Choose from the Pareto front: knee, best-accuracy or fastest."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="With --pick: at most this many accuracy points below the baseline (validation split)."),
    max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", help="With --pick: at most this size (MB)."),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="With --pick: at most this latency (ms/example, the front's latency objective)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx, checked against PyTorch and timed in ONNX Runtime."),
    data: Optional[str] = typer.Option(None, "--data", help="Task data, if it moved since the search (for verification and --onnx)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload the export and check it reproduces the recorded held-out accuracy."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it holds a previous export."),
    results_dir: Path = ResultsOpt,
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Export one trial as a self-contained model folder: weights, recipe, tokenizer, model card, export.json."""
    from .export import export_trial

    command = "autocompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    export_trial(_study_path(study, results_dir), out_dir, trial=trial, pick=pick, max_drop=max_drop,
                 max_size_mb=max_size_mb, max_latency_ms=max_latency_ms, onnx=onnx, data=data, verify=verify,
                 force=force, command=command, registry=_registry(plugin), log=_log)


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A folder written by 'autocompress export'."),
    texts: List[str] = typer.Argument(..., help="Texts to classify."),
    pair_separator: Optional[str] = typer.Option(None, "--pair-separator", help="Split each text into a sentence pair at this string (for pair tasks)."),
    format: str = typer.Option("table", "--format", "-f", help="table or json"),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Classify texts with an exported model: label and probability per text."""
    from .export import Predictor

    if format not in ("table", "json"):
        raise typer.BadParameter(f"--format {format!r}: use 'table' or 'json'")
    inputs = [tuple(t.split(pair_separator, 1)) if pair_separator else t for t in texts]
    if pair_separator and any(len(t) != 2 for t in inputs):
        bad = next(t for t, i in zip(texts, inputs) if len(i) != 2)
        raise typer.BadParameter(f"--pair-separator {pair_separator!r} does not occur in {bad!r}; put it between the two sentences")
    results = Predictor.load(model_dir, registry=_registry(plugin))(inputs)
    if format == "json":
        print(json.dumps([{"text": t, "label": lab, "probability": p} for t, (lab, p) in zip(texts, results)], indent=2))
        return
    for text, (label, prob) in zip(texts, results):
        print(f"{label}\t{prob:.4f}\t{text}")  # plain tab-separated lines (rich would expand the tabs)


@app.command()
def profile(
    model: str = typer.Argument(..., help="STUDY:N (a trial), STUDY:baseline, an exported or trial folder, a baseline cache folder, a Hugging Face folder or hub id, or 'default'."),
    trial: Optional[int] = typer.Option(None, "--trial", "-t", help="MODEL is a study: profile this trial."),
    compare: Optional[str] = typer.Option(None, "--compare", "-c", help="Another MODEL (same forms), e.g. the baseline: ratios model / reference per component."),
    front: bool = typer.Option(False, "--front", help="MODEL is a study: profile every front trial against its baseline into STUDY/profiles/, linked from report.md."),
    format: str = typer.Option("table", "--format", "-f", help="table or json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write stacked bars per component (one bar per model) to this .png."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per example (default: the study's model.max_length, else 64)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (models with int8 layers run on cpu)."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes to time."),
    examples: int = typer.Option(64, "--examples", help="Examples timed per batch size."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per batch size (median reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed passes first, per batch size."),
    timing: bool = typer.Option(True, "--time/--no-time", help="--no-time: parameters, bytes and FLOPs only."),
    detail: bool = typer.Option(False, "--detail", help="Also print every (layer, component) cell."),
    results_dir: Path = ResultsOpt,
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Where a model spends parameters, bytes, FLOPs and time: per component, per layer and in total."""
    from .profile_models import parse_batch_sizes, profile_command

    profile_command(model, fmt=format, plot=plot, front=front, detail=detail,
                    print_=lambda item: print(item) if isinstance(item, str) else (out if out.is_terminal else Console(width=240)).print(item),
                    trial=trial, compare=compare, results_dir=results_dir, seq_len=seq_len, device=device,
                    batch_sizes=parse_batch_sizes(batch_sizes), examples=examples, repeats=repeats, warmup=warmup, timing=timing,
                    registry=_registry(plugin), log=_log)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, job schedulers) stops as cleanly as Ctrl-C


def _click_exceptions(name: str) -> tuple[type, ...]:
    """Click's exception class ``name``, from typer's vendored copy (typer >= 0.26) and from click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _exit(code: int) -> NoReturn:
    """``sys.exit(code)``, after clearing CPython's record of an unhandled Ctrl-C. A Ctrl-C that escaped code run
    from source text (``exec``/``eval`` of a string, as some libraries do while importing) sets that record even
    though we handle the KeyboardInterrupt later; under ``python -m autocompress.cli`` the interpreter then kills
    itself with SIGINT at exit (status -2) instead of exiting with ``code``: 3 of 33 Ctrl-Cs at random start-up
    moments did. The ``autocompress`` console script is not affected (its exit status is set before the record
    is read). The record is a C global up to Python 3.11 and private runtime state from 3.12, where this
    cannot reach it."""
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ImportError, ValueError, AttributeError):
        pass
    sys.exit(code)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and then
    # Python installs no handler: make Ctrl-C / SIGINT always stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
        # typer turns a Ctrl-C that no command handled (imports, loading data, fine-tuning) into a returned 130
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            _exit(code)
    except AutocompressError as exc:
        # escape: messages quote ranges such as [low, high] that rich would read as markup
        err.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", highlight=False)
        _exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("Interrupted.")
        _exit(130)
    except Exception as exc:
        if isinstance(exc, _click_exceptions("Abort")):
            err.print("Aborted.")
            _exit(130)
        if isinstance(exc, _click_exceptions("ClickException")):  # usage errors: bad option, missing argument
            exc.show()
            _exit(exc.exit_code)
        if isinstance(exc, _click_exceptions("Exit")):
            _exit(exc.exit_code)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message, code = unexpected_error(exc)  # one line and a saved traceback, never the locals
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        _exit(code)


if __name__ == "__main__":
    main()
