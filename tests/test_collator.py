"""The collator tokenizes raw text per model and shares encodings where it can."""

import pytest
import torch
from conftest import build_tokenizer, teacher_words

from ki_trainer import KnowledgeIntegrationCollator, LabelSpace

SPACE = LabelSpace([["a", "b"], ["c", "d"]], ["t0", "t1"])
ROWS = [{"text": "apple of banana", "label": "c"}, {"text": "grape", "label": 1}]


def test_shared_tokenizer_reads_student_inputs():
    tok = build_tokenizer()
    collator = KnowledgeIntegrationCollator(tok, SPACE, teacher_tokenizers=[None, tok])
    batch = collator(ROWS)
    assert "teacher_inputs" not in batch
    assert collator.teacher_input_key(0) is None and collator.teacher_input_key(1) is None
    assert batch["labels"].tolist() == [2, 1]
    assert batch["input_ids"].shape[0] == 2 and (batch["attention_mask"][1] == 0).any()  # dynamic padding


def test_own_tokenizers_get_own_encodings_and_share_when_identical():
    student = build_tokenizer()
    own = build_tokenizer(teacher_words(["alpha", "beta"]))
    collator = KnowledgeIntegrationCollator(student, SPACE, teacher_tokenizers=[own, own])
    batch = collator(ROWS)
    assert collator.teacher_input_key(0) == collator.teacher_input_key(1) == "group_0"
    ids = batch["teacher_inputs"]["group_0"]["input_ids"]
    assert ids[1, 1].item() == own.unk_token_id  # "grape" is unknown to this teacher
    assert batch["input_ids"][1, 1].item() != student.unk_token_id


def test_missing_labels_are_not_invented():
    tok = build_tokenizer()
    batch = KnowledgeIntegrationCollator(tok, SPACE)([{"text": "apple"}, {"text": "dill"}])
    assert "labels" not in batch


def test_clear_errors():
    tok = build_tokenizer()
    collator = KnowledgeIntegrationCollator(tok, SPACE)
    with pytest.raises(KeyError, match="no text column 'text'"):
        collator([{"sentence": "x"}])
    with pytest.raises(TypeError, match="must hold strings"):
        collator([{"text": 3}])
    with pytest.raises(ValueError, match="'zebra' is not owned"):
        collator([{"text": "x", "label": "zebra"}])
    tok_no_pad = build_tokenizer()
    tok_no_pad.pad_token = None
    with pytest.raises(ValueError, match="student tokenizer .* has no pad token"):
        KnowledgeIntegrationCollator(tok_no_pad, SPACE)
    with pytest.raises(ValueError, match="teacher 't1'.*no pad token"):
        KnowledgeIntegrationCollator(tok, SPACE, teacher_tokenizers=[None, tok_no_pad])


def test_truncation_per_model():
    tok = build_tokenizer()
    collator = KnowledgeIntegrationCollator(tok, SPACE, max_length=4, teacher_max_lengths=[None, 6])
    batch = collator([{"text": "the a of and to in is it"}])
    assert batch["input_ids"].shape[1] == 4
    assert batch["teacher_inputs"][collator.teacher_input_key(1)]["input_ids"].shape[1] == 6


def test_equal_tokenizers_share_an_encoding_even_as_separate_objects():
    student = build_tokenizer()
    copy_of_student = build_tokenizer()  # same words, same settings, another object
    other = build_tokenizer(teacher_words(["gamma", "delta"]))
    other_copy = build_tokenizer(teacher_words(["gamma", "delta"]))
    collator = KnowledgeIntegrationCollator(student, SPACE, teacher_tokenizers=[copy_of_student, other])
    assert collator.teacher_input_key(0) is None and collator.teacher_input_key(1) == "group_0"
    collator = KnowledgeIntegrationCollator(student, LabelSpace([["a", "b"], ["c", "d"], ["e", "f"]]),
                                            teacher_tokenizers=[other, other_copy, None])
    assert collator.teacher_input_key(0) == collator.teacher_input_key(1) == "group_0"
    assert collator.teacher_input_key(2) is None
