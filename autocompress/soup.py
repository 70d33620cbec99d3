"""Model soups (Wortsman et al. 2022): average the weights of fine-tunes that share their pretrained start.

The greedy soup takes the ingredients in order of their own validation score and keeps each one whose
addition does not lower the soup's validation score, so it never scores below its best ingredient on
validation. Only validation decides: the held-out split reports, and is never looked at here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    import torch


def average_state_dicts(states: Sequence[Mapping[str, "torch.Tensor"]]) -> dict[str, "torch.Tensor"]:
    """:func:`autocompress.train.average_states` (the checkpoint averaging of the baseline's fine-tune), once the
    ingredients are checked to be one architecture: fine-tunes, unlike one run's checkpoints, may not be."""
    from .train import average_states

    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    first = states[0]
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != set(first):
            raise ValueError(f"state dict {i} has other tensors than the first ({sorted(set(sd) ^ set(first))[:3]}): "
                             "a soup averages fine-tunes of one architecture")
    return average_states([dict(sd) for sd in states])


def greedy_soup(states: Sequence[Mapping[str, Any]], score: Callable[[Mapping[str, Any]], float],
                *, own_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """Greedy soup of ``states`` under ``score`` (validation accuracy of a state dict; higher is better).

    ``own_scores``: the ingredients' own scores when known (else each is scored). Returns ``{"state": the
    soup's state dict, "kept": indices into states, "score": the soup's score, "own_scores": [...],
    "tried": [[index, soup score with it, kept?], ...]}``."""
    own = list(own_scores) if own_scores is not None else [score(sd) for sd in states]
    if len(own) != len(states):
        raise ValueError(f"own_scores has {len(own)} scores for {len(states)} ingredients")
    order = sorted(range(len(states)), key=lambda i: (-own[i], i))  # ties: the order given
    kept, best = [order[0]], own[order[0]]
    tried: list[list[Any]] = []
    for i in order[1:]:
        candidate = score(average_state_dicts([states[j] for j in (*kept, i)]))
        joined = candidate >= best
        tried.append([i, candidate, joined])
        if joined:
            kept.append(i)
            best = candidate
    return {"state": average_state_dicts([states[j] for j in kept]), "kept": kept, "score": best,
            "own_scores": own, "tried": tried}
