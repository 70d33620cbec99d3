"""A sampler's repeat of a tried pipeline is skipped (PRUNED, not counted), not run again."""
from __future__ import annotations

import json

from conftest import write_tiny_spec

from autocompress.registry import load_registry
from autocompress.results import load_results
from autocompress.search import run_search
from autocompress.spec import load_spec

TWO_SETTINGS = ("  quantization: {enabled: true, params: {granularity: [channel, tensor], bits: 8, embeddings: false, "
                "embedding_bits: 8}}\n")


def _search(tmp_path, tiny_model_dir, tiny_data_dir, *, trials: int, seed: int, logs: list[str]):
    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=trials, study=f"s{trials}-{seed}",
                                     techniques=TWO_SETTINGS), overrides=[f"search.seed={seed}"])
    d = run_search(spec, registry=load_registry(), results_dir=tmp_path / "results", command="test", log=logs.append)
    return load_results(d).rows


def test_repeats_are_skipped_until_the_space_is_exhausted(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    logs: list[str] = []
    skipped = []
    for seed in range(4):  # two settings, two trials: some seeds propose a repeat, which must not run
        rows = _search(tmp_path, tiny_model_dir, tiny_data_dir, trials=2, seed=seed, logs=logs)
        done = [r for r in rows if r["state"] == "COMPLETE"]
        assert len({json.dumps(r["params"], sort_keys=True) for r in done}) == len(done) == 2, seed
        skipped += [r for r in rows if r["state"] == "PRUNED"]
    assert skipped, "none of the seeds proposed a repeat; the test needs one"
    assert all("pipeline again" in r["fail_reason"] for r in skipped)
    assert not any("is the space exhausted?" in m for m in logs)

    # Three trials over two settings: after MAX_REPEATS_IN_A_ROW proposals of tried pipelines, one runs anyway.
    rows = _search(tmp_path, tiny_model_dir, tiny_data_dir, trials=3, seed=0, logs=logs)
    assert [r["state"] for r in rows].count("COMPLETE") == 3
    assert [r["state"] for r in rows].count("PRUNED") >= 50
    assert any("is the space exhausted?" in m for m in logs)
