"""Teachers of different architectures and vocabularies in ONE ensemble, each reading the raw text
with its own tokenizer (BERT WordPiece-style, MPNet and XLM-R style special tokens)."""

import pytest
import torch
from conftest import CLASS_WORDS, FILLER, build_tokenizer, make_rows, teacher_words, tiny_bert
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    MPNetConfig,
    MPNetForSequenceClassification,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher


def roberta_style_tokenizer(words) -> PreTrainedTokenizerFast:
    """<s> ... </s> with <pad> = 1, as in RoBERTa/XLM-R/MPNet vocabularies."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>", model_max_length=40,
    )


def small(config_cls, model_cls, tokenizer, labels, **kw):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id, num_labels=len(labels), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        **kw,
    )
    return model_cls(config).eval()


@pytest.fixture
def ensemble():
    bert_tok = build_tokenizer(teacher_words(["alpha", "beta"]))
    mpnet_tok = roberta_style_tokenizer(teacher_words(["gamma", "delta"]))
    xlmr_tok = roberta_style_tokenizer(list(reversed(FILLER)) + CLASS_WORDS["alpha"] + CLASS_WORDS["delta"])
    teachers = [
        Teacher(tiny_bert(2, len(bert_tok), labels=["alpha", "beta"], dropout=0.0), tokenizer=bert_tok, name="bert"),
        Teacher(small(MPNetConfig, MPNetForSequenceClassification, mpnet_tok, ["gamma", "delta"], max_position_embeddings=42),
                tokenizer=mpnet_tok, name="mpnet"),
        Teacher(small(XLMRobertaConfig, XLMRobertaForSequenceClassification, xlmr_tok, ["alpha", "delta"], max_position_embeddings=42),
                tokenizer=xlmr_tok, name="xlmr"),
    ]
    return teachers


def test_each_teacher_reads_its_own_encoding(tmp_path, ensemble):
    student_tok = build_tokenizer()
    data = Dataset.from_list([{"text": r["text"]} for r in make_rows(4, seed=3)])
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, mc_samples=3, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=32,
    )
    trainer = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(student_tok)), args=args, teachers=ensemble, train_dataset=data, processing_class=student_tok
    )
    assert trainer.label_space.labels == ["alpha", "beta", "gamma", "delta"]  # overlaps merged by name
    rows = [data[i] for i in range(5)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    groups = batch["teacher_inputs"]
    assert len(groups) == 3  # three different tokenizers -> three encodings
    signals = trainer.query_signals({k: v for k, v in batch.items() if k != "teacher_inputs"}, groups)
    for teacher, logits in zip(ensemble, signals.logits):
        own = teacher.tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
        own = {k: v for k, v in own.items() if k in teacher.accepted_inputs()}
        with torch.no_grad():
            expected = teacher.model(**own).logits
        torch.testing.assert_close(logits, expected, msg=f"teacher {teacher.name} did not read its own tokens")
    trainer.train()  # and the whole ensemble trains a student end to end
    assert trainer.state.global_step == 2


def test_teacher_that_cannot_read_the_student_tokens_is_an_early_error(tmp_path):
    student_tok = build_tokenizer()
    small_vocab_teacher = Teacher(tiny_bert(2, 10, labels=["alpha", "beta"]), name="narrow")
    other = Teacher(tiny_bert(2, len(student_tok), labels=["gamma", "delta"], seed=1), name="ok")
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    data = Dataset.from_list([{"text": "apple"}])
    with pytest.raises(ValueError, match="'narrow' has 10 token embeddings but would read the student's tokenizer"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(student_tok)), args=args, teachers=[small_vocab_teacher, other],
                                    train_dataset=data, processing_class=student_tok)


def test_teacher_saved_with_another_vocabulary_must_bring_it(tmp_path):
    student_tok = build_tokenizer()
    own_tok = build_tokenizer(teacher_words(["alpha", "beta"]))
    model = tiny_bert(2, len(student_tok), labels=["alpha", "beta"])
    model.save_pretrained(tmp_path / "t0")
    own_tok.save_pretrained(tmp_path / "t0")
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    data = Dataset.from_list([{"text": "apple"}])
    other = Teacher(tiny_bert(2, len(student_tok), labels=["gamma", "delta"], seed=1), name="ok")
    with pytest.raises(ValueError, match="saved with its own tokenizer"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(student_tok)), args=args,
                                    teachers=[Teacher(str(tmp_path / "t0")), other], train_dataset=data,
                                    processing_class=student_tok)
    trainer = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(student_tok)), args=args,
        teachers=[Teacher(str(tmp_path / "t0"), tokenizer=str(tmp_path / "t0")), other],
        train_dataset=data, processing_class=student_tok,
    )
    assert trainer.data_collator.teacher_input_key(0) is not None
