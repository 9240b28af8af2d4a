"""Masked-token accuracy and pseudo-perplexity on held-out text; teacher selection per language;
downstream accuracy after fine-tuning a checkpoint as a sequence classifier.

Scoring masks every eligible token exactly once: the eligible tokens of a text are dealt into
``groups`` groups round-robin, and each group is replaced by ``[MASK]`` in one pass (``groups=None``
masks one token per pass, the classic pseudo-perplexity of Salazar et al., at one pass per token).
Accuracy is top-1 on the gold token; pseudo-perplexity is ``exp(mean -log p(gold))``.

A student is scored on the SAME teacher tokenization mapped to student ids and the same positions
as that language's teacher, so teacher, student and baseline are compared token for token.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch

from ..teacher import model_position_limit
from .signals import masked_lm_logits
from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary


@torch.no_grad()
def score_masked_lm(
    model,
    teacher: MaskedLMTeacher,
    texts: Sequence[str],
    vocabulary: Optional[StudentVocabulary] = None,
    teacher_index: Optional[int] = None,
    student: bool = False,
    candidates: str = "all",
    groups: Optional[int] = 7,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict:
    """Score ``model`` on ``texts`` tokenized by ``teacher``.

    Args:
        model: the teacher's own masked LM, or a student (then ``student=True`` and ``vocabulary``).
        teacher: whose tokenizer segments the texts.
        vocabulary, teacher_index: the student vocabulary and ``teacher``'s index in it. Given, only
            tokens with a student counterpart are scored (so a teacher and a student are scored on the
            same positions); ``None``: every non-special token is scored.
        student: ``model`` reads student ids (the teacher's tokens mapped through the vocabulary).
        candidates: for a teacher, ``"all"`` predicts over its whole vocabulary; ``"student_vocabulary"``
            only over its tokens with a student counterpart (the student's candidate set, and a fraction of
            the cost for a 250k-token teacher).
        groups: tokens masked together per pass (round-robin); ``None`` = one token per pass.
    """
    if (vocabulary is None) != (teacher_index is None) or (student and vocabulary is None):
        raise ValueError("Pass vocabulary and teacher_index together (a student always needs them).")
    if candidates not in ("all", "student_vocabulary") or (candidates != "all" and (student or vocabulary is None)):
        raise ValueError("candidates='student_vocabulary' applies to a teacher scored with a vocabulary.")
    id_map = vocabulary.id_maps[teacher_index] if vocabulary is not None else None
    columns = inverse = None
    if candidates == "student_vocabulary":
        columns = vocabulary.mapped_teacher_ids(teacher_index)
        inverse = torch.full((len(id_map),), -1, dtype=torch.long)
        inverse[columns] = torch.arange(len(columns))
    tokenizer = teacher.tokenizer
    # never past a position limit (the scored model's, the teacher's, its tokenizer's): like the trainer
    limits = [max_length, teacher.max_length, teacher.position_limit(), model_position_limit(model.config),
              getattr(tokenizer, "model_max_length", None)]
    max_length = int(min(x for x in limits if x is not None and x < 1_000_000))
    if max_length < 3:
        raise ValueError(f"max_length resolves to {max_length}: too short for two special tokens and a text token.")
    model.eval()
    device = next(model.parameters()).device
    specials = set(tokenizer.all_special_ids)
    sequences = []  # (input ids, gold ids, predict mask)
    unknown = 0
    for text in texts:
        ids = torch.tensor(tokenizer(text, truncation=True, max_length=max_length)["input_ids"], dtype=torch.long)
        unknown += int((ids == tokenizer.unk_token_id).sum()) if tokenizer.unk_token_id is not None else 0
        eligible = torch.tensor([i not in specials for i in ids.tolist()], dtype=torch.bool)
        if id_map is not None:
            eligible &= (ids < len(id_map)) & (id_map[ids.clamp(max=len(id_map) - 1)] >= 0)
        order = torch.nonzero(eligible).flatten()
        n_groups = len(order) if groups is None else min(groups, len(order))
        if student:
            inputs = vocabulary.map_ids(teacher_index, ids)
            gold, mask_id = inputs.clone(), vocabulary.special_ids["mask"]
        else:
            inputs, gold, mask_id = ids, ids, tokenizer.mask_token_id
        for g in range(n_groups):
            predict = torch.zeros_like(eligible)
            predict[order[g::n_groups]] = True
            masked = inputs.clone()
            masked[predict] = mask_id
            sequences.append((masked, gold, predict))
    correct, nll, count = 0, 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s[0]) for s in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        predict = torch.zeros_like(input_ids, dtype=torch.bool)
        gold = torch.zeros_like(input_ids)
        for j, (masked, g, p) in enumerate(chunk):
            input_ids[j, : len(masked)], attention[j, : len(masked)] = masked, 1
            predict[j, : len(masked)], gold[j, : len(masked)] = p, g
        logits = masked_lm_logits(
            model, input_ids.to(device), attention.to(device), predict.to(device),
            columns=None if columns is None else columns.to(device),
        ).float()
        target = gold[predict] if inverse is None else inverse[gold[predict]]
        target = target.to(device)
        log_probs = torch.log_softmax(logits, dim=-1)
        nll += float(-log_probs.gather(1, target[:, None]).sum())
        correct += int((logits.argmax(dim=-1) == target).sum())
        count += len(target)
    return {
        "accuracy": correct / count if count else float("nan"),
        "pseudo_perplexity": (math.exp(nll / count) if nll / count < 700 else float("inf")) if count else float("nan"),
        "tokens": count,
        "unknown_tokens": unknown,
        # [UNK] tokens (text the tokenizer cannot represent) counted as misses: what teacher selection uses
        "accuracy_with_unknown": correct / (count + unknown) if count + unknown else float("nan"),
    }


def select_teachers(
    teachers: Sequence[MaskedLMTeacher],
    held_out: dict[str, Sequence[str]],
    groups: Optional[int] = 7,
    max_length: int = 128,
    batch_size: int = 32,
    candidates: Optional[dict[str, StudentVocabulary]] = None,
) -> tuple[dict[str, str], list[dict]]:
    """Choose, per language, the teacher with the highest masked-token accuracy on held-out text.

    Each teacher is scored in its own tokenization (so the token sets differ between teachers); tokens
    its tokenizer cannot represent ([UNK]) count as misses, so a teacher that cannot read a language
    is not chosen for it on the strength of the few tokens it can read (``accuracy_with_unknown``). Sets
    ``teacher.languages`` accordingly and returns ``(language -> teacher name, table)``; the table has
    one row per (language, teacher) with accuracy, pseudo-perplexity, tokens and ``chosen``.

    ``candidates`` (language -> a vocabulary with one id map per teacher, e.g. the union of the tokens
    the teachers produce on that language's training text) restricts each teacher's prediction to its
    tokens in that vocabulary and scores only those positions: much cheaper for 250k-token teachers,
    and every teacher chooses among the tokens that occur in the language.
    """
    if not held_out:
        raise ValueError("Teacher selection needs held-out text for at least one language.")
    table, choice = [], {}
    for language, texts in held_out.items():
        if not texts:
            raise ValueError(f"No held-out text for language {language!r}; cannot choose its teacher.")
        rows = []
        for t, teacher in enumerate(teachers):
            restrict = {}
            if candidates is not None:
                restrict = dict(vocabulary=candidates[language], teacher_index=t, candidates="student_vocabulary")
            scores = score_masked_lm(
                teacher.model, teacher, texts, groups=groups, max_length=max_length, batch_size=batch_size, **restrict
            )
            rows.append({"language": language, "teacher": teacher.name, **scores})
        def key(row):
            accuracy = row["accuracy_with_unknown"]
            return (accuracy if accuracy == accuracy else -1.0, -row["pseudo_perplexity"] if row["tokens"] else -math.inf)

        best = max(rows, key=key)
        for row in rows:
            row["chosen"] = row is best
        choice[language] = best["teacher"]
        table.extend(rows)
    for teacher in teachers:
        teacher.languages = [lang for lang, name in choice.items() if name == teacher.name]
    return choice, table


def fine_tune_accuracy(
    model_name_or_path: str,
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    *,
    tokenizer=None,
    labels: Optional[Sequence[str]] = None,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_length: int = 48,
    freeze_word_embeddings: bool = False,
    eval_batch_size: int = 64,
    device: Optional[str] = None,
) -> dict:
    """Fine-tune a checkpoint as a sequence classifier on ``train_*`` and return its accuracy on ``test_*``.

    The downstream check of a merged student against its teachers: ``model_name_or_path`` (a student
    saved by :class:`MergeDistillTrainer`, or a teacher's original encoder) is loaded with
    ``AutoModelForSequenceClassification`` (a fresh classifier head, and pooler where the checkpoint has
    none) and tokenizes with ITS OWN tokenizer (``tokenizer``, default: the one saved with the model;
    for a student, the union tokenizer). Training: AdamW (no decay on biases and LayerNorm weights), linear
    warm-up over ``warmup_ratio`` of the steps then linear decay, cross-entropy in fp32, batches drawn in a
    seeded order; everything random (head initialisation, dropout, order) follows ``seed``, so a seed gives
    the same accuracy on the same machine. Nothing is chosen on the test texts.

    Returns ``accuracy`` plus what explains it: rows, steps, the last epoch's mean training loss, the
    tokenizer's size, the share of non-special tokens that are unknown, of texts cut at ``max_length`` and
    the mean tokens per uncut text (on train + test text: a tokenizer that reads the language poorly, or
    splits it into many pieces so that ``max_length`` covers less of each text, shows here), and seconds.

    Raises:
        ValueError: empty or misaligned texts/labels, a test label absent from the label set, a tokenizer
            with more tokens than the model has embeddings (it is not the model's tokenizer), or
            ``max_length`` beyond the model's position embeddings.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    for name, texts, golds in (("train", train_texts, train_labels), ("test", test_texts, test_labels)):
        if not texts:
            raise ValueError(f"No {name} texts to fine-tune/evaluate on.")
        if len(texts) != len(golds):
            raise ValueError(f"{len(texts)} {name} texts but {len(golds)} {name} labels.")
    if epochs < 1 or batch_size < 1 or max_length < 3:
        raise ValueError(f"Need epochs >= 1, batch_size >= 1 and max_length >= 3 (got {epochs}, {batch_size}, {max_length}).")
    labels = list(labels) if labels is not None else sorted(set(train_labels))
    label2id = {label: i for i, label in enumerate(labels)}
    for name, golds in (("train", train_labels), ("test", test_labels)):
        unknown = next(((row, gold) for row, gold in enumerate(golds) if gold not in label2id), None)
        if unknown is not None:
            raise ValueError(f"{name} row {unknown[0]} has label {unknown[1]!r}, not among the {len(labels)} labels {labels[:5]}...")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(seed)  # the classifier head (and a missing pooler) are initialised from this seed
    model = AutoModelForSequenceClassification.from_pretrained(
        model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    embeddings = model.get_input_embeddings()
    if len(tokenizer) > embeddings.num_embeddings:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but {model_name_or_path} embeds only {embeddings.num_embeddings}: "
            "it is not this model's tokenizer (each model must be fine-tuned with its own)."
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length={max_length} exceeds the {positions} position embeddings of {model_name_or_path}.")
    if freeze_word_embeddings:
        embeddings.weight.requires_grad_(False)
    model.to(device)

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    def batch_of(encoded: list[list[int]]) -> dict:
        padded = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
        return {key: value.to(device) for key, value in padded.items() if key in ("input_ids", "attention_mask")}

    train_ids, test_ids = encode(train_texts), encode(test_texts)
    full = tokenizer(list(train_texts) + list(test_texts), truncation=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ordinary = [i for ids in full for i in ids if i not in specials]
    unknown_share = sum(i == tokenizer.unk_token_id for i in ordinary) / max(1, len(ordinary))
    truncated_share = sum(len(ids) > max_length for ids in full) / len(full)
    mean_tokens = sum(map(len, full)) / len(full)
    train_y = torch.tensor([label2id[label] for label in train_labels], dtype=torch.long)
    test_y = torch.tensor([label2id[label] for label in test_labels], dtype=torch.long)

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": weight_decay},
         {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}],
        lr=learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_ids) / batch_size)
    total = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(round(warmup_ratio * total)), total)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    epoch_losses: list[float] = []
    for _ in range(epochs):
        epoch_losses = []
        for rows in torch.randperm(len(train_ids), generator=generator).split(batch_size):
            logits = model(**batch_of([train_ids[r] for r in rows.tolist()])).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), train_y[rows].to(device))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            epoch_losses.append(float(loss.detach()))
    train_seconds = time.time() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for begin in range(0, len(test_ids), eval_batch_size):
            logits = model(**batch_of(test_ids[begin : begin + eval_batch_size])).logits
            correct += int((logits.argmax(dim=-1).cpu() == test_y[begin : begin + eval_batch_size]).sum())
    return {
        "accuracy": correct / len(test_ids),
        "train_rows": len(train_ids),
        "test_rows": len(test_ids),
        "labels": len(labels),
        "steps": total,
        "last_epoch_loss": round(sum(epoch_losses) / len(epoch_losses), 4),
        "vocab_size": len(tokenizer),
        "unknown_share": round(unknown_share, 4),
        "truncated_share": round(truncated_share, 4),
        "mean_tokens_per_text": round(mean_tokens, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
    }


@torch.no_grad()
def mean_pooled_features(
    model_name_or_path,
    texts: Sequence[str],
    *,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 32,
    device: Optional[str] = None,
) -> torch.Tensor:
    """Frozen features for a linear probe: the encoder's last hidden states, mean-pooled over the real tokens.

    ``model_name_or_path`` is a checkpoint directory (a teacher's encoder or a saved student, loaded with
    ``AutoModel``: the encoder without its head) or a loaded model; each model reads the texts with ITS OWN
    tokenizer (``tokenizer``, default the one saved with it). ``max_length`` is clamped to the model's
    position limit. Returns ``(len(texts), hidden)`` fp32 on the CPU.
    """
    from transformers import AutoModel, AutoTokenizer

    if not texts:
        raise ValueError("No texts to embed.")
    if isinstance(model_name_or_path, torch.nn.Module):
        model = model_name_or_path
        if tokenizer is None:
            raise ValueError("Pass the tokenizer with a loaded model.")
    else:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model_name_or_path))
        model = AutoModel.from_pretrained(str(model_name_or_path))
    base = getattr(model, "base_model", model)
    limit = model_position_limit(base.config)
    max_length = min(max_length, limit) if limit else max_length
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.to(device).eval()
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.zeros((len(encoded), base.config.hidden_size))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        mask = padded["attention_mask"].to(device)
        hidden = base(input_ids=padded["input_ids"].to(device), attention_mask=mask)[0].float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        out[torch.tensor(rows)] = pooled.cpu()
    if not torch.isfinite(out).all():
        raise ValueError(f"Non-finite features from {model_name_or_path}.")
    return out


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: Sequence[int],
    test_x: torch.Tensor,
    test_y: Sequence[int],
    *,
    num_labels: Optional[int] = None,
    l2: float = 1e-3,
    max_iter: int = 300,
) -> dict:
    """Multinomial logistic regression on frozen features; accuracy on ``test_*``.

    Features are standardised with the TRAIN rows' mean and std; the weights minimise the mean
    cross-entropy plus ``l2 * |W|^2`` (bias unpenalised) by full-batch L-BFGS in fp64 from zero, so the
    result is deterministic given the rows. Nothing is chosen on the test rows.
    """
    train_x, test_x = train_x.double(), test_x.double()
    y = torch.as_tensor(list(train_y), dtype=torch.long)
    gold = torch.as_tensor(list(test_y), dtype=torch.long)
    if len(train_x) != len(y) or len(test_x) != len(gold) or len(y) == 0 or len(gold) == 0:
        raise ValueError(f"Features and labels differ in length or are empty ({len(train_x)}/{len(y)}, {len(test_x)}/{len(gold)}).")
    n_labels = num_labels or int(max(int(y.max()), int(gold.max())) + 1)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros((a.shape[1], n_labels), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ weight + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (b @ weight + bias).argmax(-1)
        train_accuracy = float(((a @ weight + bias).argmax(-1) == y).double().mean())
    return {"accuracy": float((predicted == gold).double().mean()), "train_accuracy": train_accuracy,
            "train_rows": len(y), "test_rows": len(gold), "labels": n_labels}
