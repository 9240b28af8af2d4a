"""``KnowledgeIntegrationTrainer``: a drop-in ``transformers.Trainer`` that learns from a teacher ensemble.

Only ``compute_loss`` (and the evaluation step that reuses it) changes: the student's gold-label loss
is replaced by the integration strategy's loss against the teachers' predictions. Everything else
(optimisation, gradient accumulation, mixed precision, DDP through Accelerate, checkpoints and
resuming, ``report_to`` logging, ``push_to_hub``) is the stock Trainer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    enable_full_determinism,
    set_seed,
)
from transformers.utils import logging

from . import checkpoints
from .collator import EXAMPLE_IDS_KEY, TEACHER_INPUTS_KEY, KnowledgeIntegrationCollator, build_collator
from .config import KnowledgeIntegrationConfig
from .dataset_checks import check_dataset, check_user_collator, column_names, column_values, is_streaming
from .guards import FiniteLossGuard, NonFiniteLossError, check_teachers_distinct, check_writable  # noqa: F401
from .launch import check_distributed_type, check_launch, output_dir_lock
from .metrics import evaluation_metrics, routed_teacher_predictions
from .model_card import write_model_card
from .peft_support import is_peft_model, merged_copy, unwrap, write_labels
from .querying import query_teachers
from .routing import Router, build_router
from .signal_cache import SUFFIX as SIGNAL_CACHE_SUFFIX
from .signal_cache import (
    StaleSignalCacheError,
    TeacherSignalCache,
    batch_seed,
    build_or_update_cache,
    build_or_update_cache_streaming,
    teachers_fingerprints,
    text_hash,
)
from .strategies import TeacherSignals, get_strategy
from .student import (
    adopt_union_labels,
    check_student_vocabulary,
    finish_student,
    label_space_for,
    load_student,
    student_label_order,
)
from .teacher import Teacher
from .training_stats import MARGIN_COLLAPSE, TrainingStats  # noqa: F401

logger = logging.get_logger(__name__)


def _unique_names(teachers: Sequence[Teacher]) -> list[str]:
    names, seen = [], set()
    for i, teacher in enumerate(teachers):
        name = teacher.name or f"teacher_{i}"
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        names.append(name)
    return names


class KnowledgeIntegrationTrainer(Trainer):
    """Merge several fine-tuned classifiers (teachers) into one student over the union of their labels.

    Args:
        model: the student: a ``*ForSequenceClassification`` instance whose ``num_labels`` equals the
            union size, or a directory / Hub id from which one is built with the union labels.
        args: a :class:`KnowledgeIntegrationConfig` (plain ``TrainingArguments`` are upgraded with
            default KI settings).
        data_collator: defaults to :class:`KnowledgeIntegrationCollator` (tokenizes raw text per model).
        train_dataset: rows with raw text in ``args.text_column``; gold labels, if any, are ignored.
        eval_dataset: rows with raw text and, for metrics, gold labels (names or union ids).
        processing_class: the student's tokenizer (loaded from ``model`` when that is a path/id).
        teachers: the :class:`Teacher` ensemble (paths/ids/models are wrapped into ``Teacher``).
        compute_metrics: extra metrics; they are merged with the built-in integration metrics.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``; TRL's convention): the student is wrapped with
            ``get_peft_model`` (task type SEQ_CLS, so the classifier is trained and saved with the adapter).
        **kwargs: any other ``Trainer`` argument (callbacks, optimizers, ``model_init`` ...).

    Labels: a student whose ``config.id2label`` already names exactly the union's labels keeps ITS
    order (the teachers are mapped into it), so a script's own ``ClassLabel`` names decode its
    predictions; a student naming other labels is an error; generic ``LABEL_i`` names are replaced
    by the union's.

    ``model_init`` (instead of ``model``) builds a fresh student for each ``train()`` and each
    ``hyperparameter_search`` trial; the teachers stay fixed. Search KI fields such as
    ``kd_temperature`` like any ``TrainingArguments`` field: the strategy is rebuilt for each trial.
    """

    def __init__(
        self,
        model: Union[PreTrainedModel, torch.nn.Module, str, os.PathLike, None] = None,
        args: Optional[TrainingArguments] = None,
        data_collator: Optional[Callable] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: Optional[PreTrainedTokenizerBase] = None,
        teachers: Optional[Sequence[Union[Teacher, PreTrainedModel, str]]] = None,
        compute_metrics: Optional[Callable[[EvalPrediction], dict]] = None,
        peft_config: Optional[Any] = None,
        **kwargs: Any,
    ) -> None:
        if not teachers:
            raise ValueError("KnowledgeIntegrationTrainer needs at least one teacher (teachers=[Teacher(...), ...]).")
        model_init = kwargs.pop("model_init", None)
        if model is None and model_init is None:
            raise ValueError(
                "Pass the student as `model=` (an instance, a directory or a Hub id), or a `model_init=` callable "
                "that builds a fresh one (needed by hyperparameter_search)."
            )
        if model is not None and model_init is not None:
            raise ValueError("Pass either `model=` or `model_init=`, not both.")
        if args is None:
            args = KnowledgeIntegrationConfig(output_dir="ki_trainer_output")
        elif not isinstance(args, KnowledgeIntegrationConfig):
            args = KnowledgeIntegrationConfig.from_training_arguments(args)

        teachers = [t if isinstance(t, Teacher) else Teacher(t) for t in teachers]
        check_teachers_distinct(teachers)
        for teacher, name in zip(teachers, _unique_names(teachers)):
            teacher.name = name
        self.teachers: list[Teacher] = teachers
        self._peft_config = peft_config
        self._model_init_probe: Optional[torch.nn.Module] = None
        self.student_source: Optional[str] = None  # the directory / Hub id the student was built from

        if model_init is not None:
            # Build the first student now: its labels fix the label space and its config the collator.
            # Trainer.__init__ then receives it through call_model_init (no second build).
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model_init = model_init
            model = Trainer.call_model_init(self)
        if isinstance(model, (str, os.PathLike)):
            self.student_source = str(model)
            if processing_class is None and (data_collator is None or not isinstance(data_collator, KnowledgeIntegrationCollator)):
                processing_class = AutoTokenizer.from_pretrained(str(model))
            self.label_space = label_space_for(AutoConfig.from_pretrained(str(model)), teachers, strict=False)
            # The new head is initialised here, before Trainer.__init__ seeds: seed it ourselves.
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            model = load_student(str(model), self.label_space)
        else:
            self.student_source = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None) or None
            self.label_space = label_space_for(getattr(unwrap(model), "config", None), teachers, strict=True)
            adopt_union_labels(model, self.label_space)
        model = finish_student(model, teachers, self.label_space, processing_class, args, peft_config)
        if model_init is not None:
            self._model_init_probe, model = model, None

        check_launch(args)  # several launched processes that would each train alone raise here
        if args.dataloader_pin_memory and args.device.type == "cpu":
            args.dataloader_pin_memory = False  # nothing to pin on CPU (and torch warns about it)
        train_dataset = self._check_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._check_dataset(v, f"eval[{k!r}]", args) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._check_dataset(eval_dataset, "eval", args)

        student = model if model is not None else self._model_init_probe
        user_collator = None
        if data_collator is not None and not isinstance(data_collator, KnowledgeIntegrationCollator):
            # e.g. DataCollatorWithPadding from a converted script: it pads the student's pre-tokenized ids,
            # the KI collator around it adds gold labels, ids and the teachers' own encodings.
            user_collator, data_collator = data_collator, None
            processing_class = processing_class or getattr(user_collator, "tokenizer", None)
            check_user_collator(user_collator, train_dataset, args)
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "KnowledgeIntegrationTrainer tokenizes raw text itself: pass the student's tokenizer as "
                    "`processing_class=` (or your own `data_collator=`)."
                )
            data_collator = build_collator(student, processing_class, teachers, self.label_space, args, user_collator)
        check_student_vocabulary(unwrap(student), processing_class)
        if args.should_save:
            check_writable(args.output_dir, "output_dir")
        if args.teacher_signals == "cached":
            check_writable(args.signal_cache_dir or os.path.join(args.output_dir, "teacher_signals"), "signal_cache_dir")

        self.strategy = get_strategy(args.strategy)(self.label_space, args.strategy_options())
        router_name = args.resolved_router()
        self.router: Optional[Router] = build_router(router_name, args.router_kwargs()) if router_name else None
        self._user_compute_metrics = compute_metrics
        self._eval_certainty: list[torch.Tensor] = []
        self._eval_routed: list[torch.Tensor] = []  # the most competent teacher's prediction (union ids) per eval row
        self._last_signals: Optional[TeacherSignals] = None
        self.signal_cache: Optional[TeacherSignalCache] = None  # the training rows' cached signals
        self._eval_signal_cache: Optional[TeacherSignalCache] = None  # set while evaluating from cached signals
        self._signal_caches: dict[str, TeacherSignalCache] = {}  # every cache loaded, by file
        # ids of iterable datasets, read by their precompute pass: {id(dataset): (reference to it, ids)}; the
        # reference is checked on lookup, so a new dataset at a freed one's address never gets its ids.
        self._streamed_ids: dict[int, tuple[Callable[[], Any], list[str]]] = {}
        self.certainty_statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # per-teacher mean, std
        super().__init__(
            model=model,
            model_init=model_init,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=self._compute_metrics,
            **kwargs,
        )
        # The KI loss is a per-example mean; let the Trainer divide by gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        check_distributed_type(self.args, self.accelerator)  # e.g. an FSDP launch that runs as DDP on CPU
        teacher_dtype = self.args.resolved_teacher_dtype()
        prepared: dict[int, torch.nn.Module] = {}  # adapter teachers of one base share its (cast) copy
        for teacher in self.teachers:
            original = id(teacher.model)
            if original in prepared:
                teacher.model = prepared[original]
            prepared[original] = teacher.prepare(self.accelerator.device, teacher_dtype).model
        self._teacher_keys = [teacher.accepted_inputs() for teacher in self.teachers]
        self._stats = TrainingStats(self.label_space.teacher_names, self.accelerator.device)
        self._finite_loss = FiniteLossGuard(self.accelerator.device)
        self._final_save = self._pushing = False  # a save of the final model (merge_adapter applies) / push_to_hub
        self.add_callback(checkpoints.ResumeGuard())

    # ------------------------------------------------------------------ set-up helpers
    def _check_dataset(self, dataset, split: str, args: KnowledgeIntegrationConfig):
        return check_dataset(dataset, split, args, self.teachers, self.label_space)

    def call_model_init(self, trial=None) -> torch.nn.Module:
        """A fresh student per ``train()`` / trial, with the union labels (and ``peft_config``) applied."""
        if self._model_init_probe is not None:
            model, self._model_init_probe = self._model_init_probe, None
            return model
        model = super().call_model_init(trial)
        order = student_label_order(getattr(unwrap(model), "config", None), self.teachers, strict=True)
        if order is not None and order != self.label_space.labels:
            raise ValueError(
                f"model_init returned a student labelled {order}, but the first one fixed the order "
                f"{self.label_space.labels}. Build every student with the same id2label."
            )
        adopt_union_labels(model, self.label_space)
        return finish_student(model, self.teachers, self.label_space, self.processing_class, self.args, self._peft_config)

    def _hp_search_setup(self, trial) -> None:
        # A trial sets fields on self.args (e.g. kd_temperature): rebuild the strategy from them.
        super()._hp_search_setup(trial)
        self.strategy = get_strategy(self.args.strategy)(self.label_space, self.args.strategy_options())

    def _set_signature_columns_if_needed(self) -> None:
        # Keep raw text, gold labels, ids and lengths: the collator and the length-grouped sampler need
        # them, the student's forward does not take them.
        super()._set_signature_columns_if_needed()
        keep = (self.args.text_column, self.args.label_column, self.args.id_column, self.args.length_column_name)
        for column in keep:
            if column and column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ the KI step
    def _teacher_inputs(self, student_inputs: dict, teacher_batches: dict) -> list[dict]:
        key_of = getattr(self.data_collator, "teacher_input_key", lambda t: None)
        per_teacher = []
        for t, accepted in enumerate(self._teacher_keys):
            key = key_of(t)
            source = student_inputs if key is None else teacher_batches[key]
            per_teacher.append({k: v for k, v in source.items() if k in accepted})
        return per_teacher

    @property
    def _certainty_source(self) -> Optional[str]:
        """Which certainty the signals must carry: MC when the router reads MC statistics."""
        if self.router is None:
            return self.strategy.certainty_source
        return "mc" if "mc" in self.router.requires else "deterministic"

    @property
    def _needs_features(self) -> bool:
        return self.router is not None and "features" in self.router.requires

    @property
    def _needs_mc(self) -> bool:
        """Whether the strategy/router reads Monte-Carlo statistics (K dropout passes per teacher and row)."""
        return self._certainty_source == "mc"

    def teacher_signals(
        self,
        student_inputs: dict,
        teacher_batches: Optional[dict] = None,
        certainty_source: Optional[str] = "strategy",
        example_ids: Optional[Sequence[str]] = None,
        features: Optional[bool] = None,
    ) -> TeacherSignals:
        """Query the ensemble (no gradients) for the signals the strategy/router needs, or for ``certainty_source``.
        ``example_ids`` are named in a NaN/inf error; ``features`` (default: when the router needs them) adds
        each teacher's pooled features."""
        return query_teachers(
            self.teachers,
            self._teacher_inputs(student_inputs, teacher_batches or {}),
            certainty_source=self._certainty_source if certainty_source == "strategy" else certainty_source,
            mc_samples=self.args.mc_samples,
            chunk_size=self.args.mc_chunk_size,
            autocast=self.accelerator.autocast,
            check_finite=self.args.check_teacher_outputs,
            mc_top_layers=self.args.mc_top_layers,
            row_ids=example_ids,
            features=self._needs_features if features is None else features,
        )

    def route(self, signals: TeacherSignals) -> TeacherSignals:
        """Replace ``signals.certainty`` by the router's competence scores (no-op without a router)."""
        if self.router is None:
            return signals
        if not self.router.fitted:
            self.fit_router()
        return dataclasses.replace(signals, certainty=self.router.score(signals).to(signals.logits[0].device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs = dict(inputs)
        teacher_batches = student_inputs.pop(TEACHER_INPUTS_KEY, {})
        example_ids = student_inputs.pop(EXAMPLE_IDS_KEY, None)
        student_inputs.pop("labels", None)  # gold labels never enter the training loss
        outputs = model(**student_inputs)
        student_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        cache = self.signal_cache if model.training else self._eval_signal_cache
        if cache is not None and example_ids is not None:
            signals = cache.lookup(example_ids, self._certainty_source)
        else:
            signals = self.teacher_signals(student_inputs, teacher_batches, example_ids=example_ids)
        signals = self.normalize_certainty(self.route(signals))
        result = self.strategy.compute(student_logits, signals)
        if model.training:
            self._finite_loss.record(result.loss)  # no host sync here
            self._stats.accumulate(result, signals)
        self._last_signals = signals
        return (result.loss, outputs) if return_outputs else result.loss

    # ------------------------------------------------------------------ cached signals
    def signal_fingerprint(self, features: Optional[bool] = None, mc: Optional[bool] = None) -> str:
        """Hash of teacher weights, labels, tokenization, truncation, MC samples and dtype, and of what the cache
        holds: pooled features (default: when the router needs them) and MC statistics (default: when the
        strategy/router reads them; a cache without them hashes K=0)."""
        mc = self._needs_mc if mc is None else mc
        features = self._needs_features if features is None else features
        return self._signal_fingerprints([(mc, features)])[0]

    def _signal_fingerprints(self, kinds: list[tuple[bool, bool]]) -> list[str]:
        """:meth:`signal_fingerprint` of several ``(with MC, with features)`` kinds, reading every teacher weight once."""
        collator = self.data_collator
        lengths = [
            collator.groups[key][1] if key is not None else collator.max_length
            for key in (collator.teacher_input_key(t) for t in range(len(self.teachers)))
        ] if isinstance(collator, KnowledgeIntegrationCollator) else [None] * len(self.teachers)
        variants = [
            (self.args.mc_samples if mc else 0, self.args.mc_top_layers if mc else None, features) for mc, features in kinds
        ]
        return teachers_fingerprints(
            self.teachers, self.processing_class, lengths, self.args.resolved_teacher_dtype(), variants
        )

    def precompute_teacher_signals(
        self, dataset=None, *, mc: Optional[bool] = None, features: Optional[bool] = None
    ) -> TeacherSignalCache:
        """Compute (or load) the teacher signals of every row of ``dataset`` (default: the train set).

        The cache file is ``<signal_cache_dir>/<fingerprint>.safetensors``; rows already cached are reused, new
        ids are added. Under several processes each computes its share of the missing rows into its own
        shard files; the main process then merges them and every process loads the whole cache.

        Only what the strategy and router read is computed: the K Monte-Carlo-dropout passes per teacher
        only when they read MC statistics (``muki`` with ``router="mc_entropy"``, ...), pooled features only for
        feature routers. A cache that holds more (written by another run) serves this one as well; the rows it
        lacks are then added with everything it holds, except that a cache with MC statistics this run does not
        read is extended only when that costs fewer teacher passes than a new cache of the exact kind.
        ``mc=True`` / ``features=True`` compute them anyway, e.g. to compare every router on one cache.
        """
        dataset = dataset if dataset is not None else self.train_dataset
        self.signal_cache = self._cached_signals(dataset, mc=mc, features=features)
        if self.router is not None and self.router.needs_fit and not self.router.fitted:
            self.fit_router(dataset)
        self._fit_certainty_normalization(dataset)
        return self.signal_cache

    # ------------------------------------------------------------------ routing
    ROUTER_STATE_FILE = "router_state.pt"

    def fit_router(self, dataset=None) -> Optional[Router]:
        """Fit a transductive router on the unlabeled pool (default: the training rows), label-free.

        The router sees the cached teacher signals of every pool row: never text, ids or gold labels.
        Its state is saved to ``<output_dir>/router_state.pt`` (and with every checkpoint and
        ``save_model``) so that evaluation and resumed runs score with the same fit.
        """
        if self.router is None or not self.router.needs_fit:
            return self.router
        dataset = dataset if dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError(f"Router {self.router.name!r} is fitted on the unlabeled training rows: pass train_dataset.")
        if self.signal_cache is None:
            self.signal_cache = self._cached_signals(dataset)
        ids = self._dataset_ids(dataset)
        limit = self.args.router_fit_rows
        if limit is not None and len(ids) > limit:  # a seeded random subset (ids only: no text, no label)
            chosen = np.random.default_rng(self.args.seed).choice(len(ids), size=limit, replace=False)
            ids = [ids[i] for i in sorted(chosen.tolist())]
        pool = self.signal_cache.lookup(ids, self._certainty_source)
        self.router.fit(pool)
        shares = getattr(self.router, "describe_shares", None)  # the pool's teacher shares, as the router estimated them
        found = f"; {shares([t.name for t in self.teachers])}" if shares is not None else ""
        logger.info(f"Router {self.router.name!r} fitted on {len(ids)} unlabeled rows{found}.")
        if self.args.should_save:
            self._save_router_state(self.args.output_dir)
        self.certainty_statistics = None  # standardization statistics follow the new scores
        return self.router

    def _save_router_state(self, directory: str) -> None:
        if self.router is None or not self.router.needs_fit or not self.router.fitted:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.ROUTER_STATE_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.router.state_dict(), tmp)
        os.replace(tmp, path)

    def _load_router_state(self, directory: str) -> bool:
        path = os.path.join(directory, self.ROUTER_STATE_FILE)
        if self.router is None or not self.router.needs_fit or not os.path.isfile(path):
            return False
        self.router.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info(f"Router {self.router.name!r}: fitted state loaded from {path}.")
        return True

    # ------------------------------------------------------------------ certainty normalization
    def _fit_certainty_normalization(self, dataset) -> None:
        """Per-teacher mean and std of the router's (or strategy's) scores over ``dataset``'s cached rows."""
        source = self._certainty_source
        if self.args.certainty_normalization == "none" or source is None:
            return
        ids = self._dataset_ids(dataset)
        certainty = self.route(self.signal_cache.lookup(ids, source)).certainty.float()
        self.certainty_statistics = (certainty.mean(0), certainty.std(0, unbiased=False).clamp_min(1e-6))
        logger.info(f"Certainty standardization ({self.router.name if self.router else source}): mean "
                    f"{certainty.mean(0).tolist()}, std {self.certainty_statistics[1].tolist()} over {len(ids)} training rows.")

    def normalize_certainty(self, signals: TeacherSignals) -> TeacherSignals:
        """Apply ``certainty_normalization`` (identity for 'none' or signals without certainty)."""
        if self.args.certainty_normalization == "none" or signals.certainty is None:
            return signals
        if self.certainty_statistics is None:
            self.precompute_teacher_signals()
        mean, std = (t.to(signals.certainty.device) for t in self.certainty_statistics)
        return dataclasses.replace(signals, certainty=(signals.certainty.float() - mean) / std)

    def _dataset_ids(self, dataset) -> list[str]:
        """Every example id of ``dataset`` (of a streamed one: as read by its precompute pass)."""
        if is_streaming(dataset):
            ids = self._known_stream_ids(dataset)
            if ids is None:
                self._cached_signals(dataset)
                ids = self._known_stream_ids(dataset)
            return ids
        return [str(x) for x in column_values(dataset, self.args.id_column)]

    def _known_stream_ids(self, dataset) -> Optional[list[str]]:
        entry = self._streamed_ids.get(id(dataset))
        return entry[1] if entry is not None and entry[0]() is dataset else None

    def _remember_stream_ids(self, dataset, ids: list[str]) -> None:
        for key in [k for k, (ref, _) in self._streamed_ids.items() if ref() is None]:
            del self._streamed_ids[key]  # datasets that are gone
        try:
            reference = weakref.ref(dataset)
        except TypeError:  # not weakly referenceable: keep it alive instead
            reference = (lambda kept: lambda: kept)(dataset)
        self._streamed_ids[id(dataset)] = (reference, ids)

    def _cache_choice(
        self, file_suffix: str, mc: bool, features: bool, dataset=None
    ) -> tuple[str, str, bool, bool]:
        """(fingerprint, path, with MC, with features) of the cache to use: the first that exists (loaded or on
        disk) of the exact kind and the richer kinds (also MC statistics, also pooled features), else the exact
        kind, new.

        A cache with MC statistics that this run does not read is taken only when extending it with ``dataset``'s
        missing rows (K dropout passes each) costs no more teacher passes than one deterministic pass over every
        row into a new cache of the exact kind; a run over mostly NEW rows then does not pay for MC passes it
        never reads."""
        directory = self.args.signal_cache_dir or os.path.join(self.args.output_dir, "teacher_signals")
        kinds = list(dict.fromkeys([(mc, features), (mc, True), (True, features), (True, True)]))
        choices = []
        fingerprints = self._signal_fingerprints(kinds)  # one read of every teacher weight for all kinds
        for (with_mc, with_features), fingerprint in zip(kinds, fingerprints):
            path = os.path.join(directory, f"{fingerprint}{file_suffix}{SIGNAL_CACHE_SUFFIX}")
            choice = (fingerprint, path, with_mc, with_features)
            if path in self._signal_caches or TeacherSignalCache.exists(path):
                if with_mc and not mc and not self._extending_is_cheaper(path, fingerprint, dataset):
                    continue
                return choice
            choices.append(choice)
        return choices[0]

    def _extending_is_cheaper(self, path: str, fingerprint: str, dataset) -> bool:
        """Whether adding ``dataset``'s rows missing from the MC cache at ``path`` (1 + K·m/L passes each, with
        ``mc_top_layers=m`` of L layers) costs at most one deterministic pass over all its rows. Streamed datasets
        (ids unknown before their pass) always extend."""
        if dataset is None or is_streaming(dataset):
            return True
        cache = self._open_signal_cache(path, fingerprint, [len(t.labels) for t in self.teachers])
        ids = set(self._dataset_ids(dataset))
        missing = len(ids - cache.index.keys())
        if missing == 0:
            return True
        share = 1.0
        layers = [getattr(getattr(t.model, "config", None), "num_hidden_layers", None) for t in self.teachers]
        if self.args.mc_top_layers is not None and all(isinstance(n, int) and n > 0 for n in layers):
            share = min(1.0, self.args.mc_top_layers / min(layers))
        return missing * (1.0 + self.args.mc_samples * share) <= len(ids)

    def _cached_signals(
        self, dataset, file_suffix: str = "", mc: Optional[bool] = None, features: Optional[bool] = None
    ) -> TeacherSignalCache:
        """The cache in ``<signal_cache_dir>/<fingerprint><file_suffix>.safetensors``, extended with ``dataset``'s missing
        rows. It holds at least what the strategy/router reads (and MC statistics / features when ``mc`` / ``features``)."""
        fingerprint, path, with_mc, with_features = self._cache_choice(
            file_suffix, bool(mc) or self._needs_mc, bool(features) or self._needs_features, dataset
        )
        sizes = [len(t.labels) for t in self.teachers]
        device = self.accelerator.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        batches = lambda todo: self._signal_batches(dataset, todo, features=with_features, mc=with_mc)  # noqa: E731
        world = (self.accelerator.process_index, self.accelerator.num_processes)
        if is_streaming(dataset):  # one pass over the stream; the ids are kept for the router / normalization
            def build(cache, shard=(0, 1, 1)):
                computed, ids = self._streamed_signals(cache, dataset, with_features, shard[:2], mc=with_mc)
                self._remember_stream_ids(dataset, ids)
                return computed
        else:
            def build(cache, shard=(0, 1, 1)):
                return build_or_update_cache(cache, dataset, self.args.id_column, self.args.text_column, batches, shard)
        # fork_rng: the MC draws here must not shift the data order or dropout of the training run.
        with torch.random.fork_rng(devices=rng_devices):
            if world[1] > 1:
                cache, computed = self._sharded_signals(path, fingerprint, sizes, build, lambda: self._dataset_ids(dataset))
            else:
                cache = self._open_signal_cache(path, fingerprint, sizes)
                computed = build(cache)
                cache.finalize(self.accelerator.device)
                if computed or os.path.isdir(path + ".shards"):
                    cache.save(path)  # compacts this run's and other writers' shards into the main file
        logger.info(f"Teacher signals: {computed} computed, {len(cache) - computed} reused from {path}.")
        self._signal_caches[path] = cache
        return cache

    def _open_signal_cache(self, path: str, fingerprint: str, sizes: list[int]) -> TeacherSignalCache:
        """The cache already loaded for ``path``, else its main file + shards of earlier writers, else a new one."""
        known = self._signal_caches.get(path)
        if known is not None and known.fingerprint == fingerprint:
            return known
        if TeacherSignalCache.exists(path):
            return TeacherSignalCache.load(path, fingerprint, sizes)
        return TeacherSignalCache(fingerprint, sizes, path)

    def _sharded_signals(self, path: str, fingerprint: str, sizes: list[int], build, dataset_ids: Callable[[], list[str]]):
        """Every process computes its share of the missing rows (batches dealt round-robin, see
        :func:`~ki_trainer.signal_cache.shard_positions`) into its own shard files; then the main process
        compacts them, and every process loads the whole cache and checks that it holds every row.

        Every step (load, compute, merge, reload, check) ends with all processes agreeing whether any of them
        failed: a failure on one process stops every process with an error (no rank waits at a barrier for a
        rank that gave up); the rows written so far stay in their shards and are skipped by the next run.
        ``signal_cache_dir`` must be one directory every process sees (a filesystem shared across nodes):
        otherwise the check after the merge fails, naming the directory.
        """
        accelerator = self.accelerator

        # Every process has read the same files before any writes a shard: they find the same missing rows.
        cache = self._on_every_process(lambda: self._open_signal_cache(path, fingerprint, sizes),
                                       "loading the teacher-signal cache", path)
        shard = (accelerator.process_index, accelerator.num_processes, self.args.per_device_eval_batch_size)
        self._signal_progress = accelerator.num_processes

        def compute():
            done = build(cache, shard)
            cache.flush()  # this process's rows, in its own shard files
            return done

        try:
            computed = self._on_every_process(compute, "computing teacher signals", path)
        finally:
            self._signal_progress = 1
        total = int(accelerator.reduce(torch.tensor([computed], device=accelerator.device), reduction="sum").item())

        def merge():
            if accelerator.is_main_process and (total or os.path.isdir(path + ".shards")):
                cache.save(path)  # merges every process's shards into the main file

        self._on_every_process(merge, "merging the teacher-signal shards", path)
        if total:  # every process reloads, also one that computed nothing itself
            cache = self._on_every_process(lambda: TeacherSignalCache.load(path, fingerprint, sizes),
                                           "loading the merged teacher-signal cache", path)

        def check():
            cache.finalize(accelerator.device)
            ids = dataset_ids()
            missing = [example_id for example_id in ids if example_id not in cache.index]
            if missing:
                raise StaleSignalCacheError(
                    f"After the sharded precompute, process {accelerator.process_index} finds {len(missing)} of "
                    f"{len(ids)} rows missing from {path} (e.g. id {missing[0]!r}): signal_cache_dir must be ONE "
                    "directory that every process reads and writes (on several nodes: a shared filesystem). Set "
                    "signal_cache_dir to a shared path, or precompute on one node first."
                )

        # The last agreement also keeps anyone from compacting again (a later call) while another still reads.
        self._on_every_process(check, "checking the merged teacher-signal cache", path)
        return cache, computed

    def _on_every_process(self, step: Callable[[], Any], what: str, path: str) -> Any:
        """Run ``step`` on this process, then agree with every process whether any failed (an all-reduce,
        which is also a barrier): this process's own error is re-raised; another's becomes a RuntimeError."""
        accelerator = self.accelerator
        error: Optional[BaseException] = None
        result = None
        try:
            result = step()
        except BaseException as err:  # reported below, after every process has reached the same point
            error = err
        failed = accelerator.reduce(torch.tensor([int(error is not None)], device=accelerator.device), reduction="sum")
        if error is not None:
            raise error
        if int(failed.item()):
            raise RuntimeError(
                f"{int(failed.item())} other process(es) failed while {what} (their error is in their log). The "
                f"rows computed so far are kept in {path}.shards/ and are not recomputed next time."
            )
        return result

    def _streamed_signals(
        self, cache: TeacherSignalCache, dataset, features: bool, shard: tuple[int, int], mc: bool = True
    ):
        """Fill ``cache`` from a dataset that can only be iterated: one pass, one batch in memory (see
        :func:`~ki_trainer.signal_cache.build_or_update_cache_streaming`). Returns (missing rows, all ids)."""
        from tqdm.auto import tqdm

        disable = self.args.disable_tqdm or not self.accelerator.is_main_process
        with tqdm(unit="rows", desc="Teacher signals (stream)", disable=disable) as bar:
            def compute(rows: list[dict]) -> TeacherSignals:
                signals = self._signal_rows(rows, features, mc)
                bar.update(len(rows) * shard[1])
                return signals

            return build_or_update_cache_streaming(
                cache, dataset, self.args.id_column, self.args.text_column, compute,
                self.args.per_device_eval_batch_size, shard,
            )

    def _signal_rows(self, rows: list[dict], features: Optional[bool] = None, mc: bool = True) -> TeacherSignals:
        """Teacher signals of one precompute batch (MC ones, ``mc``, with dropout seeded by the batch's example ids)."""
        batch = self._prepare_inputs(self.data_collator(rows))
        teacher_batches = batch.pop(TEACHER_INPUTS_KEY, {})
        student_inputs = {k: v for k, v in batch.items() if k not in ("labels", EXAMPLE_IDS_KEY)}
        ids = [str(row.get(self.args.id_column)) for row in rows]
        torch.manual_seed(batch_seed(self.args.seed, ids))
        return self.teacher_signals(
            student_inputs, teacher_batches, certainty_source="mc" if mc else None, example_ids=ids, features=features
        )

    def _signal_batches(self, dataset, positions: list[int], features: Optional[bool] = None, mc: bool = True):
        """Teacher signals of ``positions`` in batches of ``per_device_eval_batch_size``, each batch's MC dropout
        seeded by its example ids (:func:`~ki_trainer.signal_cache.batch_seed`): the cache does not depend on
        how many processes computed it. Under several processes the main one's progress bar counts all rows
        (its own times the number of processes)."""
        from tqdm.auto import tqdm

        size = self.args.per_device_eval_batch_size
        processes = getattr(self, "_signal_progress", 1)
        total = len(positions) * processes
        disable = self.args.disable_tqdm or not positions or not self.accelerator.is_main_process
        with tqdm(total=total, unit="rows", desc="Teacher signals", disable=disable) as bar:
            for start in range(0, len(positions), size):
                chunk = positions[start : start + size]
                yield chunk, self._signal_rows([dataset[p] for p in chunk], features, mc)
                bar.update(min(len(chunk) * processes, total - bar.n))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resume_from_checkpoint = self._checked_resume(resume_from_checkpoint)
        if resume_from_checkpoint is not None:
            self._load_router_state(str(resume_from_checkpoint))
        # A second run writing the same output_dir while this one is alive is refused (see ki_trainer.launch).
        with output_dir_lock(self.args.output_dir, is_main_process=self.is_world_process_zero()):
            if self.args.teacher_signals == "cached":
                self.precompute_teacher_signals()
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._check_finite_loss("at the end of training")
        return output

    def get_train_dataloader(self):
        """Training batches carry no gold labels: they never enter the loss, so a training label outside the
        union (or a malformed one) is ignored, as documented, instead of failing mid-epoch."""
        collator = self.data_collator
        if not isinstance(collator, KnowledgeIntegrationCollator) or not collator.label_column:
            return super().get_train_dataloader()
        self.data_collator = copy.copy(collator)
        self.data_collator.label_column = None
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    # ------------------------------------------------------------------ checkpoints and resuming
    def run_fingerprint(self) -> dict:
        """What identifies this run in its checkpoints (see :func:`ki_trainer.checkpoints.run_fingerprint`)."""
        return checkpoints.run_fingerprint(self)

    def _checked_resume(self, resume_from_checkpoint):
        """Resolve ``True`` to the newest COMPLETE checkpoint and refuse a checkpoint of another run."""
        return checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir, self.run_fingerprint())

    def _save_checkpoint(self, model, trial) -> None:
        self._check_finite_loss("before saving a checkpoint")
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            checkpoints.write_fingerprint(folder, self.run_fingerprint())  # first: trainer_state.json marks "complete"
        super()._save_checkpoint(model, trial)

    def _check_finite_loss(self, when: str, collective: bool = True) -> None:
        """Raise if any training step since training began had a NaN/inf loss (one host sync)."""
        step = self.state.global_step if getattr(self, "state", None) is not None else 0
        self._finite_loss.check(self.accelerator, step, when, collective)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate through ``compute_loss`` even without gold labels (eval_loss is the KI loss)."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            with self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        certainty = self._last_signals.certainty if self._last_signals is not None else None
        if certainty is not None and labels is not None:
            self._eval_certainty.append(self.accelerator.gather_for_metrics(certainty).cpu())
            routed = self.routed_teacher_predictions(self._last_signals)
            self._eval_routed.append(self.accelerator.gather_for_metrics(routed).cpu())
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return loss, logits.detach(), labels

    def routed_teacher_predictions(self, signals: TeacherSignals) -> torch.Tensor:
        """``[B]`` union ids: each row's most competent teacher's prediction (see :func:`~ki_trainer.metrics.routed_teacher_predictions`)."""
        return routed_teacher_predictions(signals, self.label_space)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = self._check_dataset(eval_dataset, metric_key_prefix, self.args)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        with self._evaluation_signals(None if isinstance(dataset, dict) else dataset, metric_key_prefix):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._check_dataset(test_dataset, metric_key_prefix, self.args)
        with self._evaluation_signals(test_dataset, metric_key_prefix):
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    @contextlib.contextmanager
    def _evaluation_signals(self, dataset, metric_key_prefix: str):
        """With ``teacher_signals="cached"``, evaluate from cached signals of ``dataset``'s rows.

        Each ``metric_key_prefix`` gets its own file (``<fingerprint>.<prefix>.<digest>.safetensors``), so evaluation sets
        that reuse ids of other splits (row numbers, or translations sharing ids) never collide; the
        first evaluation computes the signals (MC dropout), later ones reuse them, so repeated
        evaluations score the same teacher draws. Rows without ids fall back to live queries.
        """
        usable = (
            self.args.teacher_signals == "cached" and dataset is not None and not is_streaming(dataset)
            and self.args.id_column in column_names(dataset)
        )
        previous = self._eval_signal_cache
        if usable:
            # Scoped by prefix AND by the dataset's content: two evaluation sets reusing row-number ids under
            # one prefix get two files, not a false stale-cache error.
            suffix = "." + re.sub(r"[^A-Za-z0-9_-]", "_", metric_key_prefix) + "." + self._dataset_digest(dataset)
            self._eval_signal_cache = self._cached_signals(dataset, file_suffix=suffix)
        try:
            yield
        finally:
            self._eval_signal_cache = previous

    def _dataset_digest(self, dataset) -> str:
        """A short hash of a dataset's ids and texts."""
        ids = [str(x) for x in column_values(dataset, self.args.id_column)]
        hashes = [text_hash(t) if isinstance(t, str) else 0 for t in column_values(dataset, self.args.text_column)]
        return hashlib.blake2b(json.dumps([ids, hashes]).encode(), digest_size=6).hexdigest()

    def evaluation_loop(self, *args, **kwargs):
        self._eval_certainty, self._eval_routed = [], []
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self._eval_certainty, self._eval_routed = [], []

    def _compute_metrics(self, eval_pred: EvalPrediction) -> dict[str, float]:
        certainty = torch.cat(self._eval_certainty).numpy() if self._eval_certainty else None
        routed = torch.cat(self._eval_routed).numpy() if self._eval_routed else None
        user = self._user_compute_metrics
        return evaluation_metrics(eval_pred.predictions, eval_pred.label_ids, self.label_space, certainty, routed,
                                  user_metrics=(lambda: user(eval_pred)) if user is not None else None)

    # ------------------------------------------------------------------ saving and the model card
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the student (a PEFT adapter with its labels, or merged with ``merge_adapter``) and, for a
        final save, its model card (``README.md``)."""
        self._check_finite_loss("before saving the model", collective=False)  # users may call it on one rank
        self._final_save = not _internal_call or self._pushing
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False
        if not _internal_call and self.is_world_process_zero():
            self.write_model_card(output_dir or self.args.output_dir)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._save_router_state(output_dir)  # a transductive router's fit travels with the model and checkpoints
        peft_student = is_peft_model(self.accelerator.unwrap_model(self.model))
        if peft_student and self.args.merge_adapter and self._final_save:
            original = self.model
            self.model = merged_copy(self.accelerator.unwrap_model(original))  # training keeps the adapter
            try:
                super()._save(output_dir, state_dict=None)
            finally:
                self.model = original
            return
        super()._save(output_dir, state_dict)
        if peft_student:
            write_labels(output_dir, unwrap(self.accelerator.unwrap_model(self.model)).config)

    def push_to_hub(self, *args, **kwargs):
        self._pushing = True  # push_to_hub saves with _internal_call=True: still the final model
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._pushing = False

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """The card from the packaged template (see :mod:`ki_trainer.model_card`), in ``output_dir``."""
        if not self.is_world_process_zero():
            return
        self.write_model_card(
            self.args.output_dir, language=language, license=license, tags=tags, model_name=model_name,
            finetuned_from=finetuned_from, dataset=dataset,
        )

    def write_model_card(self, output_dir: str, **kwargs) -> str:
        """Render the model card into ``<output_dir>/README.md`` and return its path."""
        return write_model_card(self, output_dir, **kwargs)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        self._check_finite_loss("at a logging step")  # before the Trainer logs a NaN loss as a finite number
        if "loss" in logs:
            logs.update(self._stats.logs(self.accelerator, self.args, self.strategy.certainty_source is not None))
        super().log(logs, start_time)
