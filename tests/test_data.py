"""The embedded Debian-sections data loads as documented, and label partitions are validated."""

from __future__ import annotations

import lzma
from pathlib import Path

import datasets
import pytest

from ki_trainer.data import (
    DEFAULT_DATA_PATH,
    cap_per_class,
    filter_by_labels,
    label_maps,
    load_debian_sections,
    partition_labels,
)

LABELS = sorted(
    "admin database editors electronics fonts games graphics hamradio mail math net science sound tex text "
    "utils vcs video web x11".split()
)


@pytest.fixture(scope="module")
def data() -> datasets.DatasetDict:
    return load_debian_sections()


def test_splits_sizes_and_columns(data: datasets.DatasetDict) -> None:
    assert {name: len(split) for name, split in data.items()} == {"train": 4700, "val": 657, "test": 1258}
    for name, split in data.items():
        assert split.column_names == ["id", "text", "label", "split"]
        assert set(split["split"]) == {name}


def test_twenty_labels_unique_ids_and_text(data: datasets.DatasetDict) -> None:
    assert sorted(set(data["train"]["label"])) == LABELS
    ids = [i for split in data.values() for i in split["id"]]
    assert len(ids) == len(set(ids)) == 6615
    assert all(text.strip() for text in data["test"]["text"])


def test_single_split_and_alias() -> None:
    val = load_debian_sections(split="validation")
    assert isinstance(val, datasets.Dataset) and len(val) == 657
    assert load_debian_sections(split="val")["id"] == val["id"]


def test_non_english_drops_untranslated_rows(data: datasets.DatasetDict) -> None:
    german = load_debian_sections(language="de")
    sizes = {name: len(split) for name, split in german.items()}
    assert sizes == {"train": 1626, "val": 220, "test": 420}  # 2,266 rows carry a German translation
    english = dict(zip(data["train"]["id"], data["train"]["text"]))
    row = german["train"][0]
    assert row["text"] != english[row["id"]]  # the translation, not the English original


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl.xz"):
        load_debian_sections(tmp_path / "nope.jsonl.xz")
    with pytest.raises(ValueError, match="Unknown split 'dev2'"):
        load_debian_sections(split="dev2")
    with pytest.raises(ValueError, match="Unknown language 'xx'"):
        load_debian_sections(language="xx")


def test_explicit_path_and_duplicate_ids(tmp_path: Path) -> None:
    rows = '{"text": "t", "label": "a", "split": "train", "package": "p", "source": "s", "texts": {}}\n'
    good = tmp_path / "one.jsonl.xz"
    with lzma.open(good, "wt") as handle:
        handle.write(rows)
    assert load_debian_sections(good, split="train")["id"] == ["p"]
    bad = tmp_path / "dup.jsonl.xz"
    with lzma.open(bad, "wt") as handle:
        handle.write(rows * 2)
    with pytest.raises(ValueError, match="unique"):
        load_debian_sections(bad)


def test_default_path_is_package_data_linked_to_the_repo_copy() -> None:
    import ki_trainer

    assert DEFAULT_DATA_PATH.parent == Path(ki_trainer.__file__).resolve().parent / "resources"
    # In a checkout the package file is a link to the one copy in data/ (no duplicate in the repository).
    assert DEFAULT_DATA_PATH.resolve() == Path(__file__).resolve().parent.parent / "data" / "debian_sections20.jsonl.xz"


def test_sorted_grid_partition() -> None:
    assert partition_labels(LABELS, "2x10") == [LABELS[:10], LABELS[10:]]
    four = partition_labels(reversed(LABELS), "4x5")
    assert four == [LABELS[i : i + 5] for i in range(0, 20, 5)]


def test_random_partition_is_seeded_disjoint_and_complete() -> None:
    first = partition_labels(LABELS, "random:2x10", seed=3)
    assert first == partition_labels(LABELS, "random:2x10", seed=3)
    assert first != partition_labels(LABELS, "random:2x10", seed=4)
    assert first != [LABELS[:10], LABELS[10:]]
    assert sorted(first[0] + first[1]) == LABELS and all(group == sorted(group) for group in first)


def test_explicit_partition_as_list_or_json() -> None:
    groups = [["a", "c"], ["b", "d", "e"]]
    assert partition_labels("abcde", groups) == groups
    assert partition_labels("abcde", '[["a", "c"], ["b", "d", "e"]]') == groups


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3x7", "3 x 7 = 21 labels but there are 20"),
        ("2by10", "Bad label partition spec"),
        ("random:", "Bad label partition spec"),
        ("20x1", "fewer than 2 labels"),
        ([LABELS[:10], LABELS[9:]], r"repeated \['math'\]"),
        ([LABELS[:10], LABELS[11:]], r"missing \['net'\]"),
        ([LABELS[:10], LABELS[10:] + ["nope"]], r"unknown \['nope'\]"),
        ("[[1, 2", "does not parse"),
        (["ab"], "list of label lists"),
    ],
)
def test_bad_specs_raise(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_labels(LABELS, spec)  # type: ignore[arg-type]


def test_filter_by_labels(data: datasets.DatasetDict) -> None:
    own = filter_by_labels(data, ["tex", "vcs"])
    assert {name: len(split) for name, split in own.items()} == {"train": 141, "val": 18, "test": 25}
    assert set(own["train"]["label"]) == {"tex", "vcs"}
    assert len(filter_by_labels(data["val"], [])) == 0
    with pytest.raises(ValueError, match="'section' not in dataset columns"):
        filter_by_labels(data["val"], ["tex"], label_column="section")


def test_cap_per_class(data: datasets.DatasetDict) -> None:
    capped = cap_per_class(data["train"], 20, seed=0)
    counts = {label: capped["label"].count(label) for label in LABELS}
    assert set(counts.values()) == {20}
    assert capped["id"] == cap_per_class(data["train"], 20, seed=0)["id"]
    assert cap_per_class(data["train"], None) is data["train"]
    with pytest.raises(ValueError, match="max_per_class"):
        cap_per_class(data["train"], 0)


def test_label_maps() -> None:
    id2label, label2id = label_maps(["games", "admin"])
    assert id2label == {0: "games", 1: "admin"} and label2id == {"games": 0, "admin": 1}
    with pytest.raises(ValueError, match="distinct"):
        label_maps(["a", "a"])
