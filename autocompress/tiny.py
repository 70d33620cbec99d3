"""Tiny random BERT models, tokenizers and data for tests and demos: built in code, no download."""

from __future__ import annotations

import random
from pathlib import Path

WORDS_POS = ["good", "great", "fine", "lovely", "superb", "fun", "warm", "bright"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "boring", "sad", "cold", "grim"]
WORDS_NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "and", "story"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    return SPECIAL + WORDS_NEUTRAL + WORDS_POS + WORDS_NEG


def make_tiny_model_dir(path: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                        intermediate: int = 64, seed: int = 0) -> Path:
    """Write a random ``BertModel`` and a WordPiece tokenizer to ``path`` (an HF model directory)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores vocab_file= on the fast tokenizer; pass the vocabulary itself.
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def tiny_sentences(n: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """Learnable toy sentiment data: the label is which word list dominates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(WORDS_NEUTRAL, rng.randint(2, 5))
        words += rng.sample(WORDS_POS if label else WORDS_NEG, rng.randint(1, 2))
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def write_glue_tsv(directory: str | Path, *, train: int = 96, dev: int = 32, seed: int = 0) -> Path:
    """Write ``train.tsv`` and ``dev.tsv`` in the GLUE SST-2 layout (header ``sentence<TAB>label``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", train, seed), ("dev", dev, seed + 1)):
        rows = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in tiny_sentences(n, seed=s)]
        (directory / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return directory


def make_tiny_classifier(*, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
                         num_labels: int = 2, seed: int = 0):
    """A random ``BertForSequenceClassification`` in eval mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).eval()
