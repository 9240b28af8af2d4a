"""The student reads every language with its own tokenizer; teacher signals are aligned to it.

Tiny tokenizers: an UNCASED WordPiece teacher and a CASED SentencePiece/Unigram student whose
segmentation puts a bare "▁" before "Cat" (a piece that follows a bare "▁") and splits punctuation.
Expected alignments and ids are written out by hand from the two vocabularies below."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from ki_trainer.merge_distill import (
    MaskedLMTeacher,
    MergeDistillConfig,
    MergeDistillTrainer,
    StudentVocabulary,
    TeacherAlignment,
    build_student,
    choose_student_tokenizer,
    fit_linear_map,
    init_student_embeddings,
    linear_probe_accuracy,
    mean_pooled_features,
    score_masked_lm,
    segmentation_agreement,
    select_teachers,
)
from ki_trainer.merge_distill.alignment import CASE_LOWER, CASE_TITLE, CASE_UPPER, case_pattern
from ki_trainer.merge_distill.collator import KD_POSITIONS_KEY, TEACHER_BATCHES_KEY

WP_WORDS = ["the", "cat", "dog", "'", "s", "tail", ".", "a", "walk", "##s"]
SP_PIECES = ["\u2581The", "\u2581the", "\u2581", "Cat", "cat", "'", "s", "\u2581tail", ".", "\u2581A", "\u2581a",
             "\u2581THE", "\u2581walk", "\u2581dog"]
TEXTS = ["The Cat's tail.", "the cat's tail.", "THE dog walks.", "A cat's tail."]


def wordpiece(words=WP_WORDS, max_length=64) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def unigram(pieces=SP_PIECES) -> PreTrainedTokenizerFast:
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces] + [("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=64)


def tiny(vocab_size, seed, positions=64, layers=1, hidden=32):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).eval()


def tokens(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]


def test_student_segmentation_has_the_hard_cases():
    pieces, _ = tokens(unigram(), "The Cat's tail.")
    assert pieces == ["\u2581The", "\u2581", "Cat", "'", "s", "\u2581tail", "."]  # "Cat" follows a bare "▁"
    assert tokens(wordpiece(), "The Cat's tail.")[0] == ["the", "cat", "'", "s", "tail", "."]  # uncased, punctuation split


def test_alignment_spans_and_string_forms():
    teacher, student = wordpiece(), unigram()
    alignment = TeacherAlignment(teacher, student)
    assert not alignment.identical and alignment.uncased
    text = "The Cat's tail."
    s = student(text, return_offsets_mapping=True)
    t = teacher(text, return_offsets_mapping=True)
    from ki_trainer.merge_distill.collator import _trimmed

    pairs = alignment.align(_trimmed(text, s["offset_mapping"]), [i in student.all_special_ids for i in s["input_ids"]],
                            _trimmed(text, t["offset_mapping"]), [i in teacher.all_special_ids for i in t["input_ids"]])
    s_tokens = student.convert_ids_to_tokens(s["input_ids"])
    t_tokens = teacher.convert_ids_to_tokens(t["input_ids"])
    # every student piece but the bare "▁" and the specials is one teacher token's span
    assert {s_tokens[p]: t_tokens[q] for p, q in pairs.items()} == {
        "\u2581The": "the", "Cat": "cat", "'": "'", "s": "s", "\u2581tail": "tail", ".": "."}
    v, w = student.get_vocab(), teacher.get_vocab()
    # a teacher candidate is written in the student's form at that position, case restored for the uncased teacher
    assert alignment.student_id(w["the"], True, CASE_TITLE) == v["\u2581The"]
    assert alignment.student_id(w["the"], True, CASE_LOWER) == v["\u2581the"]
    assert alignment.student_id(w["the"], True, CASE_UPPER) == v["\u2581THE"]
    assert alignment.student_id(w["cat"], False, CASE_TITLE) == v["Cat"]  # after a bare "▁": continuation form
    assert alignment.student_id(w["##s"], False, CASE_LOWER) == v["s"]  # WordPiece "##s" <-> SentencePiece "s"
    assert alignment.student_id(w["dog"], False, CASE_TITLE) == -1  # no "Dog" piece: unmappable
    assert alignment.student_id(w["[MASK]"], True, CASE_LOWER) == -1  # specials never map
    # top-k: unmappable candidates dropped, the rest renormalised
    ids = torch.tensor([[w["cat"], w["dog"], w["the"]]])
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    mapped, renormalised, kept = alignment.map_topk(ids, probs, torch.tensor([[0, CASE_TITLE]]))
    assert mapped[0, 0] == v["Cat"] and renormalised[0, 1] == 0 and math.isclose(float(kept[0]), 0.5)
    assert torch.allclose(renormalised, torch.tensor([[1.0, 0.0, 0.0]]))  # "The" is not a continuation piece either
    assert [case_pattern(x) for x in ("cat", "Cat", "CAT", "cAt", "'")] == [CASE_LOWER, CASE_TITLE, CASE_UPPER, 0, CASE_LOWER]


def _setup(tmp_path, **config):
    teacher_tok, student_tok = wordpiece(), unigram()
    teacher = MaskedLMTeacher(tiny(len(teacher_tok), 1), teacher_tok, languages=["en"], name="wp")
    vocabulary = StudentVocabulary.from_tokenizer(student_tok, [teacher_tok], ["wp"], min_coverage=0.1)
    student = build_student(vocabulary, [teacher], hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
    rows = [{"id": str(i), "text": t, "language": "en"} for i, t in enumerate(TEXTS * 4)]
    args = MergeDistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                              num_train_epochs=1, save_strategy="no", mlm_probability=0.6, **config)
    trainer = MergeDistillTrainer(model=student, args=args, teachers=[teacher], vocabulary=vocabulary,
                                  train_dataset=Dataset.from_list(rows))
    return trainer, teacher, rows


def test_collator_masks_overlaps_in_the_teacher_and_signals_only_aligned_positions(tmp_path):
    trainer, teacher, rows = _setup(tmp_path)
    batch = trainer.data_collator(rows[:4])
    student_tok = trainer.vocabulary.tokenizer
    kd, labels = batch[KD_POSITIONS_KEY], batch["labels"]
    sub = batch[TEACHER_BATCHES_KEY][0]
    bare = student_tok.convert_tokens_to_ids("\u2581")
    for i, row in enumerate(rows[:4]):
        ids = torch.tensor(student_tok(row["text"])["input_ids"])
        predicted = labels[i, : len(ids)] != -100
        # a bare "▁" spans no teacher token: it is predicted by MLM only, never by KD
        assert not (kd[i, : len(ids)] & (ids == bare)).any()
        assert (kd[i, : len(ids)] <= predicted).all()
        assert int(sub["predict"][i].sum()) == int(kd[i].sum())
        assert (sub["input_ids"][i][sub["predict"][i]] == teacher.tokenizer.mask_token_id).all()
    assert int(kd.sum()) > 0 and len(sub["forms"]) == int(kd.sum())
    signal = trainer.teacher_signal(batch[TEACHER_BATCHES_KEY], labels, kd)
    aligned = kd[labels != -100]
    assert (signal.kept_mass[~aligned] == 0).all()  # no KD where nothing aligns
    # every kept candidate is a student token that fits the position's form: word start <-> "▁"
    gold = labels[labels != -100]
    vocab_tokens = student_tok.convert_ids_to_tokens(list(range(len(student_tok))))
    for row in torch.nonzero(aligned).flatten().tolist():
        starts = vocab_tokens[int(gold[row])].startswith("\u2581")
        for sid, p in zip(signal.ids[row].tolist(), signal.probs[row].tolist()):
            if p > 0:
                assert vocab_tokens[sid].startswith("\u2581") == starts
        if signal.kept_mass[row] > 0:
            assert math.isclose(float(signal.probs[row].sum()), 1.0, rel_tol=1e-5)


def test_training_restricted_output_saved_tokenizer_reads_as_trained(tmp_path):
    trainer, teacher, rows = _setup(tmp_path, output_vocabulary="training_text", alpha=0.5, freeze_word_embeddings=True)
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    assert torch.equal(trainer.model.get_input_embeddings().weight, before)  # frozen word embeddings
    trainer.save_model()
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    trained = set(trainer.output_columns.tolist()) - set(tok.all_special_ids)  # [UNK] is never a target
    closed = [i for i in range(len(tok)) if i not in trained]
    bias = reloaded.get_output_embeddings().bias
    assert closed and (bias[closed] == -100).all() and (bias[sorted(trained)] > -100).all()
    # as shipped, the student predicts only tokens it was trained on
    with torch.no_grad():
        enc = tok("The <mask>'s tail.", return_tensors="pt")
        logits = reloaded(**enc).logits[0]
    assert set(logits.argmax(-1).tolist()) <= trained
    # the saved tokenizer reads held-out text exactly as the training tokenizer; a different one is measured as such
    report = segmentation_agreement(tok, trainer.vocabulary.tokenizer, ["The cat's tail. THE dog walks."], teacher.tokenizer)
    assert report == {"words": 6, "same_segmentation": 1.0, "unknown_words": 0, "unknown_word_share": 0.0}
    assert trainer.segmentation_report["en"]["same_segmentation"] == 1.0
    other = segmentation_agreement(unigram(SP_PIECES + ["\u2581Cat"]), trainer.vocabulary.tokenizer, ["The Cat's tail."])
    assert other["same_segmentation"] == pytest.approx(2 / 3)  # "Cat's" is split differently
    missing = segmentation_agreement(unigram([p for p in SP_PIECES if p != "\u2581tail"]), trainer.vocabulary.tokenizer,
                                     ["The tail."], teacher.tokenizer)
    assert missing["unknown_words"] == 1  # "tail" becomes [UNK] where the teacher reads it


def test_saved_tokenizer_mismatch_is_loud(tmp_path):
    trainer, _, _ = _setup(tmp_path)
    trainer.save_model()
    unigram(SP_PIECES + ["\u2581Cat"]).save_pretrained(tmp_path)  # someone swaps the tokenizer
    with pytest.warns(UserWarning, match="segments .* differently"):
        trainer.check_saved_tokenizer(str(tmp_path))


def test_linear_map_and_mapped_embeddings():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    r = torch.randn(8, 8)
    w = fit_linear_map(x, x @ r + 0.5, ridge=1e-9)
    assert torch.allclose(torch.cat([x, torch.ones(200, 1)], 1).double() @ w, (x @ r + 0.5).double(), atol=1e-5)
    # teacher B's embeddings are teacher A's under a linear map; tokens only B owns land in A's space
    a_tok = wordpiece(["w%d" % i for i in range(60)])
    b_tok = wordpiece(["w%d" % i for i in range(40)] + ["x%d" % i for i in range(10)])
    a = MaskedLMTeacher(tiny(len(a_tok), 1), a_tok, name="a")
    b = MaskedLMTeacher(tiny(len(b_tok), 2), b_tok, name="b")
    rotation = torch.linalg.qr(torch.randn(32, 32))[0]
    hidden_x = torch.randn(10, 32) * 0.02  # the scale of the embeddings (BERT initialises with std 0.02)
    with torch.no_grad():
        eb = b.model.get_input_embeddings().weight
        ea = a.model.get_input_embeddings().weight
        for i in range(40):
            eb[b_tok.convert_tokens_to_ids(f"w{i}")] = ea[a_tok.convert_tokens_to_ids(f"w{i}")] @ rotation
        for i in range(10):
            eb[b_tok.convert_tokens_to_ids(f"x{i}")] = hidden_x[i] @ rotation
    vocabulary = StudentVocabulary.union([a_tok, b_tok], ["a", "b"])
    student = build_student(vocabulary, [a, b], hidden_size=32, num_hidden_layers=1, num_attention_heads=2, init_embeddings=False)
    report = init_student_embeddings(student, vocabulary, [a, b], reference=0)
    assert report["mapped"] == 10 and report["maps"]["b"] < 0.01  # 40 shared tokens, 32 dimensions, ridge 1e-3
    rows = student.get_input_embeddings().weight
    for i in range(10):
        mapped = rows[vocabulary.tokens.index(f"x{i}")]
        assert float((mapped - hidden_x[i]).norm() / hidden_x[i].norm()) < 0.05
    assert torch.equal(rows[vocabulary.tokens.index("w5")], ea[a_tok.convert_tokens_to_ids("w5")])


def test_student_from_teacher_layers_and_identical_start():
    tok = unigram()
    model = tiny(len(tok), 3, layers=4)
    teacher = MaskedLMTeacher(model, tok, name="sp")
    vocabulary = StudentVocabulary.from_tokenizer(tok, [tok], ["sp"])
    copy = build_student(vocabulary, [teacher], init="teacher", layer_stride=1)
    enc = tok(["The Cat's tail."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(copy(**enc).logits, model(**enc).logits, atol=1e-5)  # the teacher itself
    half = build_student(vocabulary, [teacher], init="teacher", layer_stride=2)
    assert half.config.num_hidden_layers == 2 and half.config.ki_student_init["layers"] == [1, 3]
    for mine, theirs in ((0, 1), (1, 3)):
        a = half.bert.encoder.layer[mine].state_dict()
        b = model.bert.encoder.layer[theirs].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="layer_stride"):
        build_student(vocabulary, [teacher], init="teacher", layer_stride=0)
    with pytest.raises(ValueError, match="init must be"):
        build_student(vocabulary, [teacher], init="noise")


def test_scoring_clamps_to_a_small_position_limit():
    tok = wordpiece()
    teacher = MaskedLMTeacher(tiny(len(tok), 4, positions=12), tok, name="short")
    long_text = " ".join(["the cat 's tail ."] * 10)  # ~50 tokens, 12 positions
    scores = score_masked_lm(teacher.model, teacher, [long_text], groups=3)  # default max_length=128
    assert scores["tokens"] == 10  # 12 positions minus [CLS] and [SEP]
    choice, table = select_teachers([teacher], {"en": [long_text]})
    assert choice == {"en": "short"} and table[0]["tokens"] == 10


def test_choose_student_tokenizer_prefers_full_coverage_and_case():
    texts = {"en": ["The Cat's tail."], "xx": ["the dog walks."]}
    best, table = choose_student_tokenizer([wordpiece(), unigram()], texts, ["wp", "sp"])
    assert best == 1  # both read everything; the SentencePiece one keeps case
    best, _ = choose_student_tokenizer([wordpiece(), unigram(SP_PIECES[:4])], texts, ["wp", "sp"])
    assert best == 0  # the cut SentencePiece vocabulary has [UNK] words


def test_linear_probe_and_features(tmp_path):
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 4
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 16)
    result = linear_probe_accuracy(x[:30], y[:30].tolist(), x[30:], y[30:].tolist())
    assert result["accuracy"] == 1.0 and result["train_rows"] == 30
    shuffled = linear_probe_accuracy(x[:30], y[torch.randperm(30)].tolist(), x[30:], y[30:].tolist())
    assert shuffled["accuracy"] < 0.8
    assert linear_probe_accuracy(x[:30], y[:30].tolist(), x[30:], y[30:].tolist()) == result  # deterministic
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe_accuracy(x[:30], y[:29].tolist(), x[30:], y[30:].tolist())
    tok = unigram()
    model = tiny(len(tok), 5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    feats = mean_pooled_features(str(tmp_path), ["The Cat's tail.", "the dog walks."], max_length=500)
    with torch.no_grad():
        enc = tok(["The Cat's tail."], return_tensors="pt")
        expected = model.bert(**enc)[0][0].mean(0)
    assert feats.shape == (2, 32) and torch.allclose(feats[0], expected, atol=1e-5)
