"""``MergeDistillTrainer``: merge masked-LM teachers with different vocabularies into one student.

A drop-in ``transformers.Trainer`` (same signatures): the batch comes from
:class:`MergeDistillCollator` (each text tokenized and masked by its language's teacher, mapped to
student ids), the loss is ``alpha * KD + (1 - alpha) * MLM`` at the masked positions only, with the
teachers' top-k signals computed on the fly or read from a :class:`TopKSignalCache`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedModel, Trainer

from ..signal_cache import column_names, column_values
from ..teacher import model_position_limit
from .collator import EXAMPLE_IDS_KEY, TEACHER_BATCHES_KEY, MergeDistillCollator
from .config import MergeDistillConfig
from .guards import RunGuards
from .model_card import MERGE_DISTILL_TAGS, merge_distill_section
from .signals import TopKSignal, TopKSignalCache, masked_lm_logits, merge_distill_loss, topk_fingerprint, topk_to_student
from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary

logger = logging.getLogger(__name__)


class MergeDistillTrainer(RunGuards, Trainer):
    """Trainer for MergeDistill.

    Args:
        model: the student masked LM (e.g. from :func:`~ki_trainer.merge_distill.build_student`); its
            vocabulary size must equal ``len(vocabulary)``.
        args: a :class:`MergeDistillConfig` (plain ``TrainingArguments`` are upgraded).
        teachers: :class:`MaskedLMTeacher` s, each with its languages (or give ``language_teachers``).
        vocabulary: the student vocabulary (default: the union of the teachers' vocabularies).
        language_teachers: language -> teacher name; overrides the teachers' ``languages``.
        train_dataset / eval_dataset: rows with raw text and a language (and ids for cached signals).
        processing_class: the student tokenizer saved with the model (default: ``vocabulary.tokenizer``).
    """

    def __init__(
        self,
        model: Optional[PreTrainedModel] = None,
        args: Optional[MergeDistillConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teachers: Optional[Sequence[MaskedLMTeacher]] = None,
        vocabulary: Optional[StudentVocabulary] = None,
        language_teachers: Optional[dict[str, str]] = None,
        **kwargs: Any,
    ) -> None:
        if not teachers:
            raise ValueError("MergeDistillTrainer needs at least one MaskedLMTeacher (teachers=[...]).")
        if model is None:
            raise ValueError("Pass the student masked LM as `model=` (see ki_trainer.merge_distill.build_student).")
        if args is None:
            args = MergeDistillConfig(output_dir="merge_distill_output")
        elif not isinstance(args, MergeDistillConfig):
            values = {k: v for k, v in args.to_dict().items() if k in MergeDistillConfig.__dataclass_fields__}
            args = MergeDistillConfig(**{k: getattr(args, k) for k in values})
        teachers = list(teachers)
        for teacher in teachers:
            if not isinstance(teacher, MaskedLMTeacher):
                raise TypeError(f"Teachers must be MaskedLMTeacher instances, got {type(teacher).__name__}.")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"Teacher names must be unique, got {names}.")
        self.teachers = teachers
        self.language_teachers = self._language_map(teachers, language_teachers)
        if vocabulary is None:
            vocabulary = StudentVocabulary.union([t.tokenizer for t in teachers], names)
        if len(vocabulary.id_maps) != len(teachers):
            raise ValueError(f"The vocabulary has id maps for {len(vocabulary.id_maps)} teachers, {len(teachers)} given.")
        self.vocabulary = vocabulary
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != len(vocabulary):
            raise ValueError(
                f"The student has {rows} token embeddings but the student vocabulary has {len(vocabulary)} tokens; "
                "build it with build_student(vocabulary, ...) or resize_token_embeddings(len(vocabulary))."
            )
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise ValueError(f"The student ({type(model).__name__}) has no MLM head; use an *ForMaskedLM model.")
        if processing_class is None:
            processing_class = vocabulary.tokenizer
        for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            for name, part in (dataset.items() if isinstance(dataset, dict) else [(split, dataset)]):
                self._check_dataset(part, name, args)
        if data_collator is None:
            data_collator = MergeDistillCollator(
                teachers,
                vocabulary,
                {lang: names.index(name) for lang, name in self.language_teachers.items()},
                [self._max_length(t, model, args) for t in teachers],
                mlm_probability=args.mlm_probability,
                seed=args.seed,
                static_masking=args.static_masking,
                text_column=args.text_column,
                language_column=args.language_column,
                id_column=args.id_column,
                emit_ids=args.teacher_signals == "cached",
            )
        self.signal_cache: Optional[TopKSignalCache] = None
        self._stats = self._empty_stats()
        self._eval_counts = [0, 0]
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a mean over masked positions
        if args.alpha > 0:
            dtype = args.resolved_teacher_dtype()
            for teacher in self.teachers:
                teacher.prepare(self.accelerator.device, dtype)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _language_map(teachers: Sequence[MaskedLMTeacher], given: Optional[dict[str, str]]) -> dict[str, str]:
        names = [t.name for t in teachers]
        if given is not None:
            unknown = {lang: name for lang, name in given.items() if name not in names}
            if unknown:
                raise ValueError(f"language_teachers names unknown teachers {unknown}; teachers are {names}.")
            return dict(given)
        mapping: dict[str, str] = {}
        for teacher in teachers:
            for language in teacher.languages:
                if language in mapping:
                    raise ValueError(
                        f"Language {language!r} is assigned to two teachers ({mapping[language]!r} and {teacher.name!r}); "
                        "give each language one teacher (or choose with select_teachers)."
                    )
                mapping[language] = teacher.name
        if not mapping and len(teachers) > 1:
            raise ValueError(
                "No teacher has languages: give MaskedLMTeacher(..., languages=[...]), language_teachers=, or choose "
                "them with ki_trainer.merge_distill.select_teachers."
            )
        return mapping

    def _check_dataset(self, dataset, split: str, args: MergeDistillConfig) -> None:
        if dataset is None:
            return
        columns = column_names(dataset)
        if args.text_column not in columns:
            raise ValueError(f"The {split} dataset has no text column {args.text_column!r} (columns: {columns}).")
        several = len(self.teachers) > 1 or bool(self.language_teachers)
        if several:
            if args.language_column not in columns:
                raise ValueError(
                    f"The {split} dataset has no language column {args.language_column!r} (columns: {columns}); with "
                    f"several teachers each text needs a language, one of {sorted(self.language_teachers)}."
                )
            languages = column_values(dataset, args.language_column)
            for position, language in enumerate(languages):
                if language is None or language not in self.language_teachers:
                    what = "has no language" if language is None else f"has language {language!r}, which has no teacher"
                    raise ValueError(
                        f"Row {position} of the {split} dataset {what}; teachers cover {sorted(self.language_teachers)}."
                    )
        if args.teacher_signals == "cached" and split == "train":
            if args.id_column not in columns:
                raise ValueError(
                    f"Cached teacher signals need an example id column {args.id_column!r}; the {split} dataset has "
                    f"{columns}. Add one (dataset.map(lambda r, i: {{'id': str(i)}}, with_indices=True)) or set id_column=."
                )
            ids = [str(x) for x in column_values(dataset, args.id_column)]
            if len(set(ids)) != len(ids):
                raise ValueError(f"Column {args.id_column!r} of the {split} dataset has duplicate ids.")

    @staticmethod
    def _max_length(teacher: MaskedLMTeacher, student, args: MergeDistillConfig) -> int:
        limits = [
            args.max_length,
            teacher.max_length,
            teacher.position_limit(),
            model_position_limit(student.config),
            getattr(teacher.tokenizer, "model_max_length", None),
        ]
        return int(min(x for x in limits if x is not None and x < 1_000_000))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (self.args.text_column, self.args.language_column, self.args.id_column):
            if column and column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ signals and loss
    @torch.no_grad()
    def teacher_signal(self, teacher_batches: dict, labels: torch.Tensor) -> TopKSignal:
        """Top-k signals for every predicted position of the batch, in the student's row-major order."""
        row_of = torch.nonzero(labels != -100)[:, 0]
        k = self.args.top_k
        ids = torch.zeros((len(row_of), k), dtype=torch.long, device=labels.device)
        probs = torch.zeros((len(row_of), k), device=labels.device)
        kept = torch.zeros(len(row_of), device=labels.device)
        for t, sub in teacher_batches.items():
            teacher = self.teachers[int(t)]
            device = next(teacher.model.parameters()).device
            id_map, columns = self.vocabulary.id_maps[int(t)], None
            if self.args.teacher_output == "student_vocabulary":
                columns = self.vocabulary.mapped_teacher_ids(int(t))
                id_map, columns = id_map[columns], columns.to(device)
            with self.accelerator.autocast():
                logits = masked_lm_logits(
                    teacher.model,
                    sub["input_ids"].to(device),
                    sub["attention_mask"].to(device),
                    sub["predict"].to(device),
                    columns=columns,
                )
            signal = topk_to_student(logits, id_map, k, self.args.kd_temperature)
            select = torch.isin(row_of, sub["rows"].to(row_of.device))
            if int(select.sum()) != len(signal.ids):
                raise RuntimeError(
                    f"Teacher {teacher.name!r} predicted {len(signal.ids)} positions, the student {int(select.sum())}: "
                    "teacher and student sequences are misaligned."
                )
            ids[select] = signal.ids.to(ids.device)
            probs[select] = signal.probs.to(probs.device)
            kept[select] = signal.kept_mass.to(kept.device)
        return TopKSignal(ids, probs, kept)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        teacher_batches = inputs.pop(TEACHER_BATCHES_KEY, {})
        example_ids = inputs.pop(EXAMPLE_IDS_KEY, None)
        labels = inputs.pop("labels")
        predict = labels != -100
        logits = masked_lm_logits(model, inputs["input_ids"], inputs["attention_mask"], predict)
        gold = labels[predict]
        signal = None
        if self.args.alpha > 0:
            if self.signal_cache is not None and example_ids is not None and model.training:
                signal = self.signal_cache.lookup(example_ids, predict.sum(dim=1).tolist(), device=logits.device)
            else:
                signal = self.teacher_signal(teacher_batches, labels)
        loss, parts = merge_distill_loss(logits, gold, signal, self.args.alpha, self.args.kd_temperature)
        stats = self._stats if model.training else None
        if stats is not None:
            stats["steps"] += 1
            for key, value in parts.items():
                stats[key] += float(value)
            if signal is not None and len(signal.kept_mass):
                stats["kept_mass"] += float(signal.kept_mass.float().mean())
                stats["no_teacher_mass"] += float((signal.kept_mass == 0).float().mean())
        else:
            self._eval_counts[0] += int((logits.argmax(dim=-1) == gold).sum())
            self._eval_counts[1] += len(gold)
        if return_outputs:
            return loss, {"logits": logits}
        return loss

    # ------------------------------------------------------------------ cached signals
    def signal_fingerprint(self) -> str:
        collator = self.data_collator
        settings = {
            "k": self.args.top_k,
            "T": self.args.kd_temperature,
            "p": self.args.mlm_probability,
            "output": self.args.teacher_output,
            "seed": self.args.seed,
            "lengths": getattr(collator, "max_lengths", None),
            "languages": self.language_teachers,
            "dtype": str(self.args.resolved_teacher_dtype()),
        }
        return topk_fingerprint(self.teachers, self.vocabulary.id_maps, settings)

    def precompute_teacher_signals(self, dataset=None) -> TopKSignalCache:
        """Compute (or load and complete) the top-k signals of every row of ``dataset`` (default: the
        training set), saved atomically to ``<signal_cache_dir>/<fingerprint>.pt``."""
        dataset = self.train_dataset if dataset is None else dataset
        fingerprint = self.signal_fingerprint()
        directory = self.args.signal_cache_dir or os.path.join(self.args.output_dir, "teacher_signals")
        path = os.path.join(directory, f"{fingerprint}.pt")
        cache = TopKSignalCache.open(path, fingerprint, self.args.top_k)  # main file + shards of a killed precompute
        collator = self.data_collator
        static, emit = collator.static_masking, collator.emit_ids
        collator.static_masking, collator.emit_ids = True, True
        try:
            rows = [dataset[i] for i in range(len(dataset))]
            todo = [row for row in rows if not cache.check_text(collator.example_key(row), row[self.args.text_column])]
            size = self.args.per_device_eval_batch_size
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                batch = collator(chunk)
                labels = batch["labels"]
                signal = self.teacher_signal(batch[TEACHER_BATCHES_KEY], labels)
                cache.add(batch[EXAMPLE_IDS_KEY], [r[self.args.text_column] for r in chunk], (labels != -100).sum(1).tolist(), signal)
        finally:
            collator.static_masking, collator.emit_ids = static, emit
        if todo or not os.path.exists(path) or os.path.isdir(path + ".shards"):
            cache.save(path)  # merges the shards into the main file
        self.signal_cache = cache.finalize()
        logger.info("Top-k signal cache %s: %d rows (%d computed), %.1f MB", path, len(cache), len(todo), cache.nbytes() / 1e6)
        return cache

    def train(self, *args, **kwargs):
        if self.args.teacher_signals == "cached" and self.args.alpha > 0:
            self.precompute_teacher_signals()
            if self.args.release_teachers:
                for teacher in self.teachers:
                    teacher.model.to("cpu")
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss at the masked positions; no logits are gathered (they are vocabulary-sized)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Evaluation masks statically (same positions every time) and reports masked-token accuracy."""
        collator = self.data_collator
        static = getattr(collator, "static_masking", None)
        if static is not None:
            collator.static_masking = True
        self._eval_counts = [0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        finally:
            if static is not None:
                collator.static_masking = static
        correct, total = self._eval_counts
        if total:
            output.metrics[f"{metric_key_prefix}_masked_accuracy"] = correct / total
            output.metrics[f"{metric_key_prefix}_masked_tokens"] = total
        return output

    # ------------------------------------------------------------------ logging and card
    @staticmethod
    def _empty_stats() -> dict[str, float]:
        return {"steps": 0, "kd": 0.0, "mlm": 0.0, "kept_mass": 0.0, "no_teacher_mass": 0.0}

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        stats = self._stats
        if stats["steps"] and "loss" in logs:
            n = stats["steps"]
            for key in ("kd", "mlm"):
                if stats[key]:
                    logs[f"md_{key}"] = round(stats[key] / n, 4)
            if self.args.alpha > 0:
                logs["md_teacher_kept_mass"] = round(stats["kept_mass"] / n, 4)
                logs["md_positions_without_teacher_mass"] = round(stats["no_teacher_mass"] / n, 4)
            self._stats = self._empty_stats()
        super().log(logs, start_time)

    def create_model_card(self, *args, tags=None, **kwargs) -> None:
        """The Trainer's card plus teachers, languages, vocabulary sizes and coverage."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in MERGE_DISTILL_TAGS if tag not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
            card.write("\n" + merge_distill_section(self.teachers, self.language_teachers, self.vocabulary, self.args))
