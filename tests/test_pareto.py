from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.pareto import (
    dominates,
    front_knee,
    front_rows,
    hypervolume,
    knee_index,
    objective_matrix,
    pareto_front_indices,
    pareto_mask,
    relative_to_baseline,
    to_minimization,
)

OBJ = [("accuracy", "maximize"), ("latency_bs32", "minimize"), ("size_mb", "minimize")]


def row(n, acc, lat, size, *, state="COMPLETE", feasible=True, **extra):
    return {"number": n, "state": state, "pipeline": ["head_pruning"], "params": {}, "feasible": feasible,
            "metrics": {"accuracy": acc, "latency_bs32": lat, "size_mb": size, **extra}}


def test_to_minimization_negates_maximize_columns():
    v = np.array([[0.9, 2.0], [0.8, 1.0]])
    out = to_minimization(v, ["maximize", "minimize"])
    assert out.tolist() == [[-0.9, 2.0], [-0.8, 1.0]]
    assert v[0, 0] == 0.9  # input untouched


def test_to_minimization_rejects_bad_directions_and_shapes():
    with pytest.raises(ValueError, match="directions"):
        to_minimization(np.zeros((2, 2)), ["maximize", "smaller"])
    with pytest.raises(ValueError, match="2 objective columns but 1"):
        to_minimization(np.zeros((2, 2)), ["minimize"])


def test_dominates():
    assert dominates([1, 1], [1, 2])
    assert not dominates([1, 2], [1, 2])  # equal: no strict improvement
    assert not dominates([0, 3], [1, 2])  # trade-off
    assert not dominates([np.nan, 0], [1, 1])


def test_pareto_mask_minimize():
    v = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [4, 4]], dtype=float)
    assert pareto_mask(v, ["minimize", "minimize"]).tolist() == [True, True, False, True, False]
    assert pareto_front_indices(v, ["minimize", "minimize"]).tolist() == [0, 1, 3]


def test_pareto_mask_maximize_duplicates_and_nan():
    # accuracy (max) vs latency (min)
    v = np.array([
        [0.90, 2.0],   # front
        [0.80, 1.0],   # front (fastest)
        [0.85, 3.0],   # dominated by row 0
        [0.90, 2.0],   # duplicate of a front point: kept
        [np.nan, 0.1], # NaN: never on the front, and must not dominate row 1
        [0.95, np.inf],  # non-finite: never on the front
    ])
    assert pareto_mask(v, ["maximize", "minimize"]).tolist() == [True, True, False, True, False, False]


def test_pareto_mask_edge_shapes():
    assert pareto_mask(np.zeros((0, 2)), ["minimize", "minimize"]).tolist() == []
    assert pareto_mask(np.array([3.0, 1.0, 2.0]), ["maximize"]).tolist() == [True, False, False]


def test_hypervolume_2d_hand_computed():
    # Staircase of (1,3), (2,2), (3,1) under reference (4,4): 3*1 + 2*1 + 1*1 = 6
    assert hypervolume(np.array([[1, 3], [2, 2], [3, 1]]), np.array([4, 4])) == pytest.approx(6.0)
    # A dominated point adds nothing; a point outside the reference box is ignored.
    pts = np.array([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0], [0, 4]])
    assert hypervolume(pts, np.array([4, 4])) == pytest.approx(6.0)
    assert hypervolume(np.zeros((0, 2)), np.array([1, 1])) == 0.0


def test_hypervolume_3d_hand_computed():
    ref = np.array([2.0, 2.0, 2.0])
    assert hypervolume(np.array([[1, 1, 1]]), ref) == pytest.approx(1.0)
    # Boxes 2*2*1 = 4 and 1*1*2 = 2 overlap in [1,2]^3 = 1 -> 5
    assert hypervolume(np.array([[0, 0, 1], [1, 1, 0]]), ref) == pytest.approx(5.0)
    # Three axis-aligned slabs around the origin, reference (1,1,1):
    # each point covers 1*1*1 minus the corner; inclusion-exclusion: 3*0.5 - 3*0.25 + 0.125 = 0.875
    pts = np.array([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    assert hypervolume(pts, np.ones(3)) == pytest.approx(0.875)


def test_hypervolume_matches_monte_carlo_3d():
    rng = np.random.default_rng(0)
    pts = rng.random((8, 3))
    ref = np.ones(3)
    samples = rng.random((200_000, 3))
    covered = np.any(np.all(pts[None, :, :] <= samples[:, None, :], axis=2), axis=1)
    assert hypervolume(pts, ref) == pytest.approx(covered.mean(), abs=0.01)


def test_hypervolume_rejects_mismatched_reference():
    with pytest.raises(ValueError, match="reference"):
        hypervolume(np.ones((2, 2)), np.ones(3))


def test_knee_two_objectives():
    front = np.array([[0.0, 10.0], [1.0, 2.0], [2.0, 1.5], [10.0, 0.0]])
    assert knee_index(front) == 1
    # invariant to the scale of each objective
    assert knee_index(front * np.array([1000.0, 0.001])) == 1


def test_knee_falls_back_to_ideal_point():
    assert knee_index(np.array([[0.0, 1.0], [1.0, 0.0]])) == 0  # tie: the lower index
    assert knee_index(np.array([[3.0, 4.0]])) == 0
    # 3 objectives: closest to the ideal point in normalised space
    pts = np.array([[0, 1, 1], [0.4, 0.4, 0.4], [1, 0, 0.9], [1, 1, 0]], dtype=float)
    assert knee_index(pts) == 1
    with pytest.raises(ValueError):
        knee_index(np.zeros((0, 2)))


def test_relative_to_baseline_numbers():
    base = {"accuracy": 0.91, "eval_accuracy": 0.90, "latency_bs32": 2.0, "latency_bs1": 8.0, "size_mb": 88.0,
            "params": 22_000_000, "flops": 2e9, "device": "cpu"}
    m = {"accuracy": 0.905, "eval_accuracy": 0.897, "latency_bs32": 1.0, "latency_bs1": 6.4, "size_mb": 22.0,
         "params": 11_000_000, "flops": 1e9}
    rel = relative_to_baseline(m, base)
    assert rel["acc_delta"] == pytest.approx(-0.5)
    assert rel["eval_acc_delta"] == pytest.approx(-0.3)
    assert rel["speedup_bs32"] == pytest.approx(2.0)
    assert rel["speedup_bs1"] == pytest.approx(1.25)
    assert rel["size_reduction"] == pytest.approx(4.0)
    assert rel["params_reduction"] == pytest.approx(2.0)
    assert rel["flops_reduction"] == pytest.approx(2.0)
    assert "f1_delta" not in rel
    # row-shaped baseline works too, and f1 is included when present
    rel2 = relative_to_baseline({"accuracy": 0.9, "f1": 0.8}, {"metrics": {"accuracy": 0.9, "f1": 0.85}})
    assert rel2["acc_delta"] == pytest.approx(0.0) and rel2["f1_delta"] == pytest.approx(-5.0)
    # missing values give None, not an exception
    assert relative_to_baseline({"latency_bs32": None}, {"latency_bs32": 2.0})["speedup_bs32"] is None


def test_front_rows_filters_and_sorts():
    rows = [
        row(0, 0.90, 2.0, 80.0),
        row(1, 0.88, 1.0, 40.0),
        row(2, 0.95, 0.5, 10.0, state="FAIL"),  # would dominate everything, but failed
        row(3, 0.99, 0.1, 1.0, feasible=False),  # would dominate everything, but infeasible
        row(4, 0.85, 3.0, 90.0),  # dominated
        row(5, 0.91, 2.5, 85.0),
        {"number": 6, "state": "COMPLETE", "feasible": True, "metrics": {"accuracy": 0.99}},  # objectives missing
        row(7, 0.89, float("nan"), 10.0),
        {"number": 8, "state": "RUNNING", "metrics": {}},
    ]
    front = front_rows(rows, OBJ)
    assert [r["number"] for r in front] == [5, 0, 1]  # best accuracy first
    assert [r["number"] for r in front_rows(rows, OBJ, feasible_only=False)] == [3]
    assert front_rows([], OBJ) == []
    knee = front_knee(front, OBJ)
    assert knee is not None and knee["number"] in {0, 1, 5}


def test_objective_matrix_nan_for_missing():
    objectives = [("accuracy", "maximize"), ("size_mb", "minimize")]
    m = objective_matrix([{"metrics": {"accuracy": 0.9, "size_mb": True}}], objectives)  # a bool is not a measurement
    assert m[0, 0] == 0.9 and math.isnan(m[0, 1])


def test_objectives_as_dicts_or_lists():
    from autocompress.pareto import normalize_objectives

    as_dicts = [{"name": n, "direction": d} for n, d in OBJ]
    assert normalize_objectives(as_dicts) == OBJ and normalize_objectives([list(o) for o in OBJ]) == OBJ
    rows = [row(0, 0.9, 2.0, 80.0), row(1, 0.8, 1.0, 40.0), row(2, 0.7, 3.0, 90.0)]
    assert [r["number"] for r in front_rows(rows, as_dicts)] == [0, 1]
    with pytest.raises(ValueError, match="direction"):
        normalize_objectives([("accuracy", "max")])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*[st.sampled_from([0.0, 1.0, 2.0, 3.0, float("nan")])] * 3), max_size=12))
def test_pareto_mask_matches_brute_force(points):
    directions = ["maximize", "minimize", "minimize"]
    v = np.array(points, dtype=float).reshape(-1, 3)
    vmin = to_minimization(v, directions)
    expected = [bool(np.all(np.isfinite(p)) and not any(dominates(q, p) for q in vmin if np.all(np.isfinite(q))))
                for p in vmin]
    assert pareto_mask(v, directions).tolist() == expected
