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


# ---------------------------------------------------------------- peft_config= on the trainer
import os  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from peft import AutoPeftModelForSequenceClassification, PeftModel  # noqa: E402
from transformers import pipeline  # noqa: E402

from ki_trainer.peft_support import label_kwargs  # noqa: E402
from ki_trainer.querying import deterministic_logits, mc_dropout_probs, query_teachers  # noqa: E402

UNION = ["alpha", "beta", "gamma", "delta"]


def _peft_trainer(tmp_path, trained_teachers, unlabeled_train, **kw):
    tok = build_tokenizer()
    base_dir = str(tmp_path / "base")
    tiny_bert(2, len(tok), seed=3).save_pretrained(base_dir)  # a 2-class base: the union needs 4
    tok.save_pretrained(base_dir)
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=16, learning_rate=1e-2,
        mc_samples=2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", **kw,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])  # no task_type: SEQ_CLS is implied
    trainer = KnowledgeIntegrationTrainer(model=base_dir, args=args, teachers=teachers, train_dataset=unlabeled_train,
                                          peft_config=lora)
    return trainer, tok


def test_peft_config_wraps_the_student_and_the_adapter_reloads_with_its_labels(tmp_path, trained_teachers, unlabeled_train):
    trainer, tok = _peft_trainer(tmp_path, trained_teachers, unlabeled_train)
    assert isinstance(trainer.model, PeftModel)
    head = trainer.model.base_model.model.classifier
    assert any(p.requires_grad for p in head.parameters())  # the union head trains (modules_to_save)
    trainer.train()
    out = str(tmp_path / "adapter")
    trainer.save_model(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "ki_labels.json", "README.md"} <= set(os.listdir(out))
    assert "model.safetensors" not in os.listdir(out)  # an adapter, not the full model

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out, **label_kwargs(out)).eval()
    assert [reloaded.config.id2label[i] for i in range(4)] == UNION
    inputs = tok(["apple banana of the", "dill grape"], padding=True, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trainer.model(**inputs).logits)
    classify = pipeline("text-classification", model=reloaded, tokenizer=out, device="cpu")
    assert classify("apple banana")[0]["label"] in UNION
    from_dir = pipeline("text-classification", model=out, model_kwargs=label_kwargs(out), device="cpu")
    with torch.no_grad():  # the pipeline loads base + adapter (with its trained head) from the directory
        torch.testing.assert_close(from_dir.model(**inputs).logits, trainer.model(**inputs).logits)
    assert from_dir("apple banana")[0]["label"] in UNION

    as_teacher = Teacher(out)  # a saved adapter directory as a teacher: its labels come with it
    assert as_teacher.labels == UNION and as_teacher.adapter is None

    meta = yaml.safe_load(open(os.path.join(out, "README.md")).read().split("---\n")[1])
    assert meta["library_name"] == "peft" and "label_kwargs" in open(os.path.join(out, "README.md")).read()


def test_merge_adapter_saves_a_plain_model_and_training_keeps_the_adapter(tmp_path, trained_teachers, unlabeled_train):
    trainer, tok = _peft_trainer(tmp_path, trained_teachers, unlabeled_train, merge_adapter=True)
    trainer.train()
    out = str(tmp_path / "merged")
    trainer.save_model(out)
    assert isinstance(trainer.model, PeftModel)  # merged on a copy
    assert "adapter_config.json" not in os.listdir(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert [plain.config.id2label[i] for i in range(4)] == UNION
    inputs = tok(["apple banana of the", "dill grape"], padding=True, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, trainer.model(**inputs).logits)
    classify = pipeline("text-classification", model=out, device="cpu")
    assert classify("apple banana")[0]["label"] in UNION


def test_already_wrapped_student_with_peft_config_is_refused(tmp_path, trained_teachers, unlabeled_train):
    tok = build_tokenizer()
    wrapped = get_peft_model(tiny_bert(4, len(tok)), LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"]))
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="already a PeftModel"):
        KnowledgeIntegrationTrainer(model=wrapped, args=args, teachers=teachers, train_dataset=unlabeled_train,
                                    processing_class=tok, peft_config=LoraConfig(r=2, target_modules=["query"]))


# ---------------------------------------------------------------- LoRA teachers as adapters of ONE base
def _two_adapter_base(vocab_size: int, dropout: float = 0.1):
    """One base model holding two distinct LoRA adapters (random B, distinct heads) named fruit and spice."""
    base = tiny_bert(2, vocab_size, seed=4, dropout=dropout)
    config = dict(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=16, target_modules=["query", "value"],
                  init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**config), adapter_name="fruit")
    model.add_adapter("spice", LoraConfig(**config))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "modules_to_save.spice" in name:
            param.data.normal_(0, 1.0)
    return model


def test_adapter_teachers_on_one_base_each_answer_with_their_own_adapter(tmp_path, unlabeled_train):
    tok = build_tokenizer()
    shared = _two_adapter_base(len(tok))
    inputs = dict(tok(["apple banana", "dill grape of the"], padding=True, return_tensors="pt"))
    expected = {}
    with torch.no_grad():
        for name in ("fruit", "spice"):
            shared.set_adapter(name)
            shared.eval()
            expected[name] = shared(**inputs).logits
    assert not torch.allclose(expected["fruit"], expected["spice"])
    teachers = [Teacher(shared, adapter="fruit", labels=["alpha", "beta"]), Teacher(shared, adapter="spice", labels=["gamma", "delta"])]
    assert [t.name for t in teachers] == ["fruit", "spice"]
    signals = query_teachers(teachers, [inputs, inputs], certainty_source="mc", mc_samples=2)
    torch.testing.assert_close(signals.logits[0], expected["fruit"])
    torch.testing.assert_close(signals.logits[1], expected["spice"])
    assert not any(p.requires_grad for p in shared.parameters())  # switching never re-enables gradients

    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                      mc_samples=2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                          train_dataset=unlabeled_train, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    assert not any(p.requires_grad for p in shared.parameters())
    with torch.no_grad():
        for name in ("fruit", "spice"):  # training left both adapters untouched
            shared.set_adapter(name)
            shared.eval()
            torch.testing.assert_close(shared(**inputs).logits, expected[name])


def test_unknown_adapter_is_a_clear_error():
    shared = _two_adapter_base(40)
    with pytest.raises(ValueError, match=r"no adapter 'c'; it has \['fruit', 'spice'\]"):
        Teacher(shared, adapter="c", labels=["x", "y"])
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        Teacher(tiny_bert(2, 40, labels=["x", "y"]), adapter="fruit")


def test_mc_top_layers_works_through_peft_wrappers():
    tok = build_tokenizer()
    shared = _two_adapter_base(len(tok), dropout=0.0)
    teacher = Teacher(shared, adapter="spice", labels=["gamma", "delta"])
    inputs = dict(tok(["apple banana", "dill grape of the"], padding=True, return_tensors="pt"))
    top = mc_dropout_probs(teacher, inputs, num_samples=4, top_layers=1)  # raised "Cannot find the transformer layers"
    full = deterministic_logits(teacher, inputs).softmax(-1)
    torch.testing.assert_close(top, full)  # no dropout: every sample equals the deterministic pass


def test_adapter_dir_without_labels_file_says_how_to_load_it(tmp_path):
    tok = build_tokenizer()
    base_dir = str(tmp_path / "base")
    tiny_bert(2, len(tok), seed=3).save_pretrained(base_dir)
    wide = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=4, ignore_mismatched_sizes=True)
    adapter = get_peft_model(wide, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"]))
    adapter.save_pretrained(str(tmp_path / "adapter"))  # saved by plain peft: no ki_labels.json
    with pytest.raises(ValueError, match="has no ki_labels.json.*ignore_mismatched_sizes=True"):
        Teacher(str(tmp_path / "adapter"))


def test_adapter_teachers_share_one_cast_copy_under_bf16(tmp_path, unlabeled_train):
    tok = build_tokenizer()
    shared = _two_adapter_base(len(tok))
    teachers = [Teacher(shared, adapter="fruit", labels=["alpha", "beta"]),
                Teacher(shared, adapter="spice", labels=["gamma", "delta"])]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, bf16=True,
                                      mc_samples=2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                          train_dataset=unlabeled_train, processing_class=tok)
    first, second = (t.model for t in trainer.teachers)
    assert first is second  # one bf16 base in memory for both adapter teachers
    assert next(first.parameters()).dtype == torch.bfloat16 and next(shared.parameters()).dtype == torch.float32
    trainer.train()
    assert trainer.state.global_step == 1
