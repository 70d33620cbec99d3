from __future__ import annotations

import pytest

from autocompress.bench_report import report_md, selection_agreement, spearman


def test_spearman_ranks_ties_and_degenerate_inputs():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # ranks, not values
    assert spearman([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833)  # scipy.stats.spearmanr
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def _row(val: float, dev: float, state: str = "COMPLETE") -> dict:
    return {"state": state, "metrics": {"accuracy": val, "eval_accuracy": dev}}


def test_selection_agreement_overall_and_near_the_baseline():
    base = {"accuracy": 0.94, "eval_accuracy": 0.90}
    rows = [_row(0.70, 0.65), _row(0.80, 0.75), _row(0.93, 0.89), _row(0.935, 0.88), _row(0.94, 0.87),
            _row(0.95, 0.86), _row(0.99, 0.99, state="FAIL"), {"state": "COMPLETE", "metrics": {"accuracy": 0.9}}]
    sel = selection_agreement(rows, base)
    assert sel["trials"] == 6 and sel["near_trials"] == 4  # val >= 92%
    assert sel["spearman"] == pytest.approx(spearman([.7, .8, .93, .935, .94, .95], [.65, .75, .89, .88, .87, .86]))
    assert sel["spearman_near"] == pytest.approx(-1.0)  # near the baseline, validation ranks them backwards
    summary = {"title": "t", "command": "c", "machine": "m", "baseline": base, "targets": [], "hypervolume": {},
               "peers": {}, "fronts": {}, "phases_seconds": {}, "selection": sel}
    md = report_md(summary)
    assert "over the 6 finished trials of all studies" in md and "-1.00" in md
    assert selection_agreement([], base)["spearman"] is None
    assert "Selection" not in report_md({**summary, "selection": {"trials": 0}})
