"""``MergeDistillTrainer``: merge masked-LM teachers with different vocabularies into one student.

A drop-in ``transformers.Trainer`` (same signatures): the batch comes from
:class:`MergeDistillCollator` (each text tokenized and masked by its language's teacher, mapped to
student ids), the loss is ``alpha * KD + (1 - alpha) * MLM`` at the masked positions only, with the
teachers' top-k signals computed on the fly or read from a :class:`TopKSignalCache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedModel, Trainer

from ..collator import tokenizer_fingerprint
from ..signal_cache import SUFFIX, column_names, column_values
from .collator import EXAMPLE_IDS_KEY, KD_POSITIONS_KEY, TEACHER_BATCHES_KEY, MergeDistillCollator
from .config import MergeDistillConfig
from .guards import RunGuards
from .model_card import student_card
from .preparation import check_dataset, language_map, student_max_length, teacher_max_length, training_text_columns
from .signals import (
    TopKSignal,
    TopKSignalCache,
    check_finite_teacher_logits,
    masked_lm_logits,
    merge_distill_loss,
    topk_fingerprint,
    topk_to_student,
)
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
        if vocabulary.tokenizer is None:
            raise ValueError(
                "The student vocabulary has no tokenizer: the student reads every text with its own tokenizer "
                "(StudentVocabulary.union builds one; StudentVocabulary.from_tokenizer takes yours)."
            )
        if processing_class is None:
            processing_class = vocabulary.tokenizer
        for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            for name, part in (dataset.items() if isinstance(dataset, dict) else [(split, dataset)]):
                self._check_dataset(part, name, args)
        if args.freeze_word_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        self.output_columns: Optional[torch.Tensor] = None
        if args.output_vocabulary == "training_text":
            if train_dataset is None:
                raise ValueError("output_vocabulary='training_text' needs a train_dataset to read the tokens from.")
            self.output_columns = self._training_text_columns(
                vocabulary, column_values(train_dataset, args.text_column), self._student_max_length(model, args)
            )
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
                emit_ids=args.signals_are_cached,
                student_max_length=self._student_max_length(model, args),
                replacement_ids=self.output_columns,
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

    # ------------------------------------------------------------------ set-up helpers (ki_trainer.merge_distill.preparation)
    _language_map = staticmethod(language_map)
    _max_length = staticmethod(teacher_max_length)
    _student_max_length = staticmethod(student_max_length)
    _training_text_columns = staticmethod(training_text_columns)

    def _check_dataset(self, dataset, split: str, args: MergeDistillConfig) -> None:
        check_dataset(dataset, split, args, self.teachers, self.language_teachers)

    def _teacher_columns(self, t: int) -> Optional[torch.Tensor]:
        """The teacher ids whose logits are computed (``teacher_output='student_vocabulary'``), else None."""
        if self.args.teacher_output != "student_vocabulary":
            return None
        cache = getattr(self, "_teacher_columns_cache", None)
        if cache is None:
            cache = self._teacher_columns_cache = {}
        if t not in cache:
            alignment = self.data_collator.alignments[t]
            if alignment.identical:
                cache[t] = self.output_columns if self.output_columns is not None else None
            else:
                columns = alignment.mappable_teacher_ids()
                if self.output_columns is not None:
                    allowed = set(self.output_columns.tolist())
                    from .alignment import CASE_LOWER, CASE_TITLE, CASE_UPPER

                    columns = torch.tensor(
                        [i for i in columns.tolist()
                         if any(alignment.student_id(i, ws, c) in allowed for ws in (True, False)
                                for c in (CASE_LOWER, CASE_TITLE, CASE_UPPER))],
                        dtype=torch.long,
                    )
                cache[t] = columns
        return cache[t]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (self.args.text_column, self.args.language_column, self.args.id_column):
            if column and column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ signals and loss
    @torch.no_grad()
    def teacher_signal(self, teacher_batches: dict, labels: torch.Tensor, kd_positions: torch.Tensor) -> TopKSignal:
        """Top-k signals for every predicted position of the batch, in the student's row-major order.

        Positions outside ``kd_positions`` (student positions with no aligned teacher token) get an
        all-zero signal (no KD term there)."""
        predicted = labels != -100
        row_of = torch.nonzero(predicted)[:, 0]
        kd_flat = kd_positions.to(labels.device)[predicted]
        k = self.args.top_k
        ids = torch.zeros((len(row_of), k), dtype=torch.long, device=labels.device)
        probs = torch.zeros((len(row_of), k), device=labels.device)
        kept = torch.zeros(len(row_of), device=labels.device)
        alignments = self.data_collator.alignments
        for t, sub in teacher_batches.items():
            teacher = self.teachers[int(t)]
            device = next(teacher.model.parameters()).device
            columns = self._teacher_columns(int(t))
            with self.accelerator.autocast():
                logits = masked_lm_logits(
                    teacher.model,
                    sub["input_ids"].to(device),
                    sub["attention_mask"].to(device),
                    sub["predict"].to(device),
                    columns=None if columns is None else columns.to(device),
                )
            check_finite_teacher_logits(logits)
            teacher_probs = torch.softmax(logits.float() / self.args.kd_temperature, dim=-1)
            top_probs, top_ids = teacher_probs.topk(min(k, teacher_probs.shape[-1]), dim=-1)
            if columns is not None:
                top_ids = columns.to(top_ids.device)[top_ids]
            mapped, renormalised, mass = alignments[int(t)].map_topk(top_ids.cpu(), top_probs.cpu(), sub["forms"])
            select = torch.isin(row_of, sub["rows"].to(row_of.device)) & kd_flat
            if int(select.sum()) != len(mapped):
                raise RuntimeError(
                    f"Teacher {teacher.name!r} predicted {len(mapped)} positions, the student has {int(select.sum())} "
                    "aligned positions: teacher and student sequences are misaligned."
                )
            width = mapped.shape[1]
            ids[select, :width] = mapped.to(ids.device)
            probs[select, :width] = renormalised.to(probs.device)
            kept[select] = mass.to(kept.device)
        return TopKSignal(ids, probs, kept)

    def _to_columns(self, gold: torch.Tensor, signal: Optional[TopKSignal]):
        """Student ids -> positions in ``output_columns`` (gold outside them: ignored; signal: dropped, renormalised)."""
        columns = self.output_columns
        inverse = getattr(self, "_inverse_columns", None)
        if inverse is None or inverse.device != gold.device:
            inverse = torch.full((len(self.vocabulary),), -1, dtype=torch.long)
            inverse[columns] = torch.arange(len(columns))
            inverse = self._inverse_columns = inverse.to(gold.device)
        gold = inverse[gold.clamp(min=0)]
        gold = torch.where(gold >= 0, gold, torch.full_like(gold, -100))
        if signal is not None:
            ids = inverse[signal.ids.to(gold.device)]
            p = signal.probs * (ids >= 0)
            mass = p.sum(dim=-1)
            p = torch.where(mass[:, None] > 0, p / mass.clamp_min(1e-30)[:, None], torch.zeros_like(p))
            signal = TopKSignal(ids.clamp_min(0), p, torch.where(mass > 0, signal.kept_mass * mass, torch.zeros_like(mass)))
        return gold, signal

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        teacher_batches = inputs.pop(TEACHER_BATCHES_KEY, {})
        example_ids = inputs.pop(EXAMPLE_IDS_KEY, None)
        kd_positions = inputs.pop(KD_POSITIONS_KEY, None)
        labels = inputs.pop("labels")
        predict = labels != -100
        columns = self.output_columns
        logits = masked_lm_logits(model, inputs["input_ids"], inputs["attention_mask"], predict,
                                  columns=None if columns is None else columns.to(labels.device))
        gold = labels[predict]
        signal = None
        if self.args.alpha > 0:
            if self.signal_cache is not None and example_ids is not None and model.training:
                signal = self.signal_cache.lookup(example_ids, predict.sum(dim=1).tolist(), device=logits.device)
            else:
                signal = self.teacher_signal(teacher_batches, labels, kd_positions)
        if columns is not None:
            gold, signal = self._to_columns(gold, signal)
        loss, parts = merge_distill_loss(logits, gold, signal, self.args.alpha, self.args.kd_temperature)
        stats = self._stats if model.training else None
        if stats is not None:
            stats["steps"] += 1
            for key, value in parts.items():
                stats[key] += float(value)
            if signal is not None and len(signal.kept_mass):
                stats["kept_mass"] += float(signal.kept_mass.float().mean())
                stats["no_teacher_mass"] += float((signal.kept_mass == 0).float().mean())
                if kd_positions is not None:
                    stats["aligned"] += float(kd_positions.float().sum() / max(1, int(predict.sum())))
        else:
            valid = gold != -100
            self._eval_counts[0] += int((logits.argmax(dim=-1)[valid] == gold[valid]).sum())
            self._eval_counts[1] += int(valid.sum())
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
            "student_tokenizer": tokenizer_fingerprint(self.vocabulary.tokenizer),
            "student_length": getattr(collator, "student_max_length", None),
            "output_columns": None if self.output_columns is None else hashlib.sha1(
                self.output_columns.numpy().tobytes()).hexdigest(),
            "alignment": "student-segmentation-v1",
        }
        return topk_fingerprint(self.teachers, self.vocabulary.id_maps, settings)

    def precompute_teacher_signals(self, dataset=None) -> TopKSignalCache:
        """Compute (or load and complete) the top-k signals of every row of ``dataset`` (default: the
        training set), in ``<signal_cache_dir>/<fingerprint>.safetensors`` (see :class:`TopKSignalCache`)."""
        dataset = self.train_dataset if dataset is None else dataset
        fingerprint = self.signal_fingerprint()
        path = os.path.join(self.args.resolved_signal_cache_dir(), f"{fingerprint}{SUFFIX}")
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
                signal = self.teacher_signal(batch[TEACHER_BATCHES_KEY], labels, batch[KD_POSITIONS_KEY])
                cache.add(batch[EXAMPLE_IDS_KEY], [r[self.args.text_column] for r in chunk], (labels != -100).sum(1).tolist(), signal)
        except BaseException:
            with contextlib.suppress(Exception):
                cache.flush()  # keep what was computed; the original error is what the user must see
            raise
        finally:
            collator.static_masking, collator.emit_ids = static, emit
        if todo or not os.path.exists(path) or os.path.isdir(path + ".shards"):
            cache.save(path)  # merges the shards into the main file
        self.signal_cache = cache.finalize()
        logger.info("Top-k signal cache %s: %d rows (%d computed), %.1f MB", path, len(cache), len(todo), cache.nbytes() / 1e6)
        return cache

    def train(self, *args, **kwargs):
        if self.args.signals_are_cached and self.args.alpha > 0:
            self.precompute_teacher_signals()
            if self.args.release_teachers:
                for teacher in self.teachers:
                    teacher.model.to("cpu")
        output = super().train(*args, **kwargs)
        self.restrict_saved_output()
        return output

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, then check that the SAVED tokenizer reads the training text as in training."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero() and self.processing_class is not None and not _internal_call:
            self.check_saved_tokenizer(output_dir or self.args.output_dir)

    def check_saved_tokenizer(self, directory: str, max_texts: int = 200) -> dict:
        """Reload the tokenizer saved in ``directory`` and measure, per language on up to ``max_texts`` training
        texts, the share of words it segments as the training tokenizer did and the words it reads as [UNK]
        where the language's teacher does not (:func:`~ki_trainer.merge_distill.segmentation_agreement`).
        Stored in ``self.segmentation_report`` (and the model card); anything short of identical segmentation
        and no new [UNK] words is a warning naming the language."""
        import warnings

        from transformers import AutoTokenizer

        from .alignment import segmentation_agreement

        saved = AutoTokenizer.from_pretrained(directory)
        dataset = self.train_dataset
        texts: dict[str, list[str]] = {}
        if dataset is not None:
            column_text = column_values(dataset, self.args.text_column)
            columns = column_names(dataset)
            languages = (column_values(dataset, self.args.language_column) if self.args.language_column in columns
                         else [None] * len(column_text))
            for text, language in zip(column_text, languages):
                bucket = texts.setdefault(language or "", [])
                if len(bucket) < max_texts:
                    bucket.append(text)
        names = [t.name for t in self.teachers]
        report = {}
        for language, rows in texts.items():
            teacher = self.teachers[names.index(self.language_teachers[language])] if language in self.language_teachers else self.teachers[0]
            report[language] = segmentation_agreement(saved, self.vocabulary.tokenizer, rows, teacher.tokenizer)
            bad = report[language]["same_segmentation"] < 1.0 or report[language]["unknown_words"] > 0
            if bad:
                message = (
                    f"The tokenizer saved in {directory} segments {language or 'the'} text differently from training: "
                    f"{report[language]['same_segmentation']:.2%} of words split as in training, "
                    f"{report[language]['unknown_words']} words read as [UNK] where the teacher reads them. The student "
                    "will read text at inference differently from how it learned."
                )
                logger.warning(message)
                warnings.warn(message, UserWarning)
        self.segmentation_report = report
        return report

    @torch.no_grad()
    def restrict_saved_output(self, value: float = -100.0) -> int:
        """With ``output_vocabulary='training_text'``: set the output bias of every token outside the trained
        columns to ``value`` so the model (as saved) predicts among exactly the tokens it was trained on.
        Returns how many tokens were closed (0 when the output is not restricted)."""
        if self.output_columns is None:
            return 0
        model = self.accelerator.unwrap_model(self.model)
        decoder = model.get_output_embeddings()
        bias = decoder.bias if getattr(decoder, "bias", None) is not None else None
        if bias is None:
            head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
            bias = getattr(getattr(head, "predictions", head), "bias", None)
        if bias is None:
            raise ValueError(f"{type(model).__name__} has no output bias to restrict the saved output with.")
        closed = torch.ones(len(bias), dtype=torch.bool)
        closed[self.output_columns.to("cpu")] = False
        closed[[i for i in self.vocabulary.tokenizer.all_special_ids if i < len(bias)]] = True
        bias[closed.to(bias.device)] = value
        return int(closed.sum())

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
        return {"steps": 0, "kd": 0.0, "mlm": 0.0, "kept_mass": 0.0, "no_teacher_mass": 0.0, "aligned": 0.0}

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
                logs["md_aligned_share"] = round(stats["aligned"] / n, 4)
            self._stats = self._empty_stats()
        super().log(logs, start_time)

    def create_model_card(self, *args, model_id: Optional[str] = None, results: Optional[str] = None, **kwargs) -> None:
        """Write ``<output_dir>/README.md``: the merged student's own card (teachers and languages, vocabulary
        and coverage, segmentation agreement of the saved tokenizer, settings, ``results`` markdown if given,
        a fill-mask snippet for ``model_id`` (default: the output directory) and citations). Other arguments
        of ``Trainer.create_model_card`` are accepted and ignored: transformers' fine-tuning card does not
        describe a merged model."""
        if not self.is_world_process_zero():
            return
        report = getattr(self, "segmentation_report", None)
        if report is None and os.path.exists(os.path.join(self.args.output_dir, "tokenizer_config.json")):
            report = self.check_saved_tokenizer(self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        card = student_card(
            self.teachers, self.language_teachers, self.vocabulary, self.args,
            model_id=model_id or self.args.output_dir, segmentation=report,
            output_tokens=None if self.output_columns is None else len(self.output_columns),
            results=results, init=getattr(model.config, "ki_student_init", None),
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
