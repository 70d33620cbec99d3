"""Every registered technique passes the public contract suite, and every pair composes or is declared
incompatible (autocompress.testing). The built-ins run it here, once each; their own test modules test what is
specific to them."""

from __future__ import annotations

import itertools

import pytest

from autocompress import testing
from autocompress.registry import load_registry

REGISTRY = load_registry(selection="builtin")
NAMES = REGISTRY.names()


def test_all_builtins_are_registered():
    # The seven techniques of the product; a missing one means a broken entry point.
    expected = {"head_pruning", "movement_pruning", "low_rank", "weight_sharing", "distillation", "quantization",
                "token_elimination"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declaration(name):
    testing.check_declaration(REGISTRY.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_identity(name):
    testing.check_identity(REGISTRY.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_effect(name):
    testing.check_effect(REGISTRY.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_save_reload(name):
    testing.check_save_reload(REGISTRY.get(name), REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_cuda(name):
    testing.check_cuda(REGISTRY.get(name), REGISTRY)


@pytest.mark.parametrize("a,b", list(itertools.combinations(NAMES, 2)))
def test_pair_composes_or_is_declared_incompatible(a, b):
    reason = testing.check_pair(REGISTRY.get(a), REGISTRY.get(b), REGISTRY)
    if reason is not None:
        assert len(reason) > 20, f"{a}+{b}: an incompatibility needs a reason a user can act on, got {reason!r}"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_support_is_truthful(name):
    from autocompress.onnx_export import missing_dependencies

    if missing_dependencies():
        pytest.skip(f"needs {', '.join(missing_dependencies())}: pip install 'autocompress[onnx]'")
    testing.check_onnx(REGISTRY.get(name), REGISTRY)


def test_contract_catches_a_false_onnx_claim():
    """A technique that says it exports but installs an untraceable module fails the ONNX check by name."""
    import torch
    from torch import nn

    from autocompress.onnx_export import missing_dependencies
    from autocompress.technique import Technique

    if missing_dependencies():
        pytest.skip(f"needs {', '.join(missing_dependencies())}: pip install 'autocompress[onnx]'")

    class ThroughNumpy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.from_numpy(x.detach().cpu().numpy()))  # leaves the traced graph

    class Opaque(Technique):
        name = "opaque"

        def example_params(self):
            return {}

        def apply(self, model, *, params, ctx):
            model.classifier = ThroughNumpy(model.classifier)
            return None

        def restore(self, model, *, phase, params, record):
            if phase == "apply":
                model.classifier = ThroughNumpy(model.classifier)

    from autocompress.registry import RegisteredTechnique

    reg = load_registry(selection="builtin")
    reg.techniques["opaque"] = RegisteredTechnique(Opaque(), plugin="tests", source="--plugin")
    with pytest.raises(AssertionError, match="opaque: onnx_support.* says the model exports, but the export failed"):
        testing.check_onnx(reg.get("opaque"), reg)


def test_contract_catches_a_false_claim():
    """The suite can fail: a technique claiming to reduce params that does nothing is caught."""
    from autocompress.technique import Technique

    class Liar(Technique):
        name = "liar"
        reduces = frozenset({"params"})

    with pytest.raises(AssertionError, match="claims to reduce params"):
        testing.check_effect(Liar())


def test_contract_catches_a_broken_identity():
    import torch

    from autocompress.technique import Technique

    class Noisy(Technique):
        name = "noisy"

        def identity_params(self):
            return {}

        def apply(self, model, *, params, ctx):
            with torch.no_grad():
                model.classifier.bias.add_(1.0)
            return None

    with pytest.raises(AssertionError, match="changed the outputs"):
        testing.check_identity(Noisy())


class TestHeadPruningViaMixin(testing.TechniqueContract):
    """The mixin a third-party plugin uses, exercised on a built-in."""

    technique = REGISTRY.get("head_pruning")
