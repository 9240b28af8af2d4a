"""student_init='teacher_average': the student starts from the teachers' averaged weights and stacked heads."""

import pytest
import torch
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, tiny_bert
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher

UNION = [label for labels in TEACHER_SPLIT for label in labels]


def config(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                    save_strategy="no", per_device_train_batch_size=8, mc_samples=2, seed=0,
                    student_init="teacher_average")
    defaults.update(kw)
    return KnowledgeIntegrationConfig(**defaults)


def finetune_of(base, labels, seed: int, scale: float = 0.02):
    """A stand-in for a fine-tune of ``base``: its weights moved a little, its own head over ``labels``."""
    torch.manual_seed(seed)
    model = tiny_bert(len(labels), base.config.vocab_size, labels=labels, seed=seed)
    state = {k: v + scale * v.abs().mean() * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in base.state_dict().items() if not k.startswith("classifier")}
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture
def teachers(tok):
    # Fine-tunes of one base with different perturbations: every weight differs, so an average is detectable.
    base = tiny_bert(2, len(tok), seed=5)
    return [Teacher(finetune_of(base, labels, seed=30 + i), name=f"t{i}") for i, labels in enumerate(TEACHER_SPLIT)]


@pytest.fixture
def train():
    return Dataset.from_list([{"text": r["text"]} for r in make_rows(6, seed=3)])


def test_encoder_is_the_teachers_mean_and_heads_are_stacked_by_label_name(tmp_path, tok, teachers, train):
    # The student names the union labels in an order of its own: rows must follow names, not positions.
    order = ["delta", "alpha", "gamma", "beta"]
    student = tiny_bert(4, len(tok), labels=order, seed=99)
    trainer = KnowledgeIntegrationTrainer(model=student, args=config(tmp_path), teachers=teachers,
                                          train_dataset=train, processing_class=tok)
    state = trainer.model.state_dict()
    first, second = (t.model.state_dict() for t in teachers)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(state[name], (first[name] + second[name]) / 2)
    assert not torch.allclose(state[name], first[name])
    for row, label in enumerate(order):
        owner = 0 if label in TEACHER_SPLIT[0] else 1
        own_row = TEACHER_SPLIT[owner].index(label)
        source = (first, second)[owner]
        torch.testing.assert_close(state["classifier.weight"][row], source["classifier.weight"][own_row])
        torch.testing.assert_close(state["classifier.bias"][row], source["classifier.bias"][own_row])


def test_encoder_average_keeps_the_students_own_output_layer(tmp_path, tok, teachers, train):
    student = tiny_bert(4, len(tok), labels=UNION, seed=99)
    head = student.classifier.weight.detach().clone()
    trainer = KnowledgeIntegrationTrainer(model=student, args=config(tmp_path, student_init="teacher_average_encoder"),
                                          teachers=teachers, train_dataset=train, processing_class=tok)
    state = trainer.model.state_dict()
    first, second = (t.model.state_dict() for t in teachers)
    name = "bert.pooler.dense.weight"
    torch.testing.assert_close(state[name], (first[name] + second[name]) / 2)
    torch.testing.assert_close(state["classifier.weight"], head)


def test_pretrained_default_leaves_the_student_untouched(tmp_path, tok, teachers, train):
    student = tiny_bert(4, len(tok), labels=UNION, seed=99)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = KnowledgeIntegrationTrainer(model=student, args=config(tmp_path, student_init="pretrained"),
                                          teachers=teachers, train_dataset=train, processing_class=tok)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_averaged_start_trains(tmp_path, tok, teachers, train):
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=UNION), args=config(tmp_path, max_steps=2),
                                          teachers=teachers, train_dataset=train, processing_class=tok)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_teacher_of_another_architecture_is_a_clear_error(tmp_path, tok, teachers, train):
    wider = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=48, num_attention_heads=2,
                                                     intermediate_size=64, num_hidden_layers=2, num_labels=2,
                                                     max_position_embeddings=64))
    wider.config.id2label = {0: "gamma", 1: "delta"}
    wider.config.label2id = {"gamma": 0, "delta": 1}
    with pytest.raises(ValueError, match="teacher 'wide'.*shape"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=UNION), args=config(tmp_path),
                                    teachers=[teachers[0], Teacher(wider, name="wide")], train_dataset=train,
                                    processing_class=tok)


def test_teacher_with_its_own_vocabulary_is_a_clear_error(tmp_path, tok, teachers, train):
    own = build_tokenizer(["zebra", "yak", "xylophone"])
    model = tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=31)
    with pytest.raises(ValueError, match="own vocabulary"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=UNION), args=config(tmp_path),
                                    teachers=[teachers[0], Teacher(model, tokenizer=own, name="own")],
                                    train_dataset=train, processing_class=tok)


def test_teachers_that_are_not_fine_tunes_of_one_base_are_a_clear_error(tmp_path, tok, train):
    unrelated = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=40 + i), name=f"u{i}") for i, labels in enumerate(TEACHER_SPLIT)]
    with pytest.raises(ValueError, match="do not look like fine-tunes of one base"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=UNION), args=config(tmp_path), teachers=unrelated,
                                    train_dataset=train, processing_class=tok)


def test_unknown_student_init_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="student_init must be one of"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), student_init="soup")


def test_model_card_records_the_student_init(tmp_path, tok, teachers, train):
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=UNION), args=config(tmp_path),
                                          teachers=teachers, train_dataset=train, processing_class=tok)
    card = open(trainer.write_model_card(str(tmp_path / "card"))).read()
    assert "`student_init`: teacher_average" in card
