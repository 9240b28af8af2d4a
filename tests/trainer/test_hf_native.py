"""Drop-in fidelity with Hugging Face conventions: the student's own label order, `labels` columns, the
user's collator / pre-tokenized ids / max_length, model_init + hyperparameter_search, and the model card."""

import json
import os

import pytest
import torch
import yaml
from conftest import TEACHER_SPLIT, make_rows, tiny_bert
from datasets import ClassLabel, Dataset
from transformers import DataCollatorWithPadding

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher

UNION = [label for labels in TEACHER_SPLIT for label in labels]  # alpha, beta, gamma, delta


def config(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                    save_strategy="no", per_device_train_batch_size=8, mc_samples=2, seed=0)
    defaults.update(kw)
    return KnowledgeIntegrationConfig(**defaults)


def trainer_for(tmp_path, tok, teachers, train, student=None, **kw):
    extra = {k: kw.pop(k) for k in ("eval_dataset", "data_collator", "model_init", "peft_config") if k in kw}
    return KnowledgeIntegrationTrainer(
        model=student if student is not None or "model_init" in extra else tiny_bert(4, len(tok), seed=3),
        args=config(tmp_path, **kw), teachers=teachers, train_dataset=train, processing_class=tok, **extra,
    )


# ---------------------------------------------------------------- the student's own label order
def test_student_naming_the_union_in_its_own_order_keeps_that_order(tmp_path, tok, teachers, unlabeled_train):
    order = ["delta", "alpha", "gamma", "beta"]
    student = tiny_bert(4, len(tok), labels=order, seed=3)
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train, student=student)
    assert trainer.label_space.labels == order
    assert [trainer.model.config.id2label[i] for i in range(4)] == order
    # teachers are mapped INTO the student's order: t0's (alpha, beta) are union ids (1, 3)
    assert trainer.label_space.teacher_to_union(0).tolist() == [1, 3]
    assert trainer.label_space.teacher_to_union(1).tolist() == [2, 0]
    # gold names are encoded in the student's order too, so metrics decode with the student's labels
    batch = trainer.data_collator([{"text": "apple", "label": "delta"}, {"text": "dill", "label": "beta"}])
    assert batch["labels"].tolist() == [0, 3]


def test_student_naming_other_labels_is_a_clear_error(tmp_path, tok, teachers, unlabeled_train):
    student = tiny_bert(4, len(tok), labels=["alpha", "beta", "gamma", "epsilon"], seed=3)
    with pytest.raises(ValueError, match=r"config.id2label names .*not in the student: \['delta'\].*not owned by any teacher: \['epsilon'\]"):
        trainer_for(tmp_path, tok, teachers, unlabeled_train, student=student)


def test_generic_student_labels_take_the_union_order(tmp_path, tok, teachers, unlabeled_train):
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train)
    assert [trainer.model.config.id2label[i] for i in range(4)] == UNION


def test_student_checkpoint_with_the_union_labels_keeps_order_and_head(tmp_path, tok, teachers, unlabeled_train):
    order = ["gamma", "delta", "alpha", "beta"]
    path = tmp_path / "student"
    saved = tiny_bert(4, len(tok), labels=order, seed=5)
    saved.save_pretrained(path)
    tok.save_pretrained(path)
    trainer = KnowledgeIntegrationTrainer(model=str(path), args=config(tmp_path), teachers=teachers,
                                          train_dataset=unlabeled_train)
    assert trainer.label_space.labels == order
    torch.testing.assert_close(trainer.model.classifier.weight, saved.classifier.weight)  # its head, not a new one


def test_classlabel_in_the_students_order_scores_like_names(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    order = sorted(UNION)  # a script's ClassLabel order: alpha, beta, delta, gamma
    student = tiny_bert(4, len(tok), labels=order, seed=3)
    class_ids = [order.index(label) for label in labeled_eval["label"]]
    as_ids = labeled_eval.map(lambda row: {"label": order.index(row["label"])}).cast_column("label", ClassLabel(names=order))
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train, student=student, strategy="entropy")
    by_ids, by_names = trainer.predict(as_ids), trainer.predict(labeled_eval)
    # gold ids are the script's own ClassLabel ids (the union's first-seen order would swap gamma/delta)
    assert by_ids.label_ids.tolist() == class_ids and by_names.label_ids.tolist() == class_ids
    assert by_ids.metrics["test_accuracy"] == pytest.approx(by_names.metrics["test_accuracy"])
    torch.testing.assert_close(torch.as_tensor(by_ids.predictions), torch.as_tensor(by_names.predictions))


# ---------------------------------------------------------------- drop-in data handling
def test_a_labels_column_gives_metrics(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train, strategy="entropy")
    renamed = labeled_eval.rename_column("label", "labels")
    metrics = trainer.evaluate(renamed)
    assert metrics["eval_accuracy"] == pytest.approx(trainer.evaluate(labeled_eval)["eval_accuracy"])
    as_ids = renamed.map(lambda row: {"labels": sorted(UNION).index(row["labels"])})
    as_ids = as_ids.cast_column("labels", ClassLabel(names=sorted(UNION)))
    assert trainer.evaluate(as_ids)["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_stock_collator_on_raw_text_says_what_to_do(tmp_path, tok, teachers, unlabeled_train):
    with pytest.raises(ValueError, match=r"DataCollatorWithPadding pads token ids.*tokenize it first.*drop data_collator="):
        trainer_for(tmp_path, tok, teachers, unlabeled_train, data_collator=DataCollatorWithPadding(tok))


def test_pretokenized_rows_and_stock_collator_are_used_as_they_are(tmp_path, tok, trained_teachers):
    own = [Teacher(model, tokenizer=own_tok, name=f"t{i}") for i, (model, own_tok) in enumerate(trained_teachers)]
    shared = Teacher(tiny_bert(2, len(tok), labels=["alpha", "beta"], seed=9), name="shared")
    rows = Dataset.from_list(make_rows(4, seed=3))
    data = rows.map(lambda b: tok(b["text"], truncation=True, max_length=4), batched=True).rename_column("label", "labels")
    trainer = trainer_for(tmp_path, tok, own + [shared], data, data_collator=DataCollatorWithPadding(tok), max_steps=2)
    batch = trainer.data_collator([data[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 4)  # the user's max_length=4, not re-tokenized from the text
    assert batch["input_ids"].tolist() == [data[i]["input_ids"] for i in range(3)]
    assert batch["labels"].tolist() == [UNION.index(data[i]["labels"]) for i in range(3)]
    # teachers with their own tokenizer read the raw text; the one sharing the student's reads the same ids
    assert trainer.data_collator.teacher_input_key(2) is None
    key = trainer.data_collator.teacher_input_key(0)
    assert batch["teacher_inputs"][key]["input_ids"].shape[1] > 4
    trainer.train()
    assert trainer.state.global_step == 2
    _, body = _card(trainer.write_model_card(str(tmp_path / "card")))
    assert "- max_length: 4 (longest pre-tokenized training row; the user's own truncation)" in body


def test_pretokenized_rows_without_text_are_refused_when_a_teacher_needs_text(tmp_path, tok, trained_teachers):
    own = [Teacher(model, tokenizer=own_tok, name=f"t{i}") for i, (model, own_tok) in enumerate(trained_teachers)]
    data = Dataset.from_list(make_rows(2, seed=3)).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    with pytest.raises(ValueError, match=r"pre-tokenized without its text column.*\['t0', 't1'\].*Keep the text column"):
        trainer_for(tmp_path, tok, own, data)


def test_pretokenized_rows_without_text_work_when_teachers_share_the_tokenizer(tmp_path, tok, teachers):
    data = Dataset.from_list(make_rows(2, seed=3)).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    trainer = trainer_for(tmp_path, tok, teachers, data, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


def test_pretokenized_rows_longer_than_max_length_are_refused(tmp_path, tok, teachers):
    data = Dataset.from_list(make_rows(2, seed=3)).map(lambda b: tok(b["text"]), batched=True)
    trainer = trainer_for(tmp_path, tok, teachers, data, max_length=4)
    with pytest.raises(ValueError, match=r"Pre-tokenized row 0 has \d+ tokens but the student reads at most 4"):
        trainer.data_collator([data[0]])


# ---------------------------------------------------------------- model_init and hyperparameter_search
def test_model_init_and_optuna_search_rebuild_the_student_and_keep_teachers(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    pytest.importorskip("optuna", reason="optuna is in the dev extra (setup.cfg)")
    built = []

    def model_init(trial=None):
        built.append(trial)
        return tiny_bert(4, len(tok), seed=3)

    teacher_weights = [torch.cat([p.flatten() for p in t.model.parameters()]).clone() for t in teachers]
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train, model_init=model_init, max_steps=2,
                          eval_dataset=labeled_eval, strategy="entropy")
    assert len(built) == 1  # one student at construction (fixes the labels), not two
    seen, within = [], []

    def hp_space(trial):
        return {"kd_temperature": trial.suggest_float("kd_temperature", 0.5, 4.0),
                "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
                "within_teacher_kd": trial.suggest_float("within_teacher_kd", 0.1, 2.0)}

    def objective(metrics):
        seen.append((trainer.args.kd_temperature, trainer.strategy.options.temperature, id(trainer.model)))
        within.append((trainer.args.within_teacher_kd, trainer.strategy.options.within_teacher_weight,
                       trainer.scoring.within_teacher_kd))
        return metrics["eval_loss"]

    best = trainer.hyperparameter_search(hp_space=hp_space, backend="optuna", n_trials=2, direction="minimize",
                                         compute_objective=objective)
    assert len(built) == 3 and all(trial is not None for trial in built[1:])  # a fresh student per trial
    assert len(seen) == 2 and all(args_t == strategy_t for args_t, strategy_t, _ in seen)  # strategy follows the trial
    assert seen[0][0] != seen[1][0] and seen[0][2] != seen[1][2]
    assert all(a == b == c for a, b, c in within)  # the trial's within_teacher_kd reaches the loss and the scoring
    assert set(best.hyperparameters) == {"kd_temperature", "learning_rate", "within_teacher_kd"}
    for teacher, before in zip(teachers, teacher_weights):
        torch.testing.assert_close(torch.cat([p.flatten() for p in teacher.model.parameters()]), before)


def test_model_init_student_with_another_order_than_the_first_is_refused(tmp_path, tok, teachers, unlabeled_train):
    orders = iter([UNION, list(reversed(UNION))])
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train, max_steps=1,
                          model_init=lambda: tiny_bert(4, len(tok), labels=next(orders), seed=3))
    assert trainer.label_space.labels == UNION
    with pytest.raises(ValueError, match="model_init returned a student labelled"):
        trainer.train()


# ---------------------------------------------------------------- the model card
def _card(path):
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_save_model_writes_the_card_with_hub_ids_and_no_local_paths(tmp_path, tok, unlabeled_train, labeled_eval):
    # A student directory that ki_trainer.pretrained assembled offline records the Hub id it reproduces.
    student_dir = tmp_path / "assembled" / "paraphrase-MiniLM-L3-v2"
    tiny_bert(2, len(tok), seed=3).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    (student_dir / ".ki_trainer_assembled.json").write_text(json.dumps({"model": "sentence-transformers/paraphrase-MiniLM-L3-v2"}))
    teacher_dir = tmp_path / "teachers" / "fruit-teacher"
    tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20).save_pretrained(teacher_dir)
    teachers = [Teacher(str(teacher_dir), language="en"),
                Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=21), name="spice", language="it")]
    trainer = KnowledgeIntegrationTrainer(
        model=str(student_dir), args=config(tmp_path, max_steps=2, max_length=24), teachers=teachers,
        train_dataset=unlabeled_train, eval_dataset=labeled_eval,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    meta, body = _card(tmp_path / "saved" / "README.md")
    assert meta["base_model"] == "sentence-transformers/paraphrase-MiniLM-L3-v2"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["language"] == ["en", "it"] and "knowledge-integration" in meta["tags"] and "muki" in meta["tags"]
    results = meta["model-index"][0]["results"][0]
    values = {m["type"]: m["value"] for m in results["metrics"]}
    assert values["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    assert results["task"]["type"] == "text-classification"
    saved = f'model="{tmp_path}/saved"'  # the usage snippet loads the folder the model was saved to (no Hub repo)
    assert body.count(saved) == 1 and str(tmp_path) not in body.replace(saved, "")
    assert str(tmp_path) not in json.dumps(meta)  # otherwise never a local path
    assert "| fruit-teacher | local model `fruit-teacher` | BertForSequenceClassification | alpha, beta | en |" in body
    assert "| spice | local model `spice` | BertForSequenceClassification | gamma, delta | it |" in body
    assert f'pipeline("text-classification", {saved})' in body
    assert "### Strategy and router" in body and "- strategy: `muki`" in body and "`mc_samples`: 2" in body
    assert f"- training rows (unlabeled text): {len(unlabeled_train)}" in body and "- max_length: 24" in body
    from ki_trainer import __version__

    assert f"- ki-trainer {__version__}" in body
    for citation in ("2210.05230", "2112.07327", "@software{ki_trainer"):
        assert citation in body
    assert "MergeDistill" not in body  # a classifier's card cites what made it


def test_card_strategy_block_reads_router_fields_the_config_has(tmp_path, tok, teachers, unlabeled_train):
    trainer = trainer_for(tmp_path, tok, teachers, unlabeled_train)
    trainer.args.router = "mc_entropy"  # a later config field: the card reads whatever exists
    trainer.args.router_neighbours = 8
    path = trainer.write_model_card(str(tmp_path / "card"))
    _, body = _card(path)
    assert "- router: `mc_entropy`" in body and "`router_neighbours`: 8" in body


def test_hub_ids_for_cards(tmp_path):
    from ki_trainer.pretrained.resolve import hub_id_of

    assert hub_id_of("bert-base-uncased") == "bert-base-uncased"
    assert hub_id_of("org/model") == "org/model"
    assert hub_id_of("paraphrase-MiniLM-L3-v2") == "sentence-transformers/paraphrase-MiniLM-L3-v2"
    assert hub_id_of(str(tmp_path)) is None  # a plain local directory
    assert hub_id_of("/no/such/dir") is None and hub_id_of("./outputs/teacher_0") is None
    (tmp_path / ".ki_trainer_assembled.json").write_text(json.dumps({"model": "intfloat/multilingual-e5-small"}))
    assert hub_id_of(str(tmp_path)) == "intfloat/multilingual-e5-small"
