"""examples/train_teachers.py end to end on a tiny BERT built in-process (no downloaded weights)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("tokenizers")
from transformers import pipeline  # noqa: E402

from ki_trainer.data import load_debian_sections  # noqa: E402
from conftest import build_tiny_base_model  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_teachers.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_teachers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


train_teachers = _load_script()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("tiny_bert"))


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--output_dir", str(out), "--split_spec", "2x10",
        "--max_train_per_class", "4", "--max_length", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--use_cpu", "true",
        "--disable_tqdm", "true", "--save_strategy", "no", *extra,
    ]  # fmt: skip


def test_teacher_splits_and_encoding(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    data = load_debian_sections()
    labels = ["video", "tex", "vcs"]
    splits = train_teachers.teacher_splits(data, labels, max_train_per_class=3, seed=0)
    assert sorted(splits["train"]["label"]) == sorted(labels * 3)
    assert set(splits["val"]["label"]) == set(labels) and len(splits["val"]) == 15 + 9 + 9
    encoded = train_teachers.encode(splits, AutoTokenizer.from_pretrained(tiny_model), labels, max_length=16)
    assert set(encoded["train"].column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "text" not in encoded["train"].column_names
    assert [labels[i] for i in encoded["train"]["labels"]] == splits["train"]["label"]
    assert max(len(ids) for ids in encoded["val"]["input_ids"]) == 16


def test_cache_check(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher_0"
    assert not train_teachers.is_cached(teacher, ["a", "b"])
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"id2label": {"1": "b", "0": "a"}}))
    assert not train_teachers.is_cached(teacher, ["a", "b"])  # no weights: an unfinished directory
    (teacher / "model.safetensors").write_bytes(b"")
    assert train_teachers.is_cached(teacher, ["a", "b"])
    with pytest.raises(ValueError, match="overwrite_teachers"):
        train_teachers.is_cached(teacher, ["a", "c"])


def test_script_trains_saves_and_reuses_teachers(tiny_model: Path, tmp_path: Path) -> None:
    summary = train_teachers.main(_argv(tiny_model, tmp_path))
    assert [t["path"] for t in summary["teachers"]] == ["teacher_0", "teacher_1"]
    assert summary == json.loads((tmp_path / "teachers.json").read_text())
    first = summary["teachers"][0]
    assert first["labels"] == sorted(set(load_debian_sections(split="train")["label"]))[:10]
    assert first["num_train"] == 40 and first["num_val"] == 300 and 0.0 <= first["val_accuracy"] <= 1.0

    classify = pipeline("text-classification", model=str(tmp_path / "teacher_0"), device="cpu")
    assert classify("a text editor for programmers")[0]["label"] in first["labels"]

    weights = tmp_path / "teacher_0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = train_teachers.main(_argv(tiny_model, tmp_path))
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again["teachers"] == summary["teachers"]
    (tmp_path / "teachers.json").unlink()  # cached teachers without a record are evaluated, not retrained
    assert train_teachers.main(_argv(tiny_model, tmp_path))["teachers"] == summary["teachers"]
    assert weights.stat().st_mtime_ns == stamp

    train_teachers.main(_argv(tiny_model, tmp_path, "--overwrite_teachers", "true"))
    assert weights.stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="overwrite_teachers"):
        train_teachers.main(_argv(tiny_model, tmp_path, "--split_spec", "random:2x10"))
