"""Integration really merges knowledge: two teachers trained on disjoint halves of a learnable task
become one student that beats chance on EVERY class, without seeing a single gold label."""

import pytest
from conftest import build_tokenizer, tiny_bert

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher


@pytest.mark.parametrize("strategy, options", [("muki", {}), ("vanilla_kd", {})])
def test_student_learns_every_class_of_both_teachers(tmp_path, trained_teachers, unlabeled_train, labeled_eval, strategy, options):
    tok = build_tokenizer()
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        num_train_epochs=15,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        mc_samples=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **options,
    )
    trainer = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tok), seed=3),
        args=args,
        teachers=teachers,
        train_dataset=unlabeled_train,  # text only: no labels
        processing_class=tok,
    )
    assert "label" not in unlabeled_train.column_names
    trainer.train()
    output = trainer.predict(labeled_eval)
    predictions, labels = output.predictions.argmax(-1), output.label_ids
    per_class = [float((predictions[labels == c] == c).mean()) for c in range(4)]
    assert min(per_class) >= 0.5, per_class  # chance is 0.25
    assert output.metrics["test_accuracy"] >= 0.8
    if strategy == "muki":
        assert output.metrics["test_teacher_selection_accuracy"] >= 0.9


def test_routed_teacher_accuracy_is_the_most_certain_teachers_accuracy(tmp_path, trained_teachers, labeled_eval):
    """eval reports the accuracy of the hard-routed teacher ensemble: recomputed here by hand from the teachers."""
    import torch

    from ki_trainer.numerics import certainty_from_logits

    tok = build_tokenizer()
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), strategy="entropy", report_to=[], use_cpu=True,
                                      per_device_eval_batch_size=7, disable_tqdm=True, save_strategy="no")
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                          processing_class=tok)
    metrics = trainer.evaluate(labeled_eval)
    texts = list(labeled_eval["text"])
    union = trainer.label_space.labels
    with torch.no_grad():
        logits = [model.eval()(**own(texts, padding=True, return_tensors="pt")).logits for model, own in trained_teachers]
    chosen = torch.stack([certainty_from_logits(x) for x in logits], 1).argmax(1)
    predicted = [union.index(teachers[t].labels[int(logits[t][i].argmax())]) for i, t in enumerate(chosen.tolist())]
    gold = [union.index(label) for label in labeled_eval["label"]]
    expected = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert metrics["eval_routed_teacher_accuracy"] == pytest.approx(expected)
