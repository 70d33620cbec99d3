"""``autocompress bench``: the joint search against one search per single technique (same trial budget each)
and against what users deploy instead (the fp32 baseline in PyTorch and ONNX Runtime, and dynamic int8 of
it in both), in one run, one latency protocol and one results folder.

Phases, each timed: the fine-tuned baseline (cached, so reused when it exists); the peers; one study per
technique (that technique always on, its parameters searched); the joint study (the spec as written); the
joint front exported to ONNX and timed in ONNX Runtime where its techniques allow. Studies are ordinary
autocompress studies under ``OUT/studies/`` (``autocompress pareto``/``show``/``export`` read them), so an
interrupted bench resumes each where it stopped. The figures go to ``OUT/report.md``, ``OUT/summary.json``
and ``OUT/bench.png`` (:mod:`autocompress.bench_report`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .bench_timing import PEERS_DIR, final_timing, time_front_in_onnxruntime
from .errors import SpecError
from .registry import Registry
from .spec import Spec, load_spec

STUDIES = "studies"


def technique_names(spec: Spec) -> list[str]:
    return [name for name, t in spec.techniques.items() if t.enabled is not False]


def derive_spec(spec: Spec, *, study: str, techniques: Sequence[str], trials: int, single: bool,
                promote: int | None = None, warm_starts: Sequence[Mapping[str, Any]] = ()) -> Spec:
    """``spec`` restricted to ``techniques`` under another study name and trial budget (``promote``: the
    retrainings of a multi-fidelity schedule). A single-technique study turns its technique always on (its
    parameters are what is searched); seeded pipelines that use only the kept techniques are kept, and
    ``warm_starts`` are seeded before them."""
    d = spec.model_dump(mode="json")
    d["study"] = study
    kept = set(techniques)
    d["techniques"] = {n: {**t, "enabled": True if single else t["enabled"]}
                       for n, t in d["techniques"].items() if n in kept}
    s = d["search"]
    s["trials"] = int(trials)
    s["enqueue"] = [dict(w) for w in warm_starts] + [
        e for e in s.get("enqueue") or [] if {k for k, v in e.items() if v is not None} <= kept]
    if s.get("fidelity") and promote is not None:
        s["fidelity"]["promote"] = max(1, min(int(promote), int(trials)))
    if s.get("population_size"):
        s["population_size"] = max(2, min(int(s["population_size"]), int(trials)))
    return load_spec(data=d)


def compose_warm_starts(fronts: Mapping[str, Sequence[Mapping[str, Any]]], baseline: Mapping[str, Any], *,
                        latency: str, compatible: Callable[[Sequence[str]], bool], max_drop: float = 0.01,
                        relaxed_drop: float = 0.02, min_gain: float = 1.1, verbatim: int = 5,
                        limit: int = 10) -> list[dict[str, dict[str, Any]]]:
    """Pipelines to seed the joint study with, from the single-technique fronts (``{technique: front rows}``,
    rows with ``metrics`` and ``params``): the joint search starts where the best single technique ends and
    earns its hypervolume by composition instead of waiting for the sampler to stumble on mild combinations.

    A row's *gain* is its latency ratio x size ratio to the baseline; rows gaining less than ``min_gain``
    (timing noise, or a setting that changes nothing) are never picked. A technique's *pick* is its row within
    ``max_drop`` validation accuracy of the baseline that gains most (rows that change neither FLOPs nor bytes,
    where both are known, count as no gain: their latency ratio is noise); a technique with no such row may still
    offer its most accurate row within ``relaxed_drop`` (a *relaxed* pick, ranked after every in-target one):
    with a strong baseline, a milder technique's best point often sits just outside the target, and leaving
    it out left the joint study one technique to compose (session 16). The *anchor* is the best pick.

    Seeds, in order: the anchor technique's front rows verbatim (up to ``verbatim``: in-target ones by gain,
    then the rest by accuracy), so the joint front holds the best single front's trade-offs rather than
    re-finding them; the anchor's pick with each other pick, in-target ones first; the anchor with the two
    best others. Incompatible combinations and repeats are left out; at most ``limit`` seeds. Pure (reads rows
    only), so the seeds are the same on resume."""
    base_acc, base_lat, base_mb = (float(baseline[k]) for k in ("accuracy", latency, "size_mb"))

    def gain(r: Mapping[str, Any]) -> float:
        m = r["metrics"]
        return (base_lat / m[latency]) * (base_mb / m["size_mb"])

    def drop(r: Mapping[str, Any]) -> float:
        return base_acc - r["metrics"]["accuracy"]

    base_flops = baseline.get("flops")

    def changes_cost(r: Mapping[str, Any]) -> bool:
        # A latency ratio alone can be timing noise: a search-time baseline timed 18% slow made weight sharing's
        # mode=none (the unchanged model) look 1.32x faster and take a seed slot (session 18). FLOPs and bytes
        # are deterministic, so a row that changes neither changes nothing.
        m = r["metrics"]
        if not base_flops or m.get("flops") is None:
            return True
        return m["flops"] < 0.999 * float(base_flops) or m["size_mb"] < 0.999 * base_mb

    def useful(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in rows if gain(r) >= min_gain and changes_cost(r)]

    # (rank, row): rank 0 = in-target pick, 1 = relaxed pick; the anchor needs an in-target one.
    picks: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for name, rows in fronts.items():
        kept = useful(rows)
        strict = max((r for r in kept if drop(r) <= max_drop), key=gain, default=None)
        relaxed = max((r for r in kept if drop(r) <= relaxed_drop), key=lambda r: (-drop(r), gain(r)), default=None)
        if strict is not None:
            picks[name] = (0, strict)
        elif relaxed is not None:
            picks[name] = (1, relaxed)
    ranked = sorted(picks, key=lambda n: (picks[n][0], -gain(picks[n][1])))
    if not ranked or picks[ranked[0]][0] != 0:
        return []
    anchor, *others = ranked

    def pipeline(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        return {name: dict(p) for r in rows for name, p in r["params"].items()}

    own = useful(fronts[anchor])
    own = (sorted((r for r in own if drop(r) <= max_drop), key=gain, reverse=True)
           + sorted((r for r in own if drop(r) > max_drop), key=drop))
    candidates = [pipeline([r]) for r in own[:verbatim]]
    head = picks[anchor][1]
    candidates += [pipeline([head, picks[o][1]]) for o in others]
    candidates.append(pipeline([head] + [picks[o][1] for o in others[:2]]))
    seeds: list[dict[str, dict[str, Any]]] = []
    for p in candidates:
        if p not in seeds and compatible(list(p)) and len(seeds) < limit:
            seeds.append(p)
    return seeds


def machine_description(threads: int) -> str:
    import torch

    from .modeling import cpu_name

    cpu = cpu_name()
    try:
        import onnxruntime

        ort = f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = ""
    return (f"{cpu}, {os.cpu_count()} logical cores, {threads} threads used, {cpu_isa()}; {platform.system()} "
            f"{platform.release()}; python {platform.python_version()}, torch {torch.__version__}{ort}")


def cpu_isa() -> str:
    """The vector ISA torch dispatches to, and the int8 dot-product extensions present: int8 kernels (fbgemm,
    ONNX Runtime) take other code paths with AVX512-VNNI than with AVX2 alone, which moved both int8 latency
    (1.6x) and int8 accuracy between two machines both named "AMD EPYC" (session 17)."""
    import torch

    from .modeling import cpuinfo_field

    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch, or a build without the probe
        cap = "unknown"
    flags = (cpuinfo_field("flags") or "").split()
    extra = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"ISA {cap}" + (f" ({', '.join(extra)})" if extra else (" (no VNNI)" if flags else ""))


# ----------------------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------------------


def _timed(model: Any, prep: Any) -> dict[str, Any]:
    from .engine import latency_metrics
    from .measure import evaluate

    out: dict[str, Any] = {f"eval_{k}": v for k, v in evaluate(model, prep.evaluation, device="cpu",
                                                                pad_token_id=prep.pad_token_id).items()}
    return {**out, **latency_metrics(model, prep, device="cpu")}


def measure_peers(prep: Any, *, work: Path, registry: Registry, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The baseline as users deploy it without autocompress, measured with the search's protocol on CPU."""
    import torch
    from torch import nn

    from .modeling import config_snapshot, save_compressed

    peers: dict[str, dict[str, Any]] = {}
    base = copy.deepcopy(prep.baseline).cpu().eval()
    fp32_dir = work / "baseline-fp32"
    size = save_compressed(base, fp32_dir, base_config=config_snapshot(base), recipe=[])
    peers["pytorch_fp32"] = {"label": "PyTorch fp32 (baseline)", **_timed(base, prep), "size_mb": size / 1e6}
    log(f"peer PyTorch fp32: {_line(peers['pytorch_fp32'])}")
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)  # written, never loaded: the size a user of torch's own recipe ships
    peers["pytorch_int8"] = {"label": "PyTorch dynamic int8 (torch.ao quantize_dynamic)", **_timed(q, prep),
                             "size_mb": len(buf.getvalue()) / 1e6}
    log(f"peer PyTorch dynamic int8: {_line(peers['pytorch_int8'])}")
    from .bench_timing import time_onnx_alone
    from .measure import evaluate
    from .onnx_export import OrtClassifier, example_batch, export_graph, missing_dependencies

    if missing_dependencies():
        log(f"ONNX Runtime peers skipped: missing {', '.join(missing_dependencies())} (pip install 'autocompress[onnx]')")
        return peers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    example = example_batch(prep.evaluation, pad_token_id=prep.pad_token_id)
    fp32 = work / "baseline-fp32.onnx"
    export_graph(fp32_dir, fp32, registry=registry, example=example, log=log)
    int8 = work / "baseline-int8.onnx"
    import onnx

    plain = onnx.load(str(fp32))
    del plain.graph.value_info[:]  # the exporter's shape hints trip quantize_dynamic's shape inference
    plain_path = work / "baseline-fp32-plain.onnx"
    onnx.save(plain, str(plain_path))
    quantize_dynamic(str(plain_path), str(int8), weight_type=QuantType.QInt8)  # Optimum's / ORT's default recipe
    plain_path.unlink()
    for key, path, label in (("onnxruntime_fp32", fp32, "ONNX Runtime fp32"),
                             ("onnxruntime_int8", int8, "ONNX Runtime dynamic int8 (quantize_dynamic, QInt8)")):
        session = OrtClassifier(path, threads=torch.get_num_threads())
        accuracy = {f"eval_{k}": v for k, v in evaluate(session, prep.evaluation, device="cpu",
                                                         pad_token_id=prep.pad_token_id).items()}
        del session  # timed in a fresh process: this one has been running PyTorch (bench_timing)
        m = prep.spec.measurement
        latency = time_onnx_alone(path, prep.latency_sets, warmup=m.warmup, repeats=m.repeats,
                                  pad_token_id=prep.pad_token_id, threads=torch.get_num_threads())
        peers[key] = {"label": label, **accuracy, **latency, "size_mb": path.stat().st_size / 1e6}
        log(f"peer {label}: {_line(peers[key])}")
    return peers


def _line(m: Mapping[str, Any]) -> str:
    parts = [f"dev {m.get('eval_accuracy', float('nan')) * 100:.2f}"]
    parts += [f"{k.removeprefix('latency_')} {v:.3g} ms" for k, v in m.items()
              if k.startswith("latency_bs") and not k.endswith("_spread")]
    return ", ".join(parts + [f"{m.get('size_mb', float('nan')):.1f} MB"])


# ----------------------------------------------------------------------------------------------------------
# Fronts
# ----------------------------------------------------------------------------------------------------------


def front_points(d: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """(front points, baseline metrics, all rows) of the study in ``d``, as bench points."""
    from .pareto import baseline_metrics
    from .report import params_summary, pipeline_str
    from .results import load_results

    res = load_results(d)
    points = []
    for row in res.front:
        m = dict(row.get("metrics") or {})
        points.append({**m, "label": f"{name} #{row['number']}: {pipeline_str(row.get('pipeline'))}",
                       "trial": row["number"], "params": params_summary(row.get("params")),
                       "fidelity": row.get("fidelity"), "model_dir": row.get("model_dir")})
    return points, baseline_metrics(res.baseline), res.rows


RUNS = "runs.json"


def _runs(out: Path) -> dict[str, Any]:
    """What earlier runs of this bench folder measured: search wall times (a resumed study adds to its time)
    and every measurement of the peers, so a rerun of the command states the spread instead of hiding it."""
    for name in (RUNS, "summary.json"):  # a folder written before runs.json existed: its summary seeds it
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if name == RUNS:
            return data
        return {"search_seconds": {k: v for k, v in (data.get("phases_seconds") or {}).items() if k.startswith("search: ")},
                "peers": [data["peers"]] if data.get("peers") else []}
    return {}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """min, max, median and (max - min) / median of repeated measurements of one figure."""
    import statistics

    v = [float(x) for x in values if isinstance(x, (int, float))]
    if not v:
        return {"n": 0}
    med = statistics.median(v)
    return {"n": len(v), "min": min(v), "max": max(v), "median": med,
            "spread_pct": (max(v) - min(v)) / med * 100 if med else None}


def reproducibility(baselines: Sequence[Mapping[str, Any]], peer_runs: Sequence[Mapping[str, Any]],
                    keys: Sequence[str]) -> dict[str, Any]:
    """The spread of figures measured more than once: the fp32 baseline's latency (measured again at the start
    of every study, and as the PyTorch fp32 peer), each peer across runs of the command, held-out accuracy."""
    out: dict[str, Any] = {}
    fp32 = list(baselines) + [r["pytorch_fp32"] for r in peer_runs if "pytorch_fp32" in r]
    out["fp32 baseline (measured at each run's start, and as the PyTorch fp32 peer)"] = {k: spread([b.get(k) for b in fp32]) for k in keys}
    for name in dict.fromkeys(n for r in peer_runs for n in r):
        runs = [r[name] for r in peer_runs if name in r]
        out[f"peer {name} ({len(runs)} run(s) of the command)"] = {k: spread([p.get(k) for p in runs])
                                                                     for k in (*keys, "eval_accuracy")}
        final = [r["final"] for r in runs if isinstance(r.get("final"), Mapping)]
        if final:  # the final, interleaved timing of the same peer (bench_timing.final_timing)
            out[f"peer {name}, final timing ({len(final)} run(s))"] = {k: spread([f.get(k) for f in final]) for k in keys}
    return out


def profile_point(d: Path, point: Mapping[str, Any], out: Path, *, registry: Registry,
                  log: Callable[[str], None]) -> str:
    """Profile one front point of the study in ``d`` against its baseline (where time, bytes and FLOPs go, per
    component) into ``OUT/profile-<study>-trial<N>.md``: the "why" behind a missed latency target. Returns the
    file's name."""
    from .profile_models import run_profile
    from .profile_render import profile_markdown
    from .report import _write_text

    study = d.name
    result = run_profile(f"{study}:{point['trial']}", compare=f"{study}:baseline", results_dir=d.parent,
                         registry=registry, log=log)
    name = f"profile-{study}-trial{point['trial']}.md"
    _write_text(out / name, profile_markdown(result["profile"], reference=result["reference"],
                                             comparison=result["comparison"]))
    return name


def _overhead(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Median share of trial wall time not spent in model compute (forward, backward, optimiser step)."""
    import statistics

    shares = []
    for r in rows:
        m = r.get("metrics") or {}
        wall, compute = m.get("trial_seconds"), m.get("compute_seconds")
        if isinstance(wall, (int, float)) and isinstance(compute, (int, float)) and wall > 0:
            shares.append(max(0.0, 1.0 - compute / wall))
    return statistics.median(shares) if shares else None


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _save_runs(out: Path, runs: Mapping[str, Any]) -> None:
    from .report import _write_text

    _write_text(out / RUNS, json.dumps(runs, indent=2, default=str))


def _compatible(registry: Registry, names: Sequence[str]) -> bool:
    from .space import first_incompatible

    return first_incompatible([registry.get(n) for n in names]) is None


def single_promote(spec: Spec, *, trials_per_technique: int, joint_trials: int) -> int | None:
    """A single-technique study promotes the joint study's share: same screened-to-promoted ratio, at least one."""
    f = spec.search.fidelity
    if f is None:
        return None
    return max(1, round(f.promote * trials_per_technique / joint_trials))


def run_bench(spec: Spec, *, registry: Registry, out_dir: str | Path, trials_per_technique: int,
              joint_trials: int | None = None, techniques: Sequence[str] | None = None, onnx_front: bool = True,
              data: str | None = None, command: str, log: Callable[[str], None] = print) -> Path:
    from .bench_report import (draw_png, evaluate_targets, front_hypervolume, plot_data, report_md,
                               selection_agreement)
    from .baseline import read_training, training_lines
    from .engine import measure_baseline, prepare
    from .modeling import describe_device
    from .search import run_search

    out = Path(out_dir)
    runs = _runs(out)
    names = list(techniques or technique_names(spec))
    unknown = [n for n in names if n not in spec.techniques]
    if unknown:
        raise SpecError(f"--techniques {','.join(unknown)}: not in the spec's techniques "
                        f"({', '.join(spec.techniques)}); name techniques the spec configures")
    if trials_per_technique < 1:
        raise SpecError(f"--trials-per-technique {trials_per_technique}: must be at least 1")
    studies = out / STUDIES
    studies.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    prep = prepare(spec, registry, log=log)
    # Measured once, with the studies' protocol, and handed to every study (each would measure the same model).
    measured = {**measure_baseline(prep), "device": describe_device(prep.device)}
    stats = read_training(prep.baseline_dir)
    training = {"key": prep.baseline_key, "recipe": spec.baseline.model_dump(mode="json", exclude_defaults=True),
                "stats": stats, "lines": training_lines(stats)}
    phases["baseline (fine-tune, or reuse the cached one; measure it)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    peers = measure_peers(prep, work=studies / PEERS_DIR, registry=registry, log=log)
    phases["peers (PyTorch and ONNX Runtime, fp32 and dynamic int8)"] = time.perf_counter() - t0
    runs.setdefault("peers", []).append(peers)
    runs.setdefault("baselines", []).append({k: v for k, v in measured.items() if k.startswith(("latency_", "eval_"))})
    runs.setdefault("search_seconds", {})
    _save_runs(out, runs)
    threads = prep.spec.measurement.threads or os.cpu_count() or 1
    latency_sets, pad_token_id, rounds = prep.latency_sets, prep.pad_token_id, prep.spec.measurement.repeats
    del prep

    fronts: dict[str, list[dict[str, Any]]] = {}
    base: dict[str, Any] = {}
    joint_rows: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    single_rows: dict[str, list[dict[str, Any]]] = {}
    latency = f"latency_bs{32 if 32 in spec.measurement.batch_sizes else spec.measurement.batch_sizes[0]}"
    joint_trials = joint_trials or spec.search.trials
    promote = single_promote(spec, trials_per_technique=trials_per_technique, joint_trials=joint_trials)
    plan = [(n, derive_spec(spec, study=f"{spec.study}-{n}", techniques=[n], trials=trials_per_technique, single=True,
                            promote=promote))
            for n in names]
    plan.append(("joint", None))  # derived once the single fronts exist: they seed it
    warm: list[dict[str, dict[str, Any]]] = []
    for name, sub in plan:
        if sub is None:
            warm = compose_warm_starts({n: single_rows[n] for n in names if n in single_rows}, base,
                                       latency=latency, compatible=lambda ts: _compatible(registry, ts))
            sub = derive_spec(spec, study=f"{spec.study}-joint", techniques=names, trials=joint_trials, single=False,
                              warm_starts=warm)
            log(f"== joint: seeded with {len(warm)} pipelines from the single fronts (the best front's points, "
                "and compositions of each technique's pick)")
        t0 = time.perf_counter()
        f = sub.search.fidelity
        log(f"== {name}: study {sub.study}, {sub.search.trials} trials"
            + (f" screened at {f.screen_steps} recovery steps, {f.promote} retrained at {sub.recovery.steps}" if f else ""))
        d = run_search(sub, registry=registry, results_dir=studies, command=command, log=log, measured_baseline=measured)
        # A resumed study's time adds to what earlier runs spent on it (a finished one adds about a second).
        key = f"search: {name}"
        runs["search_seconds"][key] = runs["search_seconds"].get(key, 0.0) + time.perf_counter() - t0
        _save_runs(out, runs)
        phases[key] = runs["search_seconds"][key]
        fronts[name], base, rows = front_points(d, name)
        all_rows += rows
        if name == "joint":
            joint_rows = rows
        else:
            single_rows[name] = [r for r in rows if r["number"] in {p["trial"] for p in fronts[name]}]
    if onnx_front:
        t0 = time.perf_counter()
        log("== joint front in ONNX Runtime")
        time_front_in_onnxruntime(studies / f"{spec.study}-joint", fronts["joint"], registry=registry, data=data, log=log)
        phases["joint front exported and timed in ONNX Runtime"] = time.perf_counter() - t0
    final = None
    if fronts.get("joint"):
        t0 = time.perf_counter()
        log("== final timing: the joint front and the peers, interleaved")
        final = final_timing(studies, f"{spec.study}-joint", fronts["joint"], peers, latency_sets=latency_sets,
                             pad_token_id=pad_token_id, rounds=rounds, registry=registry, log=log)
        phases["final timing (joint front and peers, interleaved)"] = time.perf_counter() - t0
        _save_runs(out, runs)  # the peers now carry their final timing: the next run's spread includes it

    singles = {k: v for k, v in fronts.items() if k != "joint"}
    overhead = _overhead(joint_rows)
    targets = evaluate_targets(fronts.get("joint", []), singles, base, peers,
                               joint_minutes=phases.get("search: joint", 0.0) / 60, overhead=overhead, latency=latency)
    profiled = None
    fastest = next((p for p in fronts.get("joint", []) if p["label"] == targets[0]["point"]), None)
    if fastest is not None:
        t0 = time.perf_counter()
        log(f"== profile of {fastest['label']} against the baseline")
        try:
            profiled = {"point": fastest["label"],
                        "file": profile_point(studies / f"{spec.study}-joint", fastest, out, registry=registry, log=log)}
        except Exception as exc:  # noqa: BLE001 - a profile is evidence for the report, not a reason to lose it
            log(f"  profile failed: {type(exc).__name__}: {exc}")
        phases["profile of the fastest joint point within 1 point"] = time.perf_counter() - t0
    baseline_point = {**base, "label": "fp32 baseline (search protocol)"}
    summary: dict[str, Any] = {
        "title": f"Benchmark {spec.study}: joint search vs single techniques vs deployed peers",
        "intro": (f"Held-out accuracy is the study's eval split (searches select on a validation split carved from "
                  f"train: {spec.data.validation_size:g} "
                  f"{'whole sentences, their own phrases out of train' if spec.data.validation_carve == 'sentences' else 'random examples'}"
                  "). Latency: median ms per example over timed passes, PyTorch eager unless marked ORT. "
                  "Ratios are baseline / point. Fronts and hypervolumes use each trial's own timing, taken during "
                  "its search; the speed targets use the final timing, where the joint front and the peers are "
                  "timed again in interleaved rounds, each runtime in its own fresh process" + ("" if final else " (not taken in this run)") + "."),
        "command": command, "machine": machine_description(threads),
        "baseline": baseline_point, "baseline_training": training, "peers": peers, "fronts": fronts,
        "latency_metric": latency,
        "hypervolume": {k: front_hypervolume(v, base, latency=latency) for k, v in fronts.items()},
        "targets": targets, "profile": profiled, "final_timing": final,
        "engine_overhead_median": overhead, "phases_seconds": phases,
        "selection": selection_agreement(all_rows, base),
        "reproducibility": reproducibility(runs["baselines"], runs["peers"], [latency, "latency_bs1"]),
        "budget": {"trials_per_technique": trials_per_technique, "joint_trials": joint_trials,
                   "techniques": names, "recovery_steps": spec.recovery.steps,
                   "fidelity": spec.search.fidelity.model_dump() if spec.search.fidelity else None,
                   "promoted_per_technique": promote, "warm_starts": warm},
        "notes": [],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report_md(summary))
    draw_png(plot_data(fronts, {**{"fp32 baseline": baseline_point}, **{p["label"]: p for p in peers.values()}},
                       latency=latency), out / "bench.png")
    log(f"Wrote {out}/ (report.md, summary.json, bench.png; studies in {studies}/)")
    return out
