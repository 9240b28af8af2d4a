"""The ``ki-trainer`` console command: dispatch, grouped help, run files with flag overrides, integrate
end to end on tiny models saved to disk, and the demo on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEACHER_SPLIT, build_tiny_base_model, build_tokenizer, make_rows, teacher_words, tiny_bert

from ki_trainer.cli import commands, main
from ki_trainer.cli.arguments import RunFileError
from ki_trainer.cli.integrate import build_parser, build_teachers, teacher_specs

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.fixture(scope="module")
def disk_models(tmp_path_factory) -> dict:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def save_tiny_models(root: Path) -> dict:
    """Two tiny teachers (own tokenizers, label names in config), a tiny student and train/validation/test
    JSON files, as directories under ``root``."""
    paths = {}
    for i, labels in enumerate(TEACHER_SPLIT):
        tok = build_tokenizer(teacher_words(labels))
        model = tiny_bert(len(labels), len(tok), labels=labels, seed=i)
        paths[f"teacher_{i}"] = root / f"teacher_{i}"
        model.save_pretrained(paths[f"teacher_{i}"])
        tok.save_pretrained(paths[f"teacher_{i}"])
    tok = build_tokenizer()
    student = tiny_bert(2, len(tok), seed=5)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    paths["student"] = root / "student"
    data = root / "data"
    data.mkdir()
    for split, seed in (("train", 1), ("validation", 2), ("test", 3)):
        rows = [{"id": f"{split}{i}", **row} for i, row in enumerate(make_rows(6, seed=seed))]
        (data / f"{split}.json").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    paths["data"] = data
    return paths


def test_overview_lists_the_commands_and_unknown_commands_get_a_hint(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("ki-trainer: merge fine-tuned classifiers")
    for name in ("integrate", "train-teachers", "demo", "launch-config", "merge-distill"):
        assert f"  {name}" in out
    assert main(["integrat"]) == 2
    assert "Did you mean 'integrate'?" in capsys.readouterr().err
    runner, summary = commands()["merge-distill"]
    assert runner is not None and summary.startswith("merge masked-LM teachers")  # registered like every command


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "ki_trainer", "launch-config", "fsdp"], capture_output=True,
                            text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2


def test_shipped_launch_configs_are_valid_accelerate_configs() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    from ki_trainer.cli.launch_config import available

    configs = available()
    assert {"single_gpu", "multi_gpu", "cpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(configs)
    for name, path in configs.items():
        loaded = ClusterConfig.from_yaml_file(str(path))  # accelerate's own reader
        assert loaded.num_machines == 1, name
    assert ClusterConfig.from_yaml_file(str(configs["deepspeed_zero3"])).deepspeed_config["zero_stage"] == 3


def test_help_starts_with_the_description_and_groups_the_ki_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["integrate", "--help"])
    short = capsys.readouterr().out
    lines = short.splitlines()
    assert lines[0].startswith("usage: ki-trainer integrate [RUN_FILE")
    assert lines[2].startswith("Merge fine-tuned classifiers")
    groups = [line for line in lines if line and not line.startswith(" ") and line.endswith(":") or "):" in line[:140]]
    titles = [line.split(" (")[0].rstrip(":") for line in groups if not line.startswith(" ")]
    assert titles.index("what to integrate") < titles.index("knowledge integration options") < titles.index("training options")
    assert "--mc_samples" in short and "--output_dir" in short
    assert "--adam_beta1" not in short  # the long tail of TrainingArguments is behind --help-all
    with pytest.raises(SystemExit):
        main(["integrate", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and len(full.splitlines()) > 2 * len(lines)


def test_run_file_values_flags_override_and_unknown_keys_fail(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "teachers": ["a", {"path": "b", "tokenizer": "student", "name": "second"}],
        "strategy": "entropy", "learning_rate": "1e-4", "mc_samples": 4, "output_dir": str(tmp_path / "out"),
        "report_to": "none", "use_cpu": True,
    }))  # fmt: skip
    script, args = build_parser().parse([str(run), "--mc_samples", "6"])
    assert script.teachers == ["a", {"path": "b", "tokenizer": "student", "name": "second"}]
    assert args.strategy == "entropy" and args.mc_samples == 6  # the flag wins over the file
    assert args.learning_rate == pytest.approx(1e-4) and isinstance(args.learning_rate, float)  # YAML's "1e-4" string
    script, args = build_parser().parse([str(run), "--teachers", "x", "y"])
    assert script.teachers == ["x", "y"]

    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"teachers": ["a"], "stratgy": "muki", "report_to": "none"}))
    with pytest.raises(RunFileError, match=r"'stratgy' \(did you mean 'strategy'\?\)"):
        build_parser().parse([str(as_json)])
    with pytest.raises(RunFileError, match="run file ending in"):
        build_parser().parse(["run.txt"])
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):  # the config's own validation still runs
        build_parser().parse([str(run), "--mc_samples", "0"])


def test_teacher_entries(disk_models: dict, tmp_path: Path) -> None:
    summary = tmp_path / "teachers.json"
    summary.write_text(json.dumps({"teachers": [{"path": "teacher_0"}, {"path": "teacher_1"}]}))
    assert [e["path"] for e in teacher_specs([str(summary)])] == [str(tmp_path / "teacher_0"), str(tmp_path / "teacher_1")]
    with pytest.raises(ValueError, match=r"unknown: \['tokeniser'\]"):
        teacher_specs([{"path": "x", "tokeniser": "y"}])
    first, second = build_teachers([str(disk_models["teacher_0"]),
                                    {"path": str(disk_models["teacher_1"]), "tokenizer": "student", "name": "two"}])
    assert first.tokenizer is not None and first.labels == TEACHER_SPLIT[0]
    assert second.tokenizer is None and second.name == "two" and second.labels == TEACHER_SPLIT[1]


def test_integrate_from_a_run_file(disk_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "student_out"
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "teachers": [str(disk_models["teacher_0"]), str(disk_models["teacher_1"])],
        "student": str(disk_models["student"]), "dataset": str(disk_models["data"]),
        "strategy": "muki", "mc_samples": 2, "signal_source": "cached", "max_length": 16,
        "num_train_epochs": 1, "per_device_train_batch_size": 8, "report_to": "none", "save_strategy": "no",
        "use_cpu": True, "disable_tqdm": True, "output_dir": str(out),
    }))  # fmt: skip
    assert main(["integrate", str(run), "--max_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "==> training the student on 24 unlabeled rows ... " in printed  # phase banners with timing
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_teacher_selection_accuracy" in metrics
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(label for split in TEACHER_SPLIT for label in split)
    assert not (out / "_ki_trainer.lock").exists()  # released after training


def test_demo_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    from ki_trainer.cli import demo

    base = build_tiny_base_model(tmp_path / "base")
    calls = []

    def one_student(args, strategy, teachers, unlabeled, test, **options):
        calls.append(strategy)
        return demo.integrate_student(args, strategy, teachers, unlabeled, test, **options)

    args = demo.DemoArguments(output_dir=str(tmp_path / "demo"), model=str(base), per_class=2, test_per_class=1,
                              max_length=16, mc_samples=2, teacher_epochs=1, num_train_epochs=1,
                              per_device_train_batch_size=8)
    from ki_trainer.data import cap_per_class, load_debian_sections

    data = load_debian_sections()
    teachers = demo.train_demo_teachers(args)
    unlabeled = cap_per_class(data["train"], 2, seed=0).remove_columns(["label", "split"])
    test = cap_per_class(data["test"], 1, seed=0)
    students = demo.STUDENTS + [("student: hard MUKI", "muki", {"selection": "hard", "run_name": "muki_hard"})]
    rows = demo.demo_rows(args, teachers, unlabeled, test, students=students, train_student=one_student)
    assert calls == [strategy for _, strategy, _ in demo.STUDENTS] + ["muki"]
    assert list(rows)[2:] == [name.format(mc_samples=2, mc_layers="top 1 layer") for name, _, _ in demo.STUDENTS] + [
        "student: hard MUKI", demo.ORACLE]
    assert "student: MUKI (soft, MC K=2, top 1 layer)" in rows  # as published, dropout sampled in the top layer only
    assert demo.mc_layers(demo.DemoArguments(mc_top_layers=0)) == "all layers"  # --mc_top_layers 0: full MC dropout
    assert "student: MUKI + relative_mahalanobis router" in rows  # the recommended router beside MUKI as published
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows.values())
    assert "teacher_selection_accuracy" in rows["student: hard MUKI"]
    assert 0.0 <= rows["student: MUKI + relative_mahalanobis router"]["routed_teacher_accuracy"] <= 1.0  # the routed ensemble
    oracle = json.loads((tmp_path / "demo" / "oracle" / "teachers.json").read_text())["teachers"]
    assert len(oracle) == 1 and len(oracle[0]["labels"]) == 20  # one model over every class, trained with labels
    assert f"==> training student {len(students)}/{len(students)}: hard MUKI ... " in capsys.readouterr().out


def test_demo_names_a_negative_mc_top_layers_before_training(capsys) -> None:
    from ki_trainer.cli import main

    assert main(["demo", "--mc_top_layers", "-1"]) == 2  # a usage error, before any teacher is trained
    assert "--mc_top_layers -1" in capsys.readouterr().err
