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
