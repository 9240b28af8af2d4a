"""``Teacher``: a fine-tuned sequence classifier, its label names and (optionally) its own tokenizer."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
from typing import Iterator, Optional, Sequence, Union

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .peft_support import is_adapter_dir, is_peft_model, load_adapter_model, read_labels, unwrap

logger = logging.get_logger(__name__)

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

ModelLike = Union[str, os.PathLike, PreTrainedModel]
TokenizerLike = Union[str, os.PathLike, PreTrainedTokenizerBase, None]


class Teacher:
    """One member of the teacher ensemble.

    Args:
        model: a fine-tuned ``*ForSequenceClassification`` instance, a local directory or a Hub id; or a
            PEFT model / a saved adapter directory (its labels are read from the ``ki_labels.json`` that
            ki-trainer writes next to an adapter).
        tokenizer: the teacher's own tokenizer (instance, directory or Hub id). ``None`` means the
            teacher reads the student's tokenization, which is right when both share a vocabulary.
        labels: the teacher's label names in its own index order. Defaults to
            ``model.config.id2label``; generic ``LABEL_i`` names are rejected because labels are
            matched across teachers by name.
        name: used in logs and metrics; defaults to the model's directory/Hub name.
        max_length: truncation length for this teacher's own tokenization (default: the model's limit).
        adapter: the name of one adapter of a ``PeftModel`` holding several: teachers that are LoRA
            adapters of ONE base model share its weights in memory, and each query switches to the
            teacher's adapter first (always under ``no_grad``). Adapters of one base share its classifier
            shape, so such teachers have equal class counts; give ``labels=`` when their names differ.
        language: the language(s) of the text the teacher was trained on (e.g. ``"en"``), shown on the
            student's model card.

    Example (two LoRA teachers on one base)::

        base = PeftModel.from_pretrained(model, "lora_a", adapter_name="a")
        base.load_adapter("lora_b", adapter_name="b")
        teachers = [Teacher(base, adapter="a", labels=[...]), Teacher(base, adapter="b", labels=[...])]
    """

    def __init__(
        self,
        model: ModelLike,
        tokenizer: TokenizerLike = None,
        labels: Optional[Sequence[str]] = None,
        name: Optional[str] = None,
        max_length: Optional[int] = None,
        adapter: Optional[str] = None,
        language: Optional[Union[str, Sequence[str]]] = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
            if is_adapter_dir(source):
                labels = labels if labels is not None else read_labels(source)
                with whole_model_loading():  # never sharded by ZeRO-3's init: teachers stay outside the engine
                    model = load_adapter_model(source)
            else:
                model = load_trained_model(AutoModelForSequenceClassification, source, "classification")
        elif isinstance(model, torch.nn.Module):
            source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        else:
            raise TypeError(f"Teacher model must be a PreTrainedModel, a directory or a Hub id; got {type(model).__name__}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
            raise ValueError(
                f"Teacher max_length must be an int >= 2 (room for the special tokens) or None, got {max_length!r}."
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))

        self.model: PreTrainedModel = model
        self.tokenizer: Optional[PreTrainedTokenizerBase] = tokenizer
        self.source: str = source
        self.name: str = name or (os.path.basename(os.path.normpath(source)) if source else "")
        self.max_length = max_length
        self.language = language
        self.adapter: Optional[str] = self._check_adapter(adapter)
        if self.adapter is not None and not name:
            self.name = self.adapter
        self.labels: list[str] = self._resolve_labels(labels)

    def _check_adapter(self, adapter: Optional[str]) -> Optional[str]:
        if adapter is None:
            return None
        if not is_peft_model(self.model):
            raise TypeError(
                f"Teacher(..., adapter={adapter!r}) needs a peft.PeftModel holding that adapter; got "
                f"{type(self.model).__name__}."
            )
        if adapter not in self.model.peft_config:
            raise ValueError(f"The PeftModel has no adapter {adapter!r}; it has {sorted(self.model.peft_config)}.")
        return adapter

    @contextlib.contextmanager
    def activated(self) -> Iterator[torch.nn.Module]:
        """The model with this teacher's adapter active (a no-op for ordinary teachers).

        ``set_adapter(..., inference_mode=True)`` keeps the adapter frozen; callers run under no_grad.
        The switch happens only when another adapter is active (~0.5 ms); it is not undone afterwards.
        """
        if self.adapter is not None and self.model.active_adapter != self.adapter:
            self.model.set_adapter(self.adapter, inference_mode=True)
        yield self.model

    def _resolve_labels(self, labels: Optional[Sequence[str]]) -> list[str]:
        config = getattr(self.model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        who = self.name or "teacher"
        problem = getattr(config, "problem_type", None)
        if problem not in (None, "single_label_classification"):
            raise ValueError(
                f"Teacher {who!r} is a {problem!r} model (config.problem_type): its outputs are not one softmax "
                "distribution over classes, which is what knowledge integration reads (a multi-label teacher's "
                "independent sigmoids would be read as competing classes). Only single-label classifiers can "
                "be teachers."
            )
        if labels is None:
            id2label = getattr(config, "id2label", None) or {}
            labels = [id2label[i] for i in sorted(id2label)]
            if not labels or all(_GENERIC_LABEL.match(str(label)) for label in labels):
                raise ValueError(
                    f"Teacher {who!r} has no label names (its config.id2label is {dict(id2label) or 'empty'}). "
                    "Labels are matched across teachers by NAME: pass Teacher(..., labels=[...]) or set "
                    "config.id2label when fine-tuning it."
                )
        if isinstance(labels, (str, bytes)) or isinstance(labels, dict):
            raise TypeError(
                f"Teacher {who!r}: labels must be a list of label names in the teacher's index order, got "
                f"{type(labels).__name__} {labels!r} (a string would be read letter by letter)."
            )
        labels = [str(label) for label in labels]
        if num_labels is not None and len(labels) != num_labels:
            raise ValueError(
                f"Teacher {who!r} has {num_labels} output classes but {len(labels)} label names were given."
            )
        return labels

    # ------------------------------------------------------------------ runtime
    def prepare(self, device: torch.device, dtype: torch.dtype) -> "Teacher":
        """Freeze, move and cast the teacher; keep it in eval mode between MC passes.

        Casting to another dtype (e.g. bf16 mixed precision) works on a COPY: casting in place would
        round the caller's own module, which stays rounded after training.
        """
        current = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if current is not None and current != dtype and not getattr(self.model, "_ki_cast_copy", False):
            self.model = copy.deepcopy(self.model)
            self.model._ki_cast_copy = True
        self.model.requires_grad_(False)
        self.model.to(device=device, dtype=dtype)
        self.model.eval()
        return self

    def accepted_inputs(self) -> set[str]:
        """Names the teacher's forward accepts, so a student's extra keys (e.g. token_type_ids) are dropped."""
        return set(inspect.signature(unwrap(self.model).forward).parameters)

    def check_reads(self, student_tokenizer: PreTrainedTokenizerBase) -> None:
        """Fail early if this teacher cannot read the student's tokenization (``tokenizer=None``).

        Two mistakes are caught: ids beyond the teacher's embedding table (an index error deep in
        the forward otherwise), and a teacher directory saved with a different vocabulary (which would
        silently feed it the wrong tokens).
        """
        if self.tokenizer is not None:
            return
        vocab_rows = getattr(self.model.config, "vocab_size", None)
        if vocab_rows is not None and len(student_tokenizer) > vocab_rows:
            raise ValueError(
                f"Teacher {self.name!r} has {vocab_rows} token embeddings but would read the student's tokenizer "
                f"({len(student_tokenizer)} tokens). Give it its own tokenizer: Teacher(..., tokenizer=...)."
            )
        own = _known_tokenizer(self.source)
        if own is None:
            logger.warning(
                f"Teacher {self.name!r} reads the student's tokenization, but its own tokenizer is unknown (no saved "
                f"tokenizer at {self.source!r}), so the vocabularies cannot be compared. If it was fine-tuned with "
                "another vocabulary its inputs are wrong tokens: pass Teacher(..., tokenizer=...)."
            )
        elif own.get_vocab() != student_tokenizer.get_vocab():
            raise ValueError(
                f"Teacher {self.name!r} was saved with its own tokenizer ({type(own).__name__}, {len(own)} tokens), "
                f"which differs from the student's. Pass Teacher({self.source!r}, tokenizer={self.source!r})."
            )

    def position_limit(self) -> Optional[int]:
        """Longest sequence the teacher's position embeddings support, if the config says."""
        return model_position_limit(self.model.config)

    def __repr__(self) -> str:
        kind = type(self.model).__name__
        adapter = f", adapter={self.adapter!r}" if self.adapter is not None else ""
        return f"Teacher(name={self.name!r}, model={kind}{adapter}, labels={self.labels})"


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load models whole even while DeepSpeed ZeRO-3 is configured.

    Under ZeRO-3 (``zero3_init_flag``) ``from_pretrained`` partitions every model it builds across the
    processes, expecting it to enter the DeepSpeed engine. Teachers never do (they are frozen and only
    run forward passes), so a partitioned teacher would hold empty weights: each process loads its
    own whole copy instead.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if saved is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_trained_model(auto_class, source: str, head: str) -> PreTrainedModel:
    """Load a teacher with ``auto_class`` and refuse it when any weight had to be newly initialised.

    ``from_pretrained`` fills weights missing from the checkpoint (or of another shape) with random
    values and only logs a table, which quiet loading hides: a bare encoder loaded as a sequence
    classifier gets a random classifier, a classifier loaded as a masked LM a random MLM head. A teacher
    with random weights teaches noise, so its load report (``output_loading_info``) must be clean.
    """
    with whole_model_loading():  # never sharded by ZeRO-3's init: teachers stay outside the engine
        model, info = auto_class.from_pretrained(source, output_loading_info=True)
    mismatched = {key[0] if isinstance(key, (tuple, list)) else key for key in info.get("mismatched_keys", ())}
    new = sorted(set(info.get("missing_keys", ())) | mismatched)
    if new:
        shown = ", ".join(new[:8]) + (f" ... ({len(new)} in all)" if len(new) > 8 else "")
        raise ValueError(
            f"Teacher {source!r} is not a trained {head} model (no trained head?): loading it as {type(model).__name__} had to initialise "
            f"{len(new)} weight(s) at random ({shown}), and a teacher with random weights teaches noise. Fine-tune it "
            f"first (a {head} head), or pass the checkpoint that holds the trained model."
        )
    return model


def _saved_tokenizer(source: str) -> Optional[PreTrainedTokenizerBase]:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "sentencepiece.bpe.model")
    if not source or not os.path.isdir(source) or not any(os.path.exists(os.path.join(source, n)) for n in names):
        return None
    return AutoTokenizer.from_pretrained(source)


def _known_tokenizer(source: str) -> Optional[PreTrainedTokenizerBase]:
    """The tokenizer saved with a teacher: in its directory, or in the local Hub cache for a Hub id
    (never a download)."""
    if not source:
        return None
    if os.path.isdir(source):
        return _saved_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # not cached locally, or not a Hub id at all
        return None


def model_position_limit(config) -> Optional[int]:
    """Max tokens a model can read; RoBERTa-style position ids start after ``pad_token_id``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer"}:
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return int(limit)
