"""The contract every technique plugin must pass: a reusable test suite for built-in and third-party
techniques.

Use it from a plugin's own tests by subclassing :class:`TechniqueContract` (pytest collects the
``test_*`` methods)::

    from autocompress.testing import TechniqueContract
    from my_plugin import MyTechnique

    class TestMyTechnique(TechniqueContract):
        technique = MyTechnique()
        plugins = ["my_plugin"]          # modules to load besides the installed entry points

or call the ``check_*`` functions directly. What is checked, on a tiny random BERT classifier:

* the declared parameters are well formed and ``example_params()`` / ``identity_params()`` pass them;
* identity settings leave the model's outputs unchanged;
* each claim in ``reduces`` that a tiny model can show is observable: ``params`` (parameter count),
  ``size`` (bytes of the saved model), ``flops`` (forward FLOPs), ``tokens`` (sequence length seen by the
  last encoder layer's FFN). ``latency`` is measured by benchmarks on the real model, not asserted here;
* the compressed model saves and reloads (safetensors + recipe) with identical outputs;
* it runs on CPU, and on CUDA when present and the technique supports it;
* it composes with every other registered technique, or the pair is declared incompatible with a reason.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from .pipeline import ordered, run_pipeline
from .technique import Technique, TechniqueContext

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import Encoded
    from .registry import Registry

#: Claims in ``Technique.reduces`` that the contract can check on a tiny model.
CHECKABLE_CLAIMS = ("params", "size", "flops", "tokens")
TINY = {"hidden": 32, "layers": 4, "heads": 4, "intermediate": 64}
TRAIN_STEPS = 3


# ----------------------------------------------------------------------------------------------------------
# Fixtures: tiny model, data, context
# ----------------------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> "nn.Module":
    from .tiny import make_tiny_classifier

    return make_tiny_classifier(seed=seed, **TINY)


def tiny_encoded(n: int = 64, *, seed: int = 0) -> "Encoded":
    """Tokenised toy sentences of mixed lengths (so batches carry padding)."""
    import numpy as np
    from transformers import BertTokenizer

    from .data import Encoded
    from .tiny import tiny_sentences, tiny_vocab

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True)
    rows = tiny_sentences(n, seed=seed)
    out = tok([t for t, _ in rows], truncation=True, max_length=32, return_attention_mask=False)
    ids = [np.asarray(x, dtype=np.int32) for x in out["input_ids"]]
    tts = [np.asarray(x, dtype=np.int8) for x in out["token_type_ids"]]
    return Encoded(ids, tts, np.asarray([y for _, y in rows], dtype=np.int64), 0)


def tiny_batch(enc: "Encoded", n: int = 8, *, device: str = "cpu") -> dict[str, "torch.Tensor"]:
    from .data import batches

    batch = next(batches(enc, batch_size=n, device=device))
    batch.pop("labels")
    return batch


def tiny_context(teacher: "nn.Module", enc: "Encoded", *, device: str = "cpu") -> TechniqueContext:
    from .data import batches

    def train_batches(n: int):
        for i, b in enumerate(batches(enc, batch_size=16, device=device, shuffle=True, seed=0)):
            if i >= n:
                return
            yield b

    def train(model: "nn.Module", *, steps: int, hooks: list, learning_rate: float | None) -> dict[str, Any]:
        from .train import fine_tune

        return fine_tune(model, enc, steps=steps, batch_size=8, learning_rate=learning_rate or 1e-3, seed=0,
                         device=device, hooks=hooks)

    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return TechniqueContext(device=device, train_batches=train_batches, teacher=lambda: frozen, fine_tune=train)


def compress(model: "nn.Module", steps: Sequence[tuple[Technique, Mapping[str, Any]]], enc: "Encoded", *,
             train_steps: int = TRAIN_STEPS, device: str = "cpu") -> list[dict[str, Any]]:
    """Run a pipeline on ``model`` in place with a few recovery steps; return the recipe."""
    from .train import fine_tune

    ctx = tiny_context(model, enc, device=device)
    order = {t.name: i for i, t in enumerate(ordered([t for t, _ in steps]))}
    steps = sorted(steps, key=lambda s: order[s[0].name])

    def train(m: "nn.Module", hooks: list) -> dict[str, Any]:
        if train_steps <= 0:
            return {"steps": 0}
        return fine_tune(m, enc, steps=train_steps, batch_size=8, learning_rate=1e-3, seed=0, device=device,
                         hooks=hooks)

    model.to(device)
    return run_pipeline(model, steps, ctx=ctx, train=train, device=device).recipe


def example(tech: Technique, device: str = "cpu") -> dict[str, Any]:
    """``tech.example_params()``, passing ``device`` when the technique takes it (a setting may only run on
    some devices, e.g. int8 kernels on CPU and bf16 on CUDA)."""
    import inspect

    if "device" in inspect.signature(tech.example_params).parameters:
        return dict(tech.example_params(device=device))
    return dict(tech.example_params())


def logits(model: "nn.Module", batch: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
    import torch

    model.eval()
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def _saved(model: "nn.Module", recipe: list[dict[str, Any]], base_config: Mapping[str, Any], out: Path) -> int:
    from .modeling import save_compressed

    return save_compressed(model, out, base_config=base_config, recipe=recipe)


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def check_declaration(tech: Technique) -> None:
    """Parameters are well formed; the example and identity settings are valid."""
    assert tech.name and tech.name.isidentifier(), f"technique name {tech.name!r} must be an identifier"
    names = [p.name for p in tech.params]
    assert len(set(names)) == len(names), f"{tech.name}: duplicate parameter names {names}"
    unknown = set(tech.reduces) - {"size", "latency", "params", "flops", "tokens"}
    assert not unknown, f"{tech.name}.reduces has unknown claims {sorted(unknown)}"
    for label, params in (("example_params()", tech.example_params()), ("identity_params()", tech.identity_params())):
        if params is None:
            continue
        full = {**tech.defaults(), **params}
        assert set(full) == set(names), f"{tech.name}.{label} names unknown parameters {sorted(set(full) - set(names))}"
        for p in tech.params:
            p.check(full[p.name])
        tech.validate(full)


def check_identity(tech: Technique, *, device: str = "cpu", atol: float = 1e-5) -> None:
    """With ``identity_params()`` (if any), apply + finalize leave the outputs unchanged."""
    import torch

    params = tech.identity_params()
    if params is None:
        return
    enc = tiny_encoded()
    model = tiny_model().to(device)
    batch = tiny_batch(enc, device=device)
    before = logits(model, batch)
    compress(model, [(tech, {**tech.defaults(), **params})], enc, train_steps=0, device=device)
    after = logits(model, batch)
    assert torch.allclose(before, after, atol=atol), (
        f"{tech.name}: identity settings {params} changed the outputs (max diff {(before - after).abs().max():.3g})")


def _tokens_seen(model: "nn.Module", batch: Mapping[str, "torch.Tensor"]) -> int:
    """Sequence length entering the FFN of the last encoder layer (the most reduced one)."""
    from .surgery import encoder_layers

    seen: list[int] = []
    layer = encoder_layers(model)[-1]
    handle = layer.intermediate.register_forward_hook(lambda m, a, o: seen.append(int(a[0].shape[1])))
    try:
        logits(model, batch)
    finally:
        handle.remove()
    return seen[-1]


def measure_claims(model: "nn.Module", enc: "Encoded", batch: Mapping[str, "torch.Tensor"], *,
                   recipe: list[dict[str, Any]], base_config: Mapping[str, Any]) -> dict[str, float]:
    from .measure import flops_per_example
    from .modeling import param_count

    with tempfile.TemporaryDirectory() as tmp:
        size = _saved(model, recipe, base_config, Path(tmp))
    device = str(next(model.parameters()).device) if any(True for _ in model.parameters()) else "cpu"
    return {"params": param_count(model), "size": size, "tokens": _tokens_seen(model, batch),
            "flops": flops_per_example(model, enc, device=device)}


def check_effect(tech: Technique, *, device: str = "cpu") -> None:
    """Every checkable claim in ``reduces`` is observable with ``example_params()``.

    FLOPs are counted before post-training transforms (as the engine does: quantised kernels are invisible
    to the FLOP counter), so a post-training technique's FLOP claim is not checked here."""
    from .modeling import config_snapshot
    from .technique import Stage

    enc = tiny_encoded()
    batch = tiny_batch(enc, device=device)
    base = tiny_model().to(device)
    base_config = config_snapshot(base)
    before = measure_claims(base, enc, batch, recipe=[], base_config=base_config)
    model = copy.deepcopy(base)
    recipe = compress(model, [(tech, {**tech.defaults(), **example(tech, device)})], enc, device=device)
    after = measure_claims(model, enc, batch, recipe=recipe, base_config=base_config)
    for claim in CHECKABLE_CLAIMS:
        if claim not in tech.reduces or (claim == "flops" and tech.stage == Stage.POST_TRAINING):
            continue
        assert after[claim] < before[claim], (
            f"{tech.name} claims to reduce {claim}, but with example_params() {example(tech, device)} it went "
            f"from {before[claim]} to {after[claim]}")


def check_save_reload(tech: Technique | Sequence[Technique], registry: "Registry", *, device: str = "cpu",
                      atol: float = 0.0) -> None:
    """The compressed model (example params, a few recovery steps) reloads from disk with the same outputs."""
    import torch

    from .modeling import config_snapshot, load_compressed

    techs = [tech] if isinstance(tech, Technique) else list(tech)
    enc = tiny_encoded()
    batch = tiny_batch(enc, device=device)
    model = tiny_model().to(device)
    base_config = config_snapshot(model)
    recipe = compress(model, [(t, {**t.defaults(), **example(t, device)}) for t in techs], enc, device=device)
    expected = logits(model, batch)
    assert torch.isfinite(expected).all(), f"{'+'.join(t.name for t in techs)}: non-finite outputs"
    with tempfile.TemporaryDirectory() as tmp:
        _saved(model, recipe, base_config, Path(tmp))
        reloaded = load_compressed(tmp, device=device, registry=registry)
    got = logits(reloaded, batch)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=atol, rtol=0), (
        f"{'+'.join(t.name for t in techs)}: the reloaded model's outputs differ (max diff "
        f"{(got - expected).abs().max():.3g})")


def check_onnx(tech: Technique, registry: "Registry") -> str | None:
    """``tech.onnx_support`` tells the truth for its example setting: when it says yes, ``autocompress export
    --onnx``'s exporter turns the compressed tiny model into an ONNX graph that ONNX Runtime runs with the same
    predictions as PyTorch. Returns the declared refusal reason (nothing to run), else ``None``."""
    import numpy as np

    from .modeling import config_snapshot
    from .onnx_export import OrtClassifier, export_graph
    from .measure import predict

    params = {**tech.defaults(), **example(tech)}
    reason = tech.onnx_support(params)
    if reason is not None:
        assert isinstance(reason, str) and reason.strip(), f"{tech.name}: onnx_support must return None or a reason"
        return reason
    enc = tiny_encoded()
    model = tiny_model()
    base_config = config_snapshot(model)
    recipe = compress(model, [(tech, params)], enc)
    with tempfile.TemporaryDirectory() as tmp:
        _saved(model, recipe, base_config, Path(tmp))
        try:
            export_graph(tmp, Path(tmp) / "model.onnx", registry=registry, example=tiny_batch(enc, n=4),
                         log=lambda message: None)
        except Exception as exc:  # noqa: BLE001 - any failure falsifies the declaration
            raise AssertionError(f"{tech.name}: onnx_support({params}) says the model exports, but the export "
                                 f"failed: {exc}. Fix the technique, or return the reason from onnx_support") from exc
        got = predict(OrtClassifier(Path(tmp) / "model.onnx", threads=1), enc, batch_size=16)
    want = predict(model, enc, batch_size=16)
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert agree == 1.0, (f"{tech.name}: the ONNX graph predicts differently from PyTorch on {1 - agree:.1%} of the "
                          f"tiny examples (max |logit diff| {np.abs(got - want).max():.3g})")
    return None


def check_cuda(tech: Technique, registry: "Registry") -> None:
    """Identity and save/reload on CUDA; skips (saying why) without a CUDA device or where the technique
    declares it does not run there."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = tech.supports(tiny_model(), device="cuda")
    if reason:
        pytest.skip(f"{tech.name} does not run on CUDA: {reason}")
    check_identity(tech, device="cuda", atol=1e-4)
    check_save_reload(tech, registry, device="cuda", atol=1e-5)


def check_pair(a: Technique, b: Technique, registry: "Registry", *, device: str = "cpu") -> str | None:
    """``a`` and ``b`` compose (pipeline, recovery, save/reload), or their incompatibility is declared.
    Returns the declared reason, or ``None`` when the pair was run."""
    from .space import incompatibility

    reason = incompatibility(a, b)
    if reason:
        return reason
    check_save_reload([a, b], registry, device=device)
    return None


# ----------------------------------------------------------------------------------------------------------
# The pytest mixin
# ----------------------------------------------------------------------------------------------------------


class TechniqueContract:
    """Subclass with ``technique = MyTechnique()`` (and ``plugins`` to load) to run the contract."""

    technique: ClassVar[Technique]
    plugins: ClassVar[Sequence[str]] = ()

    def registry(self) -> "Registry":
        from .registry import load_registry

        reg = load_registry(extra_plugins=list(self.plugins))
        if self.technique.name not in reg.techniques:
            raise AssertionError(f"no loaded plugin registers {self.technique.name!r}; list the plugin module in "
                                 f"{type(self).__name__}.plugins or install its entry point")
        return reg

    def test_declaration(self) -> None:
        check_declaration(self.technique)

    def test_identity(self) -> None:
        check_identity(self.technique)

    def test_effect(self) -> None:
        check_effect(self.technique)

    def test_save_reload(self) -> None:
        check_save_reload(self.technique, self.registry())

    def test_cuda(self) -> None:
        check_cuda(self.technique, self.registry())

    def test_onnx_support_is_truthful(self) -> None:
        import pytest

        from .onnx_export import missing_dependencies

        missing = missing_dependencies()
        if missing:
            pytest.skip(f"the ONNX check needs {', '.join(missing)}: pip install 'autocompress[onnx]'")
        check_onnx(self.technique, self.registry())

    def test_composes_with_registered(self) -> None:
        reg = self.registry()
        for name in reg.names():
            other = reg.get(name)
            if other.name != self.technique.name:
                check_pair(self.technique, other, reg)
