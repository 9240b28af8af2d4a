"""The one z-score (routing/standardization.py): the self-training router's input standardization is it."""

import torch

from ki_trainer import TeacherSignals, build_router
from ki_trainer.routing.pool import SelfTrainingRouter
from ki_trainer.routing.standardization import MIN_STD, zscore, zscore_fit


def _signals(n=60, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    owners = torch.arange(n) % 2
    features = [torch.randn(n, dim, generator=g) + owners[:, None].float() * 2 for _ in range(2)]
    logits = [torch.randn(n, 3, generator=g) for _ in range(2)]
    logits[0][owners == 0, 0] += 4
    logits[1][owners == 1, 1] += 4
    certainty = torch.rand(n, 2, generator=g)
    return TeacherSignals(logits=logits, certainty=certainty, mutual_information=torch.zeros(n, 2),
                          top_variance=torch.zeros(n, 2), features=features)


def test_zscore_is_population_standardization_with_a_floor():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    stats = zscore_fit(x)
    torch.testing.assert_close(stats["std"], torch.tensor([1.0, MIN_STD]))
    torch.testing.assert_close(zscore(x, stats), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_self_training_router_standardizes_its_inputs_with_the_shared_zscore():
    signals = _signals()
    router = build_router("self_training", {"min_rows_per_teacher": 5}).fit(signals)
    assert router.fallback is None
    x = SelfTrainingRouter._inputs(signals)
    expected = zscore_fit(x)
    torch.testing.assert_close(router.state["mean"], expected["mean"], rtol=0, atol=0)
    torch.testing.assert_close(router.state["std"], expected["std"], rtol=0, atol=0)
    # scoring applies the same standardization: the owner logits are the head on zscore(x)
    logits = zscore(x, expected) @ router.state["weight"] + router.state["bias"] + router.state["prior_shift"]
    torch.testing.assert_close(router.owner_logits(signals), logits)
