"""Teacher querying: MC dropout really samples, restores eval mode, chunks exactly, catches NaNs."""

import pytest
import torch
from conftest import build_tokenizer, tiny_bert

from ki_trainer import Teacher, query_teachers
from ki_trainer.querying import TeacherNaNError, deterministic_logits, mc_dropout_probs


@pytest.fixture
def teacher():
    tok = build_tokenizer()
    model = tiny_bert(3, len(tok), labels=["x", "y", "z"], dropout=0.3)
    enc = tok(["apple the banana", "grape of dill date"], padding=True, return_tensors="pt")
    return Teacher(model).prepare(torch.device("cpu"), torch.float32), dict(enc)


def test_mc_passes_differ_and_teacher_returns_to_eval(teacher):
    t, inputs = teacher
    torch.manual_seed(0)
    a = mc_dropout_probs(t, inputs, num_samples=4)
    b = mc_dropout_probs(t, inputs, num_samples=4)
    assert not torch.allclose(a, b), "dropout must be active during MC passes"
    assert not t.model.training
    assert all(not m.training for m in t.model.modules())
    torch.testing.assert_close(a.sum(-1), torch.ones(2))


def test_deterministic_pass_is_deterministic(teacher):
    t, inputs = teacher
    torch.testing.assert_close(deterministic_logits(t, inputs), deterministic_logits(t, inputs))


def test_attention_dropout_is_sampled_too(teacher):
    """Only attention dropout on: the MC samples must still differ (whole teacher in train mode)."""
    t, inputs = teacher
    for module in t.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    t.model.config.attention_probs_dropout_prob = 0.5
    for layer in t.model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.5
        layer.attention.self.dropout_prob = 0.5
    a = mc_dropout_probs(t, inputs, num_samples=2)
    b = mc_dropout_probs(t, inputs, num_samples=2)
    assert not torch.allclose(a, b)


def test_chunking_gives_identical_results_with_the_same_masks(teacher):
    """Without dropout, chunk size must not change the result (chunks hold whole examples)."""
    t, inputs = teacher
    for module in t.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in t.model.bert.encoder.layer:
        layer.attention.self.dropout_prob = 0.0
    whole = mc_dropout_probs(t, inputs, num_samples=4, chunk_size=512)
    chunked = mc_dropout_probs(t, inputs, num_samples=4, chunk_size=5)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(whole, torch.softmax(deterministic_logits(t, inputs), -1))


def test_teacher_goes_back_to_eval_when_forward_fails(teacher):
    t, inputs = teacher
    with pytest.raises(RuntimeError):
        mc_dropout_probs(t, {"input_ids": inputs["input_ids"].float()}, 2)  # embeddings need integer ids
    assert not t.model.training


def test_nan_teacher_is_reported_by_name(teacher):
    t, inputs = teacher
    t.name = "broken"
    with torch.no_grad():
        t.model.classifier.weight.fill_(float("nan"))
    with pytest.raises(TeacherNaNError, match="broken"):
        query_teachers([t], [inputs], certainty_source="deterministic")


def test_signals_shapes(teacher):
    t, inputs = teacher
    signals = query_teachers([t, t], [inputs, inputs], certainty_source="mc", mc_samples=3)
    assert [x.shape for x in signals.logits] == [(2, 3), (2, 3)]
    assert signals.certainty.shape == (2, 2)
    assert query_teachers([t], [inputs], certainty_source=None).certainty is None


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout_prob = 0.0


def test_top_layer_mc_runs_lower_layers_once_per_example(teacher, tokenizer):
    model = tiny_bert(3, len(tokenizer), labels=["x", "y", "z"], dropout=0.3, num_hidden_layers=3)
    t = Teacher(model).prepare(torch.device("cpu"), torch.float32)
    inputs = dict(tokenizer(["apple the banana", "grape of dill date"], padding=True, return_tensors="pt"))
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).shape[0]))
        for i, layer in enumerate(t.model.bert.encoder.layer)
    ]
    probs = mc_dropout_probs(t, inputs, num_samples=5, top_layers=2)
    for hook in hooks:
        hook.remove()
    assert seen == {0: 2, 1: 10, 2: 10}  # layer 0 once per example, layers 1-2 on 2 x 5 samples
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert not t.model.training and not any(m.training for m in t.model.modules())


def test_top_layer_mc_samples_vary_and_match_deterministic_without_dropout(teacher):
    t, inputs = teacher
    a = mc_dropout_probs(t, inputs, num_samples=4, top_layers=1)
    b = mc_dropout_probs(t, inputs, num_samples=4, top_layers=1)
    assert not torch.allclose(a, b)
    _no_dropout(t.model)
    torch.testing.assert_close(
        mc_dropout_probs(t, inputs, num_samples=4, top_layers=1, chunk_size=6),
        torch.softmax(deterministic_logits(t, inputs), -1),
    )


def test_top_layer_count_is_checked(teacher):
    t, inputs = teacher
    with pytest.raises(ValueError, match="mc_top_layers=3 but the teacher has 2 layers"):
        mc_dropout_probs(t, inputs, num_samples=2, top_layers=3)
    assert not t.model.training
