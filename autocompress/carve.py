"""Carving splits out of a train split: stratified random rows, or whole sentences of a phrase-level dataset.

Phrase-level datasets such as SST-2 label every phrase of every parse tree: GLUE's SST-2 train holds 67,349
phrases of about 8,500 sentences (median 7 words), while its dev split holds whole unseen sentences (median
19 words). A validation split carved at random from such a train split is mostly short phrases whose
sentence, or sub-phrases, the model trained on: on the reference benchmark it scored ~94% against ~89% on
dev, and among the good models it ranked them poorly for dev (Spearman 0.5), so the search selected on
noise. ``carve_sentences`` carves what dev is made of instead: whole sentences (examples no other example
contains), with the phrases found only inside them taken out of train.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import DataError

#: Word windows enumerated by :func:`phrase_owners` before it refuses (long documents are not phrase data).
MAX_WINDOWS = 30_000_000


def carve_size(size: float, total: int) -> int:
    return max(1, round(size * total) if size < 1 else int(size))


def carve(labels: np.ndarray, n: int, rng: np.random.Generator, *, what: str,
          where: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded carve of ``n`` rows (capped so every class keeps one row); returns (kept, carved)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    cap = counts - 1
    n = min(n, int(cap.sum()))
    if n < 1:
        raise DataError(f"{where} is too small to carve a {what} split: {len(labels)} examples in {len(classes)} "
                        "classes, and every class must keep an example for training. Add data, or point data.path "
                        "at a directory with separate train and dev files.")
    share = n * counts / counts.sum()
    quota = np.minimum(np.floor(share).astype(np.int64), cap)
    while quota.sum() < n:  # hand the remainder to the classes furthest below their share that still have room
        gap = np.where(quota < cap, share - quota, -np.inf)
        quota[int(np.argmax(gap))] += 1
    carved = [rng.permutation(np.flatnonzero(inverse == c))[:q] for c, q in enumerate(quota)]
    carved_idx = np.sort(np.concatenate(carved))
    return np.setdiff1d(np.arange(len(labels)), carved_idx), carved_idx


def phrase_owners(texts: Sequence[str], *, where: str) -> list[list[int]]:
    """For each example, the *sentences* that contain it as a run of whole words (whitespace-normalised), where a
    sentence is an example that no other example contains. A sentence owns itself; an exact duplicate of a
    sentence is owned by its first occurrence."""
    words = [t.split() for t in texts]
    order = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))
    index: dict[str, list[int]] = {}
    for i in range(len(words)):
        index.setdefault(" ".join(words[i]), []).append(i)
    owners: list[list[int]] = [[] for _ in words]
    budget = MAX_WINDOWS
    for i in order:
        if owners[i]:
            continue  # inside a longer sentence (or a duplicate of one seen first)
        w = words[i]
        budget -= len(w) * (len(w) + 1) // 2
        if budget < 0:
            raise DataError(f"data.validation_carve='sentences' found examples too long to be phrases in {where} "
                            f"(more than {MAX_WINDOWS:,} word windows to compare): it is meant for phrase-level "
                            "datasets such as SST. Set data.validation_carve: random.")
        seen: set[str] = set()
        for length in range(1, len(w) + 1):
            for start in range(len(w) - length + 1):
                key = " ".join(w[start:start + length])
                if key in seen:
                    continue
                seen.add(key)
                for j in index.get(key, ()):
                    owners[j].append(i)
    return owners


def carve_sentences(texts: Sequence[str], labels: np.ndarray, size: float, rng: np.random.Generator, *,
                    where: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Carve ``size`` whole sentences (a fraction of the sentences if < 1; stratified, seeded) and drop from the
    kept rows every phrase found only inside carved sentences; phrases that also occur in a kept sentence stay,
    as common phrases of dev sentences occur in train. Returns (kept, carved, dropped phrases, sentences)."""
    owners = phrase_owners(texts, where=where)
    sentences = np.array([i for i, o in enumerate(owners) if o == [i]], dtype=np.int64)
    n = carve_size(size, len(sentences))
    _, picked = carve(np.asarray(labels)[sentences], n, rng, what="validation", where=f"{where} (whole sentences)")
    carved = sentences[picked]
    chosen = set(carved.tolist())
    gone = np.array([all(o in chosen for o in own) for own in owners])
    kept = np.flatnonzero(~gone)
    return kept, carved, int(gone.sum()) - len(carved), len(sentences)
