"""PEFT (LoRA) support: a student wrapped from ``peft_config=``, adapters saved with their labels, and
adapter teachers that share one base model.

``peft`` is imported lazily: nothing here costs anything for users who never touch adapters.

Why a labels file: a saved adapter holds the classifier (``modules_to_save``) but its
``adapter_config.json`` names only the *base* checkpoint, whose head has the base's own class count.
``AutoPeftModelForSequenceClassification.from_pretrained(dir)`` then fails with a size mismatch unless
it is told the union labels. ``ki_labels.json`` (written next to the adapter) records them, and
:func:`label_kwargs` turns them into the keyword arguments that make the stock loaders work::

    AutoPeftModelForSequenceClassification.from_pretrained(dir, **label_kwargs(dir))
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

import torch

LABELS_FILE = "ki_labels.json"
ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it cannot be one)."""
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT wrappers (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def wrap_student(model: torch.nn.Module, peft_config: Any) -> torch.nn.Module:
    """``get_peft_model`` for a sequence-classification student (classifier trained and saved).

    ``task_type`` defaults to SEQ_CLS, which puts the classifier head in ``modules_to_save``; the
    config is copied, so one ``peft_config`` serves every ``model_init`` trial.
    """
    from peft import TaskType, get_peft_model

    if is_peft_model(model):
        raise ValueError(
            "The student is already a PeftModel and peft_config= was given too: pass the plain model with "
            "peft_config=, or your own wrapped model without it."
        )
    config = copy.deepcopy(peft_config)
    task_type = getattr(config, "task_type", None)
    if task_type is None:
        config.task_type = TaskType.SEQ_CLS
    elif str(getattr(task_type, "value", task_type)) != TaskType.SEQ_CLS.value:
        raise ValueError(f"peft_config.task_type is {task_type}; a classification student needs TaskType.SEQ_CLS.")
    return get_peft_model(model, config)


def write_labels(output_dir: str, config) -> str:
    """Record ``id2label``/``label2id`` of a saved adapter (the base checkpoint cannot carry them)."""
    id2label = {int(i): str(label) for i, label in config.id2label.items()}
    payload = {
        "num_labels": len(id2label),
        "id2label": {str(i): id2label[i] for i in sorted(id2label)},
        "label2id": {id2label[i]: i for i in sorted(id2label)},
    }
    path = os.path.join(output_dir, LABELS_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return path


def _labels_file(adapter_dir: str) -> Optional[str]:
    if os.path.isdir(adapter_dir):
        path = os.path.join(adapter_dir, LABELS_FILE)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    try:  # a Hub repo id
        return hf_hub_download(adapter_dir, LABELS_FILE)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def read_labels(adapter_dir: str) -> Optional[list[str]]:
    """The union labels stored with an adapter by ki-trainer (local directory or Hub repo id), in id
    order; ``None`` if the adapter has no ``ki_labels.json``."""
    path = _labels_file(adapter_dir)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        id2label = json.load(handle)["id2label"]
    return [id2label[key] for key in sorted(id2label, key=int)]


def label_kwargs(adapter_dir: str) -> dict:
    """Keyword arguments that let ``AutoPeftModelForSequenceClassification.from_pretrained`` (or
    ``pipeline(..., model_kwargs=...)``) rebuild the base with the adapter's union head."""
    labels = read_labels(adapter_dir)
    if labels is None:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "ignore_mismatched_sizes": True,  # the base head is replaced by the adapter's saved classifier
    }


def load_adapter_model(adapter_dir: str, **kwargs) -> torch.nn.Module:
    """Load a saved adapter (with its labels) as a ``PeftModelForSequenceClassification``.

    As ``AutoPeftModelForSequenceClassification.from_pretrained`` does (the base, then the adapter), but the base's
    load report is read: a weight the base checkpoint lacks (a bare encoder's classifier) or whose shape was
    replaced (``ignore_mismatched_sizes``) must be among the adapter's saved ``modules_to_save``, else the
    teacher's head would be random and a ``ValueError`` says so.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    labels = label_kwargs(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            config.base_model_name_or_path, output_loading_info=True, **{**labels, **kwargs})
        model = PeftModel.from_pretrained(base, adapter_dir)
    except RuntimeError as error:
        if labels or "mismatch" not in str(error).lower():
            raise
        raise ValueError(
            f"The adapter in {adapter_dir!r} has no {LABELS_FILE} and its classifier does not fit the base model's "
            "head. Load it yourself with AutoPeftModelForSequenceClassification.from_pretrained(dir, num_labels=..., "
            "id2label=..., label2id=..., ignore_mismatched_sizes=True) and pass Teacher(model, labels=[...])."
        ) from error
    mismatched = {key[0] if isinstance(key, (tuple, list)) else key for key in info.get("mismatched_keys", ())}
    saved = set(getattr(config, "modules_to_save", None) or [])
    random = sorted(key for key in set(info.get("missing_keys", ())) | mismatched
                    if not any(part in saved for part in key.split(".")[:-1]))
    if random:
        raise ValueError(
            f"The adapter in {adapter_dir!r} does not hold weights that its base {config.base_model_name_or_path!r} "
            f"lacks: {', '.join(random[:6])}{' ...' if len(random) > 6 else ''} would be random (the adapter was "
            "saved without its classifier: modules_to_save / task_type=SEQ_CLS). A teacher needs its trained head."
        )
    return model


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter merged in; ``model`` itself keeps training."""
    return copy.deepcopy(model).merge_and_unload()
