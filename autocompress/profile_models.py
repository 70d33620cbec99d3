"""Which model ``autocompress profile MODEL`` profiles, and the command's work (profile, compare, write).

MODEL is one of:

* ``STUDY:N`` (or ``STUDY --trial N``): trial N of a study under ``--results-dir``, from its saved model
  folder (``trials/N``, kept for front trials), located as ``autocompress export`` locates it;
* ``STUDY:baseline``: the study's fine-tuned baseline, from the cache (the study's data is read to find
  its cache key, exactly as the search computed it);
* a folder written by ``autocompress export`` or a trial folder (``recipe.json`` + ``model.safetensors``);
* a baseline cache folder (``~/.cache/autocompress/baselines/KEY``, with ``model/`` inside) or any
  Hugging Face model folder;
* ``default`` (the packaged all-MiniLM-L6-v2) or a hub id: a base model; if it has no classification head
  a fresh 2-label one is added (parameters and time are real, its outputs mean nothing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import AutocompressError, ModelError, StudyError

if TYPE_CHECKING:
    from torch import nn

    from .registry import Registry

DEFAULT_SEQ_LEN = 64
PROFILE_DIR = "profiles"  # inside a study folder: one profile per front trial, linked from report.md
_REF = re.compile(r"^(?P<study>.+):(?P<which>\d+|baseline)$")


@dataclass
class Source:
    """Where a profiled model came from (recorded in the profile)."""

    label: str
    kind: str  # trial, baseline, compressed, huggingface, base
    path: str | None = None
    study: str | None = None
    trial: int | None = None
    max_length: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": self.path, "study": self.study,
                "trial": self.trial, "notes": self.notes}


def split_reference(model: str, trial: int | None = None) -> tuple[str, int | str | None]:
    """``("sst2-all", 10)`` for ``sst2-all:10`` or (``sst2-all``, ``--trial 10``); ``"baseline"`` for
    ``STUDY:baseline``; ``(model, None)`` for anything else."""
    if trial is not None:
        return model, int(trial)
    m = _REF.match(model)
    if m and not Path(model).exists():
        which = m.group("which")
        return m.group("study"), int(which) if which.isdigit() else "baseline"
    return model, None


def find_study(name: str, results_dir: str | Path) -> Path | None:
    """The study folder ``name`` refers to (a folder with study.json, or ``results_dir/name``), or None."""
    from .search import STATE_FILE, study_dir

    p = Path(name)
    if p.is_dir() and (p / STATE_FILE).is_file():
        return p
    try:
        d = study_dir(results_dir, name)
    except StudyError:
        return None
    return d if (d / STATE_FILE).is_file() else None


def _studies(results_dir: str | Path) -> list[str]:
    root = Path(results_dir)
    return sorted(p.name for p in root.iterdir() if (p / "study.json").is_file()) if root.is_dir() else []


def load_model(model: str, *, trial: int | None = None, results_dir: str | Path = "results",
               registry: "Registry | None" = None, log: Callable[[str], None] | None = None) -> tuple["nn.Module", Source]:
    """Resolve MODEL (see the module docstring) and load it on CPU, in eval mode."""
    name, which = split_reference(model, trial)
    study = find_study(name, results_dir)
    if which is not None:
        if study is None:
            known = ", ".join(_studies(results_dir)) or "none"
            raise StudyError(f"MODEL {model!r}: no study {name!r} under {str(results_dir)!r} (studies there: {known}); "
                             f"give STUDY:N with an existing study, or --results-dir where it lives")
        return (_load_baseline(study, log=log) if which == "baseline" else _load_trial(study, int(which), registry))
    if study is not None:
        from .results import load_results

        front = [r["number"] for r in load_results(study).front]
        raise StudyError(f"MODEL {model!r} is a study; say which of its models: {name}:N for trial N (front trials: "
                         f"{front or 'none'}) or {name}:baseline for its baseline")
    return _load_path_or_hub(model, registry)


def _load_trial(d: Path, number: int, registry: "Registry | None") -> tuple["nn.Module", Source]:
    from .export import finished_trial, missing_model_hint
    from .modeling import SIZE_FILES, load_compressed
    from .results import load_results

    res = load_results(d)
    row = finished_trial(res.rows, number)
    src = d / (row.get("model_dir") or f"trials/{number}")
    if not all((src / f).is_file() for f in SIZE_FILES):
        raise StudyError(missing_model_hint(d.resolve(), row, keep_models=res.spec.search.keep_models))
    label = f"{res.spec.study} trial {number} ({'+'.join(row.get('pipeline') or []) or 'no technique'})"
    return load_compressed(src, registry=registry), Source(label, "trial", str(src), res.spec.study, number,
                                                           res.spec.model.max_length)


def _load_baseline(d: Path, *, log: Callable[[str], None] | None) -> tuple["nn.Module", Source]:
    from .data import load_task_data
    from .engine import baseline_location
    from .results import load_results

    res = load_results(d)
    try:
        data = load_task_data(res.spec.data, seed=res.spec.seed)
    except AutocompressError as exc:
        raise StudyError(f"{res.spec.study}:baseline: the study's data is needed to find its cached baseline and "
                         f"could not be read ({exc}). Profile the baseline folder directly instead: "
                         f"autocompress profile ~/.cache/autocompress/baselines/KEY") from None
    key, bdir = baseline_location(res.spec, data)
    if not (bdir / "model" / "config.json").is_file():
        raise StudyError(f"{res.spec.study}:baseline: the study's fine-tuned baseline is not cached on this machine "
                         f"(looked for {bdir}/model); run the study's search command to fine-tune it again: "
                         f"{res.command or 'autocompress search SPEC'}")
    if log:
        log(f"{res.spec.study}:baseline is the cached baseline {bdir}")
    model, _ = _load_hf(bdir / "model")
    return model, Source(f"{res.spec.study} baseline", "baseline", str(bdir), res.spec.study, None,
                         res.spec.model.max_length)


def _load_hf(path: Path) -> tuple["nn.Module", list[str]]:
    """A Hugging Face folder: as saved if it is a sequence classifier, else the base model with a new head."""
    from .modeling import load_base_classifier
    from .spec import ModelSpec

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{str(path)!r}: config.json cannot be read ({exc})") from None
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        from transformers import AutoModelForSequenceClassification

        try:
            return AutoModelForSequenceClassification.from_pretrained(str(path)).eval(), []
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's model folder
            raise ModelError(f"{str(path)!r}: could not load the classifier ({type(exc).__name__}: {exc})") from None
    model = load_base_classifier(ModelSpec(name=str(path)), label_names=["0", "1"])
    return model.eval(), ["a base model: a fresh 2-label classification head was added (its outputs mean nothing)"]


def _load_path_or_hub(model: str, registry: "Registry | None") -> tuple["nn.Module", Source]:
    from .modeling import CONFIG_FILE, MODEL_FILE, RECIPE_FILE, load_base_classifier, load_compressed
    from .spec import DEFAULT_MODEL, ModelSpec

    p = Path(model).expanduser()
    if p.is_dir():
        if all((p / f).is_file() for f in (CONFIG_FILE, RECIPE_FILE, MODEL_FILE)):
            return load_compressed(p, registry=registry), Source(_compressed_label(p), "compressed", str(p))
        if (p / "model" / CONFIG_FILE).is_file():  # a baseline cache folder
            m, notes = _load_hf(p / "model")
            return m, Source(f"baseline {p.name}", "baseline", str(p), notes=notes)
        if (p / CONFIG_FILE).is_file():
            m, notes = _load_hf(p)
            return m, Source(p.name, "huggingface", str(p), notes=notes)
        raise ModelError(f"MODEL {model!r} is a folder but not a model: no config.json (nor model/config.json); give "
                         f"an exported or trial folder, a baseline cache folder or a Hugging Face model folder")
    try:
        m = load_base_classifier(ModelSpec(name=model), label_names=["0", "1"])
    except ModelError as exc:
        raise ModelError(f"MODEL {model!r} is not a study reference (STUDY:N, STUDY:baseline), an existing folder, "
                         f"'{DEFAULT_MODEL}' or a reachable hub id: {exc}") from None
    label = "all-MiniLM-L6-v2 (default)" if model == DEFAULT_MODEL else model
    return m.eval(), Source(label, "base", model, notes=["a base model: a fresh 2-label classification head was "
                                                         "added (its outputs mean nothing)"])


def _compressed_label(p: Path) -> str:
    """'STUDY trial N (techniques)' for a trial or export folder, else the folder name (with techniques)."""
    from .export import EXPORT_FILE
    from .modeling import RECIPE_FILE

    try:
        steps = json.loads((p / RECIPE_FILE).read_text())
        techniques = "+".join(dict.fromkeys(str(s["technique"]) for s in steps)) or "no technique"
        info = json.loads((p / EXPORT_FILE).read_text()) if (p / EXPORT_FILE).is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        return p.name
    if info.get("study") is not None and info.get("trial") is not None:
        return f"{info['study']} trial {info['trial']} ({techniques}, exported to {p.name})"
    if p.parent.name == "trials" and p.name.isdigit():
        return f"{p.parent.parent.name} trial {p.name} ({techniques})"
    return f"{p.name} ({techniques})"


# -------------------------------------------------------------------------------------------- the command


def pick_profile_device(requested: str, model: "nn.Module", log: Callable[[str], None] | None = None) -> str:
    """``auto`` -> CUDA when present, unless the model holds int8 weights (their kernels are CPU-only)."""
    import torch

    from .modeling import pick_device

    int8 = any(b.dtype == torch.int8 for b in model.buffers())
    if requested == "auto":
        device = pick_device("auto")
        if device.startswith("cuda") and int8:
            if log:
                log("The model holds int8 layers, whose kernels run on CPU only: profiling on cpu")
            return "cpu"
        return device
    device = pick_device(requested)
    if device.startswith("cuda") and int8:
        raise ModelError(f"--device {requested}: this model holds int8 layers, whose kernels run on CPU only; "
                         f"use --device cpu")
    return device


def run_profile(model: str, *, trial: int | None = None, compare: str | None = None, results_dir: str | Path = "results",
                seq_len: int | None = None, device: str = "auto", batch_sizes: tuple[int, ...] = (1, 32),
                examples: int = 64, warmup: int = 1, repeats: int = 5, timing: bool = True, threads: int | None = None,
                registry: "Registry | None" = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Profile MODEL (and ``compare``); return ``{"profile": ..., "reference": ... | None, "comparison": ...}``."""
    import torch

    from .profile import compare as compare_profiles
    from .profile import profile_model

    if seq_len is not None and seq_len < 2:
        raise ModelError(f"--seq-len {seq_len}: must be at least 2 tokens ([CLS] and [SEP])")
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise ModelError(f"--batch-sizes {','.join(map(str, batch_sizes))}: give one or more batch sizes >= 1, e.g. 1,32")
    torch.set_num_threads(threads or os.cpu_count() or 1)  # the study's measurement protocol
    loaded = [load_model(model, trial=trial, results_dir=results_dir, registry=registry, log=log)]
    if compare is not None:
        loaded.append(load_model(compare, results_dir=results_dir, registry=registry, log=log))
    length = seq_len or next((s.max_length for _, s in loaded if s.max_length), None) or DEFAULT_SEQ_LEN
    profiles = []
    for m, source in loaded:
        dev = pick_profile_device(device, m, log)
        if log:
            log(f"Profiling {source.label} at {length} tokens on {dev}")
        p = profile_model(m, seq_len=length, batch_sizes=batch_sizes, device=dev, examples=examples, warmup=warmup,
                          repeats=repeats, timing=timing, label=source.label, log=log)
        p["source"] = source.as_dict()
        profiles.append(p)
    out: dict[str, Any] = {"profile": profiles[0], "reference": None, "comparison": None}
    if compare is not None:
        out["reference"] = profiles[1]
        out["comparison"] = compare_profiles(profiles[0], profiles[1])
    return out


def profile_front(study: str, *, results_dir: str | Path = "results", seq_len: int | None = None, device: str = "auto",
                  batch_sizes: tuple[int, ...] = (1, 32), examples: int = 64, warmup: int = 1, repeats: int = 5,
                  timing: bool = True, threads: int | None = None, registry: "Registry | None" = None,
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """Profile every front trial of ``study`` against its baseline into ``STUDY/profiles/trial-N.{json,md,png}``
    and rewrite the study's report (which links them). Front trials whose model folder is gone are reported
    and skipped. Returns the markdown files written."""
    import torch

    from .profile import compare as compare_profiles
    from .profile import profile_model
    from .profile_plot import draw_png, plot_data
    from .profile_render import profile_markdown
    from .report import _jsonable, _write_text
    from .results import load_results, refresh

    d = find_study(study, results_dir)
    if d is None:
        raise StudyError(f"--front: no study {study!r} under {str(results_dir)!r} (studies there: "
                         f"{', '.join(_studies(results_dir)) or 'none'})")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    res = load_results(d)
    if not res.front:
        raise StudyError(f"--front: study {res.spec.study!r} has no Pareto front yet; run more trials first")
    length = seq_len or res.spec.model.max_length
    opts = dict(seq_len=length, batch_sizes=batch_sizes, examples=examples, warmup=warmup, repeats=repeats,
                timing=timing, log=log)
    base_model, base_source = _load_baseline(d, log=log)
    reference = profile_model(base_model, device=pick_profile_device(device, base_model, log), label=base_source.label, **opts)
    reference["source"] = base_source.as_dict()
    del base_model
    out_dir = d / PROFILE_DIR
    written = []
    for row in res.front:
        n = int(row["number"])
        try:
            m, source = _load_trial(d, n, registry)
        except StudyError as exc:
            if log:
                log(f"trial {n}: not profiled: {str(exc).splitlines()[0]}")
            continue
        if log:
            log(f"Profiling {source.label}")
        p = profile_model(m, device=pick_profile_device(device, m, log), label=source.label, **opts)
        p["source"] = source.as_dict()
        cmp = compare_profiles(p, reference)
        stem = out_dir / f"trial-{n}"
        _write_text(stem.with_suffix(".json"), json.dumps(_jsonable({"profile": p, "reference": reference,
                                                                       "comparison": cmp}), indent=2) + "\n")
        draw_png(plot_data([reference, p]), stem.with_suffix(".png"))
        _write_text(stem.with_suffix(".md"), profile_markdown(p, reference=reference, comparison=cmp,
                                                              plot=stem.with_suffix(".png").name))
        written.append(stem.with_suffix(".md"))
    refresh(d)  # report.md now links the profiles
    return written


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise ModelError(f"--batch-sizes {text!r}: give comma-separated batch sizes >= 1, e.g. 1,32")
    return sizes


def profile_command(model: str, *, fmt: str, plot: Path | None, front: bool, detail: bool,
                    print_: Callable[[Any], None], **kwargs: Any) -> dict[str, Any] | list[Path]:
    """``autocompress profile``: validate the options, profile, print (table or JSON), draw the plot."""
    from .profile_plot import draw_png, plot_data
    from .profile_render import terminal_output
    from .report import _jsonable

    if fmt not in ("table", "json"):
        raise ModelError(f"--format {fmt!r}: use 'table' or 'json'")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise ModelError(f"--plot {str(plot)!r}: the plot is a PNG; give a path ending in .png")
    if front:
        if kwargs.get("compare") is not None or kwargs.get("trial") is not None or plot is not None:
            raise ModelError("--front profiles every front trial against the study's baseline and writes its own "
                             "files; it takes no --compare, --trial or --plot")
        kwargs.pop("compare", None), kwargs.pop("trial", None)
        written = profile_front(model, **kwargs)
        for path in written:
            print_(str(path))
        return written
    result = run_profile(model, **kwargs)
    if plot is not None:
        profiles = [result["profile"]] + ([result["reference"]] if result["reference"] else [])
        draw_png(plot_data(profiles[::-1]), plot)  # reference first: bars read "before -> after"
        result["plot"] = str(plot)
    if fmt == "json":
        print_(json.dumps(_jsonable(result), indent=2))
    else:
        for item in terminal_output(result, detail=detail):
            print_(item)
        if plot is not None:
            print_(f"Plot: {plot}")
    return result
