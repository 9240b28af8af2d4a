"""``Teacher``: a fine-tuned sequence classifier, its label names and (optionally) its own tokenizer."""

from __future__ import annotations

import inspect
import os
import re
from typing import Optional, Sequence, Union

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

ModelLike = Union[str, os.PathLike, PreTrainedModel]
TokenizerLike = Union[str, os.PathLike, PreTrainedTokenizerBase, None]


class Teacher:
    """One member of the teacher ensemble.

    Args:
        model: a fine-tuned ``*ForSequenceClassification`` instance, a local directory or a Hub id.
        tokenizer: the teacher's own tokenizer (instance, directory or Hub id). ``None`` means the
            teacher reads the student's tokenization, which is right when both share a vocabulary.
        labels: the teacher's label names in its own index order. Defaults to
            ``model.config.id2label``; generic ``LABEL_i`` names are rejected because labels are
            matched across teachers by name.
        name: used in logs and metrics; defaults to the model's directory/Hub name.
        max_length: truncation length for this teacher's own tokenization (default: the model's limit).
    """

    def __init__(
        self,
        model: ModelLike,
        tokenizer: TokenizerLike = None,
        labels: Optional[Sequence[str]] = None,
        name: Optional[str] = None,
        max_length: Optional[int] = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
            model = AutoModelForSequenceClassification.from_pretrained(source)
        elif isinstance(model, torch.nn.Module):
            source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        else:
            raise TypeError(f"Teacher model must be a PreTrainedModel, a directory or a Hub id; got {type(model).__name__}.")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))

        self.model: PreTrainedModel = model
        self.tokenizer: Optional[PreTrainedTokenizerBase] = tokenizer
        self.name: str = name or (os.path.basename(os.path.normpath(source)) if source else "")
        self.max_length = max_length
        self.labels: list[str] = self._resolve_labels(labels)

    def _resolve_labels(self, labels: Optional[Sequence[str]]) -> list[str]:
        config = getattr(self.model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        who = self.name or "teacher"
        if labels is None:
            id2label = getattr(config, "id2label", None) or {}
            labels = [id2label[i] for i in sorted(id2label)]
            if not labels or all(_GENERIC_LABEL.match(str(label)) for label in labels):
                raise ValueError(
                    f"Teacher {who!r} has no label names (its config.id2label is {dict(id2label) or 'empty'}). "
                    "Labels are matched across teachers by NAME: pass Teacher(..., labels=[...]) or set "
                    "config.id2label when fine-tuning it."
                )
        labels = [str(label) for label in labels]
        if num_labels is not None and len(labels) != num_labels:
            raise ValueError(
                f"Teacher {who!r} has {num_labels} output classes but {len(labels)} label names were given."
            )
        return labels

    # ------------------------------------------------------------------ runtime
    def prepare(self, device: torch.device, dtype: torch.dtype) -> "Teacher":
        """Freeze, move and cast the teacher; keep it in eval mode between MC passes."""
        self.model.requires_grad_(False)
        self.model.to(device=device, dtype=dtype)
        self.model.eval()
        return self

    def accepted_inputs(self) -> set[str]:
        """Names the teacher's forward accepts, so a student's extra keys (e.g. token_type_ids) are dropped."""
        return set(inspect.signature(self.model.forward).parameters)

    def position_limit(self) -> Optional[int]:
        """Longest sequence the teacher's position embeddings support, if the config says."""
        return model_position_limit(self.model.config)

    def __repr__(self) -> str:
        kind = type(self.model).__name__
        return f"Teacher(name={self.name!r}, model={kind}, labels={self.labels})"


def model_position_limit(config) -> Optional[int]:
    """Max tokens a model can read; RoBERTa-style position ids start after ``pad_token_id``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer"}:
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return int(limit)
