"""``MaskedLMTeacher``: the masked-LM variant of :class:`ki_trainer.Teacher` for MergeDistill.

It keeps the base class's runtime (``prepare``, ``accepted_inputs``, ``position_limit``) and
replaces what is specific to classifiers: the model is an ``AutoModelForMaskedLM``, there are no
labels, the teacher always has its own tokenizer, and it is assigned to languages.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from ..teacher import ModelLike, Teacher, TokenizerLike, load_trained_model


class MaskedLMTeacher(Teacher):
    """A pre-trained masked LM with its own tokenizer, teaching one or more languages.

    Args:
        model: an ``*ForMaskedLM`` instance, a local directory or a Hub id.
        tokenizer: its tokenizer (instance, directory or id); defaults to ``model`` when that is a path/id.
        languages: the languages (or domains) this teacher teaches; may be left empty and filled by
            :func:`~ki_trainer.merge_distill.select_teachers`.
        name: used in reports; defaults to the model's directory/Hub name.
        max_length: truncation length for this teacher's tokenization.

    Raises:
        ValueError: the model has no MLM head, or the tokenizer has no mask token.
    """

    def __init__(
        self,
        model: ModelLike,
        tokenizer: TokenizerLike = None,
        languages: Optional[Sequence[str]] = None,
        name: Optional[str] = None,
        max_length: Optional[int] = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
            tokenizer = source if tokenizer is None else tokenizer
            model = load_trained_model(AutoModelForMaskedLM, source, "masked-LM")
        elif isinstance(model, torch.nn.Module):
            source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        else:
            raise TypeError(f"Teacher model must be a PreTrainedModel, a directory or a Hub id; got {type(model).__name__}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3):
            raise ValueError(f"Teacher max_length must be an int >= 3 (two special tokens and a text token) or None, got {max_length!r}.")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.model: PreTrainedModel = model
        self.source = source
        self.name = name or (os.path.basename(os.path.normpath(source)) if source else type(model).__name__)
        self.max_length = max_length
        self.labels: list[str] = []
        self.languages: list[str] = list(languages or [])
        if tokenizer is None:
            raise ValueError(f"MaskedLMTeacher {self.name!r} needs its own tokenizer (tokenizer=...).")
        self.tokenizer = tokenizer
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(
                f"Teacher {self.name!r}: its tokenizer ({type(tokenizer).__name__}) has no mask token, so it cannot "
                "be queried as a masked LM."
            )
        get_head = getattr(model, "get_output_embeddings", None)
        if get_head is None or get_head() is None:
            raise ValueError(
                f"Teacher {self.name!r} ({type(model).__name__}) has no MLM head: load it with AutoModelForMaskedLM, "
                "and if its checkpoint has no trained head (e.g. a sentence-embedding encoder), continue its MLM "
                "training first (a decoder tied to the input embeddings adapts quickly)."
            )

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def __repr__(self) -> str:
        return f"MaskedLMTeacher(name={self.name!r}, model={type(self.model).__name__}, languages={self.languages})"
