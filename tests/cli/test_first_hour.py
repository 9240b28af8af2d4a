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

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def disk_models(tmp_path_factory) -> dict:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    header, body = text[len("---\n"):].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _run_args(disk_models: dict, out: Path, **extra) -> list[str]:
    options = {
        "student": str(disk_models["student"]), "mc_samples": 2, "signal_source": "cached", "max_length": 16,
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


def _run_snippet(body: str, cwd: Path) -> str:
    """Run the card's usage snippet as a user would paste it (another directory, offline); return the snippet."""
    snippet = body.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=cwd, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = eval(result.stdout.strip())  # noqa: S307 - the snippet prints pipeline's list of dicts
    assert predicted[0]["label"] in {label for split in TEACHER_SPLIT for label in split}
    return snippet


def test_card_usage_snippet_runs_as_written(integrated: Path, tmp_path: Path) -> None:
    _, body = _card(integrated / "README.md")
    snippet = _run_snippet(body, tmp_path)
    assert f'model="{integrated}"' in snippet  # the folder the model was saved to, not its base name


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
    assert "`signal_source`" in plain and "teacher_signals" not in plain  # the setting, not its deprecated alias
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
    from ki_trainer.cli.integrate import build_parser, teacher_specs

    run = tmp_path / "run.yaml"
    run.write_text(f"teachers: {disk_models['teacher_0']}\noutput_dir: {tmp_path / 'o'}\n")
    script, _ = build_parser().parse([str(run)])
    assert [e["path"] for e in teacher_specs(script.teachers)] == [str(disk_models["teacher_0"])]  # not its characters


def test_a_json_that_is_no_teachers_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    assert main(["integrate", "--teachers", str(config), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{config} is not a teachers file" in err and "give the directory itself" in err


# ---------------------------------------------------------------- 7. a fast start, and `ki-trainer env`
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["integrat"], ["launch-config"]])
def test_overview_version_and_typos_import_no_ml_stack(argv: list) -> None:
    code = ("import sys\nfrom ki_trainer.cli import main\nstatus = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\nraise SystemExit(status)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr[-2000:]  # each of them costs seconds at start-up
    assert result.returncode == (2 if argv == ["integrat"] else 0)


def test_public_names_import_lazily_and_all_resolve() -> None:
    import ki_trainer

    for name in ki_trainer.__all__:
        assert getattr(ki_trainer, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Trainerr'"):
        ki_trainer.Trainerr  # noqa: B018


def test_subpackages_and_earlier_module_paths_still_import() -> None:
    code = ("import ki_trainer; print(ki_trainer.routing.__name__);"
            "from ki_trainer.merge_distill.cli import build_parser, MergeDistillArguments;"
            "from ki_trainer.cli.merge_distill import build_parser as b; assert b is build_parser; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ki_trainer.routing", "ok"]


def test_env_reports_versions_devices_and_accelerate_config(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import torch
    import transformers

    from ki_trainer import __version__

    assert f"- ki-trainer version: {__version__}" in out and f"- transformers version: {transformers.__version__}" in out
    assert f"- torch version: {torch.__version__}" in out and "- accelerate version:" in out
    assert f"- CUDA available: {torch.cuda.is_available()}" in out and "- accelerate config" in out
    assert main(["env", "--bogus"]) == 2 and "takes no options" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. TRL / transformers habits
def test_trl_style_config_and_option_names(disk_models: dict, tmp_path: Path) -> None:
    from ki_trainer.cli.integrate import build_parser

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model_name_or_path": "org/student", "dataset_name": "org/data",
                                   "teachers": ["t0"], "output_dir": str(tmp_path / "o")}))
    script, args = build_parser().parse(["--config", str(run), "--learning_rate", "1e-4"])
    assert (script.student, script.dataset, script.teachers) == ("org/student", "org/data", ["t0"])
    assert args.learning_rate == 1e-4
    script, _ = build_parser().parse([f"--config={run}", "--model_name_or_path", "org/other", "--dataset_name", "x"])
    assert (script.student, script.dataset) == ("org/other", "x")  # flags override the file, under either name
    from ki_trainer.cli.arguments import RunFileError

    with pytest.raises(RunFileError, match="Two run files"):
        build_parser().parse([str(run), "--config", str(run)])


def test_lora_student_from_the_command_line(disk_models: dict, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    args = _run_args(disk_models, out, dataset=disk_models["data"], use_peft=True, lora_r=4, lora_alpha=8)
    assert main(["integrate", *args, "--lora_target_modules", "query", "key"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and sorted(adapter["target_modules"]) == ["key", "query"]
    meta, body = _card(out / "README.md")
    assert meta["library_name"] == "peft" and re.search(r"^- peft \d", body, re.M)  # peft used: its version listed
    _run_snippet(body, tmp_path)  # the adapter's usage snippet runs as written too
    from ki_trainer.cli.errors import CommandError
    from ki_trainer.cli.integrate import build_parser, lora_config

    script, _ = build_parser().parse(["--lora_target_modules", "query", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(CommandError, match="--use_peft is not"):
        lora_config(script)


# ---------------------------------------------------------------- 6. data and split mistakes
def test_split_spec_smaller_than_the_label_set(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    tiny_bert(2, 30).save_pretrained(base)  # never loaded: the spec is checked before any model
    assert main(["train-teachers", "--model_name_or_path", str(base), "--split_spec", "2x3",
                 "--output_dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "--split_spec '2x3'" in err and "there are 20" in err and "2x10" in err and "4x5" in err
    assert not (tmp_path / "t" / "teacher_0").exists()


def test_latin1_byte_in_a_data_file_names_file_and_line(disk_models: dict, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"text": "plain", "label": "admin", "split": "train"}).encode()
    rows.write_bytes(good + b"\n" + good.replace(b"plain", b"caf\xe9") + b"\n")  # latin-1 e-acute on line 2
    assert main(["train-teachers", "--data_path", str(rows), "--output_dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert f"{rows}, line 2, byte " in err and "0xe9 is not UTF-8" in err and "iconv -f latin1" in err
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        text = (disk_models["data"] / f"{split}.json").read_bytes()
        if split == "validation":
            lines = text.split(b"\n")
            lines[3] = lines[3].replace(b'"text": "', b'"text": "\xe9t\xe9 ')
            text = b"\n".join(lines)
        (data / f"{split}.json").write_bytes(text)
    assert main(["integrate", *_run_args(disk_models, tmp_path / "o", dataset=data)]) == 2
    assert f"{data / 'validation.json'}, line 4, byte " in capsys.readouterr().err


# ---------------------------------------------------------------- 8. train-teachers: no optimizer checkpoints, cards
def test_train_teachers_writes_cards_and_no_checkpoints_unless_asked(tmp_path: Path) -> None:
    from conftest import build_tiny_base_model

    base = build_tiny_base_model(tmp_path / "base")
    argv = ["--model_name_or_path", str(base), "--max_train_per_class", "2", "--max_length", "16",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--use_cpu", "true",
            "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "steps", "--save_steps", "2"]
    out = tmp_path / "teachers"
    assert main(["train-teachers", *argv, "--split_spec", "2x10", "--output_dir", str(out)]) == 0
    assert not (out / "checkpoints").exists()  # the Trainer would have left checkpoint-2, -4 (optimizer state)
    summary = json.loads((out / "teachers.json").read_text())
    for record in summary["teachers"]:
        meta, body = _card(out / record["path"] / "README.md")
        assert "generated_from_trainer" in meta["tags"] and "ki-trainer-teacher" in meta["tags"]
        accuracy = meta["model-index"][0]["results"][0]["metrics"][0]
        assert accuracy["type"] == "accuracy" and accuracy["value"] == pytest.approx(record["val_accuracy"], abs=1e-4)
        assert meta["datasets"] == ["debian_sections20"] and str(tmp_path) not in json.dumps(meta)
    kept = tmp_path / "kept"
    assert main(["train-teachers", *argv, "--split_spec", "1x20", "--output_dir", str(kept),
                 "--keep_checkpoints", "true"]) == 0
    assert list((kept / "checkpoints" / "teacher_0").glob("checkpoint-*/optimizer.pt"))  # asked for: kept


def test_a_dataset_without_a_test_split(disk_models: dict, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.json").write_bytes((disk_models["data"] / f"{split}.json").read_bytes())
    assert main(["integrate", *_run_args(disk_models, tmp_path / "o", dataset=data)]) == 2
    err = capsys.readouterr().err
    assert "integrate needs train, validation and test (missing: ['test'])" in err and "test.json" in err


# ---------------------------------------------------------------- 9. docs: whole sentences, no raw Sphinx roles
def test_launch_config_listing_gives_whole_sentences(capsys) -> None:
    from ki_trainer.cli.launch_config import available, describe

    assert main(["launch-config"]) == 0
    listing = capsys.readouterr().out
    for name, path in available().items():
        header = " ".join(" ".join(line.lstrip("# ").split()) for line in path.read_text().splitlines()
                          if line.startswith("#"))
        sentence = describe(path)
        assert sentence.endswith(".") and header.startswith(sentence) and f"{name:18s}{sentence}\n" in listing, name
    assert "Teachers are kept whole on\n" not in listing  # was cut at the end of the file's first line


def test_docs_hook_renders_sphinx_roles_as_code() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = "<p>A :class:<code>Teacher</code> and :func:<code>~ki_trainer.data.load_debian_sections</code>.</p>"
    assert hooks.on_page_content(html, None, None, None) == "<p>A <code>Teacher</code> and <code>load_debian_sections</code>.</p>"


# ---------------------------------------------------------------- 11. the routing report
def test_integrate_writes_a_routing_report_the_card_shows(integrated: Path, capsys) -> None:
    report = json.loads((integrated / "routing_report.json").read_text())
    test_results = json.loads((integrated / "test_results.json").read_text())
    assert report["grouped_by"] == "gold label" and report["teachers"] == ["teacher_0", "teacher_1"]
    assert sum(sum(per_teacher.values()) for per_teacher in report["routed"].values()) == report["rows"] == 24
    assert report["owners"]["alpha"] == ["teacher_0"] and report["owners"]["delta"] == ["teacher_1"]
    accuracy = report["accuracy"]  # the same numbers evaluation reported, from one more pass over the test split
    assert accuracy["student"] == pytest.approx(test_results["test_accuracy"], abs=1e-6)
    assert accuracy["routed teacher ensemble"] == pytest.approx(test_results["test_routed_teacher_accuracy"], abs=1e-6)
    assert accuracy["routing (to an owner of the gold label)"] == pytest.approx(
        test_results["test_teacher_selection_accuracy"], abs=1e-6)
    assert sum(report["margins"]["counts"]) == 24 and report["margins"]["median"] >= 0
    assert (integrated / "routing_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, body = _card(integrated / "README.md")
    assert "![Routing report" in body and "(routing_report.png)" in body
    (integrated / "routing_report.png").unlink()
    assert main(["report", str(integrated)]) == 0  # the table, and the PNG drawn again from the JSON
    out = capsys.readouterr().out
    assert "routed most to" in out and f"student: {accuracy['student']:.4f}" in out
    assert (integrated / "routing_report.png").is_file()
    assert main(["report", str(integrated / "nowhere")]) == 2


def test_routing_report_without_gold_labels_groups_by_the_students_prediction(
        tmp_path: Path, tokenizer, trained_teachers, unlabeled_train) -> None:
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
    from ki_trainer.report import routing_report

    teachers = [Teacher(model, tokenizer=tok) for model, tok in trained_teachers]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, max_length=16,
                                      mc_samples=2, max_steps=1, per_device_train_batch_size=8, save_strategy="no")
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tokenizer), seed=3), args=args, teachers=teachers,
                                          train_dataset=unlabeled_train, processing_class=tokenizer)
    trainer.train()
    report = routing_report(trainer, unlabeled_train.select(range(10)))
    assert report["grouped_by"] == "student prediction" and "accuracy" not in report  # no labels: no accuracy
    assert report["rows"] == 10 == sum(sum(routed.values()) for routed in report["routed"].values())
    plain = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tokenizer), seed=3), teachers=teachers, train_dataset=unlabeled_train,
        args=KnowledgeIntegrationConfig(output_dir=str(tmp_path / "p"), strategy="vanilla_kd", report_to="none",
                                        use_cpu=True, max_length=16), processing_class=tokenizer)
    assert routing_report(plain, unlabeled_train) is None  # vanilla KD routes nothing: nothing to report


@pytest.mark.parametrize("router", [None, "consensus"])
def test_routing_report_of_a_trainer_that_has_not_trained_fits_its_router_first(
        tmp_path: Path, tokenizer, trained_teachers, unlabeled_train, router) -> None:
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
    from ki_trainer.report import routing_report

    teachers = [Teacher(model, tokenizer=tok) for model, tok in trained_teachers]
    pool = unlabeled_train.map(lambda row, i: {"id": str(i)}, with_indices=True)
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, max_length=16,
                                      signal_source="cached", router=router, save_strategy="no")
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tokenizer), seed=3), args=args, teachers=teachers,
                                          train_dataset=pool, processing_class=tokenizer)
    report = routing_report(trainer, pool.select(range(10)))  # no train(), no evaluate() before
    assert report["rows"] == 10 and trainer.router.fitted
