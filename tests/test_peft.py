"""A LoRA student (peft) trains through the KI trainer; merged, it reloads as a plain classifier."""

import torch
from conftest import build_tokenizer, tiny_bert
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher


def test_lora_student(tmp_path, trained_teachers, unlabeled_train):
    tok = build_tokenizer()
    base = tiny_bert(4, len(tok), seed=3)
    frozen_before = base.bert.embeddings.word_embeddings.weight.detach().clone()
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    student = get_peft_model(base, lora)
    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=16, learning_rate=1e-2,
        mc_samples=4, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )
    trainer = KnowledgeIntegrationTrainer(model=student, args=args, teachers=teachers, train_dataset=unlabeled_train,
                                          processing_class=tok)
    trainer.train()
    assert torch.equal(base.bert.embeddings.word_embeddings.weight, frozen_before)  # base stays frozen
    assert any(not torch.equal(p, lora_before[n]) for n, p in student.named_parameters() if "lora_B" in n)

    merged = student.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.id2label == {0: "alpha", 1: "beta", 2: "gamma", 3: "delta"}
    inputs = tok(["apple banana of the", "dill grape"], padding=True, return_tensors="pt")
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, merged(**inputs).logits)
