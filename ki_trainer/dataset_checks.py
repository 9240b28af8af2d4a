"""Datasets, read and checked before any expensive work.

The column helpers read ``datasets.Dataset``, lists of dicts, torch Datasets of dicts and iterable
(streamed) datasets alike; :func:`check_dataset` rejects what would fail mid-epoch (an empty set, a
missing text column, a bad text, a streamed set without ids for cached signals) and translates a
``ClassLabel`` column into label names.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .collator import GOLD_LABEL_FALLBACK


def is_streaming(dataset) -> bool:
    """Whether ``dataset`` can only be iterated (``IterableDataset``, ``datasets`` streaming), not indexed."""
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


def column_names(dataset) -> list[str]:
    """Column names of a ``datasets.Dataset``, or the keys of the first row of any indexable dataset (of an
    iterable one: its declared ``column_names``, else ``[]``: unknown before iterating)."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    if is_streaming(dataset):
        return []
    return list(dataset[0]) if len(dataset) else []


def column_values(dataset, name: str) -> list:
    """One column as a list; works without ``datasets`` (lists of dicts, torch Datasets of dicts)."""
    if getattr(dataset, "column_names", None) is not None:
        return list(dataset[name])
    return [dataset[i][name] for i in range(len(dataset))]


def check_texts(texts: Sequence, ids: Optional[Sequence] = None, where: str = "dataset", column: str = "text") -> None:
    """Cheap scan before any expensive work: every text is a str that encodes as UTF-8.

    Raises naming the first bad row (position and id), instead of failing in the middle of an epoch or
    of a precompute.
    """
    for position, text in enumerate(texts):
        problem = None
        if not isinstance(text, str):
            problem = f"is {type(text).__name__} {text!r:.40}, not a string"
        else:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                problem = f"is not valid text ({err.reason} at character {err.start}, e.g. a lone surrogate)"
        if problem is not None:
            who = f"row {position}" + (f" (id {ids[position]!r})" if ids is not None else "")
            raise ValueError(f"{where}: column {column!r} at {who} {problem}. Fix or drop the row.")


def check_dataset(dataset, split: str, args, teachers, label_space):
    """``dataset`` checked for a run with ``args`` (``None`` passes through); a ``ClassLabel`` label column that
    numbers classes in another order than ``label_space`` is returned mapped to label names."""
    if dataset is None:
        return None
    cached = args.signals_are_cached
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and args.text_column not in columns:
        own_tokenizers = [t.name for t in teachers if t.tokenizer is not None]
        if "input_ids" not in columns:
            raise ValueError(
                f"The {split} dataset has no text column {args.text_column!r} (columns: {columns}). "
                "Set text_column= in KnowledgeIntegrationConfig."
            )
        if own_tokenizers or cached:
            why = (f"teacher(s) {own_tokenizers} tokenize it with their own tokenizer" if own_tokenizers
                   else "signal_source='cached' checks each cached row against its text")
            raise ValueError(
                f"The {split} dataset is pre-tokenized without its text column {args.text_column!r} (columns: "
                f"{columns}), but {why}. Keep the text column when you tokenize (no remove_columns=)."
            )
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and args.text_column in column_names(dataset):
        # Cheap scan before any expensive work: a bad row fails here, by position and id, not mid-epoch.
        texts = column_values(dataset, args.text_column)
        ids = column_values(dataset, args.id_column) if args.id_column in column_names(dataset) else None
        check_texts(texts, ids, f"The {split} dataset", args.text_column)
    if split == "train" and is_streaming(dataset) and cached and columns is not None \
            and args.id_column not in columns:
        raise ValueError(
            f"The {split} dataset is an IterableDataset without an example id column {args.id_column!r} (columns: "
            f"{columns}). signal_source='cached' precomputes its signals in one pass and looks rows up by id: add "
            "an id column (e.g. dataset.map(lambda r, i: {'id': str(i)}, with_indices=True)) or set id_column=, "
            "or use signal_source='on_the_fly'."
        )
    column = args.label_column
    if columns is not None and column not in columns and GOLD_LABEL_FALLBACK in columns:
        column = GOLD_LABEL_FALLBACK  # `labels`, as HF scripts name it: read like `label`
    feature = (getattr(dataset, "features", None) or {}).get(column)
    names = getattr(feature, "names", None)
    if names is not None and names != label_space.labels:
        # A ClassLabel column numbers classes in ITS order: translate ids to names, never reuse them.
        # (`features=` matters: without it `map` re-encodes the names into the old ClassLabel.)
        from datasets import Value  # lazy: only datasets.Dataset inputs get here (GPU images may lack it)

        features = dataset.features.copy()
        features[column] = Value("string")
        dataset = dataset.map(
            lambda batch: {column: [names[i] if i is not None and i >= 0 else None for i in batch[column]]},
            batched=True,
            features=features,
            desc=f"Mapping {split} ClassLabel ids to label names",
        )
    return dataset


def check_user_collator(collator, dataset, args) -> None:
    """A user's padding collator needs token ids: say so at construction, not at the first batch."""
    columns = column_names(dataset) if dataset is not None else []
    if columns and "input_ids" not in columns:
        raise ValueError(
            f"data_collator={type(collator).__name__} pads token ids, but the train dataset has no input_ids "
            f"(columns: {columns}). Either tokenize it first (dataset.map(tokenize, batched=True), keeping the "
            f"{args.text_column!r} column for teachers with their own tokenizer), or drop data_collator= and let "
            "the trainer tokenize the raw text itself."
        )
