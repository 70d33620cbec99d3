"""Multi-fidelity search (search.fidelity): the promotion rule on hand-made points, the spec checks, and a real
screen-then-promote study on the tiny model, resumed after the screen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autocompress.errors import AutocompressError
from autocompress.fidelity import crowding_distance, mark_superseded, nondominated_ranks, select_promising
from autocompress.pareto import front_rows
from tests.conftest import write_tiny_spec

DIRS = ["maximize", "minimize", "minimize"]


def test_ranks_peel_fronts_in_order():
    v = np.array([[1.0, 1.0], [2.0, 2.0], [0.5, 3.0], [3.0, 3.0], [2.0, 2.0]])
    assert nondominated_ranks(v).tolist() == [0, 1, 0, 2, 1]


def test_crowding_keeps_the_boundaries_and_prefers_isolated_points():
    v = np.array([[0.0, 4.0], [1.0, 3.0], [1.1, 2.9], [4.0, 0.0]])
    d = crowding_distance(v)
    assert np.isinf(d[0]) and np.isinf(d[3]) and d[1] > 0 and d[2] > d[1]


def test_promotion_takes_whole_ranks_first_then_the_least_crowded():
    # accuracy up, latency down, size down
    values = np.array([
        [0.90, 4.0, 90.0],   # 0: rank 0 (most accurate)
        [0.80, 1.0, 20.0],   # 1: rank 0 (fastest, smallest)
        [0.85, 2.0, 50.0],   # 2: rank 0 (in between)
        [0.84, 2.5, 55.0],   # 3: rank 1 (dominated by 2)
        [0.70, 5.0, 95.0],   # 4: rank 2 or worse
        [np.nan, 1.0, 1.0],  # 5: unmeasured: last
    ])
    assert select_promising(values, DIRS, 3) == [0, 1, 2]
    assert select_promising(values, DIRS, 4) == [0, 1, 2, 3]
    assert select_promising(values, DIRS, 2) == [0, 1]  # boundaries of rank 0 (infinite crowding) before 2
    assert select_promising(values, DIRS, 6)[-1] == 5
    assert select_promising(values[:0], DIRS, 3) == []


def test_promotion_by_hypervolume_skips_models_that_compress_nothing():
    base = {"accuracy": 0.95, "latency_bs32": 4.5, "size_mb": 90.0}
    from autocompress.fidelity import screening_reference

    ref = screening_reference(base, list(zip(["accuracy", "latency_bs32", "size_mb"], DIRS)))
    assert ref == pytest.approx([0.85, 4.5, 90.0])
    values = np.array([
        [0.948, 4.43, 90.9],  # 0: most accurate, but neither faster nor smaller than the baseline: no volume
        [0.935, 3.10, 76.7],  # 1
        [0.902, 2.30, 69.6],  # 2: fastest
        [0.934, 2.85, 76.7],  # 3
        [0.700, 1.00, 10.0],  # 4: beyond the accuracy reference: no volume either
    ])
    picks = select_promising(values, DIRS, 3, reference=ref)
    assert 0 not in picks and 4 not in picks and len(picks) == 3
    assert select_promising(values, DIRS, 3)[0] == 0  # crowding alone takes the boundary first
    assert select_promising(values, DIRS, 5, reference=ref)[3:] == [0, 4]  # then survivor order fills up
    assert screening_reference({"accuracy": 0.9}, [("accuracy", "maximize"), ("size_mb", "minimize")]) is None


def test_a_promoted_trial_supersedes_its_screen_on_the_front():
    obj = [("accuracy", "maximize"), ("size_mb", "minimize")]
    rows = [
        {"number": 0, "state": "COMPLETE", "fidelity": "screen", "metrics": {"accuracy": 0.80, "size_mb": 10.0}},
        {"number": 1, "state": "COMPLETE", "fidelity": "screen", "metrics": {"accuracy": 0.70, "size_mb": 5.0}},
        # the retrained trial 0: its size was measured 0.1 MB larger, which alone would keep both on the front
        {"number": 2, "state": "COMPLETE", "fidelity": "full", "promoted_from": 0,
         "metrics": {"accuracy": 0.85, "size_mb": 10.1}},
    ]
    mark_superseded(rows)
    assert [r["number"] for r in front_rows(rows, obj)] == [2, 1]
    assert rows[0]["superseded"] and "superseded" not in rows[1]
    # A trial only the superseded screen dominated stays off the front: its model may be gone already.
    rows.append({"number": 3, "state": "COMPLETE", "fidelity": "screen", "metrics": {"accuracy": 0.79, "size_mb": 10.05}})
    assert [r["number"] for r in front_rows(rows, obj)] == [2, 1]


@pytest.mark.parametrize("extra, needle", [
    ("  fidelity: {screen_steps: 4, promote: 1}\n", "screen_steps (4) must be below recovery.steps (4)"),
    ("  fidelity: {screen_steps: 1, promote: 9}\n", "promote (9) cannot exceed search.trials (4)"),
    ("  fidelity: {screen_steps: 1, promote: 1}\n  workers: 2\n", "search.fidelity runs in one process"),
])
def test_bad_fidelity_settings_are_refused_with_the_fix(tmp_path, tiny_model_dir, tiny_data_dir, extra, needle):
    from autocompress.spec import load_spec

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    text = path.read_text().replace("search: {trials: 4, sampler: random, seed: 0}\n",
                                    "search:\n  trials: 4\n  sampler: random\n  seed: 0\n" + extra)
    path.write_text(text)
    with pytest.raises(AutocompressError, match="fidelity") as err:
        load_spec(path)
    assert needle in str(err.value)


def test_screen_then_promote_on_the_tiny_model_and_resume(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    from typer.testing import CliRunner

    from autocompress.cli import app

    # Head pruning only: every pipeline trains, so each trial's steps say its fidelity (which trials are promoted
    # depends on measured latency, so the test must not depend on which).
    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, study="mf", trials=4,
                           techniques="  head_pruning: {enabled: true, params: {fraction: [0.1, 0.7], importance_batches: 2}}\n")
    text = path.read_text().replace("recovery: {steps: 4, batch_size: 16}", "recovery: {steps: 6, batch_size: 16}")
    path.write_text(text.replace("search: {trials: 4, sampler: random, seed: 0}\n",
                                 "search: {trials: 4, sampler: random, seed: 0, fidelity: {screen_steps: 1, promote: 2}}\n"))
    results = tmp_path / "results"
    r = CliRunner().invoke(app, ["search", str(path), "--results-dir", str(results)])
    assert r.exit_code == 0, r.output
    rows = json.loads((results / "mf/trials.json").read_text())["trials"]
    done = [t for t in rows if t["state"] in ("COMPLETE", "FAIL")]
    assert len(done) == 6, r.output  # 4 screened + 2 promoted
    screened = [t for t in done if t["fidelity"] == "screen"]
    full = [t for t in done if t["fidelity"] == "full"]
    assert len(screened) == 4 and len(full) == 2
    assert {t["metrics"]["recovery_steps"] for t in screened} == {1}
    assert {t["metrics"]["recovery_steps"] for t in full} == {6}
    by_number = {t["number"]: t for t in rows}
    for t in full:  # same pipeline as the screened trial it retrains
        assert t["params"] == by_number[t["promoted_from"]]["params"]
    assert "Screening done (4 trials at 1 recovery steps)" in r.output
    # Rerun: nothing left, nothing re-promoted.
    again = CliRunner().invoke(app, ["search", str(path), "--results-dir", str(results)])
    assert again.exit_code == 0 and "already has 6 finished trials (requested 6)" in again.output


def test_bench_gives_each_single_technique_the_joint_share_of_promotions(tmp_path):
    from autocompress.bench import derive_spec, single_promote
    from autocompress.spec import load_spec

    spec = load_spec("search_spaces/sst2-minilm.yaml")
    assert spec.search.fidelity is not None
    k = single_promote(spec, trials_per_technique=5, joint_trials=24)
    assert k == 1  # 5 of 24 at the joint search's 5 promoted
    sub = derive_spec(spec, study="x-head_pruning", techniques=["head_pruning"], trials=5, single=True, promote=k)
    assert sub.search.total_trials == 6 and sub.search.fidelity.screen_steps == spec.search.fidelity.screen_steps
    assert single_promote(spec, trials_per_technique=24, joint_trials=24) == spec.search.fidelity.promote


def test_an_interrupted_promoted_trial_is_queued_again_at_full_fidelity():
    import optuna
    from optuna.trial import TrialState

    from autocompress.search import _requeue

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"x": 1.0}, user_attrs={"fidelity": "full", "promoted_from": 3})
    trial = study.ask()
    trial.suggest_float("x", 0.0, 2.0)
    study.tell(trial, state=TrialState.FAIL)
    _requeue(study, study.get_trials()[-1])
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"x": 1.0}
    assert waiting[0].user_attrs == {"fidelity": "full", "promoted_from": 3}
    plain = study.ask()  # the requeued one
    plain.suggest_float("x", 0.0, 2.0)
    study.tell(plain, state=TrialState.FAIL)
    study.enqueue_trial({"x": 0.5})  # an ordinary sampled-like trial: not requeued
    t = study.ask()
    t.suggest_float("x", 0.0, 2.0)
    study.tell(t, state=TrialState.FAIL)
    _requeue(study, study.get_trials()[-1])
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_a_screen_that_trained_nothing_is_final_and_never_promoted():
    import optuna
    from optuna.trial import TrialState

    from autocompress.fidelity import promote
    from autocompress.spec import load_spec

    spec = load_spec("search_spaces/sst2-minilm.yaml")
    spec.search.trials, spec.search.fidelity.promote = 3, 2
    study = optuna.create_study(directions=[d for _, d in spec.objective_list()])
    study.set_user_attr("baseline", {"accuracy": 0.9, "latency_bs32": 5.0, "size_mb": 90.0})
    # Trial 0 (int8 alone: post-training, 0 recovery steps) is the most promising of the three.
    for x, (acc, ms, mb), steps in [(0.0, (0.9, 2.5, 23.0), 0), (1.0, (0.88, 4.0, 80.0), 50), (2.0, (0.87, 3.5, 85.0), 50)]:
        t = study.ask()
        t.suggest_float("x", 0.0, 2.0)
        t.set_user_attr("metrics", {"recovery_steps": steps})
        study.tell(t, [acc, ms, mb])
    assert promote(study, spec, log=lambda _: None) == 2
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["promoted_from"] for t in waiting) == [1, 2]
