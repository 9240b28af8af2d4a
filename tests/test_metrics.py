"""Numpy metrics agree with scikit-learn; per-teacher and selection accuracy on known cases."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ki_trainer import LabelSpace, integration_metrics
from ki_trainer.metrics import macro_f1


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 6, 50), rng.integers(0, 5, 50)
    assert macro_f1(p, y) == pytest.approx(f1_score(y, p, average="macro"))


def test_integration_metrics():
    space = LabelSpace([["a", "b"], ["b", "c"]], ["t0", "t1"])
    labels = np.array([0, 1, 2, 2])
    logits = np.eye(3)[[0, 2, 2, 1]]
    certainty = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.2, 0.8]])
    m = integration_metrics(logits, labels, space, certainty)
    assert m["accuracy"] == 0.5
    assert m["accuracy_t0"] == 0.5  # classes a, b: examples 0 (right) and 1 (wrong)
    assert m["accuracy_t1"] == pytest.approx(1 / 3)  # classes b, c: examples 1, 2, 3
    assert m["teacher_selection_accuracy"] == 0.75  # example 2 routed to t0, which does not own c
    assert "routed_teacher_accuracy" not in m
    routed = integration_metrics(logits, np.array([0, 1, 2, -100]), space, certainty, routed_predictions=np.array([0, 2, 1, 2]))
    assert routed["routed_teacher_accuracy"] == pytest.approx(1 / 3)  # rows 0-2 (row 3 has no label): only row 0 right
