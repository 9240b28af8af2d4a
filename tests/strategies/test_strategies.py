"""Every strategy's loss against a hand computation, and numerical safety (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ki_trainer import LabelSpace, StrategyOptions, TeacherSignals, get_strategy, list_strategies
from ki_trainer.numerics import certainty_from_probs, kl_from_log_probs
from ki_trainer.strategies import IntegrationStrategy, register_strategy


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def certainty(p):
    return 1 + sum(pi * math.log(pi) for pi in p if pi > 0) / math.log(len(p))


SPACE = LabelSpace([["a", "b"], ["c", "d", "e"]], ["t0", "t1"])
T0 = [2.0, -1.0]
T1 = [0.5, 0.2, -0.3]
STUDENT = [0.1, 0.4, -0.2, 1.0, 0.0]


def signals(cert=None):
    c = None if cert is None else torch.tensor([cert])
    return TeacherSignals(logits=[torch.tensor([T0]), torch.tensor([T1])], certainty=c)


def run(name, cert=None, **options):
    strategy = get_strategy(name)(SPACE, StrategyOptions(**options))
    return strategy.compute(torch.tensor([STUDENT]), signals(cert))


def test_registry_names_the_four_strategies():
    assert list_strategies() == ["entropy", "muki", "uhc", "vanilla_kd"]
    with pytest.raises(ValueError, match="Unknown integration strategy 'nope'"):
        get_strategy("nope")


def test_adding_a_strategy_is_adding_one_class():
    @register_strategy
    class Uniform(IntegrationStrategy):
        name = "uniform_test_only"

        def compute(self, student_logits, signals):
            raise NotImplementedError

    try:
        assert "uniform_test_only" in list_strategies()
    finally:
        from ki_trainer.strategies import STRATEGIES

        STRATEGIES.pop("uniform_test_only")


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_vanilla_kd(tau):
    q = softmax([x / tau for x in T0 + T1])
    expected = tau**2 * kl(q, softmax([x / tau for x in STUDENT]))
    assert run("vanilla_kd", temperature=tau).loss.item() == pytest.approx(expected, rel=1e-5)


def test_vanilla_kd_overlapping_class_gets_mass_of_both_copies():
    space = LabelSpace([["a", "b"], ["b", "c"]])
    sig = TeacherSignals(logits=[torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])])
    student = torch.tensor([[0.0, 0.0, 0.0]])
    p = softmax([1.0, 2.0, 0.5, -1.0])
    q = [p[0], p[1] + p[2], p[3]]
    loss = get_strategy("vanilla_kd")(space).compute(student, sig).loss.item()
    assert loss == pytest.approx(kl(q, [1 / 3] * 3), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_uhc(tau):
    s = [x / tau for x in STUDENT]
    expected = tau**2 * (
        kl(softmax([x / tau for x in T0]), softmax(s[:2])) + kl(softmax([x / tau for x in T1]), softmax(s[2:]))
    )
    assert run("uhc", temperature=tau).loss.item() == pytest.approx(expected, rel=1e-5)


CERT = [0.7, 0.4]


def padded_targets():
    return softmax(T0) + [0, 0, 0], [0, 0] + softmax(T1)


@pytest.mark.parametrize("name", ["muki", "entropy"])
@pytest.mark.parametrize("margin", [True, False])
def test_hard_selection(name, margin):
    p0, _ = padded_targets()
    weight = (0.7 - 0.4 + 1e-6) if margin else 1.0
    expected = weight * kl(p0, softmax(STUDENT))
    out = run(name, cert=CERT, selection="hard", margin_reweighting=margin)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.selected.tolist() == [0]


@pytest.mark.parametrize("ts", [0.2, 1.0])
def test_soft_selection_with_margin(ts):
    p0, p1 = padded_targets()
    alpha = softmax([c / ts for c in CERT])
    q = [alpha[0] * a + alpha[1] * b for a, b in zip(p0, p1)]
    expected = (0.3 + 1e-6) * kl(q, softmax(STUDENT))
    out = run("muki", cert=CERT, selection="soft", score_temperature=ts)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_within_teacher_kd_adds_that_multiple_of_uhc_to_mukis_loss(weight):
    muki = run("muki", cert=CERT, selection="soft").loss.item()
    uhc = run("uhc").loss.item()
    out = run("muki", cert=CERT, selection="soft", within_teacher_weight=weight)
    assert out.loss.item() == pytest.approx(muki + weight * uhc, rel=1e-5)
    assert run("muki", cert=CERT, selection="soft", within_teacher_weight=0.0).loss.item() == pytest.approx(muki)


def test_within_teacher_kd_is_not_weighted_by_the_router():
    """The UHC term counts every row alike: a row whose margin is ~0 (no margin weight) or whose share weight is 0
    still teaches each teacher's ranking of its classes."""
    tied = run("muki", cert=[0.5, 0.5], selection="soft", within_teacher_weight=1.0).loss.item()
    assert tied == pytest.approx(run("uhc").loss.item(), rel=1e-4)
    strategy = get_strategy("muki")(SPACE, StrategyOptions(within_teacher_weight=1.0))
    unweighted = TeacherSignals(logits=signals().logits, certainty=torch.tensor([CERT]), row_weights=torch.zeros(1))
    assert strategy.compute(torch.tensor([STUDENT]), unweighted).loss.item() == pytest.approx(run("uhc").loss.item(),
                                                                                              rel=1e-5)


def test_normalized_margin_weights_average_to_one():
    strategy = get_strategy("muki")(SPACE, StrategyOptions(normalize_weights=True))
    sig = TeacherSignals(
        logits=[torch.tensor([T0, T0]), torch.tensor([T1, T1])], certainty=torch.tensor([[0.9, 0.1], [0.5, 0.4]])
    )
    out = strategy.compute(torch.tensor([STUDENT, STUDENT]), sig)
    assert out.weights.mean().item() == pytest.approx(1.0)
    assert out.weights[0].item() / out.weights[1].item() == pytest.approx(0.8 / 0.1, rel=1e-4)


def test_certainty_strategies_require_certainty():
    with pytest.raises(ValueError, match="needs teacher certainty"):
        run("muki")


def test_certainty_score():
    assert certainty_from_probs(torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)
    assert certainty_from_probs(torch.tensor([0.25] * 4)).item() == pytest.approx(0.0, abs=1e-6)
    p = [0.6, 0.3, 0.1]
    assert certainty_from_probs(torch.tensor(p)).item() == pytest.approx(certainty(p), rel=1e-5)


def test_kl_ignores_student_minus_inf_where_target_is_zero():
    target = torch.tensor([[0.0, 1.0]])
    log_probs = torch.tensor([[-float("inf"), 0.0]])
    assert kl_from_log_probs(target, log_probs).item() == 0.0


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["vanilla_kd", "uhc", "muki", "entropy"]),
    t0=st.lists(finite, min_size=2, max_size=2),
    t1=st.lists(finite, min_size=3, max_size=3),
    student=st.lists(finite, min_size=5, max_size=5),
    tau=st.sampled_from([0.5, 1.0, 4.0]),
    selection=st.sampled_from(["hard", "soft"]),
)
def test_losses_are_finite_and_nonnegative_for_saturated_models(name, t0, t1, student, tau, selection):
    """Saturated teachers (one-hot softmax) and underflowing students must not give NaN/inf."""
    logits = [torch.tensor([t0]), torch.tensor([t1])]
    cert = torch.stack([certainty_from_probs(torch.softmax(x, -1)) for x in logits], 1)
    strategy = get_strategy(name)(SPACE, StrategyOptions(temperature=tau, selection=selection))
    loss = strategy.compute(torch.tensor([student]), TeacherSignals(logits=logits, certainty=cert)).loss
    assert torch.isfinite(loss) and loss.item() >= -1e-4


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=2, max_size=6))
def test_certainty_is_in_unit_interval(xs):
    c = certainty_from_probs(torch.softmax(torch.tensor(xs), -1))
    assert torch.isfinite(c) and 0.0 <= c.item() <= 1.0
