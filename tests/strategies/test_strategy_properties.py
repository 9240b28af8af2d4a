"""Property tests (hypothesis) across every registered strategy and random label spaces.

For any teachers (1-4, overlapping label sets, saturated or flat logits, tied or distinct
certainties) and any settings: targets are probability distributions over the classes the teachers
own, losses are finite and >= 0, and listing the teachers in another order changes nothing.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ki_trainer.label_space import LabelSpace
from ki_trainer.numerics import certainty_from_logits
from ki_trainer.strategies import StrategyOptions, TeacherSignals, get_strategy, list_strategies

POOL = ["a", "b", "c", "d", "e", "f"]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@st.composite
def problems(draw):
    num_teachers = draw(st.integers(1, 4))
    label_sets = [draw(st.lists(st.sampled_from(POOL), min_size=2, max_size=4, unique=True)) for _ in range(num_teachers)]
    batch = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0, 100.0]))  # 0: flat teachers, 100: saturated
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = [torch.randn(batch, len(labels), generator=generator) * scale for labels in label_sets]
    certainty_kind = draw(st.sampled_from(["derived", "random", "tied"]))
    if certainty_kind == "derived":
        certainty = torch.stack([certainty_from_logits(x) for x in logits], dim=1)
    elif certainty_kind == "random":
        certainty = torch.rand(batch, num_teachers, generator=generator)
    else:  # exact ties (e.g. saturated teachers, all certainty 1.0): hard selection must not depend on the order
        rows = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=batch, max_size=batch))
        certainty = torch.tensor(rows).unsqueeze(1).repeat(1, num_teachers)
    space = LabelSpace(label_sets)
    student = torch.randn(batch, space.num_labels, generator=generator) * draw(st.sampled_from([0.1, 1.0, 50.0]))
    options = StrategyOptions(
        temperature=draw(st.sampled_from([0.5, 1.0, 4.0])),
        selection=draw(st.sampled_from(["hard", "soft"])),
        score_temperature=draw(st.sampled_from([0.05, 0.2, 1.0])),
        margin_reweighting=draw(st.booleans()),
        normalize_weights=draw(st.booleans()),
    )
    permutation = draw(st.permutations(range(num_teachers)))
    return label_sets, logits, certainty, student, options, permutation


def run(name, label_sets, logits, certainty, student, options, labels=None):
    space = LabelSpace(label_sets, labels=labels)
    strategy = get_strategy(name)(space, options)
    signals = TeacherSignals(logits=logits, certainty=certainty if strategy.certainty_source else None)
    return space, strategy.compute(student, signals)


@pytest.mark.parametrize("name", list_strategies())
@settings(max_examples=60, deadline=None, derandomize=True)
@given(problem=problems())
def test_targets_are_distributions_and_losses_finite_and_non_negative(name, problem):
    label_sets, logits, certainty, student, options, _ = problem
    space, out = run(name, label_sets, logits, certainty, student, options)
    assert torch.isfinite(out.loss) and out.loss.item() >= -1e-6
    assert torch.isfinite(out.divergence).all() and (out.divergence >= -1e-5).all()
    if out.weights is not None:
        assert torch.isfinite(out.weights).all() and (out.weights > 0).all()
    if getattr(out, "target", None) is not None:
        assert (out.target >= 0).all()
        torch.testing.assert_close(out.target.sum(1), torch.ones(out.target.shape[0]), rtol=0, atol=1e-5)
        owned = space.ownership().any(0)
        assert (out.target[:, ~owned] == 0).all()


@pytest.mark.parametrize("name", list_strategies())
@settings(max_examples=60, deadline=None, derandomize=True)
@given(problem=problems())
def test_permuting_the_teachers_permutes_nothing_in_the_result(name, problem):
    label_sets, logits, certainty, student, options, permutation = problem
    space, out = run(name, label_sets, logits, certainty, student, options)
    _, permuted = run(
        name,
        [label_sets[i] for i in permutation],
        [logits[i] for i in permutation],
        certainty[:, list(permutation)],
        student,
        options,
        labels=space.labels,  # the same union order: the student's classes mean the same
    )
    torch.testing.assert_close(permuted.loss, out.loss, **TOLERANCE)
    torch.testing.assert_close(permuted.divergence, out.divergence, **TOLERANCE)
    if out.weights is not None:
        torch.testing.assert_close(permuted.weights, out.weights, **TOLERANCE)
    if getattr(out, "target", None) is not None:
        torch.testing.assert_close(permuted.target, out.target, **TOLERANCE)
