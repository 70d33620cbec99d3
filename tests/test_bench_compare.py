"""bench-compare: two runs of the benchmark, figure by figure (pure functions, and the CLI on files)."""

from __future__ import annotations

import copy
import json

import pytest

from autocompress.bench_compare import compare_summaries, comparison_markdown, match_points, noise_pct


def _point(trial, params, acc, b32, b1, size):
    return {"label": f"t #{trial}", "trial": trial, "params": params, "eval_accuracy": acc,
            "latency_bs32": b32, "latency_bs1": b1, "size_mb": size}


def _summary():
    base = {"eval_accuracy": 0.9, "latency_bs32": 5.0, "latency_bs1": 9.0, "size_mb": 90.0}
    return {
        "command": "autocompress bench spec.yaml --out A",
        "baseline": base,
        "peers": {"onnxruntime_int8": {"eval_accuracy": 0.89, "latency_bs32": 2.7, "latency_bs1": 2.2, "size_mb": 30.0}},
        "fronts": {"quantization": [_point(1, "q.bits=8", 0.89, 3.0, 5.0, 23.0)],
                   "joint": [_point(3, "a=1", 0.895, 2.5, 4.5, 11.0), _point(7, "a=2", 0.88, 2.0, 4.0, 9.0)]},
        "hypervolume": {"quantization": 1.0, "joint": 2.0},
        "targets": [{"target": "size vs fp32 baseline", "goal": ">= 10x smaller", "measured": 8.18, "met": False,
                     "point": "t #3"}],
        "reproducibility": {"fp32 baseline (measured at each run's start)": {
            "latency_bs32": {"n": 3, "median": 5.0, "spread_pct": 4.0},
            "latency_bs1": {"n": 3, "median": 9.0, "spread_pct": 20.0}}},
    }


def test_a_run_compared_with_itself_changes_nothing():
    s = _summary()
    cmp = compare_summaries(s, copy.deepcopy(s))
    pts = cmp["points"]
    assert pts["matched"] == 3 and pts["only_a"] == pts["only_b"] == 0
    assert pts["accuracy_identical"] == 3 and pts["size_identical"] == 3
    assert pts["latency_bs32_max_abs_pct"] == 0.0 and pts["accuracy_max_abs_points"] == 0.0
    assert all(t["delta"] == 0.0 and t["met_a"] is t["met_b"] is False for t in cmp["targets"])
    assert all(v["delta"] == 0.0 for v in cmp["hypervolume"].values())
    assert cmp["noise_pct"] == {"latency_bs32": 4.0, "latency_bs1": 20.0}


def test_changes_are_measured_and_points_match_on_trial_and_parameters():
    a, b = _summary(), _summary()
    b["command"] = "autocompress bench spec.yaml --out B"
    b["fronts"]["joint"][0]["latency_bs32"] = 2.75            # +10% on a shared point
    b["fronts"]["joint"][1]["params"] = "a=3"                  # same trial number, another pipeline: not the same point
    b["fronts"]["quantization"][0]["eval_accuracy"] = 0.887    # -0.3 points
    b["targets"][0].update(measured=10.5, met=True, point="t #9")
    b["hypervolume"]["joint"] = 2.5
    b["reproducibility"]["fp32 baseline (measured at each run's start)"]["latency_bs32"]["median"] = 5.5
    cmp = compare_summaries(a, b)
    pts = cmp["points"]
    assert pts["matched"] == 2 and pts["only_a"] == 1 and pts["only_b"] == 1
    assert cmp["fronts"]["joint"]["only_a"] == ["t #7"] and cmp["fronts"]["joint"]["only_b"] == ["t #7"]
    assert pts["latency_bs32_max_abs_pct"] == pytest.approx(10.0)
    assert pts["latency_bs32_median_abs_pct"] == pytest.approx(5.0)
    assert pts["accuracy_max_abs_points"] == pytest.approx(0.3) and pts["accuracy_identical"] == 1
    t = cmp["targets"][0]
    assert (t["a"], t["b"], t["met_a"], t["met_b"], t["point_b"]) == (8.18, 10.5, False, True, "t #9")
    assert cmp["hypervolume"]["joint"]["rel_pct"] == pytest.approx(25.0)
    # the baseline's median moved 10% between the runs, more than its 4% spread within either
    assert cmp["noise_pct"]["latency_bs32"] == pytest.approx(0.5 / 5.25 * 100)
    text = comparison_markdown(cmp, label_a="A", label_b="B", command="autocompress bench-compare A B")
    assert "| size vs fp32 baseline | >= 10x smaller | 8.180 | 10.500 | +28.4% | missed | met |" in text
    assert "Same verdict (met / missed) on 0 of 1 targets." in text
    assert "joint: A only t #7; B only t #7" in text and "autocompress bench-compare A B" in text


def test_a_peer_timed_slower_in_the_final_timing_of_one_run_widens_the_noise():
    # The same model (a peer) timed 10% slower in one run's final timing, while the baseline's repeated timings
    # agree: the noise is what that unchanged model moved, not only the baseline's own spread.
    a, b = _summary(), _summary()
    a["peers"]["onnxruntime_int8"]["final"] = {"latency_bs32": 2.0, "latency_bs1": 2.0}
    b["peers"]["onnxruntime_int8"]["final"] = {"latency_bs32": 2.2, "latency_bs1": 2.0}
    cmp = compare_summaries(a, b)
    assert cmp["noise_pct"]["latency_bs32"] == pytest.approx(0.2 / 2.1 * 100)
    assert cmp["noise_pct"]["latency_bs1"] == 20.0  # the baseline's own spread is larger there
    assert noise_pct(a, key="latency_bs32") == 4.0   # one run alone: only its spread


def test_points_without_figures_and_runs_without_spread_say_n_a():
    a = _summary()
    del a["reproducibility"]
    b = copy.deepcopy(a)
    b["fronts"]["joint"][0]["latency_bs1"] = None
    cmp = compare_summaries(a, b)
    assert cmp["noise_pct"]["latency_bs32"] is None
    assert match_points(a["fronts"]["joint"], b["fronts"]["joint"])["matched"][0]["latency_bs1"]["delta"] is None
    assert "n/a" in comparison_markdown(cmp, label_a="A", label_b="B", command="c")
    assert noise_pct(a) is None


def test_bench_compare_cli_writes_the_report_and_names_a_missing_summary(tmp_path):
    from typer.testing import CliRunner

    from autocompress.cli import app
    from autocompress.errors import AutocompressError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(_summary()))
    out = tmp_path / "reproduction.md"
    r = CliRunner().invoke(app, ["bench-compare", str(tmp_path / "a"), str(tmp_path / "a" / "summary.json"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "## Targets" in out.read_text() and "3 matched" in out.read_text()
    r = CliRunner().invoke(app, ["bench-compare", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert r.exit_code != 0 and isinstance(r.exception, AutocompressError)
    assert "RUN_B" in str(r.exception) and "summary.json" in str(r.exception)


def test_the_peers_final_timing_is_compared_too():
    from autocompress.bench_compare import compare_summaries

    a = {"peers": {"onnxruntime_int8": {"latency_bs32": 2.0, "final": {"latency_bs32": 3.0}}}}
    b = {"peers": {"onnxruntime_int8": {"latency_bs32": 2.0, "final": {"latency_bs32": 3.3}}}}
    cmp = compare_summaries(a, b)
    assert cmp["peers"]["onnxruntime_int8 (final timing)"]["latency_bs32"]["rel_pct"] == pytest.approx(10.0)
    assert cmp["peers"]["onnxruntime_int8"]["latency_bs32"]["rel_pct"] == 0.0
