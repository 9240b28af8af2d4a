"""A Hugging Face user's first hour with the ``ki-trainer`` command (issue 25): mistakes stop early with a
message naming the option / file and the fix; the model card written after evaluation carries the final
metrics, runs as written and says only what the run used; the output folder looks like the HF example scripts'."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEACHER_SPLIT, tiny_bert
from test_cli import save_tiny_models

from ki_trainer.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def disk_models(tmp_path_factory) -> dict:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    header, body = text[len("---\n"):].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _run_args(disk_models: dict, out: Path, **extra) -> list[str]:
    options = {
        "student": str(disk_models["student"]), "mc_samples": 2, "teacher_signals": "cached", "max_length": 16,
        "max_steps": 2, "per_device_train_batch_size": 8, "report_to": "none", "save_strategy": "no",
        "use_cpu": True, "disable_tqdm": True, "output_dir": str(out), **extra,
    }  # fmt: skip
    return ["--teachers", str(disk_models["teacher_0"]), str(disk_models["teacher_1"])] + [
        part for key, value in options.items() for part in (f"--{key}", str(value))]


# ---------------------------------------------------------------- 1. own teachers without --dataset
def test_own_teachers_without_a_dataset_fail_before_training(disk_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["integrate", *_run_args(disk_models, out)]) == 2
    err = capsys.readouterr().err
    assert "No --dataset given" in err and "debian_sections20" in err and "--dataset NAME_OR_FOLDER" in err
    assert "'admin'" in err and "alpha" in err  # the embedded labels no teacher knows, and the teachers' labels
    assert not (out / "config.json").exists() and not (out / "README.md").exists()  # nothing trained or saved


def test_dataset_labels_no_teacher_predicts_fail_before_training(disk_models: dict, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        text = (disk_models["data"] / f"{split}.json").read_text()
        (data / f"{split}.json").write_text(text.replace('"delta"', '"omega"') if split == "test" else text)
    out = tmp_path / "out"
    assert main(["integrate", *_run_args(disk_models, out, dataset=data)]) == 2
    err = capsys.readouterr().err
    assert "the test split's gold labels 'omega'" in err and "not among the teachers' labels" in err
    assert not (out / "config.json").exists()


# ---------------------------------------------------------------- 2, 3, 8. the card after evaluation; output files
@pytest.fixture(scope="module")
def integrated(disk_models: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "ki"
    assert main(["integrate", *_run_args(disk_models, out, dataset=disk_models["data"])]) == 0
    return out


def test_card_carries_the_final_validation_and_test_metrics(integrated: Path) -> None:
    meta, body = _card(integrated / "README.md")
    test_results = json.loads((integrated / "test_results.json").read_text())
    eval_results = json.loads((integrated / "eval_results.json").read_text())
    results = {r["dataset"]["split"]: {m["type"]: m["value"] for m in r["metrics"]}
               for r in meta["model-index"][0]["results"]}
    assert set(results) == {"validation", "test"}
    assert results["test"]["accuracy"] == pytest.approx(test_results["test_accuracy"], abs=1e-4)
    assert results["validation"]["accuracy"] == pytest.approx(eval_results["eval_accuracy"], abs=1e-4)
    assert meta["datasets"] == ["data"] and "/" not in json.dumps(meta["model-index"])  # a local folder: its name only
    assert all("labelled_rows" not in names and "loss" not in names for names in results.values())
    assert "No evaluation with gold labels was run" not in body and "On the test set" in body
    assert "labelled_rows" not in body
    assert "generated_from_trainer" in meta["tags"]
    for framework in ("transformers", "torch", "datasets", "tokenizers", "accelerate"):
        assert re.search(rf"^- {framework} \d", body, re.M), framework
    assert "peft" not in body.split("## Framework versions")[1].split("##")[0]  # no PEFT student, not listed
    assert "MergeDistill" not in body and "2210.05230" in body  # a classifier cites MUKI, not MergeDistill


def test_output_folder_has_the_hf_example_scripts_result_files(integrated: Path) -> None:
    all_results = json.loads((integrated / "all_results.json").read_text())
    for name, prefix in (("train_results.json", "train_"), ("eval_results.json", "eval_"), ("test_results.json", "test_")):
        values = json.loads((integrated / name).read_text())
        assert values and all(key.startswith(prefix) or key in ("epoch", "total_flos") for key in values), name
        assert all(all_results[key] == value for key, value in values.items()), name


def test_card_usage_snippet_runs_as_written(integrated: Path, tmp_path: Path) -> None:
    _, body = _card(integrated / "README.md")
    snippet = body.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert f'model="{integrated}"' in snippet  # the folder the model was saved to, not its base name
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = eval(result.stdout.strip())  # noqa: S307 - the snippet prints pipeline's list of dicts
    assert predicted[0]["label"] in {label for split in TEACHER_SPLIT for label in split}


def test_card_snippet_names_the_hub_repo_when_pushing(tmp_path: Path, tokenizer, trained_teachers, unlabeled_train) -> None:
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher

    teachers = [Teacher(model, tokenizer=tok) for model, tok in trained_teachers]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path / "o"), hub_model_id="me/merged", report_to="none",
                                      use_cpu=True, max_length=16)
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tokenizer), seed=3), args=args, teachers=teachers,
                                          train_dataset=unlabeled_train, processing_class=tokenizer)
    _, body = _card(Path(trainer.write_model_card(str(tmp_path / "card"))))
    assert 'pipeline("text-classification", model="me/merged")' in body


# ---------------------------------------------------------------- 2. what the card lists per strategy
def _render(strategy: str, **config) -> str:
    from ki_trainer import KnowledgeIntegrationConfig, Teacher
    from ki_trainer.model_card import render_model_card

    teachers = [Teacher(tiny_bert(2, 30, labels=labels, seed=i), name=f"t{i}") for i, labels in enumerate(TEACHER_SPLIT)]
    args = KnowledgeIntegrationConfig(output_dir="unused", strategy=strategy, report_to="none", use_cpu=True, **config)
    return render_model_card(teachers=teachers, args=args, labels=["alpha", "beta", "gamma", "delta"],
                             model_name="m", repo_id="me/m", eval_metrics={"eval_accuracy": 0.5, "eval_labelled_rows": 8})


def test_card_lists_only_the_settings_the_strategy_reads() -> None:
    plain = _render("vanilla_kd").split("### Strategy and router")[1].split("## Training")[0]
    for muki_only in ("mc_samples", "selection", "margin_reweighting", "teacher_score_temperature", "router_fit_rows"):
        assert muki_only not in plain, muki_only
    assert "`kd_temperature`" in plain and "- router: `none" in plain
    muki = _render("muki").split("### Strategy and router")[1].split("## Training")[0]
    assert "`mc_samples`" in muki and "`selection`" in muki and "`margin_reweighting`" in muki
    entropy = _render("entropy").split("### Strategy and router")[1].split("## Training")[0]
    assert "`selection`" in entropy and "mc_samples" not in entropy  # one deterministic pass: no MC settings
    header = yaml.safe_load(_render("muki").split("---\n")[1])
    assert [m["type"] for m in header["model-index"][0]["results"][0]["metrics"]] == ["accuracy"]  # rows: no metric


def test_card_license_comes_from_the_base_model_card(tmp_path: Path) -> None:
    from ki_trainer.model_card import base_model_license

    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    assert base_model_license(str(tmp_path), None) == "apache-2.0"
    assert base_model_license(str(tmp_path / "none"), None) is None  # offline, no local card: none, as transformers


# ---------------------------------------------------------------- 6. mistakes named with the fix
def test_missing_teacher_or_student_directory_is_named(disk_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = _run_args(disk_models, out, dataset=disk_models["data"])
    missing = str(tmp_path / "teachers" / "teacher_9")
    assert main(["integrate", "--teachers", missing, *args[3:]]) == 2
    err = capsys.readouterr().err
    assert "Teacher 0: no such model directory" in err and missing in err and "Repo id" not in err
    args[args.index("--student") + 1] = "runs/my-student"  # Hub-id shaped, offline, not cached
    assert main(["integrate", *args]) == 2
    assert "--student: 'runs/my-student' is not a local directory" in capsys.readouterr().err


def test_teachers_as_one_string_in_a_run_file(disk_models: dict, tmp_path: Path) -> None:
    from ki_trainer.cli.integrate import teacher_specs

    assert [e["path"] for e in teacher_specs(str(disk_models["teacher_0"]))] == [str(disk_models["teacher_0"])]


def test_a_json_that_is_no_teachers_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    assert main(["integrate", "--teachers", str(config), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{config} is not a teachers file" in err and "give the directory itself" in err
