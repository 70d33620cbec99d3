"""The bench's final timing: interleaved rounds (pure parts on fakes) and the speed targets read from it."""

from __future__ import annotations

import pytest

from autocompress.bench_report import evaluate_targets, final_timing_rows, report_md
from autocompress.bench_timing import interleaved_latency, rotation, summarise_passes

BASE = {"eval_accuracy": 0.90, "latency_bs32": 4.0, "latency_bs1": 8.0, "size_mb": 90.0}


def test_rotation_gives_each_model_every_position():
    names = ["a", "b", "c"]
    orders = [rotation(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {o.index("a") for o in orders} == {0, 1, 2}
    assert rotation([], 5) == [] and rotation(names, 4) == ["b", "c", "a"]


def test_summarise_passes_is_the_median_of_the_rounds():
    s = summarise_passes({32: [3.0, 1.0, 2.0, 10.0, 2.5]})
    assert s["latency_bs32"] == 2.5 and s["latency_bs32_spread"] == [1.0, 10.0]
    assert s["latency_bs32_passes"] == [3.0, 1.0, 2.0, 10.0, 2.5]


def test_interleaved_latency_times_round_by_round_in_rotated_order():
    calls: list[tuple[str, int, int, int]] = []
    clock = iter(range(1, 1000))  # each timed pass is slower than the last: a machine getting slower

    def timer(model, enc, *, batch_size, warmup, repeats, device, pad_token_id):
        calls.append((model, batch_size, warmup, repeats))
        return {"median": float(next(clock))}

    out = interleaved_latency({"a": "a", "b": "b"}, {32: "e32", 1: "e1"}, rounds=3, pad_token_id=0, warmup=2,
                              timer=timer)
    # warm-up first (untimed figures are drawn but not kept), then one pass per model and batch size per round
    assert calls[:4] == [("a", 32, 0, 2), ("a", 1, 0, 2), ("b", 32, 0, 2), ("b", 1, 0, 2)]
    timed = [c[0] for c in calls[4:] if c[1] == 32]
    assert timed == ["a", "b", "b", "a", "a", "b"]  # round 2 starts with b
    assert all(c[3] == 1 and c[2] == 0 for c in calls[4:])
    assert len(out["a"]["latency_bs32_passes"]) == 3 == len(out["b"]["latency_bs1_passes"])
    # the rotation evens out a steadily slowing machine: both medians come from the middle of the run
    assert abs(out["a"]["latency_bs32"] - out["b"]["latency_bs32"]) <= 2
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_latency({"a": "a"}, {32: "e"}, rounds=0, pad_token_id=0, timer=timer)


def _final_summary():
    point = {"label": "joint #3: q", "trial": 3, "eval_accuracy": 0.895, "latency_bs32": 1.0, "latency_bs1": 1.0,
             "size_mb": 8.0, "onnxruntime": {"latency_bs32": 0.5, "latency_bs1": 0.9},
             "final": {"pytorch": {"latency_bs32": 2.0, "latency_bs1": 4.0, "latency_bs32_spread": [1.9, 2.2]},
                       "onnxruntime": {"latency_bs32": 1.0, "latency_bs1": 2.0}}}
    peers = {"pytorch_fp32": {"label": "fp32", "eval_accuracy": 0.9, "latency_bs32": 4.0, "latency_bs1": 8.0,
                              "final": {"latency_bs32": 6.0, "latency_bs1": 10.0}},
             "onnxruntime_int8": {"label": "ort8", "latency_bs32": 2.5, "final": {"latency_bs32": 3.0}},
             "onnxruntime_fp32": {"label": "ort32", "latency_bs1": 5.0, "final": {"latency_bs1": 6.0}}}
    return point, peers


def test_speed_targets_are_read_from_the_final_timing_when_taken():
    point, peers = _final_summary()
    t = {x["target"]: x for x in evaluate_targets([point], {}, BASE, peers, joint_minutes=1.0, overhead=0.0)}
    # search-time figures would say 4x, 2.5x, 1.0 ms, 5x, 0.9 ms; the final timing says otherwise
    assert t["bs32 throughput vs fp32 PyTorch"]["measured"] == pytest.approx(6.0 / 2.0)
    assert "final interleaved timing" in t["bs32 throughput vs fp32 PyTorch"]["note"]
    assert t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline"]["measured"] == pytest.approx(1.5)
    assert t["bs1 latency (ms/sentence)"]["measured"] == 4.0
    both = t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline, both in ONNX Runtime"]
    assert both["measured"] == pytest.approx(3.0) and both["met"]
    ort_bs1 = t["bs1 latency (ms/sentence) in ONNX Runtime"]
    assert ort_bs1["measured"] == 2.0 and "6.00 ms" in ort_bs1["note"]
    # without a final timing, the search-time figures are used (and said to be)
    plain = {k: {kk: vv for kk, vv in v.items() if kk != "final"} for k, v in peers.items()}
    t2 = {x["target"]: x for x in evaluate_targets([point], {}, BASE, plain, joint_minutes=1.0, overhead=0.0)}
    assert t2["bs32 throughput vs fp32 PyTorch"]["measured"] == pytest.approx(4.0)
    assert "search-time timing" in t2["bs32 throughput vs fp32 PyTorch"]["note"]


def test_report_has_the_final_timing_table_with_ratios_to_the_same_rounds():
    point, peers = _final_summary()
    summary = {"title": "t", "command": "c", "machine": "m", "baseline": BASE, "peers": peers,
               "fronts": {"joint": [point]}, "hypervolume": {"joint": 0.0}, "phases_seconds": {}, "targets": [],
               "final_timing": {"protocol": "5 rounds, rotated"}}
    rows = {r["name"]: r for r in final_timing_rows(summary)}
    assert rows["joint #3: q (PyTorch)"]["ratios"]["latency_bs32"] == pytest.approx(3.0)
    assert rows["joint #3: q (ORT)"]["ratios"]["latency_bs1"] == pytest.approx(5.0)
    md = report_md(summary)
    assert "## Final timing (the speed targets are read here): 5 rounds, rotated" in md
    assert "| joint #3: q (PyTorch) | 89.50 | 2.00 | 1.90-2.20 | 3.00x | 4.00 | - | 2.50x |" in md


def test_timing_plan_puts_each_runtime_in_its_own_block(tmp_path):
    from autocompress.bench_timing import FRONT_DIR, PEERS_DIR, timing_plan

    (tmp_path / PEERS_DIR / "baseline-fp32").mkdir(parents=True)
    (tmp_path / PEERS_DIR / "baseline-int8.onnx").write_bytes(b"x")
    (tmp_path / FRONT_DIR / "trial4").mkdir(parents=True)
    (tmp_path / FRONT_DIR / "trial4" / "model.onnx").write_bytes(b"x")
    (tmp_path / FRONT_DIR / "trial4" / "model-ort-int8.onnx").write_bytes(b"x")
    peers = {"pytorch_fp32": {}, "pytorch_int8": {}, "onnxruntime_fp32": {}, "onnxruntime_int8": {}}
    points = [{"trial": 4}, {"trial": 7, "model_dir": "trials/7b"}]
    plan = timing_plan(tmp_path, "s-joint", points, peers)
    assert [m[0] for m in plan["pytorch"]] == ["peer pytorch_fp32", "peer pytorch_int8", "joint 4 pytorch",
                                               "joint 7 pytorch"]
    assert plan["pytorch"][1][1] == "saved+torch_int8" and plan["pytorch"][3][2].endswith("s-joint/trials/7b")
    # no baseline-fp32.onnx on disk, and trial 7 was not exported: neither is timed in ONNX Runtime
    assert [m[0] for m in plan["onnxruntime"]] == ["peer onnxruntime_int8", "joint 4 onnxruntime",
                                                   "joint 4 onnxruntime_fused"]
    assert "onnxruntime" not in timing_plan(tmp_path, "s-joint", points, peers, onnx=False)


def test_a_failing_timing_process_says_why(monkeypatch):
    from autocompress import bench_timing
    from autocompress.errors import AutocompressError

    task = {"models": [], "latency_sets": {}, "pad_token_id": 0, "rounds": 0, "threads": 1}
    with pytest.raises(AutocompressError, match=r"(?s)final timing.s process failed.*rounds=0"):
        bench_timing._in_fresh_process(task)


def test_the_ort_int8_kernel_variant_competes_in_onnx_runtime_with_its_own_accuracy():
    point, peers = _final_summary()
    fast = {"latency_bs32": 0.75, "latency_bs1": 0.8}
    ok = {**point, "onnxruntime_fused": {"eval_accuracy": 0.894}, "final": {**point["final"], "onnxruntime_fused": fast}}
    t = {x["target"]: x for x in evaluate_targets([ok], {}, BASE, peers, joint_minutes=1.0, overhead=0.0)}
    both = t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline, both in ONNX Runtime"]
    assert both["measured"] == pytest.approx(3.0 / 0.75) and both["point"] == "joint #3: q (ONNX Runtime int8 kernels)"
    assert t["bs1 latency (ms/sentence) in ONNX Runtime"]["measured"] == 0.8
    # 1.6 points down in ONNX Runtime: it does not count, the bit-exact graph does
    bad = {**ok, "onnxruntime_fused": {"eval_accuracy": 0.884}}
    t = {x["target"]: x for x in evaluate_targets([bad], {}, BASE, peers, joint_minutes=1.0, overhead=0.0)}
    both = t["bs32 throughput vs ONNX Runtime dynamic int8 of the baseline, both in ONNX Runtime"]
    assert both["measured"] == pytest.approx(3.0) and both["point"] == "joint #3: q"
    rows = {r["name"]: r for r in final_timing_rows({"peers": peers, "fronts": {"joint": [ok]}})}
    assert rows["joint #3: q (ORT, ORT's int8 kernels)"]["accuracy"] == 0.894


def test_fresh_models_are_built_for_every_pass_and_warmed_each_time():
    built: list[str] = []

    def factory(name):
        def make():
            built.append(name)
            return name
        return make

    calls = []

    def timer(model, enc, *, batch_size, warmup, repeats, device, pad_token_id):
        calls.append((model, repeats))
        return {"median": 1.0}

    out = interleaved_latency({"a": factory("a"), "b": factory("b")}, {32: "e"}, rounds=2, pad_token_id=0,
                              warmup=1, timer=timer, fresh=True)
    assert built == ["a", "b", "b", "a"]  # one instance per pass, in the rotated order
    assert calls == [("a", 1), ("a", 1), ("b", 1), ("b", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 1)]
    assert out["a"]["latency_bs32"] == 1.0


def test_latency_samples_cross_to_the_timing_process_as_plain_arrays(tmp_path):
    import numpy as np

    from autocompress.bench_timing import load_latency_sets, save_latency_sets
    from autocompress.data import Encoded

    ids = [np.array([101, 7, 102], np.int32), np.array([101, 102], np.int32)]
    sets = {32: Encoded(input_ids=ids, token_type_ids=[np.zeros(3, np.int32), np.zeros(2, np.int32)],
                        labels=np.array([0, 1]), truncated=0),
            1: Encoded(input_ids=ids[:1], token_type_ids=None, labels=np.array([1]), truncated=0)}
    save_latency_sets(tmp_path / "s.npz", sets)
    back = load_latency_sets(tmp_path / "s.npz")
    assert [len(x) for x in back[32].input_ids] == [3, 2] and back[32].input_ids[0].tolist() == [101, 7, 102]
    assert back[32].token_type_ids[1].tolist() == [0, 0] and back[1].token_type_ids is None
    assert back[1].labels.tolist() == [1]


def test_each_onnx_runtime_worker_gets_a_cpu_of_its_own():
    from autocompress.bench_timing import worker_affinities

    assert worker_affinities([0, 1], 2) == "2"  # the calling thread on CPU 0, the worker on CPU 1 (1-based: 2)
    assert worker_affinities([3, 1, 2, 0], 4) == "2;3;4"
    assert worker_affinities([4, 6, 7], 2) == "7"  # a restricted CPU set (taskset, containers)
    assert worker_affinities([0], 2) is None and worker_affinities([0, 1], 1) is None  # nothing to pin


def test_the_timing_process_pins_onnx_runtime_threads(tmp_path, tiny_model_dir, monkeypatch):
    """An all-ONNX block pins its calling thread and hands the workers' affinities to every session."""
    import autocompress.bench_timing as bt

    made = []
    monkeypatch.setattr(bt, "pin_onnxruntime_threads", lambda threads: "2" if threads == 2 else None)
    monkeypatch.setattr(bt, "_load", lambda kind, path, **kw: made.append(kw["affinities"]) or object())
    monkeypatch.setattr(bt, "interleaved_latency", lambda models, *a, **kw: {n: m() if kw["fresh"] else m for n, m in models.items()})
    task = {"models": [("a", "onnx", "a.onnx"), ("b", "onnx", "b.onnx")], "latency_sets": {}, "pad_token_id": 0,
            "rounds": 1, "threads": 2}
    bt.time_block(task)
    assert made == ["2", "2", "2", "2"]  # each model loaded once up front, then once per pass
    made.clear()
    bt.time_block({**task, "models": [("t", "saved", "dir")]})  # PyTorch blocks are left alone
    assert made == [None]
