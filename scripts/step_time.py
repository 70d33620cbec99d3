"""Median time of one training step (forward + backward + AdamW) of a spec's base model on its training
split, with each batch in 1..N length-sorted micro-batches (``recovery.micro_batches``). A benchmark script,
not a test: it prints what this machine does.

    .venv/bin/python scripts/step_time.py search_spaces/sst2-minilm.yaml --data ../shared/data/sst2 --parts 1 2 3 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from autocompress.data import batches, encode, load_task_data
from autocompress.modeling import load_base_classifier, load_tokenizer
from autocompress.spec import load_spec
from autocompress.train import split_by_length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--data", required=True, help="the task's data directory (as for autocompress search)")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting (after 2 untimed)")
    ap.add_argument("--rounds", type=int, default=2, help="the settings are timed in turn, this many times")
    args = ap.parse_args()
    spec = load_spec(args.spec, overrides=[f"data.path={args.data}"])
    task = load_task_data(spec.data, seed=spec.seed)
    tok = load_tokenizer(spec.model)
    enc = encode(task.train, tok, max_length=spec.model.max_length, cache_dir=None)
    torch.manual_seed(0)
    model = load_base_classifier(spec.model, label_names=task.label_names).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    bs = spec.recovery.batch_size
    drawn = list(batches(enc, batch_size=bs, shuffle=True, seed=0, pad_token_id=tok.pad_token_id or 0))
    times: dict[int, list[float]] = {k: [] for k in args.parts}
    for r in range(args.rounds):
        for k in args.parts:
            for i in range(args.steps + 2):
                batch = drawn[(r * len(args.parts) + i) % len(drawn)]
                t = time.perf_counter()
                opt.zero_grad()
                for part, share in split_by_length(batch, k):
                    labels = part.pop("labels")
                    out = model(**part)
                    (torch.nn.functional.cross_entropy(out.logits, labels) * share).backward()
                opt.step()
                if i >= 2:
                    times[k].append(time.perf_counter() - t)
    print(f"{torch.get_num_threads()} threads, batch {bs}, {args.steps * args.rounds} steps each")
    base = statistics.median(times[args.parts[0]])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"micro_batches={k}: median step {med:.3f} s ({med / base:.2f}x of micro_batches={args.parts[0]})")


if __name__ == "__main__":
    main()
