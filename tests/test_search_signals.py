"""Ctrl-C / SIGTERM while the search talks to the study storage is held until the bookkeeping is done, so the
interrupted trial is always recorded (FAIL, "interrupted") instead of left RUNNING in a locked database."""
from __future__ import annotations

import os
import signal

import pytest
from conftest import write_tiny_spec

import autocompress.objective as objective_mod
import autocompress.search as search_mod
from autocompress.registry import load_registry
from autocompress.results import load_results
from autocompress.search import StudyInterrupted, run_search
from autocompress.spec import load_spec


# Always enabled, a continuous knob: every trial runs (no empty pipeline, no repeat skipped)
TECHNIQUES = "  head_pruning: {enabled: true, params: {fraction: [0.1, 0.7], importance_batches: 2}}\n"


def _spec(tmp_path, tiny_model_dir, tiny_data_dir):
    return load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=3, techniques=TECHNIQUES))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_sampling_is_held_until_the_trial_is_recorded(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                   isolated_cache, monkeypatch, sig):
    real_sample = search_mod.sample
    calls = []

    def sample_then_signal(space, suggest):
        calls.append(1)
        if len(calls) == 2:  # the second trial: the signal arrives in the middle of the storage writes
            os.kill(os.getpid(), sig)
        return real_sample(space, suggest)

    monkeypatch.setattr(search_mod, "sample", sample_then_signal)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with pytest.raises(StudyInterrupted, match=r"1/3 trials finished"):
            run_search(_spec(tmp_path, tiny_model_dir, tiny_data_dir), registry=load_registry(),
                       results_dir=tmp_path / "results", command="test", log=lambda m: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = load_results(tmp_path / "results" / "tiny").rows
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"]
    assert rows[1]["fail_reason"].startswith("interrupted")
    assert rows[1]["params"], "the sampling the signal arrived in finished before the signal was acted on"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the search put the handlers back


def test_signal_during_a_trial_stops_it_at_once(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache,
                                                monkeypatch):
    real_evaluate = objective_mod.evaluate
    reached = []

    def evaluate_interrupted(*args, **kwargs):
        if len(reached) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signal")  # not reached: the trial's own work is interruptible
        reached.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(objective_mod, "evaluate", evaluate_interrupted)
    with pytest.raises(StudyInterrupted):
        run_search(_spec(tmp_path, tiny_model_dir, tiny_data_dir), registry=load_registry(),
                   results_dir=tmp_path / "results", command="test", log=lambda m: None)
    assert reached == [1]
    assert [r["state"] for r in load_results(tmp_path / "results" / "tiny").rows] == ["COMPLETE", "FAIL"]
