"""benchmarks/routing.py on a labelled file it has never seen (its own label names, an extra column, .xz), with a
tiny BERT built in-process as the "pretrained" checkpoint: the results schema of issue 9 §3, both levels, both
kinds of split, and a students report rebuilt from the records without training."""

from __future__ import annotations

import importlib
import json
import lzma
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_base_model
from ki_trainer.data import load_debian_sections

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SECTIONS = ["database", "editors", "games", "mail", "math", "sound"]
ROUTERS = ["max_prob", "mc_entropy", "relative_mahalanobis"]


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module("routing")
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = build_tiny_base_model(tmp_path_factory.mktemp("tiny_base"))
    module.CONFIGS["tiny"] = dict(model=str(model), max_length=32, epochs=1, batch_size=8, learning_rate=1e-3,
                                  mc_samples=2, mc_top_layers=1)
    yield module
    del module.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six sections renamed ("topic-<name>"), 12 train / 2 val / 5 test rows each, with a column to ignore."""
    rows, wanted = [], {"train": 12, "val": 2, "test": 5}
    for split, n in wanted.items():
        part = load_debian_sections(split=split)
        for section in SECTIONS:
            texts = [t for t, label in zip(part["text"], part["label"]) if label == section][:n]
            rows += [{"text": t, "label": f"topic-{section}", "split": split, "note": "ignored"} for t in texts]
    path = tmp_path_factory.mktemp("data") / "topics.jsonl.xz"
    with lzma.open(path, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _run(routing, data_file: Path, out: Path, cache: Path, *extra: str) -> dict:
    return routing.main(["--data", str(data_file), "--output_dir", str(out), "--config", "tiny",
                         "--cache_root", str(cache), "--routers", *ROUTERS, *extra])


def _check_schema(result: dict) -> None:
    for row in result["rows"]:
        assert {"method", "kind", "accuracy"} <= set(row), row
        assert row["kind"] in {"teacher", "router", "student", "oracle", "ceiling", "baseline"}
        assert 0.0 <= row["accuracy"] <= 1.0
        if row.get("routing_accuracy") is not None:
            assert 0.0 <= row["routing_accuracy"] <= 1.0


def test_routing_level_on_another_dataset(routing, data_file: Path, tmp_path: Path) -> None:
    result = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", "--split", "2x3")
    assert result == json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results.png").is_file()
    _check_schema(result)
    settings = result["settings"]
    assert settings["pool_rows"] == 72 and settings["test_rows"] == 30
    assert settings["teacher_blocks"] == [[f"topic-{s}" for s in SECTIONS[:3]], [f"topic-{s}" for s in SECTIONS[3:]]]
    kinds = [row["kind"] for row in result["rows"]]
    assert kinds.count("teacher") == 2 and kinds.count("router") == len(ROUTERS)
    assert [row["router"] for row in result["rows"] if row["kind"] == "router"] == ROUTERS
    perfect = next(row for row in result["rows"] if row["kind"] == "ceiling" and "perfect" in row["method"])
    assert perfect["routing_accuracy"] == 1.0
    for row in result["rows"]:  # no routed ensemble beats the one routed by the gold owner
        if row["kind"] == "router":
            assert row["accuracy"] <= perfect["accuracy"] + 1e-9

    teachers = tmp_path / "cache" / "teachers"
    stamps = {p: p.stat().st_mtime_ns for p in teachers.rglob("model.safetensors")}
    assert len(stamps) == 2
    again = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", "--split", "2x3")
    assert {p: p.stat().st_mtime_ns for p in teachers.rglob("model.safetensors")} == stamps  # teachers reused
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in result["rows"]]  # same cached signals


def test_students_on_a_random_split_and_a_report_from_the_records(routing, data_file: Path, tmp_path: Path) -> None:
    args = ("--split", "random:2x3", "--split_seed", "1", "--level", "students", "--seeds", "0",
            "--student_routers", "relative_mahalanobis")
    result = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", *args)
    _check_schema(result)
    students = {row["method"]: row for row in result["rows"] if row["kind"] in ("student", "oracle")}
    assert len(students) == 4  # oracle, vanilla KD, MUKI as published, MUKI + the router
    assert all(row["n_seeds"] == 1 and row["seeds"] == [0] for row in students.values())
    records = sorted((tmp_path / "out" / "records").glob("*.json"))
    assert [p.name for p in records] == sorted(
        ["oracle-seed0.json", "vanilla_kd-seed0.json", "muki-mc_entropy-seed0.json",
         "muki-relative_mahalanobis-seed0.json"]
    )
    stamps = {p: p.stat().st_mtime_ns for p in records}
    report = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", *args, "--records_only")
    assert {p: p.stat().st_mtime_ns for p in records} == stamps  # nothing trained again
    assert [r for r in report["rows"] if r["kind"] in ("student", "oracle")] == list(students.values())
    blocks = result["settings"]["teacher_blocks"]
    assert sorted(sum(blocks, [])) == sorted(f"topic-{s}" for s in SECTIONS) and blocks != [
        [f"topic-{s}" for s in SECTIONS[:3]], [f"topic-{s}" for s in SECTIONS[3:]]]


def test_pool_shares_subsample_the_pool_by_owner_and_report_the_majority_baseline(routing, data_file: Path,
                                                                                    tmp_path: Path) -> None:
    """--pool_shares 0.75,0.25: 36 + 12 of the 72 pool rows (the gold owner builds the pool, nothing else), the test
    rows unchanged; the majority-teacher row routes 75% of that pool; every router reports its share estimate."""
    result = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", "--split", "2x3",
                  "--pool_shares", "0.75,0.25", "0.5,0.5", "--compare_equal_shares", "--compare_given_shares")
    assert set(result) == {"shares-0.75-0.25", "shares-0.5-0.5"}
    skewed = result["shares-0.75-0.25"]
    assert skewed == json.loads((tmp_path / "out" / "shares-0.75-0.25" / "results.json").read_text())
    _check_schema(skewed)
    settings = skewed["settings"]
    assert settings["pool_owner_counts"] == [36, 12] and settings["pool_rows"] == 48 and settings["test_rows"] == 30
    majority = next(row for row in skewed["rows"] if row["kind"] == "baseline")
    assert majority["pool_routing_accuracy"] == 0.75 and "teacher 0" in majority["method"]
    assert result["shares-0.5-0.5"]["settings"]["pool_owner_counts"] == [36, 36]
    mahalanobis = next(row for row in skewed["rows"] if row.get("router") == "relative_mahalanobis")
    assert "estimated_shares" in mahalanobis and mahalanobis["shares_estimate"]
    routers = [row["router"] for row in skewed["rows"] if row["kind"] == "router"]
    # the pool router again, without an estimate and given the pool's owner shares (counted, as its builder knows them)
    assert routers == ROUTERS + ["relative_mahalanobis[shares=equal]", "relative_mahalanobis[shares=given]"]
    equal = next(row for row in skewed["rows"] if row.get("router") == "relative_mahalanobis[shares=equal]")
    assert equal["options"]["shares"] == "equal" and equal["estimated_shares"] is None
    given = next(row for row in skewed["rows"] if row.get("router") == "relative_mahalanobis[shares=given]")
    assert given["options"]["shares"] == [0.75, 0.25] and given["estimated_shares"] == [0.75, 0.25]
    assert given["shares_given"] and not mahalanobis["shares_given"]
    with pytest.raises(ValueError, match="must be 2 positive numbers"):
        _run(routing, data_file, tmp_path / "out2", tmp_path / "cache", "--split", "2x3", "--pool_shares", "0.5,0.3,0.2")


def test_gold_routed_student_is_a_ceiling_row_and_unknown_rows_are_refused(routing, data_file: Path,
                                                                          tmp_path: Path) -> None:
    """muki:gold_owner trains MUKI's student on targets routed by each pool row's GOLD owner (uses labels: a ceiling
    row); its router finds every batch row in the pool's table and refuses a row the table does not hold."""
    args = ("--split", "2x3", "--level", "students", "--seeds", "0", "--student_routers", "gold_owner",
            "--only", "muki:gold_owner", "--pool_shares", "0.75,0.25")  # a subsampled pool: rows of the whole pool's table
    result = _run(routing, data_file, tmp_path / "out", tmp_path / "cache", *args)["shares-0.75-0.25"]
    gold = [row for row in result["rows"] if row.get("router") == "gold_owner"]
    assert len(gold) == 1 and gold[0]["kind"] == "ceiling" and "USES LABELS" in gold[0]["method"]
    assert gold[0]["n_seeds"] == 1 and (tmp_path / "out" / "shares-0.75-0.25" / "records" /
                                        "muki-gold_owner-seed0.json").is_file()

    from ki_trainer.strategies import TeacherSignals

    eval_module = sys.modules["routing_eval"]
    pool = TeacherSignals(logits=[torch.randn(6, 3), torch.randn(6, 3)], features=[torch.randn(6, 8), torch.randn(6, 8)])
    labels = ["a", "d", "b", "e", "c", "f"]
    table = eval_module.gold_owner_table(pool, labels, [["a", "b", "c"], ["d", "e", "f"]], tmp_path / "gold.pt")
    router = eval_module.GoldOwnerRouter(table=table)
    pick = lambda xs, f=lambda x: x: [f(x[[3, 0]]) for x in xs]  # noqa: E731
    batch = TeacherSignals(logits=pick(pool.logits), features=pick(pool.features))
    assert router.score(batch).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    fp16 = lambda x: x.half().float()  # noqa: E731  (read back at the cache's storage precision: the same rows)
    stored = TeacherSignals(logits=pick(pool.logits, fp16), features=pick(pool.features, fp16))
    assert router.score(stored).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    stranger = TeacherSignals(logits=[pool.logits[0][:1] + 1.0, pool.logits[1][:1]], features=[x[:1] for x in pool.features])
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] are not pool rows"):
        router.score(stranger)
