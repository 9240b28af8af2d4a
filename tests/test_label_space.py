"""LabelSpace: union by NAME, deterministic order, overlaps, and clear errors."""

import pytest
import torch

from ki_trainer import LabelSpace


def test_union_is_first_seen_order_and_maps_by_name():
    space = LabelSpace([["b", "a"], ["c", "a", "d"]], ["t0", "t1"])
    assert space.labels == ["b", "a", "c", "d"]
    assert space.teacher_to_union(0).tolist() == [0, 1]
    assert space.teacher_to_union(1).tolist() == [2, 1, 3]  # "a" keeps its union id in both teachers
    assert space.owners("a") == [0, 1] and space.owners("d") == [1]


def test_pad_scatters_by_name_and_keeps_mass():
    space = LabelSpace([["x", "y"], ["z", "x"]])
    padded = space.pad(torch.tensor([[0.3, 0.7]]), 1)
    assert padded.tolist() == [[pytest.approx(0.7), 0.0, pytest.approx(0.3)]]


def test_ownership_matrix():
    space = LabelSpace([["x", "y"], ["y", "z"]])
    assert space.ownership().tolist() == [[True, True, False], [False, True, True]]


def test_explicit_order_must_equal_union():
    assert LabelSpace([["a", "b"], ["c", "d"]], labels=["d", "c", "b", "a"]).labels == ["d", "c", "b", "a"]
    with pytest.raises(ValueError, match="missing \\['d'\\]"):
        LabelSpace([["a", "b"], ["c", "d"]], labels=["a", "b", "c"])


@pytest.mark.parametrize(
    "labels, message",
    [([["a"]], "at least 2 classes"), ([["a", "a", "b"]], "more than once"), ([], "at least one")],
)
def test_bad_label_sets(labels, message):
    with pytest.raises(ValueError, match=message):
        LabelSpace(labels)


def test_encode_names_and_ids_with_clear_errors():
    space = LabelSpace([["a", "b"], ["c", "d"]])
    assert space.encode(["d", 0, "b"]) == [3, 0, 1]
    with pytest.raises(ValueError, match="'zebra' is not owned by any teacher"):
        space.encode(["zebra"])
    with pytest.raises(ValueError, match="outside the union"):
        space.encode([4])
