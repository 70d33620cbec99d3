"""autocompress bench: single-technique studies, the joint study, peers, hypervolume and targets, end to end on
the tiny model; and the pure figures on hand-made points."""

from __future__ import annotations

import json

import pytest

from autocompress.bench_report import (REFERENCE, evaluate_targets, front_hypervolume, normalised, plot_data,
                                       report_md)
from tests.conftest import write_tiny_spec

BASE = {"eval_accuracy": 0.90, "latency_bs32": 4.0, "latency_bs1": 8.0, "size_mb": 90.0}


def test_hypervolume_is_normalised_by_the_baseline_and_bounded_by_the_reference():
    half = {"eval_accuracy": 0.89, "latency_bs32": 2.0, "latency_bs1": 4.0, "size_mb": 45.0}  # -1 pt, 2x, 2x
    assert normalised(half, BASE, latency="latency_bs32") == pytest.approx((1.0, 0.5, 0.5))
    # (5 - 1) * (1 - 0.5) * (1 - 0.5) = 1.0
    assert front_hypervolume([half], BASE, latency="latency_bs32") == pytest.approx(1.0)
    worse = {**half, "eval_accuracy": 0.80}  # 10 points lost: beyond the reference, no volume
    assert front_hypervolume([worse], BASE, latency="latency_bs32") == 0.0
    assert REFERENCE == (5.0, 1.0, 1.0)


def test_targets_are_read_at_one_point_of_drop_and_say_what_was_measured():
    fast_bad = {"label": "a", "eval_accuracy": 0.85, "latency_bs32": 0.5, "latency_bs1": 1.0, "size_mb": 5.0}
    ok = {"label": "b", "eval_accuracy": 0.895, "latency_bs32": 1.0, "latency_bs1": 1.4, "size_mb": 8.0}
    peers = {"onnxruntime_int8": {"latency_bs32": 2.5}}
    t = {x["target"]: x for x in evaluate_targets([fast_bad, ok], {"int8": [ok]}, BASE, peers, joint_minutes=30.0,
                                                  overhead=0.12)}
    assert t["bs32 throughput vs fp32 PyTorch"]["measured"] == pytest.approx(4.0)  # b, not the -5 pt point a
    assert t["bs32 throughput vs fp32 PyTorch"]["met"] and t["bs32 throughput vs fp32 PyTorch"]["point"] == "b"
    assert t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline"]["measured"] == pytest.approx(2.5)
    assert not t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline"]["met"]
    assert t["bs1 latency (ms/sentence)"]["met"] and t["size vs fp32 baseline"]["measured"] == pytest.approx(11.25)
    assert not t["joint front hypervolume > every single-technique front"]["met"]  # same front: not greater
    assert not t["engine overhead (share of trial wall time)"]["met"]
    assert t["joint search wall time (minutes)"]["met"] and t["fp32 baseline held-out accuracy"]["met"]
    # The front was not timed in ONNX Runtime: those rows say so instead of inventing a figure.
    in_ort = t["bs1 latency (ms/sentence) in ONNX Runtime"]
    assert in_ort["measured"] is None and not in_ort["met"] and in_ort["note"].startswith("no joint point")


def test_the_deployment_targets_are_also_read_in_onnx_runtime():
    ok = {"label": "b", "eval_accuracy": 0.895, "latency_bs32": 2.0, "latency_bs1": 4.0, "size_mb": 8.0,
          "onnxruntime": {"latency_bs32": 0.8, "latency_bs1": 1.2}}
    slower = {**ok, "label": "c", "onnxruntime": {"latency_bs32": 1.6, "latency_bs1": 1.0}}
    peers = {"onnxruntime_int8": {"latency_bs32": 2.5}, "onnxruntime_fp32": {"latency_bs1": 5.0}}
    t = {x["target"]: x for x in evaluate_targets([ok, slower], {}, BASE, peers, joint_minutes=1.0, overhead=0.0)}
    vs_ort8 = t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline, both in ONNX Runtime"]
    assert vs_ort8["measured"] == pytest.approx(2.5 / 0.8) and vs_ort8["met"] and vs_ort8["point"] == "b"
    bs1 = t["bs1 latency (ms/sentence) in ONNX Runtime"]
    assert bs1["measured"] == pytest.approx(1.0) and bs1["met"] and bs1["point"] == "c"
    assert "5.00 ms" in bs1["note"]
    # PyTorch eager rows are unchanged by the ONNX Runtime timings.
    assert not t["bs1 latency (ms/sentence)"]["met"] and t["bs1 latency (ms/sentence)"]["measured"] == 4.0


def test_plot_data_sorts_each_front_and_places_peers():
    pts = [{"label": "x", "eval_accuracy": 0.8, "latency_bs32": 3.0, "size_mb": 10.0},
           {"label": "y", "eval_accuracy": 0.9, "latency_bs32": 1.0, "size_mb": 20.0}]
    data = plot_data({"joint": pts}, {"fp32": BASE}, latency="latency_bs32")
    lat, size = data["panels"]
    assert lat["fronts"]["joint"]["x"] == [1.0, 3.0] and lat["fronts"]["joint"]["labels"] == ["y", "x"]
    assert size["fronts"]["joint"]["x"] == [10.0, 20.0] and lat["peers"]["fp32"] == {"x": 4.0, "y": 90.0}


def test_bench_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    from typer.testing import CliRunner

    from autocompress.cli import app

    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, study="tb")
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(spec), "--trials-per-technique", "2", "--joint-trials", "3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["fronts"]) == {"head_pruning", "quantization", "joint"}
    assert set(summary["hypervolume"]) == {"head_pruning", "quantization", "joint"}
    assert {"pytorch_fp32", "pytorch_int8"} <= set(summary["peers"])
    assert summary["latency_metric"] == "latency_bs8"
    for peer in summary["peers"].values():
        assert peer["latency_bs8"] > 0 and peer["size_mb"] > 0 and 0 <= peer["eval_accuracy"] <= 1
    assert len(summary["targets"]) == 10 and all("measured" in t and "met" in t for t in summary["targets"])
    assert set(summary["phases_seconds"]) >= {"search: joint", "search: head_pruning", "search: quantization"}
    assert 0 <= summary["engine_overhead_median"] < 1  # every trial records compute vs wall time
    assert (out / "bench.png").stat().st_size > 1000
    # the final timing: the joint front and the peers timed again in the same interleaved rounds
    final = summary["final_timing"]
    assert final["rounds"] == 1 and "peer pytorch_fp32" in final["models"]  # measurement.repeats: 1
    assert all(len(p["final"]["latency_bs8_passes"]) == 1 for p in summary["peers"].values())
    assert all(q["final"]["pytorch"]["latency_bs8"] > 0 for q in summary["fronts"]["joint"])
    assert "final timing (joint front and peers, interleaved)" in summary["phases_seconds"]
    assert any("final interleaved timing" in t["note"] for t in summary["targets"])
    # an int8 point also runs on ONNX Runtime's own int8 kernels, with its accuracy measured there and timed too
    for q in summary["fronts"]["joint"]:
        if "quantization" in q["label"] and "not_exported" not in q["onnxruntime"]:
            assert 0 <= q["onnxruntime_fused"]["eval_accuracy"] <= 1
            assert q["final"]["onnxruntime_fused"]["latency_bs8"] > 0
    text = (out / "report.md").read_text()
    assert "## Targets" in text and "## Front: joint" in text and summary["command"] in text
    assert "## Final timing" in text
    # how the baseline was fine-tuned: the recipe, its cache key, what was chosen on validation
    training = summary["baseline_training"]
    assert training["key"] and training["recipe"].get("max_steps") and "## fp32 baseline: how it was fine-tuned" in text
    assert f"`{training['key']}`" in text
    # the studies are ordinary studies: one technique each for the singles, always on
    single = json.loads((out / "studies/tb-quantization/trials.json").read_text())["trials"]
    assert all(r["pipeline"] == ["quantization"] for r in single if r["state"] == "COMPLETE")
    # a run compared with itself by bench-compare: every front point matched, nothing moved
    same = CliRunner().invoke(app, ["bench-compare", str(out), str(out), "--out", str(tmp_path / "same.md")])
    assert same.exit_code == 0, same.output
    n = sum(len(f) for f in summary["fronts"].values())
    assert f"{n} matched; 0 on a front of A only, 0 of B only" in (tmp_path / "same.md").read_text()


def test_report_md_marks_missed_targets():
    summary = {"title": "t", "command": "autocompress bench x", "machine": "m", "baseline": BASE, "peers": {},
               "fronts": {"joint": []}, "hypervolume": {"joint": 0.0}, "phases_seconds": {"search: joint": 60.0},
               "targets": [{"target": "x", "goal": ">= 4x", "measured": 1.5, "met": False, "point": None, "note": ""}]}
    md = report_md(summary)
    assert "| x | >= 4x | 1.5 | **no** |" in md and "| search: joint | 1.0 |" in md


def test_spread_and_reproducibility_of_repeated_measurements():
    from autocompress.bench import reproducibility, spread

    s = spread([4.0, 5.0, 4.5])
    assert s["n"] == 3 and s["median"] == 4.5 and s["spread_pct"] == pytest.approx(100 / 4.5)
    assert spread([]) == {"n": 0}
    runs = [{"pytorch_fp32": {"latency_bs32": 4.0, "eval_accuracy": 0.9}, "onnxruntime_int8": {"latency_bs32": 2.0}},
            {"pytorch_fp32": {"latency_bs32": 4.4, "eval_accuracy": 0.9}}]
    rep = reproducibility([{"latency_bs32": 4.2}], runs, ["latency_bs32"])
    fp32 = rep["fp32 baseline (measured at each run's start, and as the PyTorch fp32 peer)"]["latency_bs32"]
    assert fp32["n"] == 3 and fp32["min"] == 4.0 and fp32["max"] == 4.4
    assert rep["peer onnxruntime_int8 (1 run(s) of the command)"]["latency_bs32"]["n"] == 1
    assert rep["peer pytorch_fp32 (2 run(s) of the command)"]["eval_accuracy"]["spread_pct"] == 0


def test_joint_seeds_compose_the_single_fronts_in_target_points():
    from autocompress.bench import compose_warm_starts

    base = {"accuracy": 0.95, "latency_bs32": 5.0, "size_mb": 90.0}

    def row(params, acc, ms, mb):
        return {"params": params, "metrics": {"accuracy": acc, "latency_bs32": ms, "size_mb": mb}}

    fronts = {
        "quantization": [row({"quantization": {"bits": 8}}, 0.949, 2.7, 23.0)],
        "head_pruning": [row({"head_pruning": {"fraction": 0.7}}, 0.90, 3.0, 80.0),   # out of target: 5 points
                         row({"head_pruning": {"fraction": 0.4}}, 0.945, 4.0, 84.0)],
        "pruning": [row({"pruning": {"sparsity": 0.5}}, 0.944, 3.5, 75.0)],
        "sharing": [row({"sharing": {"mode": "none"}}, 0.95, 4.9, 90.0)],             # noise, not a gain
        "tokens": [row({"tokens": {"keep": 0.5}}, 0.946, 4.4, 90.0)],
    }
    seeds = compose_warm_starts(fronts, base, latency="latency_bs32",
                                compatible=lambda names: set(names) != {"quantization", "tokens"})
    q = {"bits": 8}
    assert seeds == [
        {"quantization": q},                                                   # the anchor: the best single
        {"quantization": q, "pruning": {"sparsity": 0.5}},                     # pairs, best other first
        {"quantization": q, "head_pruning": {"fraction": 0.4}},                # (tokens: incompatible, left out)
        {"quantization": q, "pruning": {"sparsity": 0.5}, "head_pruning": {"fraction": 0.4}},
    ]
    assert compose_warm_starts({"sharing": fronts["sharing"]}, base, latency="latency_bs32",
                               compatible=lambda names: True) == []


def test_joint_seeds_keep_the_best_front_and_relax_picks_when_one_technique_is_in_target():
    """Session 16: with a strong baseline only quantization had an in-target point, and the joint study got
    one seed. Now it gets the anchor's front verbatim and compositions with the others' near-target points."""
    from autocompress.bench import compose_warm_starts

    base = {"accuracy": 0.90, "latency_bs32": 8.0, "size_mb": 90.0}

    def row(params, acc, ms, mb):
        return {"params": params, "metrics": {"accuracy": acc, "latency_bs32": ms, "size_mb": mb}}

    q8, q4, q4e3 = {"bits": 8}, {"bits": 4}, {"bits": 4, "embedding_bits": 3}
    fronts = {
        "quantization": [row({"quantization": q4e3}, 0.880, 3.3, 10.0),   # out of target, most compressed
                         row({"quantization": q8}, 0.895, 4.0, 23.0),     # in target: the pick
                         row({"quantization": q4}, 0.888, 3.4, 12.0)],    # out of target, more accurate
        "head_pruning": [row({"head_pruning": {"fraction": 0.3}}, 0.8887, 7.0, 86.0),   # 1.13 points: relaxed
                         row({"head_pruning": {"fraction": 0.5}}, 0.870, 6.0, 84.0)],   # 3 points: never
        "low_rank": [row({"low_rank": {"ffn": 0.7}}, 0.8853, 7.4, 86.0)],   # 1.47 points, gain 1.13: relaxed
        "distillation": [row({"distillation": {"depth": 1.0}}, 0.8867, 8.8, 90.0)],   # no gain
        "movement_pruning": [row({"movement_pruning": {"sparsity": 0.5}}, 0.878, 7.9, 75.0)],  # 2.2 points
    }
    seeds = compose_warm_starts(fronts, base, latency="latency_bs32", compatible=lambda names: True)
    hp, lr = {"fraction": 0.3}, {"ffn": 0.7}
    assert seeds == [
        {"quantization": q8}, {"quantization": q4}, {"quantization": q4e3},   # the anchor's front, verbatim
        {"quantization": q8, "head_pruning": hp},                             # relaxed picks, best gain first
        {"quantization": q8, "low_rank": lr},
        {"quantization": q8, "head_pruning": hp, "low_rank": lr},
    ]
    # Fewer seeds when asked; relaxed picks alone make no anchor (nothing in target to start from).
    assert compose_warm_starts(fronts, base, latency="latency_bs32", compatible=lambda names: True,
                               verbatim=1, limit=2) == seeds[:1] + seeds[3:4]
    del fronts["quantization"]
    assert compose_warm_starts(fronts, base, latency="latency_bs32", compatible=lambda names: True) == []


def test_machine_description_names_the_cpu_isa():
    """int8 latency and accuracy depend on AVX2 vs AVX512-VNNI code paths, so a report must say which ran."""
    from autocompress.bench import cpu_isa, machine_description

    isa = cpu_isa()
    assert isa.startswith("ISA ") and isa in machine_description(1)


def test_cpuinfo_field_reads_named_fields_only(tmp_path, monkeypatch):
    """cpu_name and cpu_isa share one /proc/cpuinfo reader: it matches the whole key, not a prefix."""
    import autocompress.modeling as modeling

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_vnni\n"
                    "flags2\t: nope\n")
    real_path = modeling.Path
    monkeypatch.setattr(modeling, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    assert modeling.cpuinfo_field("model name") == "Test CPU 9000"
    assert modeling.cpuinfo_field("flags") == "fpu avx2 avx512_vnni"
    assert modeling.cpuinfo_field("model") is None
    assert modeling.cpu_name() == "Test CPU 9000"
    from autocompress.bench import cpu_isa

    assert cpu_isa().endswith("(avx512_vnni)")
    fake.unlink()
    assert modeling.cpuinfo_field("flags") is None


def test_joint_seeds_skip_rows_that_change_neither_flops_nor_bytes():
    """Session 18: the search-time baseline was timed 18% slow, so weight sharing's mode=none (the unchanged
    model) looked 1.32x faster and took a seed slot. FLOPs and size are deterministic: such a row is no gain."""
    from autocompress.bench import compose_warm_starts

    base = {"accuracy": 0.90, "latency_bs32": 10.0, "size_mb": 90.0, "flops": 1000.0}

    def row(params, acc, ms, mb, flops):
        return {"params": params, "metrics": {"accuracy": acc, "latency_bs32": ms, "size_mb": mb, "flops": flops}}

    q8 = {"bits": 8}
    fronts = {
        "quantization": [row({"quantization": q8}, 0.899, 5.5, 23.0, 1000.0)],             # size: a real gain
        "weight_sharing": [row({"weight_sharing": {"mode": "none"}}, 0.90, 7.6, 90.0, 1000.0)],   # noise only
        "tokens": [row({"tokens": {"keep": 0.7}}, 0.899, 8.0, 90.0, 800.0)],               # FLOPs: a real gain
    }
    seeds = compose_warm_starts(fronts, base, latency="latency_bs32", compatible=lambda names: True)
    assert seeds == [{"quantization": q8}, {"quantization": q8, "tokens": {"keep": 0.7}}]
    # Without FLOPs on the rows (older studies) the latency ratio decides, as before.
    for rows in fronts.values():
        for r in rows:
            del r["metrics"]["flops"]
    assert {"quantization": q8, "weight_sharing": {"mode": "none"}} in compose_warm_starts(
        fronts, base, latency="latency_bs32", compatible=lambda names: True)
