"""KnowledgeIntegrationTrainer as a drop-in Trainer: construction, GA, columns, eval, checkpoints, saving."""

import json
import os

import pytest
import torch
from conftest import TEACHER_SPLIT, ki_config, make_ki_trainer, make_rows, tiny_bert
from datasets import ClassLabel, Dataset
from transformers import AutoModelForSequenceClassification, HfArgumentParser, TrainingArguments, pipeline

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher

UNION = [label for labels in TEACHER_SPLIT for label in labels]


def config(tmp_path, **kw):  # this file's runs draw K=4 MC samples
    return ki_config(tmp_path, **{"mc_samples": 4, **kw})


def make_trainer(tmp_path, tok, teachers, train, student=None, **kw):
    return make_ki_trainer(tmp_path, tok, teachers, train, student, **{"mc_samples": 4, **kw})


# ---------------------------------------------------------------- construction and errors
def test_student_with_wrong_num_labels_is_rejected(tmp_path, tok, teachers, unlabeled_train):
    with pytest.raises(ValueError, match="student has 3 output classes but the teachers' union has 4"):
        make_trainer(tmp_path, tok, teachers, unlabeled_train, student=tiny_bert(3, len(tok)))


def test_teacher_without_label_names_is_rejected(tok):
    with pytest.raises(ValueError, match="has no label names"):
        Teacher(tiny_bert(2, len(tok)))
    with pytest.raises(ValueError, match="2 output classes but 3 label names"):
        Teacher(tiny_bert(2, len(tok)), labels=["a", "b", "c"])


def test_dataset_errors(tmp_path, tok, teachers):
    with pytest.raises(ValueError, match="train dataset is empty"):
        make_trainer(tmp_path, tok, teachers, Dataset.from_dict({"text": []}))
    with pytest.raises(ValueError, match="no text column 'text'.*sentence"):
        make_trainer(tmp_path, tok, teachers, Dataset.from_dict({"sentence": ["x"]}))


def test_missing_pad_token_is_an_early_error(tmp_path, tok, teachers, unlabeled_train):
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        make_trainer(tmp_path, tok, teachers, unlabeled_train)


def test_max_length_beyond_positions_is_rejected(tmp_path, tok, teachers, unlabeled_train):
    with pytest.raises(ValueError, match="max_length=100 exceeds what the student can read \\(64 tokens\\)"):
        make_trainer(tmp_path, tok, teachers, unlabeled_train, max_length=100)


def test_config_validation_and_argparse(tmp_path):
    with pytest.raises(ValueError, match="Unknown integration strategy 'magic'"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), strategy="magic")
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), mc_samples=0)
    (args,) = HfArgumentParser(KnowledgeIntegrationConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--strategy", "uhc", "--mc_samples", "8", "--margin_reweighting", "false"]
    )
    assert (args.strategy, args.mc_samples, args.margin_reweighting) == ("uhc", 8, False)


def test_plain_training_arguments_are_upgraded(tmp_path, tok, teachers, unlabeled_train):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3)
    trainer = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tok)), args=args, teachers=teachers, train_dataset=unlabeled_train, processing_class=tok
    )
    assert isinstance(trainer.args, KnowledgeIntegrationConfig)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.strategy == "muki"


def test_student_from_path_gets_union_labels(tmp_path, tok, teachers, unlabeled_train):
    path = tmp_path / "base"
    tiny_bert(7, len(tok)).save_pretrained(path)  # a classifier with another head size: re-headed
    tok.save_pretrained(path)
    trainer = KnowledgeIntegrationTrainer(
        model=str(path), args=config(tmp_path), teachers=teachers, train_dataset=unlabeled_train
    )
    assert trainer.model.config.num_labels == 4
    assert [trainer.model.config.id2label[i] for i in range(4)] == UNION
    assert not any(p.requires_grad for t in trainer.teachers for p in t.model.parameters())
    assert all(not t.model.training for t in trainer.teachers)
    torch.manual_seed(12345)  # whatever the ambient RNG state, args.seed decides the new head
    again = KnowledgeIntegrationTrainer(
        model=str(path), args=config(tmp_path), teachers=teachers, train_dataset=unlabeled_train
    )
    torch.testing.assert_close(again.model.classifier.weight, trainer.model.classifier.weight)


# ---------------------------------------------------------------- gradient accumulation
def _one_update(tmp_path, tok, trained_teachers, batch_size, accumulation, name):
    student = tiny_bert(4, len(tok), seed=3, dropout=0.0)
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    data = Dataset.from_list([{"text": r["text"]} for r in make_rows(2, seed=1)])  # 8 rows
    trainer = make_trainer(
        tmp_path / name,
        tok,
        teachers,
        data,
        student=student,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        strategy="entropy",  # deterministic signals: both runs see identical targets
    )
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), loss


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, tok, trained_teachers):
    """8 x GA1 and 4 x GA2 must give the same update and the same logged loss (SGD: no Adam rescaling)."""
    params_a, loss_a = _one_update(tmp_path, tok, trained_teachers, 8, 1, "a")
    params_b, loss_b = _one_update(tmp_path, tok, trained_teachers, 4, 2, "b")
    start = torch.cat([p.detach().flatten() for p in tiny_bert(4, len(tok), seed=3, dropout=0.0).parameters()])
    assert (params_a - start).abs().max() > 1e-4, "the update must be non-trivial for the test to mean anything"
    torch.testing.assert_close(params_a, params_b, atol=1e-6, rtol=1e-4)
    assert loss_a == pytest.approx(loss_b, rel=1e-3)


# ---------------------------------------------------------------- columns, evaluation, logging
def test_extra_columns_survive_and_gold_labels_stay_out_of_the_loss(tmp_path, tok, teachers):
    rows = make_rows(4, seed=2)
    data = Dataset.from_list([{"id": f"r{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)])
    trainer = make_trainer(tmp_path, tok, teachers, data, max_steps=1)
    train_loader = trainer.get_train_dataloader()
    batch = next(iter(train_loader))
    assert "input_ids" in batch and "labels" not in batch  # text was tokenized; gold labels never reach training
    trainer.train()
    # Same teachers and student, wrong gold labels: identical loss, because gold labels are never used.
    shuffled = data.map(lambda row: {"label": "alpha"})
    inputs = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(4)]))
    inputs_wrong = trainer._prepare_inputs(trainer.data_collator([shuffled[i] for i in range(4)]))
    trainer.model.eval()
    torch.manual_seed(0)
    loss = trainer.compute_loss(trainer.model, inputs)
    torch.manual_seed(0)
    assert trainer.compute_loss(trainer.model, inputs_wrong).item() == pytest.approx(loss.item())


def test_evaluate_reports_integration_metrics_and_training_logs_ki_stats(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    trainer = make_trainer(tmp_path, tok, teachers, unlabeled_train, eval_dataset=labeled_eval, max_steps=4, logging_steps=2)
    trainer.train()
    metrics = trainer.evaluate()
    for key in ["eval_loss", "eval_accuracy", "eval_macro_f1", "eval_accuracy_t0", "eval_accuracy_t1", "eval_teacher_selection_accuracy"]:
        assert key in metrics and 0.0 <= metrics[key] < float("inf"), key
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(
        k in logged[0] for k in ["kd_divergence", "mean_margin", "certainty_t0", "selection_share_t1"]
    )
    assert logged[0]["selection_share_t0"] + logged[0]["selection_share_t1"] == pytest.approx(1.0)


def test_evaluate_without_gold_labels_reports_the_ki_loss(tmp_path, tok, teachers, unlabeled_train):
    trainer = make_trainer(tmp_path, tok, teachers, unlabeled_train, eval_dataset=unlabeled_train.select(range(8)))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_accuracy" not in metrics


def test_user_metrics_are_merged(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    trainer = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tok)),
        args=config(tmp_path, strategy="vanilla_kd"),
        teachers=teachers,
        train_dataset=unlabeled_train,
        eval_dataset=labeled_eval,
        processing_class=tok,
        compute_metrics=lambda p: {"n_eval": float(len(p.label_ids))},
    )
    metrics = trainer.evaluate()
    assert metrics["eval_n_eval"] == len(labeled_eval) and "eval_accuracy" in metrics
    assert "eval_teacher_selection_accuracy" not in metrics  # vanilla KD scores no certainty


def test_classlabel_ids_are_mapped_by_name_not_position(tmp_path, tok, teachers, unlabeled_train, labeled_eval):
    reversed_names = list(reversed(UNION))
    as_ids = labeled_eval.map(lambda row: {"label": reversed_names.index(row["label"])})
    as_ids = as_ids.cast_column("label", ClassLabel(names=reversed_names))
    trainer = make_trainer(tmp_path, tok, teachers, unlabeled_train, strategy="entropy")
    by_name = trainer.evaluate(labeled_eval)
    by_classlabel = trainer.evaluate(as_ids)
    assert by_name["eval_accuracy"] == pytest.approx(by_classlabel["eval_accuracy"])
    assert by_name["eval_accuracy_t0"] == pytest.approx(by_classlabel["eval_accuracy_t0"])


# ---------------------------------------------------------------- checkpoints and saving
def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path, tok, teachers, unlabeled_train):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    full = make_trainer(tmp_path / "full", tok, teachers, unlabeled_train, **common)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", tok, teachers, unlabeled_train, **common)
    resumed.train()  # writes checkpoint-2 and checkpoint-4
    checkpoint = os.path.join(resumed.args.output_dir, "checkpoint-2")
    again = make_trainer(tmp_path / "resumed", tok, teachers, unlabeled_train, **common)
    again.train(resume_from_checkpoint=checkpoint)
    assert again.state.global_step == 4
    torch.testing.assert_close(_weights(again.model), _weights(full.model))


def test_saved_student_reloads_with_plain_transformers_and_pipeline(tmp_path, tok, teachers, unlabeled_train):
    trainer = make_trainer(tmp_path, tok, teachers, unlabeled_train, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert [model.config.id2label[i] for i in range(4)] == UNION
    assert model.config.label2id == {label: i for i, label in enumerate(UNION)}
    classify = pipeline("text-classification", model=str(tmp_path / "student"), device="cpu")
    result = classify("apple and banana")
    assert result[0]["label"] in UNION
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["id2label"]["3"] == "delta"


def test_model_card_names_teachers_labels_and_settings(tmp_path, tok, teachers, unlabeled_train):
    trainer = make_trainer(tmp_path, tok, teachers, unlabeled_train, max_steps=1, strategy="muki", selection="hard")
    trainer.train()
    trainer.create_model_card(model_name="merged-student")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "knowledge-integration" in card and "- muki" in card  # tags in the metadata header
    assert "| t0 |" in card and "alpha, beta" in card and "gamma, delta" in card
    assert "`selection`: hard" in card and "without gold labels" in card
    assert "`certainty_normalization`: none" in card


def test_length_grouped_sampling_keeps_its_length_column(tmp_path, tok, teachers):
    rows = make_rows(6, seed=5)
    data = Dataset.from_list([{"text": r["text"], "length": len(r["text"].split())} for r in rows])
    trainer = make_trainer(tmp_path, tok, teachers, data, max_steps=2, train_sampling_strategy="group_by_length")
    trainer.train()
    assert trainer.state.global_step == 2
