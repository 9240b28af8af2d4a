"""MergeDistill on tiny in-process teachers with two tokenizer conventions (WordPiece, SentencePiece/Unigram).

Every expected number below is computed by hand from the definitions (see the comments)."""

from __future__ import annotations

import math
import os
import random
from collections import Counter

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast, pipeline

from ki_trainer.merge_distill import (
    MaskedLMTeacher,
    MergeDistillConfig,
    MergeDistillTrainer,
    StudentVocabulary,
    TopKSignalCache,
    build_student,
    count_tokens,
    example_generator,
    mask_tokens,
    merge_distill_loss,
    normalize_token,
    score_masked_lm,
    select_teachers,
    topk_to_student,
)
from ki_trainer.merge_distill.collator import KD_POSITIONS_KEY, TEACHER_BATCHES_KEY
from ki_trainer.merge_distill.signals import TopKSignal
from ki_trainer.signal_cache import StaleSignalCacheError

EN_WORDS = ["the", "cat", "dog", "walk", "run", "big", "small", "and"]
IT_WORDS = ["il", "gatto", "cane", "grande", "piccolo", "e", "corre"]


def wordpiece_tokenizer(words=EN_WORDS, continuations=("##s", "##ing")) -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer with an explicit vocabulary: specials 0-4, then ``words``, then ``continuations``."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *continuations])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def unigram_tokenizer(pieces) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer (Metaspace '▁' word starts) with XLM-R's specials
    ``<s> <pad> </s> <unk>`` at 0-3, then ``pieces``, then ``<mask>``."""
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces] + [("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=64,
    )


SP_PIECES = ["\u2581the", "\u2581cat", "s", "\u2581gatto", "\u2581", "ing", "\u2581walk"]
IT_PIECES = ["\u2581" + w for w in IT_WORDS] + ["\u2581the", "\u2581cat", "s", "i", "\u2581"]


def tiny_mlm(vocab_size: int, seed: int, hidden: int = 32) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def sentences(words, n, seed, length=(3, 7)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) for _ in range(n)]


def en_sentences(n, seed):
    """A deterministic toy 'English': 'the big cat walk ...' with a fixed word order, so an MLM can learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(["cat", "dog"])
        rows.append(f"the {rng.choice(['big', 'small'])} {noun} {rng.choice(['walk', 'run'])} and the {noun}")
    return rows


def it_sentences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(["gatto", "cane"])
        rows.append(f"il {noun} {rng.choice(['grande', 'piccolo'])} corre e il {noun}")
    return rows


def train_mlm(model, tokenizer, texts, steps=120, seed=0):
    """Plain MLM on toy text (every non-special token is a target once per pass, 15% masked)."""
    torch.manual_seed(seed)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    special = torch.tensor([[i in tokenizer.all_special_ids for i in row] for row in enc["input_ids"].tolist()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        predict = (torch.rand(enc["input_ids"].shape, generator=generator) < 0.25) & ~special
        inputs = enc["input_ids"].masked_fill(predict, tokenizer.mask_token_id)
        labels = enc["input_ids"].masked_fill(~predict, -100)
        loss = model(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="module")
def teachers():
    """An English WordPiece teacher and an Italian SentencePiece teacher, each MLM-trained on its toy language."""
    en_tok = wordpiece_tokenizer()
    it_tok = unigram_tokenizer(IT_PIECES)
    en = train_mlm(tiny_mlm(len(en_tok), seed=1), en_tok, en_sentences(64, 1), seed=1)
    it = train_mlm(tiny_mlm(len(it_tok), seed=2), it_tok, it_sentences(64, 2), seed=2)
    return [
        MaskedLMTeacher(en, en_tok, languages=["en"], name="en_teacher"),
        MaskedLMTeacher(it, it_tok, languages=["it"], name="it_teacher"),
    ]


def mixed_dataset(n=24, seed=5):
    rows = [{"id": f"en-{i}", "text": t, "language": "en"} for i, t in enumerate(en_sentences(n, seed))]
    rows += [{"id": f"it-{i}", "text": t, "language": "it"} for i, t in enumerate(it_sentences(n, seed + 1))]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------- vocabulary
def test_normalize_token_conventions():
    wp, sp = ("wordpiece", "##"), ("sentencepiece", "\u2581")
    assert normalize_token("walk", wp) == "walk"  # word start
    assert normalize_token("##ing", wp) == "##ing"  # continuation
    assert normalize_token("\u2581walk", sp) == "walk"  # word start
    assert normalize_token("ing", sp) == "##ing"  # continuation
    assert normalize_token("\u2581", sp) == "\u2581"  # a bare marker keeps its own token
    assert normalize_token("##", wp) == "##"


def test_union_vocabulary_hand_checked():
    wp, sp = wordpiece_tokenizer(words=["the", "cat", "walk"]), unigram_tokenizer(SP_PIECES)
    vocabulary = StudentVocabulary.union([wp, sp], ["wp", "sp"])
    # specials first, then WordPiece in id order, then the SentencePiece tokens not seen yet.
    assert vocabulary.tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "walk", "##s", "##ing", "gatto", "\u2581"]
    # wp: [PAD] [UNK] [CLS] [SEP] [MASK] the cat walk ##s ##ing -> identical ids
    assert vocabulary.id_maps[0].tolist() == list(range(10))
    # sp: <s> <pad> </s> <unk> ▁the ▁cat s ▁gatto ▁ ing ▁walk <mask>
    assert vocabulary.id_maps[1].tolist() == [2, 0, 3, 1, 5, 6, 8, 10, 11, 9, 7, 4]
    assert [c.vocab_share for c in vocabulary.coverage] == [1.0, 1.0]
    # both teachers own "the": its owners are wp id 5 and sp id 4
    assert sorted(vocabulary.owners[5]) == [(0, 5), (1, 4)]
    assert vocabulary.owners[10] == [(1, 7)]


def test_union_pruned_by_counts_and_coverage():
    wp, sp = wordpiece_tokenizer(words=["the", "cat", "walk"]), unigram_tokenizer(SP_PIECES)
    counts = [count_tokens(wp, ["the cats", "the cat"]), count_tokens(sp, ["the gatto"])]
    # wp: the x2, cat x2, ##s x1 ; sp: ▁the, ▁gatto
    assert counts[0] == Counter({5: 2, 6: 2, 8: 1})
    vocabulary = StudentVocabulary.union([wp, sp], ["wp", "sp"], token_counts=counts, min_count=2)
    assert vocabulary.tokens[5:] == ["the", "cat"]  # ##s seen once (< 2), sp pieces seen once
    wp_cov, sp_cov = vocabulary.coverage
    assert (wp_cov.vocab_mapped, wp_cov.vocab_size) == (7, 10)  # 5 specials + the + cat
    assert (wp_cov.occurrences, wp_cov.occurrences_mapped) == (5, 4)  # ##s not covered
    # sp: specials (<s> <pad> </s> <unk> <mask>) + ▁the and ▁cat map (to wp's "the", "cat"); ▁gatto does not
    assert (sp_cov.vocab_mapped, sp_cov.occurrences, sp_cov.occurrences_mapped) == (7, 2, 1)
    held_out = vocabulary.update_coverage([count_tokens(wp, ["walk the cat"]), None])
    assert (held_out[0].occurrences, held_out[0].occurrences_mapped) == (3, 2)
    assert held_out[1].occurrences == 0


def test_union_tokenizer_saves_and_reloads(tmp_path):
    vocabulary = StudentVocabulary.union([wordpiece_tokenizer(words=["the", "cat", "walk"]), unigram_tokenizer(SP_PIECES)])
    vocabulary.tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, PreTrainedTokenizerFast)
    ids = reloaded("the cats walking gatto")["input_ids"]
    assert reloaded.convert_ids_to_tokens(ids) == ["[CLS]", "the", "cat", "##s", "walk", "##ing", "gatto", "[SEP]"]
    assert reloaded.mask_token_id == 4 and reloaded.pad_token_id == 0


def test_given_student_tokenizer_with_little_overlap_is_an_error():
    student = wordpiece_tokenizer(words=["zebra"], continuations=())
    it = unigram_tokenizer(IT_PIECES)
    with pytest.raises(ValueError, match=r"covers too little.*occurrences"):
        StudentVocabulary.from_tokenizer(student, [it], ["it"], token_counts=[count_tokens(it, it_sentences(5, 0))])
    # a student tokenizer that shares the vocabulary maps it (WordPiece onto WordPiece: identity)
    en = wordpiece_tokenizer()
    vocabulary = StudentVocabulary.from_tokenizer(wordpiece_tokenizer(), [en], ["en"])
    assert vocabulary.id_maps[0].tolist() == list(range(len(en)))


# ---------------------------------------------------------------------- masking
def test_masking_statistics_80_10_10():
    n, length = 400, 50
    input_ids = torch.randint(10, 100, (n, length))
    eligible = torch.ones(n, length, dtype=torch.bool)
    eligible[:, :2] = False  # e.g. [CLS] and a token without student counterpart
    replacements = torch.arange(10, 20)
    masked, predict = mask_tokens(input_ids, eligible, 4, replacements, 0.15, torch.Generator().manual_seed(0))
    assert not predict[:, :2].any()
    share = predict.sum().item() / eligible.sum().item()
    assert abs(share - 0.15) < 0.01  # 19,200 eligible tokens: std of the share ~0.0026
    chosen = predict.sum().item()
    as_mask = ((masked == 4) & predict).sum().item() / chosen
    unchanged = ((masked == input_ids) & predict).sum().item() / chosen
    assert abs(as_mask - 0.8) < 0.03
    assert abs(unchanged - 0.1) < 0.03  # replacement may hit the same token: 10/90 of 10% at most, here 0
    changed_random = predict & (masked != 4) & (masked != input_ids)
    assert torch.isin(masked[changed_random], replacements).all()
    assert (masked[~predict] == input_ids[~predict]).all()


def test_masking_is_deterministic_per_example_and_forces_one_position():
    ids, eligible = torch.arange(10, 14)[None], torch.ones(1, 4, dtype=torch.bool)
    a = mask_tokens(ids, eligible, 4, torch.tensor([20]), 0.15, example_generator(3, "row-1"))
    b = mask_tokens(ids, eligible, 4, torch.tensor([20]), 0.15, example_generator(3, "row-1"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for seed in range(20):  # 4 tokens at 15%: often none drawn; at_least_one always predicts one
        assert mask_tokens(ids, eligible, 4, torch.tensor([20]), 0.15, torch.Generator().manual_seed(seed))[1].any()


# ---------------------------------------------------------------------- top-k and loss
def test_topk_mapping_drops_unmapped_and_renormalises():
    # teacher probs (T=1) over 5 tokens: [0.4, 0.3, 0.2, 0.1, 0.0...]; token 1 has no student counterpart.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log()
    id_map = torch.tensor([7, -1, 3, 9])
    signal = topk_to_student(logits, id_map, k=3)
    # top-3 = tokens 0, 1, 2 (0.4, 0.3, 0.2); token 1 dropped; kept 0.6 -> 0.4/0.6, 0.2/0.6
    assert signal.ids[0, 0].item() == 7 and signal.ids[0, 2].item() == 3
    assert torch.allclose(signal.probs, torch.tensor([[2 / 3, 0.0, 1 / 3]]))
    assert math.isclose(signal.kept_mass.item(), 0.6, rel_tol=1e-6)
    # a position whose top-k maps to nothing has no KD mass at all
    nothing = topk_to_student(logits, torch.tensor([-1, -1, 3, 9]), k=2)
    assert nothing.kept_mass.item() == 0.0 and nothing.probs.abs().sum().item() == 0.0
    # temperature flattens before the top-k: T=2 -> softmax(log p / 2) ∝ sqrt(p)
    warm = topk_to_student(logits, torch.tensor([0, 1, 2, 3]), k=4, temperature=2.0)
    expected = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(warm.probs, expected, atol=1e-6)


def test_loss_hand_computed():
    # two positions, student vocabulary of 3; logits chosen so the softmaxes are easy to write down
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [0.0, 0.0, 0.0]], requires_grad=True)
    q0 = [1 / 8, 2 / 8, 5 / 8]
    q1 = [1 / 3, 1 / 3, 1 / 3]
    gold = torch.tensor([2, 0])
    signal = TopKSignal(ids=torch.tensor([[2, 1], [0, 0]]), probs=torch.tensor([[0.75, 0.25], [0.0, 0.0]]), kept_mass=torch.tensor([0.8, 0.0]))
    loss, parts = merge_distill_loss(logits, gold, signal, alpha=0.3)
    mlm = (-math.log(q0[2]) - math.log(q1[0])) / 2
    kd = -(0.75 * math.log(q0[2]) + 0.25 * math.log(q0[1]))  # only position 0 kept teacher mass
    assert math.isclose(parts["mlm"].item(), mlm, rel_tol=1e-6)
    assert math.isclose(parts["kd"].item(), kd, rel_tol=1e-6)
    assert math.isclose(loss.item(), 0.3 * kd + 0.7 * mlm, rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # temperature: KD uses softmax(logits / T) and is scaled by T^2
    _, parts_t = merge_distill_loss(logits, gold, signal, alpha=1.0, temperature=2.0)
    z = torch.tensor([0.0, math.log(2.0) / 2, math.log(5.0) / 2]).log_softmax(0)
    assert math.isclose(parts_t["kd"].item(), -(0.75 * z[2] + 0.25 * z[1]).item() * 4, rel_tol=1e-6)
    assert "mlm" not in parts_t  # alpha=1: pure distillation


# ---------------------------------------------------------------------- errors
def test_teacher_errors():
    tok = wordpiece_tokenizer()
    with pytest.raises(ValueError, match="no MLM head"):
        MaskedLMTeacher(BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), tok)
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(ValueError, match="no mask token"):
        MaskedLMTeacher(tiny_mlm(len(tok), 0), no_mask)


def test_trainer_early_errors(teachers, tmp_path):
    vocabulary = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers])
    student = build_student(vocabulary, teachers, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    args = MergeDistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    def trainer(rows, **kw):
        return MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary, train_dataset=Dataset.from_list(rows), **kw)

    with pytest.raises(ValueError, match=r"Row 1 .* language 'fr', which has no teacher"):
        trainer([{"text": "the cat", "language": "en"}, {"text": "le chat", "language": "fr"}])
    with pytest.raises(ValueError, match="no language column"):
        trainer([{"text": "the cat"}])
    with pytest.raises(ValueError, match="Row 0 .* has no language"):
        trainer([{"text": "the cat", "language": None}, {"text": "il gatto", "language": "it"}])
    with pytest.raises(ValueError, match="unknown teachers"):
        trainer([{"text": "the cat", "language": "en"}], language_teachers={"en": "nobody"})
    with pytest.raises(ValueError, match="token embeddings but the student vocabulary"):
        MergeDistillTrainer(model=tiny_mlm(7, 0), args=args, teachers=teachers, vocabulary=vocabulary)
    cached = MergeDistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, signal_source="cached")
    with pytest.raises(ValueError, match="id column"):
        MergeDistillTrainer(model=student, args=cached, teachers=teachers, vocabulary=vocabulary,
                            train_dataset=Dataset.from_list([{"text": "the cat", "language": "en"}]))
    with pytest.raises(ValueError, match="alpha"):
        MergeDistillConfig(output_dir=str(tmp_path), alpha=1.5)


# ---------------------------------------------------------------------- inputs, signals, cache
def make_trainer(teachers, tmp_path, **config):
    vocabulary = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers])
    student = build_student(vocabulary, teachers, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    defaults = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=8,
                    per_device_eval_batch_size=8, learning_rate=3e-3, num_train_epochs=2, save_strategy="no", seed=0)
    defaults.update(config)
    args = MergeDistillConfig(**defaults)
    return MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary, train_dataset=mixed_dataset())


def test_student_reads_its_own_segmentation_and_teachers_align(teachers, tmp_path):
    """Every text is tokenized by the STUDENT's tokenizer (as at inference); the teacher gets its own
    tokenization with every overlapping token masked, and predicts exactly the aligned positions."""
    trainer = make_trainer(teachers, tmp_path)
    rows = [mixed_dataset()[i] for i in range(10)]
    batch = trainer.data_collator(rows)
    student_tok = trainer.vocabulary.tokenizer
    kd = batch[KD_POSITIONS_KEY]
    for i, row in enumerate(rows):
        original = torch.tensor(student_tok(row["text"])["input_ids"])
        size = len(original)
        predict = batch["labels"][i, :size] != -100
        assert predict.any() and torch.equal(batch["labels"][i, :size][predict], original[predict])
        assert torch.equal(batch["input_ids"][i, :size][~predict], original[~predict])
        assert not (kd[i] & (batch["labels"][i] == -100)).any()  # KD only where the student predicts
    for t, sub in batch[TEACHER_BATCHES_KEY].items():
        tok = teachers[t].tokenizer
        for j, row in enumerate(sub["rows"].tolist()):
            size = int(sub["attention_mask"][j].sum())
            teacher_ids = torch.tensor(tok(rows[row]["text"])["input_ids"])
            masked = sub["input_ids"][j, :size] == tok.mask_token_id
            assert torch.equal(sub["input_ids"][j, :size][~masked], teacher_ids[~masked])
            assert masked[sub["predict"][j, :size]].all()  # the teacher never sees what it predicts
            # the toy words are whole tokens in both tokenizers: every predicted student position aligns
            assert int(sub["predict"][j].sum()) == int(kd[row].sum()) == int((batch["labels"][row] != -100).sum())
            # aligned positions hold the same word
            student_words = student_tok.convert_ids_to_tokens(batch["labels"][row][kd[row]].tolist())
            teacher_words = tok.convert_ids_to_tokens(teacher_ids[sub["predict"][j, :size]].tolist())
            assert [w.lstrip("\u2581") for w in teacher_words] == student_words
    # the student's embeddings: the reference teacher's row where it owns the token, else the other
    # teacher's row mapped by a least-squares linear map (here: too few shared tokens, so left as initialised)
    vocabulary = trainer.vocabulary
    init = trainer.model.config.ki_student_init
    reference = [t.name for t in teachers].index(init["reference"])
    ref_tok = teachers[reference].tokenizer
    word = next(w for w in ("the", "il") if vocabulary.tokens.index(w) in vocabulary.owners and any(o == reference for o, _ in vocabulary.owners[vocabulary.tokens.index(w)]))
    owner_token = word if ref_tok.convert_tokens_to_ids(word) != ref_tok.unk_token_id else "\u2581" + word
    assert torch.allclose(trainer.model.get_input_embeddings().weight[vocabulary.tokens.index(word)],
                          teachers[reference].model.get_input_embeddings().weight[ref_tok.convert_tokens_to_ids(owner_token)])


def test_cached_signals_equal_on_the_fly(teachers, tmp_path):
    trainer = make_trainer(teachers, tmp_path, signal_source="cached", signal_cache_dir=str(tmp_path / "cache"), logging_steps=4)
    cache = trainer.precompute_teacher_signals()
    assert len(cache) == 48 and os.path.exists(cache.path)
    collator = trainer.data_collator
    rows = [mixed_dataset()[i] for i in range(16)]
    batch = collator(rows)  # static masking: the same positions as when cached
    live = trainer.teacher_signal(batch[TEACHER_BATCHES_KEY], batch["labels"], batch[KD_POSITIONS_KEY])
    cached = cache.lookup(batch["md_example_ids"], (batch["labels"] != -100).sum(1).tolist())
    assert len(live.ids) == len(cached.ids) > 16
    assert torch.equal(live.ids[live.probs > 0], cached.ids[live.probs > 0])
    assert torch.allclose(live.probs, cached.probs, atol=1e-3)  # fp16 storage
    # reloaded from disk: same content; another fingerprint is refused; a changed text is refused
    reloaded = TopKSignalCache.load(cache.path, cache.fingerprint, cache.k)
    assert torch.equal(reloaded.ids, cache.ids) and torch.equal(reloaded.probs, cache.probs)
    with pytest.raises(StaleSignalCacheError, match="other teachers"):
        TopKSignalCache.load(cache.path, "0" * 20, cache.k)
    with pytest.raises(StaleSignalCacheError, match="different text"):
        cache.check_text(rows[0]["id"], rows[0]["text"] + " changed")
    # the loss from cached signals equals the on-the-fly loss on the same batch (fp16 tolerance)
    model = trainer.model.eval()
    with torch.no_grad():
        on_the_fly = trainer.compute_loss(model, dict(batch))
        model.train()  # the cache is read for training batches
        from_cache = trainer.compute_loss(model, dict(batch))
    model.eval()
    assert math.isclose(on_the_fly.item(), from_cache.item(), rel_tol=1e-3)
    trainer.train()  # trains from the cache
    assert trainer.state.global_step > 0
    assert any("md_kd" in entry and "md_mlm" in entry for entry in trainer.state.log_history)


def test_train_save_reload_fill_mask_and_card(teachers, tmp_path):
    trainer = make_trainer(teachers, tmp_path, num_train_epochs=8, logging_steps=4)
    before = trainer.evaluate(mixed_dataset(16, seed=9))
    trainer.train()
    after = trainer.evaluate(mixed_dataset(16, seed=9))
    assert after["eval_masked_tokens"] == before["eval_masked_tokens"]  # static evaluation masking
    assert after["eval_loss"] < before["eval_loss"]
    assert any("md_positions_without_teacher_mass" in entry for entry in trainer.state.log_history)
    trainer.save_model()
    trainer.create_model_card()
    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    out = fill(f"the big cat {tokenizer.mask_token} and the cat")
    assert len(out) == 5 and all(o["token_str"] for o in out)
    card = open(tmp_path / "README.md", encoding="utf-8").read()
    assert "MergeDistill" in card and "en_teacher" in card and "it_teacher" in card and "None dataset" not in card
    assert f"{len(trainer.vocabulary)} tokens" in card and "segmented as in training" in card
    assert "pipeline_tag: fill-mask" in card and "khanuja-etal-2021-mergedistill" in card
    # the card's fill-mask snippet runs as written (the model id is the output directory)
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    assert len(printed.getvalue().strip().splitlines()) == 3
    from ki_trainer.merge_distill.model_card import add_results_to_card

    add_results_to_card(str(tmp_path), "| a | b |\n|---|---|\n| 1 | 2 |")
    card = add_results_to_card(str(tmp_path), "| a | b |\n|---|---|\n| 3 | 4 |")  # replaces, never duplicates
    assert card.count("## Results") == 1 and "| 3 | 4 |" in card and "| 1 | 2 |" not in card
    assert card.index("## Results") < card.index("## Citations")


def test_scores_and_teacher_selection(teachers):
    held_out = {"en": en_sentences(12, 50), "it": it_sentences(12, 51)}
    saved = [list(t.languages) for t in teachers]
    for teacher in teachers:
        teacher.languages = []
    choice, table = select_teachers(teachers, held_out)
    assert choice == {"en": "en_teacher", "it": "it_teacher"}
    assert len(table) == 4 and sum(row["chosen"] for row in table) == 2
    en_row = next(r for r in table if r["language"] == "en" and r["teacher"] == "en_teacher")
    assert en_row["accuracy"] > 0.5 and en_row["pseudo_perplexity"] < 5
    # the English WordPiece teacher reads Italian as [UNK] only: nothing scored, every token a miss
    cannot_read = next(r for r in table if r["language"] == "it" and r["teacher"] == "en_teacher")
    assert cannot_read["tokens"] == 0 and cannot_read["unknown_tokens"] > 0 and cannot_read["accuracy_with_unknown"] == 0
    assert [t.languages for t in teachers] == [["en"], ["it"]]
    for teacher, languages in zip(teachers, saved):
        teacher.languages = languages
    # groups=None (one token per pass) scores the same tokens as grouped masking
    single = score_masked_lm(teachers[0].model, teachers[0], held_out["en"][:3], groups=None)
    grouped = score_masked_lm(teachers[0].model, teachers[0], held_out["en"][:3], groups=3)
    assert single["tokens"] == grouped["tokens"] == sum(len(s.split()) for s in held_out["en"][:3])
    # restricted to the tokens the teachers produce on each language's text: the same choice
    candidates = {
        lang: StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers],
                                      [count_tokens(t.tokenizer, texts) for t in teachers])
        for lang, texts in held_out.items()
    }
    choice, table = select_teachers(teachers, held_out, candidates=candidates)
    assert choice == {"en": "en_teacher", "it": "it_teacher"}
    for teacher, languages in zip(teachers, saved):
        teacher.languages = languages


def test_restricted_output_layer_equals_full_columns(teachers, tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from ki_trainer.merge_distill import masked_lm_logits

    torch.manual_seed(0)
    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, max_position_embeddings=40)).eval()
    import copy

    for model in (copy.deepcopy(teachers[0].model), roberta):
        with torch.no_grad():
            model.get_output_embeddings().bias.add_(torch.randn_like(model.get_output_embeddings().bias))  # non-zero bias
        ids = torch.randint(5, 15, (3, 7))
        predict = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.5
        columns = torch.tensor([9, 2, 14, 5])
        with torch.no_grad():
            full = masked_lm_logits(model, ids, torch.ones_like(ids), predict)
            restricted = masked_lm_logits(model, ids, torch.ones_like(ids), predict, columns=columns)
            reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[predict]
        assert torch.allclose(full, reference, atol=1e-5)
        assert torch.allclose(restricted, reference[:, columns], atol=1e-5)
    # teacher_output="student_vocabulary": top-k over the representable tokens; a full vocabulary here
    # (every teacher token maps), so the signal equals the full one
    full_trainer = make_trainer(teachers, tmp_path / "a")
    restricted_trainer = make_trainer(teachers, tmp_path / "b", teacher_output="student_vocabulary")
    batch = full_trainer.data_collator([mixed_dataset()[i] for i in range(8)])
    a = full_trainer.teacher_signal(batch[TEACHER_BATCHES_KEY], batch["labels"], batch[KD_POSITIONS_KEY])
    b = restricted_trainer.teacher_signal(batch[TEACHER_BATCHES_KEY], batch["labels"], batch[KD_POSITIONS_KEY])
    # the restricted top-k (over teacher tokens that have a student form) holds every token the full top-k
    # kept, with the same RELATIVE probabilities: the same distribution conditioned on representable tokens
    assert len(a.ids) == len(b.ids) > 0
    for row in range(len(a.ids)):
        full = {int(i): float(p) for i, p in zip(a.ids[row], a.probs[row]) if p > 0}
        restricted = {int(i): float(p) for i, p in zip(b.ids[row], b.probs[row]) if p > 0}
        assert full and set(full) <= set(restricted)
        ratios = [restricted[i] / full[i] for i in full]
        assert max(ratios) - min(ratios) < 1e-3 * max(ratios)
    scores = [score_masked_lm(teachers[0].model, teachers[0], en_sentences(4, 3), full_trainer.vocabulary, 0, candidates=c)
              for c in ("all", "student_vocabulary")]
    # the English teacher's vocabulary maps entirely, so both candidate sets are the same tokens
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert math.isclose(scores[0]["pseudo_perplexity"], scores[1]["pseudo_perplexity"], rel_tol=1e-5)
