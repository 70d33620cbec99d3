from __future__ import annotations

import csv
import json

import pytest

from autocompress import report
from autocompress.errors import StudyError
from autocompress.report import (
    draw_html,
    draw_png,
    front_table,
    params_summary,
    plot_data,
    trials_table_rows,
    write_all,
    write_pareto_json,
    write_report_md,
    write_trials,
)

OBJ = [("accuracy", "maximize"), ("latency_bs32", "minimize"), ("size_mb", "minimize")]
BASE = {"metrics": {"accuracy": 0.9123, "eval_accuracy": 0.9011, "latency_bs32": 2.0, "latency_bs1": 8.0,
                    "size_mb": 86.7, "params": 22_700_000, "flops": 2.9e9},
        "device": "cpu (2 threads, Test CPU 9000)"}


def trial(n, acc, lat, size, *, state="COMPLETE", feasible=True, pipeline=("head_pruning",), fail_reason=None):
    metrics = {} if state != "COMPLETE" else {
        "accuracy": acc, "eval_accuracy": acc - 0.004, "latency_bs32": lat, "latency_bs1": lat * 4,
        "size_mb": size, "params": 11_000_000, "flops": 1.2e9}
    return {"number": n, "state": state, "fail_reason": fail_reason, "pipeline": list(pipeline),
            "params": {p: ({"fraction": 0.3, "min_heads_per_layer": 1} if p == "head_pruning" else {"per_channel": True})
                       for p in pipeline},
            "metrics": metrics, "feasible": feasible, "duration_s": 12.5, "device": BASE["device"],
            "model_dir": f"trials/{n}"}


@pytest.fixture
def rows():
    return [
        trial(0, 0.905, 1.8, 80.0),
        trial(1, 0.897, 1.0, 22.1, pipeline=("head_pruning", "quantization")),
        trial(2, 0.0, 0.0, 0.0, state="FAIL", fail_reason="RuntimeError: out of memory"),
        trial(3, 0.88, 1.9, 85.0),  # dominated
        trial(4, 0.95, 0.5, 10.0, feasible=False),  # infeasible
        trial(5, 0.9123, 2.0, 86.7, pipeline=()),  # baseline copy
    ]


def test_params_summary():
    s = params_summary({"head_pruning": {"fraction": 0.3, "min_heads_per_layer": 1}, "quantization": {"per_channel": True}})
    assert s == "head_pruning.fraction=0.30 head_pruning.min_heads_per_layer=1 quantization.per_channel=True"
    assert params_summary({"x": {"lr": 3e-5, "f": 0.125}}) == "x.lr=3e-05 x.f=0.125"
    assert params_summary({}) == ""


def test_trials_table_rows(rows):
    table = trials_table_rows(rows, BASE, OBJ)
    assert len(table) == len(rows)
    assert len({tuple(t) for t in table}) == 1  # same keys, same order for every row
    t1 = next(t for t in table if t["number"] == 1)
    assert t1["pipeline"] == "head_pruning+quantization"
    assert t1["params"].startswith("head_pruning.fraction=0.30")
    assert t1["acc_delta"] == pytest.approx((0.897 - 0.9123) * 100, abs=1e-4)
    assert t1["eval_acc_delta"] == pytest.approx((0.893 - 0.9011) * 100, abs=1e-4)
    assert t1["speedup_bs32"] == pytest.approx(2.0) and t1["speedup_bs1"] == pytest.approx(2.0)
    assert t1["size_reduction"] == pytest.approx(86.7 / 22.1, abs=1e-4)
    assert t1["n_params"] == 11_000_000 and t1["on_front"] is True
    by_n = {t["number"]: t for t in table}
    assert by_n[5]["pipeline"] == "(none)"
    assert by_n[3]["on_front"] is False and by_n[4]["on_front"] is False
    assert by_n[2]["fail_reason"] == "RuntimeError: out of memory" and by_n[2]["accuracy"] is None


def test_write_trials_csv_and_json(tmp_path, rows):
    csv_path, json_path = write_trials(rows, BASE, OBJ, tmp_path)
    with csv_path.open() as f:
        parsed = list(csv.DictReader(f))
    assert len(parsed) == len(rows)
    assert parsed[1]["pipeline"] == "head_pruning+quantization"
    assert parsed[2]["state"] == "FAIL" and parsed[2]["accuracy"] == ""
    doc = json.loads(json_path.read_text())
    assert len(doc["trials"]) == len(rows) and len(doc["table"]) == len(rows)
    assert doc["objectives"][0] == {"name": "accuracy", "direction": "maximize"}


def test_write_trials_nan_becomes_null(tmp_path):
    r = trial(0, 0.9, 1.0, 10.0)
    r["metrics"]["flops"] = float("nan")
    _, json_path = write_trials([r], BASE, OBJ, tmp_path)
    assert json.loads(json_path.read_text())["trials"][0]["metrics"]["flops"] is None


def test_write_pareto_json(tmp_path, rows):
    from autocompress.pareto import front_rows

    front = front_rows(rows, OBJ)
    path = write_pareto_json(front, BASE, OBJ, tmp_path, extra={"study": "demo"})
    doc = json.loads(path.read_text())
    assert doc["study"] == "demo"
    assert [f["number"] for f in doc["front"]] == [r["number"] for r in front]
    assert doc["knee"] in [r["number"] for r in front]
    assert doc["front"][0]["relative"]["speedup_bs32"] is not None
    assert doc["baseline"]["device"] == BASE["device"]
    with pytest.raises(ValueError, match="front"):
        write_pareto_json(front, BASE, OBJ, tmp_path, extra={"front": []})


def test_plot_data(rows):
    data = plot_data(rows, BASE, OBJ, title="demo")
    assert [(p["y"], p["x"]) for p in data["pairs"]] == [("accuracy", "latency_bs32"), ("accuracy", "size_mb")]
    assert data["n_failed"] == 1 and data["n_complete"] == 5
    lat = data["pairs"][0]
    assert lat["x_label"] == "latency at batch 32 (ms/example)" and lat["y_label"] == "validation accuracy"
    assert data["pairs"][1]["x_label"] == "size (MB)"
    assert 2 not in lat["points"]["number"]  # failed trials are not shown
    assert sorted(lat["points"]["number"]) == [0, 1, 3, 4, 5]
    i4 = lat["points"]["number"].index(4)
    assert lat["points"]["feasible"][i4] is False and lat["points"]["on_front"][i4] is False
    assert lat["baseline"] == {"x": 2.0, "y": 0.9123}
    assert lat["step"] == "post"
    # the pair front is sorted by x and excludes the infeasible trial
    assert lat["pair_front"]["x"] == sorted(lat["pair_front"]["x"]) and 4 not in lat["pair_front"]["number"]
    assert lat["pair_front"]["number"] == [1, 0, 5]
    assert lat["points"]["label"][lat["points"]["number"].index(1)] == "#1 head_pruning+quantization"


def test_plot_data_single_objective_plots_costs(rows):
    data = plot_data(rows, BASE, [("accuracy", "maximize")])
    assert [p["x"] for p in data["pairs"]] == ["latency_bs32", "latency_bs1", "size_mb"]


def test_draw_png_and_html(tmp_path, rows):
    data = plot_data(rows, BASE, OBJ, title="demo")
    png = draw_png(data, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = draw_html(data, tmp_path / "pareto.html").read_text()
    assert "plotly" in html and "head_pruning+quantization" in html
    # an empty study still draws (the report links stay valid)
    empty = plot_data([], BASE, OBJ)
    assert draw_png(empty, tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_front_table_formats(rows):
    from rich.console import Console

    from autocompress.pareto import front_rows

    front = front_rows(rows, OBJ)
    as_json = front_table(front, BASE, OBJ, fmt="json")
    assert as_json[0]["trial"] == "baseline" and as_json[0]["speedup_bs32"] == pytest.approx(1.0)
    assert [r["trial"] for r in as_json[1:]] == [r["number"] for r in front]
    md = front_table(front, BASE, OBJ, fmt="markdown")
    assert md.splitlines()[0].startswith("| trial | val acc (%) | eval acc (%) | Δ eval acc (pts) | latency bs32 (ms/ex) |")
    assert "| 1 |" in md and "2.00x" in md and "head_pruning+quantization" in md
    table = front_table(front, BASE, OBJ, fmt="table")
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    assert "speedup bs32" in text and "baseline" in text
    with pytest.raises(ValueError, match="fmt"):
        front_table(front, BASE, OBJ, fmt="yaml")


def test_write_report_md_contents(tmp_path, rows):
    from autocompress.pareto import front_rows

    front = front_rows(rows, OBJ)
    path = write_report_md(
        tmp_path, spec_summary={"study": "sst2-demo", "model": "tiny", "techniques": ["head_pruning"]}, baseline=BASE,
        rows=rows, front=front, objectives=OBJ, protocol={"batch_sizes": [32, 1], "repeats": 5, "statistic": "median"},
        commands=["autocompress search spec.yaml --trials 6"], notes=["a note from the caller"],
    )
    md = path.read_text()
    assert md.startswith("# autocompress report: sst2-demo")
    assert "autocompress search spec.yaml --trials 6" in md
    assert "Test CPU 9000" in md and "**repeats**: 5" in md
    assert "0.9123" in md and "86.70" in md  # baseline figures
    assert "RuntimeError: out of memory" in md and "trial 2" in md
    for r in front:
        assert f"| {r['number']} |" in md
    assert "a note from the caller" in md and "#4" in md  # infeasible listed
    assert "_pareto.png was not drawn._" in md  # no plot files in this directory


def test_write_all(tmp_path, rows):
    out = tmp_path / "study"
    front = write_all(out, rows=rows, baseline=BASE, objectives=OBJ, spec_summary={"study": "demo"},
                      protocol={"repeats": 3}, commands=["autocompress search x.yaml"], notes=[], extra={"study": "demo"})
    assert [r["number"] for r in front] == [5, 0, 1]
    for name in ("trials.csv", "trials.json", "pareto.json", "pareto.png", "pareto.html", "report.md"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "![Pareto front](pareto.png)" in md and "pareto.html" in md
    assert not list(out.glob("*.tmp"))


def test_write_all_survives_a_broken_plotter(tmp_path, rows, monkeypatch):
    def boom(data, path):
        raise ImportError("no plotly here")

    monkeypatch.setattr(report, "draw_html", boom)
    write_all(tmp_path, rows=rows, baseline=BASE, objectives=OBJ, spec_summary={"study": "demo"})
    md = (tmp_path / "report.md").read_text()
    assert "pareto.html could not be drawn: ImportError: no plotly here" in md
    assert (tmp_path / "pareto.png").is_file()


def test_unwritable_directory_is_a_study_error(tmp_path, rows):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StudyError, match="cannot write"):
        write_trials(rows, BASE, OBJ, blocker / "sub")
