"""The model card (README.md) of an export directory, rendered from export.json's content.

A pure function of that dict, like the report's renderers: every figure in the card is in export.json
too, and the card can be re-rendered from it without the study.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .pareto import LATENCY_RE, _finite
from .report import _fmt, metric_label, params_summary


def model_card(info: Mapping[str, Any]) -> str:
    """README.md of an export directory, from export.json's content (every figure comes from ``info``)."""
    m, b, rel = info["metrics"], info["baseline"], info["relative"]
    where = json.dumps(str(info.get("directory") or "DIR"))  # as given to --out; a quoted Python/shell string
    n, study, split = info["trial"], info["study"], info["data"]["reported_split"]
    sel = info["selection"]
    how = (f"by number (--trial {n})" if sel["how"] == "trial" else
           f"with --pick {sel['how']} among the {len(sel['candidates'])} front trial(s) {sel['candidates']} meeting "
           f"{_constraints(sel['constraints']) or 'no constraint'}")
    md = [f"# {study}, trial {n}: {' + '.join(info['pipeline']) or 'no technique'}", "",
          f"A compressed {_base_name(info['base_model']['name'])} text classifier exported by autocompress "
          f"{info['autocompress']} from study `{study}`. Chosen {how}; "
          f"{'on' if sel['on_front'] else 'not on'} the study's Pareto front ({sel['front']}).", "",
          "## Use it", "", "```python", "import autocompress", "",
          f"model = autocompress.load({where})  # torch model in eval mode (safetensors + JSON, no pickles)",
          f"tokenizer = autocompress.load_tokenizer({where})",
          f"predict = autocompress.load_predictor({where})  # texts in, (label, probability) out",
          'print(predict(["a text to classify"]))', "```", "",
          "```bash", f'autocompress predict {where} "a text to classify"', "```", "",
          f"Labels: {', '.join(map(str, info['labels']))}. Inputs are truncated to {info['base_model']['max_length']} "
          f"tokens. Loading needs the plugins of its techniques ({', '.join(info['pipeline']) or 'none'}).", "",
          "## Metrics", "", "| metric | this model | baseline | change |", "|---|---:|---:|---|"]
    rows = [(q, f"{'validation' if q == 'accuracy' else split} accuracy", "pct", "acc_delta" if q == "accuracy"
             else "eval_acc_delta") for q in ("accuracy", "eval_accuracy")]
    for q, label, kind, key in rows:
        label += " (selected on)" if q == "accuracy" else " (held out, reported)"
        md.append(f"| {label} | {_fmt(kind, m.get(q))} | {_fmt(kind, b.get(q))} | {_fmt('pts', rel.get(key))} pts |")
    for k in [k for k in m if LATENCY_RE.match(k)]:
        speed = rel.get("speedup_" + k.removeprefix("latency_"))
        md.append(f"| {metric_label(k)} | {_fmt('num', m[k])} | {_fmt('num', b.get(k))} | {_ratio(speed, 'faster', 'slower')} |")
    for k, kind, key, words in (("size_mb", "num", "size_reduction", ("smaller", "larger")),
                                ("params", "big", "params_reduction", ("fewer", "more")),
                                ("flops", "big", "flops_reduction", ("fewer", "more"))):
        if k in m:
            md.append(f"| {metric_label(k)} | {_fmt(kind, m[k])} | {_fmt(kind, b.get(k))} | {_ratio(rel.get(key), *words)} |")
    md += ["", f"Measured during the search on {info.get('device') or 'the study machine'}: "
               f"{info['protocol']['statistic']}, {info['protocol']['padding']}; batch sizes "
               f"{info['protocol']['batch_sizes']}, {info['protocol']['timed_passes']} timed passes after "
               f"{info['protocol']['warmup_passes']} warm-up. Size: {info['protocol']['size']}. Deltas are in points; "
               f"speed-ups and reductions are baseline / this model.", ""]
    v = info.get("verification") or {}
    if "eval_accuracy" in v:
        md += [f"Verified at export: reloaded from this directory, the model scores {_fmt('pct', v['eval_accuracy'])} "
               f"on {v['split']} ({v['examples']} examples); the trial recorded {_fmt('pct', v['recorded_eval_accuracy'])}"
               f" ({'reproduced exactly' if v['reproduced'] else 'NOT reproduced'}).", ""]
    elif v:
        md += [f"Not verified at export: {v.get('skipped')}.", ""]
    md += ["## Pipeline", "", *[f"{i}. `{t}`: {params_summary((info['params'] or {}).get(t)) or '(defaults)'}"
                                for i, t in enumerate(info["pipeline"], 1)], "",
           "`recipe.json` holds each step with its parameters and the record that rebuilds the structure.", ""]
    md += _onnx_section(info.get("onnx"), where)
    md += ["## Reproduce", "", "The study:", "", "```", info["commands"].get("search") or "(command not recorded)", "```",
           "", "This export:", "", "```", info["commands"].get("export") or "(called from Python)", "```", "",
           f"Files: `model.safetensors`, `config.json` (base architecture), `recipe.json`, `meta.json`, tokenizer "
           f"files, `export.json` (every figure above){', `model.onnx`' if info.get('onnx') else ''}.", ""]
    return "\n".join(md)


def _base_name(name: str) -> str:
    from .spec import DEFAULT_MODEL

    return "all-MiniLM-L6-v2 (the packaged `default` model)" if name == DEFAULT_MODEL else f"`{name}`"


def _ratio(x: Any, better: str, worse: str) -> str:
    """'1.88x faster' / '2.00x slower': a ratio below 1 reads better inverted than as '0.50x faster'."""
    if not _finite(x) or float(x) <= 0:
        return "—"
    return f"{float(x):.2f}x {better}" if float(x) >= 1 else f"{1 / float(x):.2f}x {worse}"


def _constraints(c: Mapping[str, float]) -> str:
    words = {"max_drop": "accuracy drop <= {:g} pts", "max_size_mb": "size <= {:g} MB", "max_latency_ms": "latency <= {:g} ms/ex"}
    return ", ".join(words[k].format(v) for k, v in c.items())


def _onnx_section(o: Mapping[str, Any] | None, where: str) -> list[str]:
    if not o:
        return []
    p, lat = o["parity"], o["latency_ms_per_example"]
    md = ["## ONNX", "", f"`{o['file']}` ({_fmt('num', o['size_mb'])} MB), exported with {o['exporter']}; inputs "
          f"{', '.join(o['inputs'])} (dynamic batch and length), output `logits`."]
    if o.get("int8"):
        q = o["int8"]
        md += [f"The {q['linears']} int8 Linears run as int8 in ONNX too ({q['matmul_nodes']} MatMul nodes): "
               f"{q['kernels']}, on the same int8 weights and scales."]
    md += ["", f"Parity with PyTorch on {p['split']} ({p['examples']} examples): {p['agreement']:.2%} of argmax "
           f"predictions agree (required: {p['threshold']:.2%}); max |logit difference| {p['max_abs_logit_diff']:.3g}."]
    if p.get("pytorch_self_agreement"):
        f = p["pytorch_self_agreement"]
        md += ["", f"The bar is below 99.5% because dynamic int8 is not stable at the last bit: PyTorch agrees with "
                   f"itself on only {f['agreement']:.2%} of {p['split']} (max |logit difference| "
                   f"{f['max_abs_logit_diff']:.3g}) when its embedding output is perturbed by one float32 ulp "
                   f"({f['perturbation']}). Each call quantises activations with its own min/max, so any last-bit "
                   f"difference moves every later quantisation grid; ONNX Runtime cannot match it more closely than "
                   f"it matches itself."]
    md += ["", f"Latency at export time, same protocol, back to back ({o['runtime']}). Compare the two "
               f"columns with each other: timings taken at another time on a shared machine can differ.", "",
           "| batch | ONNX Runtime (ms/example) | PyTorch (ms/example) |", "|---|---:|---:|"]
    for k in lat["onnxruntime"]:
        if LATENCY_RE.match(k):
            md.append(f"| {k.removeprefix('latency_bs')} | {_fmt('num', lat['onnxruntime'][k])} | "
                      f"{_fmt('num', lat['pytorch'].get(k))} |")
    return md + ["", "```python", "import onnxruntime, autocompress",
                 f"session = onnxruntime.InferenceSession({where} + \"/{o['file']}\")",
                 f'enc = autocompress.load_tokenizer({where})(["a text to classify"], return_tensors="np")',
                 "logits = session.run(None, {i.name: enc[i.name] for i in session.get_inputs()})[0]", "```", ""]
