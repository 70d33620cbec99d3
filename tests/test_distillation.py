from __future__ import annotations

import copy

import pytest
import torch

from autocompress import testing
from autocompress.data import batches
from autocompress.modeling import config_snapshot, load_compressed, param_count, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.surgery import encoder_layers, head_counts, prune_heads
from autocompress.technique import TechniqueContext
from autocompress.tiny import make_tiny_classifier
from autocompress.train import fine_tune
import plugins.distillation as distillation
from plugins.distillation import (Distillation, attention_map_loss, hidden_state_loss, kept_layers,
                                  logit_kd_loss, teacher_states)

TECH = Distillation()


def _params(**overrides):
    return {**TECH.defaults(), **overrides}


def _frozen(model):
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _teacher(**kw):
    return _frozen(make_tiny_classifier(layers=4, **kw))


def _student(teacher):
    """A trainable copy of the (frozen) teacher."""
    return copy.deepcopy(teacher).requires_grad_(True)


@pytest.fixture(scope="module")
def enc():
    return testing.tiny_encoded(48)


def _batch(enc, n=8, *, with_index=True):
    return next(batches(enc, batch_size=n, with_index=with_index))


def _forward(model, batch, hooks=None):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return model(**inputs, output_hidden_states=bool(hooks and hooks.output_hidden_states),
                 output_attentions=bool(hooks and hooks.output_attentions))


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return _forward(model, batch).logits


class _Counter:
    """Counts forward passes of a module."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


# ----------------------------------------------------------------------------------------------------------
# Depth reduction
# ----------------------------------------------------------------------------------------------------------


def test_layer_choice_is_distilbert_rule():
    assert kept_layers(12, 0.5) == [0, 2, 4, 7, 9, 11]  # DistilBERT's released extraction
    assert kept_layers(6, 0.5) == [0, 3, 5]
    assert kept_layers(4, 0.5) == [0, 3]
    assert kept_layers(4, 0.67) == [0, 2, 3]
    assert kept_layers(4, 0.34) == [0]
    assert kept_layers(4, 1.0) == [0, 1, 2, 3]
    for n in range(1, 25):
        for d in (0.34, 0.5, 0.67, 1.0):
            keep = kept_layers(n, d)
            assert keep == sorted(set(keep)) and keep[0] == 0 and keep[-1] <= n - 1
            assert len(keep) == 1 or keep[-1] == n - 1


def test_depth_reduction_keeps_teacher_layers(enc):
    teacher = _teacher()
    student = _student(teacher)
    n_before = param_count(student)
    record = TECH.apply(student, params=_params(depth=0.5), ctx=TechniqueContext())
    assert record == {"teacher_layers": 4, "kept_layers": [0, 3]}
    layers = encoder_layers(student)
    assert len(layers) == 2 and student.config.num_hidden_layers == 2
    t_layers = encoder_layers(teacher)
    for i, k in enumerate(record["kept_layers"]):
        t_state, s_state = t_layers[k].state_dict(), layers[i].state_dict()
        assert t_state.keys() == s_state.keys()
        assert all(torch.equal(t_state[key], s_state[key]) for key in t_state)
        assert layers[i].attention.self.layer_idx == i
    per_layer = sum(p.numel() for p in t_layers[0].parameters())
    assert n_before - param_count(student) == 2 * per_layer
    # Mixed-length padded batch: a padded row gives the same logits as the row alone.
    batch = _batch(enc, with_index=False)
    out = _logits(student, batch)
    assert out.shape == (8, 2) and torch.isfinite(out).all()
    row = int(batch["attention_mask"].sum(-1).argmin())
    n = int(batch["attention_mask"][row].sum())
    alone = {k: v[row:row + 1, :n] for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(out[row:row + 1], _logits(student, alone), atol=1e-5, rtol=0)


def test_restore_rebuilds_depth_and_save_load_round_trip(enc, tmp_path):
    base = make_tiny_classifier(layers=4)
    base_config = config_snapshot(base)
    model = copy.deepcopy(base)
    params = _params(**TECH.example_params())
    ctx = TechniqueContext(teacher=lambda: _frozen(base))

    def train(m, hooks):
        return fine_tune(m, enc, steps=3, batch_size=8, learning_rate=1e-3, hooks=hooks)

    result = run_pipeline(model, [(TECH, params)], ctx=ctx, train=train)
    assert result.train_stats["steps"] == 3
    [step] = result.recipe
    assert step["technique"] == "distillation" and step["record"]["kept_layers"] == [0, 3]

    fresh = make_tiny_classifier(layers=4, seed=5)
    TECH.restore(fresh, phase="apply", params=params, record=step["record"])
    TECH.restore(fresh, phase="finalize", params=params, record=None)  # nothing to do
    fresh.load_state_dict(model.state_dict(), strict=True)
    batch = _batch(enc, with_index=False)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    with pytest.raises(ValueError, match="4-layer"):
        TECH.restore(fresh, phase="apply", params=params, record=step["record"])

    save_compressed(model, tmp_path / "m", base_config=base_config, recipe=result.recipe)
    reloaded = load_compressed(tmp_path / "m", registry=load_registry(extra_plugins=["plugins.distillation"]))
    assert len(encoder_layers(reloaded)) == 2 and reloaded.config.num_hidden_layers == 2
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def test_logit_kd_is_zero_when_student_is_teacher(enc):
    teacher = _teacher()
    student = _student(teacher).train()
    ctx = TechniqueContext(teacher=lambda: teacher)
    hooks = TECH.training_hooks(student, params=_params(alpha=1.0, temperature=4.0), ctx=ctx)
    assert hooks.task_loss_weight == 0.0 and not hooks.output_hidden_states and hooks.parameters == []
    student.eval()  # no dropout: the student computes exactly the teacher's function
    batch = _batch(enc)
    loss = hooks.loss(batch, _forward(student, batch, hooks), student)
    assert abs(float(loss.detach())) < 1e-6
    # And it is the T^2-scaled KL otherwise.
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    expected = sum(torch.sum(torch.softmax(t[i] / 2, -1) * (torch.log_softmax(t[i] / 2, -1)
                                                            - torch.log_softmax(s[i] / 2, -1))) for i in range(5))
    torch.testing.assert_close(logit_kd_loss(s, t, 2.0), expected / 5 * 4)


@pytest.mark.parametrize("kind", ["cosine", "tinybert"])
def test_hidden_and_attention_losses_zero_for_identical_student(enc, kind):
    teacher = _teacher()
    student = _student(teacher).eval()
    hooks = TECH.training_hooks(student, params=_params(alpha=0.0, hidden_loss=kind, attention_loss=True),
                                ctx=TechniqueContext(teacher=lambda: teacher))
    assert hooks.task_loss_weight == 1.0 and hooks.output_hidden_states and hooks.output_attentions
    assert hooks.parameters == []  # same width: no projection
    student.config._attn_implementation = "eager"  # what the trainer does for output_attentions
    batch = _batch(enc)
    loss = hooks.loss(batch, _forward(student, batch, hooks), student)
    assert abs(float(loss.detach())) < 1e-5
    assert teacher.config._attn_implementation == "sdpa"  # the shared teacher's kernel is restored


def test_tinybert_projection_when_widths_differ(enc):
    teacher = _teacher()  # 4 layers, hidden 32
    student = make_tiny_classifier(hidden=16, layers=2, heads=2, intermediate=32).train()
    hooks = TECH.training_hooks(student, params=_params(depth=0.5, alpha=0.5, hidden_loss="tinybert"),
                                ctx=TechniqueContext(teacher=lambda: teacher))
    assert [tuple(p.shape) for p in hooks.parameters] == [(32, 16), (32,)]
    batch = _batch(enc)
    loss = hooks.loss(batch, _forward(student, batch, hooks), student)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert hooks.parameters[0].grad is not None and hooks.parameters[0].grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_hidden_loss_compares_cls_only_when_lengths_differ():
    torch.manual_seed(0)
    t_states = [torch.randn(2, 6, 4) for _ in range(3)]  # embeddings + 2 teacher layers
    s_states = [t_states[0].clone() + 0.1, torch.randn(2, 3, 4), torch.randn(2, 3, 4)]  # shorter: eliminated
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    got = hidden_state_loss("tinybert", s_states, t_states, [0, 1], mask)
    emb = ((s_states[0] - t_states[0]).pow(2).mean(-1) * mask).sum() / mask.sum()  # full length: masked
    layers = [(s_states[i][:, 0] - t_states[i][:, 0]).pow(2).mean() for i in (1, 2)]  # [CLS] only
    torch.testing.assert_close(got, (emb + layers[0] + layers[1]) / 3)
    # Attention maps of different lengths are skipped; equal ones compared over real query/key pairs.
    t_attn = [torch.softmax(torch.randn(2, 4, 6, 6), -1) for _ in range(2)]
    s_attn = [t_attn[0].clone(), torch.softmax(torch.randn(2, 4, 3, 3), -1)]
    assert float(attention_map_loss(s_attn, t_attn, [0, 1], mask)) == 0.0


def test_layer_map_survives_head_pruning_and_sharing(enc):
    """Later structural techniques change the student; the loss still pairs positions with teacher layers."""
    teacher = _teacher()
    student = _student(teacher)
    TECH.apply(student, params=_params(depth=0.67), ctx=TechniqueContext())
    prune_heads(student, [[0, 2], [1], [0, 1, 3]])  # head pruning after depth reduction
    layers = encoder_layers(student)
    layers[2] = layers[1]  # weight sharing: a position runs an earlier layer object
    assert head_counts(student) == [2, 1, 1]
    params = _params(depth=0.67, alpha=0.5, hidden_loss="tinybert", attention_loss=True)
    hooks = TECH.training_hooks(student, params=params, ctx=TechniqueContext(teacher=lambda: teacher))
    student.config._attn_implementation = "eager"
    student.train()
    batch = _batch(enc)
    outputs = _forward(student, batch, hooks)
    assert len(outputs.hidden_states) == 4 and len(outputs.attentions) == 3
    loss = hooks.loss(batch, outputs, student)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    # A technique changing depth after distillation is caught with a clear message.
    del encoder_layers(student)[2]
    with pytest.raises(ValueError, match="depth must not change"):
        TECH.training_hooks(student, params=params, ctx=TechniqueContext(teacher=lambda: teacher))


def test_teacher_logits_come_from_context(enc):
    teacher = _teacher()
    student = _student(teacher).train()
    counter = _Counter(teacher)  # after the copy: deepcopy would copy the hook into the student
    served = []

    def cached_logits(batch):
        served.append(batch["example_index"].tolist())
        return torch.zeros(len(batch["example_index"]), 2)

    ctx = TechniqueContext(teacher=lambda: teacher, teacher_logits=cached_logits)
    batch = _batch(enc)
    hooks = TECH.training_hooks(student, params=_params(alpha=0.7), ctx=ctx)
    loss = hooks.loss(batch, _forward(student, batch, hooks), student)
    assert served == [batch["example_index"].tolist()] and counter.calls == 0
    assert float(loss.detach()) > 0  # uniform cached targets vs the student's non-uniform logits
    # Hidden-state losses cost exactly one teacher forward per step; logits still come from the cache.
    hooks = TECH.training_hooks(student, params=_params(alpha=0.7, hidden_loss="cosine"), ctx=ctx)
    hooks.loss(batch, _forward(student, batch, hooks), student)
    assert counter.calls == 1 and len(served) == 2


@pytest.fixture(scope="module")
def trained_teacher(enc):
    """A 4-layer teacher fine-tuned on the toy task: its logits and hidden states carry information (a
    random tiny BERT barely changes its inputs, so every student would already match it)."""
    teacher = make_tiny_classifier(layers=4)
    fine_tune(teacher, enc, steps=60, batch_size=16, learning_rate=3e-3)
    return _frozen(teacher)


def _distil(teacher, enc, params, *, steps):
    student = _student(teacher)
    ctx = TechniqueContext(teacher=lambda: teacher)
    TECH.apply(student, params=params, ctx=ctx)
    hooks = TECH.training_hooks(student, params=params, ctx=ctx)
    if steps:
        fine_tune(student, enc, steps=steps, batch_size=16, learning_rate=2e-3, hooks=[hooks] if hooks else [])
    return student, hooks


def test_short_fine_tune_decreases_kd_loss(enc, trained_teacher):
    params = _params(depth=0.5, alpha=0.5, hidden_loss="tinybert")
    student, hooks = _distil(trained_teacher, enc, params, steps=0)
    probe = _batch(enc, 16)

    def kd_loss():
        student.eval()
        with torch.no_grad():
            return float(hooks.loss(probe, _forward(student, probe, hooks), student))

    before = kd_loss()
    fine_tune(student, enc, steps=30, batch_size=8, learning_rate=2e-3, hooks=[hooks])
    after = kd_loss()
    assert after < 0.5 * before, (before, after)


def test_kd_transfers_the_teacher_better_than_plain_fine_tuning(enc, trained_teacher):
    """A one-layer student trained with logit KD agrees with the teacher on held-out sentences far better
    (KL of output distributions) than the same student fine-tuned on labels alone (the "no KD" control).
    Accuracy is not compared: on this toy task every student reaches 100%."""
    dev = testing.tiny_encoded(64, seed=7)
    dev_batch = {k: v for k, v in _batch(dev, 64, with_index=False).items() if k != "labels"}
    target = torch.log_softmax(_logits(trained_teacher, dev_batch), -1)

    def kl_to_teacher(params):
        student, _ = _distil(trained_teacher, enc, _params(**params), steps=20)
        log_p = torch.log_softmax(_logits(student, dev_batch), -1)
        return float(torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean"))

    plain = kl_to_teacher({"depth": 0.34, "alpha": 0.0})
    kd = kl_to_teacher({"depth": 0.34, "alpha": 0.9, "temperature": 4.0})
    # Measured: ~30x lower for this teacher; 1.7x to 500x over teacher seeds 0-5 (always lower).
    assert kd < 0.5 * plain, (kd, plain)


def test_teacher_forward_helper_restores_kernel(enc):
    teacher = _teacher()
    out = teacher_states(teacher, _batch(enc), attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert teacher.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# Identity, params, registration, contract
# ----------------------------------------------------------------------------------------------------------


def test_identity(enc):
    model = make_tiny_classifier(layers=4)
    batch = _batch(enc, with_index=False)
    before = _logits(model, batch)
    ctx = TechniqueContext(teacher=lambda: _frozen(model))
    params = _params(**TECH.identity_params())
    assert TECH.apply(model, params=params, ctx=ctx) is None
    assert TECH.training_hooks(model, params=params, ctx=ctx) is None
    assert torch.equal(_logits(model, batch), before)
    # alpha 0 with a reduced depth is plain fine-tuning of the smaller student: no hooks either.
    assert TECH.training_hooks(model, params=_params(depth=0.5, alpha=0.0), ctx=ctx) is None


@pytest.mark.parametrize("bad,match", [
    ({"depth": 0.6}, "depth"),
    ({"alpha": 1.5}, "alpha"),
    ({"temperature": 0.5}, "temperature"),
    ({"hidden_loss": "mse"}, "hidden_loss"),
    ({"attention_loss": 1}, "attention_loss"),
    ({"layers": 3}, "no parameter"),
])
def test_bad_params(bad, match):
    with pytest.raises(ValueError, match=match):
        TECH.validate(_params(**bad))
    with pytest.raises(ValueError, match=match):
        TECH.apply(make_tiny_classifier(), params=bad, ctx=TechniqueContext())


def test_supports_and_registration():
    assert TECH.supports(make_tiny_classifier()) is None
    assert "BERT-like" in TECH.supports(torch.nn.Linear(2, 2))
    import plugins.distillation as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["distillation"]


def test_contract():
    registry = load_registry(extra_plugins=["plugins.distillation"])
    assert "distillation" in registry.names()
    testing.check_declaration(TECH)
    testing.check_identity(TECH)
    testing.check_effect(TECH)
    testing.check_save_reload(TECH, registry)


# -- pre-distillation (pretrain_steps) ------------------------------------------------------------------------


class _CountingContext:
    """A tiny context whose cache is a dict and whose trainer counts its calls."""

    def __init__(self, teacher, enc):
        base = testing.tiny_context(teacher, enc)
        self.calls, self.store = [], {}

        self.hooks = []

        def fine_tune_counted(model, *, steps, hooks, learning_rate):
            self.calls.append((steps, learning_rate, len(hooks)))
            self.hooks.append(list(hooks))
            return base._fine_tune(model, steps=steps, hooks=hooks, learning_rate=learning_rate)

        def cache(key, compute):
            if key not in self.store:
                self.store[key] = compute()
            return self.store[key]

        self.ctx = TechniqueContext(train_batches=base._train_batches, teacher=base._teacher, cache=cache,
                                    fine_tune=fine_tune_counted, training_key="tiny")


def test_pre_distillation_trains_the_student_once_and_later_trials_reuse_it(enc):
    teacher = _teacher()
    c = _CountingContext(teacher, enc)
    params = _params(depth=0.5, pretrain_steps=6, pretrain_learning_rate=1e-3)
    first, second = _student(teacher), _student(teacher)
    plain = _student(teacher)
    record = TECH.apply(first, params=params, ctx=c.ctx)
    assert record == {"teacher_layers": 4, "kept_layers": [0, 3]}
    assert c.calls == [(6, 1e-3, 1)]  # one trainer run, with the logit-KD hook
    TECH.apply(second, params=params, ctx=c.ctx)
    assert len(c.calls) == 1  # served from the cache
    TECH.apply(plain, params=_params(depth=0.5), ctx=c.ctx)  # pretrain_steps 0: the kept layers as they were
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    changed = [k for k, v in first.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert any("encoder.layer" in k for k in changed) and "classifier.weight" in changed


def test_pre_distillation_key_follows_the_recipe(enc):
    teacher = _teacher()
    c = _CountingContext(teacher, enc)
    TECH.apply(_student(teacher), params=_params(depth=0.5, pretrain_steps=2), ctx=c.ctx)
    TECH.apply(_student(teacher), params=_params(depth=0.5, pretrain_steps=3), ctx=c.ctx)
    TECH.apply(_student(teacher), params=_params(depth=0.67, pretrain_steps=2), ctx=c.ctx)
    # the trial's own loss settings do not matter: pre-distillation has one fixed recipe
    TECH.apply(_student(teacher), params=_params(depth=0.5, pretrain_steps=2, alpha=0.9, temperature=4.0), ctx=c.ctx)
    assert [s for s, _, _ in c.calls] == [2, 3, 2]
    assert len(c.store) == 3


def test_pre_distillation_recipes_and_their_stages():
    (only,) = distillation.pre_distil_stages("logit", 10, depth=0.5)
    assert only[1] == 10 and only[2]["alpha"] == 0.5 and only[3] is None
    inter, pred = distillation.pre_distil_stages("tinybert", 11, depth=0.5)
    assert (inter[0], inter[1], pred[0], pred[1]) == ("intermediate", 5, "prediction", 6)
    assert inter[2]["hidden_loss"] == "tinybert" and inter[2]["attention_loss"] and inter[3] == 0.0
    assert pred[2]["alpha"] == 1.0 and pred[2]["hidden_loss"] == "none"
    assert [s[0] for s in distillation.pre_distil_stages("tinybert", 1, depth=0.5)] == ["prediction"]
    with pytest.raises(ValueError, match="pretrain_recipe"):
        distillation.pre_distil_stages("bogus", 4, depth=0.5)


def test_tinybert_pre_distillation_imitates_layers_then_logits(enc):
    teacher = _teacher()
    c = _CountingContext(teacher, enc)
    logit = _student(teacher)
    TECH.apply(logit, params=_params(depth=0.5, pretrain_steps=4, pretrain_learning_rate=1e-3), ctx=c.ctx)
    tiny = _student(teacher)
    TECH.apply(tiny, params=_params(depth=0.5, pretrain_steps=4, pretrain_learning_rate=1e-3,
                                    pretrain_recipe="tinybert"), ctx=c.ctx)
    assert [s for s, _, _ in c.calls] == [4, 2, 2] and len(c.store) == 2  # its own cache entry
    (inter,), (pred,) = c.hooks[1], c.hooks[2]
    assert inter.task_loss_weight == 0.0 and inter.output_hidden_states and inter.output_attentions
    assert pred.task_loss_weight == 0.0 and not pred.output_hidden_states  # alpha 1: soft targets only
    assert any(not torch.equal(v, logit.state_dict()[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(ValueError, match="pretrain_recipe"):
        TECH.apply(_student(teacher), params=_params(depth=0.5, pretrain_steps=4, pretrain_recipe="x"), ctx=c.ctx)


def test_pre_distillation_is_skipped_at_full_depth(enc):
    teacher = _teacher()
    c = _CountingContext(teacher, enc)
    model = _student(teacher)
    assert TECH.apply(model, params=_params(depth=1.0, pretrain_steps=5), ctx=c.ctx) is None
    assert c.calls == []


def test_a_context_without_a_trainer_says_so():
    with pytest.raises(RuntimeError, match="cannot train a model"):
        TechniqueContext().fine_tune(make_tiny_classifier(), steps=1)


def test_a_long_context_fine_tune_reports_progress_and_technique_logs_reach_the_search_log(
        tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache, monkeypatch):
    """A pre-distilled student takes tens of minutes on SST-2: the search's log says so and shows its steps,
    while a trial's short recovery stays quiet."""
    import autocompress.engine as engine
    from autocompress.engine import prepare
    from autocompress.registry import load_registry
    from autocompress.spec import load_spec
    from conftest import write_tiny_spec

    lines: list[str] = []
    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir))
    prep = prepare(spec, load_registry(), log=lines.append)
    ctx = prep.technique_context()
    ctx.log("distillation: a message from a technique")
    assert lines[-1] == "distillation: a message from a technique"
    monkeypatch.setattr(engine, "LONG_FINE_TUNE_STEPS", 10)
    before = len(lines)
    ctx.fine_tune(copy.deepcopy(prep.baseline), steps=9)
    assert len(lines) == before  # short: no progress lines
    ctx.fine_tune(copy.deepcopy(prep.baseline), steps=10)
    steps = [ln for ln in lines[before:] if ln.strip().startswith("step ")]
    assert steps and steps[-1].strip().startswith("step 10/10"), lines[before:]
    # a context given its own log reports its progress there too, not to the search's
    own: list[str] = []
    before = len(lines)
    prep.technique_context(log=own.append).fine_tune(copy.deepcopy(prep.baseline), steps=10)
    assert len(lines) == before and any(ln.strip().startswith("step 10/10") for ln in own), own
