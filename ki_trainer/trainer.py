"""``KnowledgeIntegrationTrainer``: a drop-in ``transformers.Trainer`` that learns from a teacher ensemble.

Only ``compute_loss`` (and the evaluation step that reuses it) changes: the student's gold-label loss
is replaced by the integration strategy's loss against the teachers' predictions. Everything else
(optimisation, gradient accumulation, mixed precision, DDP through Accelerate, checkpoints and
resuming, ``report_to`` logging, ``push_to_hub``) is the stock Trainer.

This module wires; the work lives in its rooms (docs/architecture.md): student, collator, dataset_checks, querying
(the teachers), signal_cache, routing (scoring, fitted in set-up), strategies (the loss), metrics, saving, guards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.utils import logging

from . import checkpoints
from ._deprecation import renamed_method
from .collator import KnowledgeIntegrationCollator, collator_for, split_batch, without_gold_labels
from .config import KnowledgeIntegrationConfig
from .dataset_checks import check_dataset
from .guards import FiniteLossGuard, NonFiniteLossError, check_signal_cache_dir, check_writable  # noqa: F401 (re-export)
from .launch import check_distributed_type, check_launch, output_dir_lock
from .metrics import EvaluationRows, routed_teacher_predictions
from .peft_support import unwrap
from .querying import TeacherQuerier, ensemble, place_teachers
from .routing import Router, build_router
from .routing.fitting import ROUTER_STATE_FILE, Scoring, SignalNeeds, load_router_state, save_router_state, signal_needs
from .saving import SavingMixin
from .signal_cache import SignalPrecompute, TeacherSignalCache
from .strategies import TeacherSignals, get_strategy
from .student import check_student_given, check_student_vocabulary, next_student, prepare_student, seed_run
from .teacher import Teacher
from .training_stats import TrainingStats

logger = logging.get_logger(__name__)


class KnowledgeIntegrationTrainer(SavingMixin, Trainer):
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

    ROUTER_STATE_FILE = ROUTER_STATE_FILE

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
        self.teachers: list[Teacher] = ensemble(teachers or [])
        model_init = kwargs.pop("model_init", None)
        check_student_given(model, model_init)
        if args is None:
            args = KnowledgeIntegrationConfig(output_dir="ki_trainer_output")
        elif not isinstance(args, KnowledgeIntegrationConfig):
            args = KnowledgeIntegrationConfig.from_training_arguments(args)
        self._peft_config = peft_config
        self._model_init_probe: Optional[torch.nn.Module] = None
        if model_init is not None:
            # Build the first student now: its labels fix the label space and its config the collator.
            # Trainer.__init__ then receives it through call_model_init (no second build).
            seed_run(args)
            self.model_init = model_init
            model = Trainer.call_model_init(self)
        model, self.label_space, self.student_source, processing_class = prepare_student(
            model, self.teachers, args, processing_class, peft_config=peft_config,
            load_tokenizer=not isinstance(data_collator, KnowledgeIntegrationCollator),
        )
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
        data_collator, processing_class = collator_for(
            data_collator, processing_class, student, self.teachers, self.label_space, args, train_dataset
        )
        check_student_vocabulary(unwrap(student), processing_class)
        if args.should_save:
            check_writable(args.output_dir, "output_dir")
        if args.signals_are_cached:  # a read-only directory holding a cache may be read (see check_signal_cache_dir)
            check_signal_cache_dir(args.resolved_signal_cache_dir())

        self.strategy = get_strategy(args.strategy)(self.label_space, args.strategy_options())
        router_name = args.resolved_router()
        router = build_router(router_name, args.router_kwargs()) if router_name else None
        self.scoring = Scoring.from_args(router, args, teachers=len(self.teachers))
        self.signal_cache: Optional[TeacherSignalCache] = None  # the training rows' cached signals
        self._eval_signal_cache: Optional[TeacherSignalCache] = None  # set while evaluating from cached signals
        self._user_compute_metrics = compute_metrics
        self._eval_rows = EvaluationRows()
        self._last_signals: Optional[TeacherSignals] = None
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
        place_teachers(self.teachers, self.accelerator.device, self.args.resolved_teacher_dtype())
        self.querier = TeacherQuerier(self.teachers, self.data_collator, self.args, self.accelerator.autocast,
                                      self.args.device)
        self.cached_signals = SignalPrecompute(self.querier, self.args, self.accelerator, self.teachers,
                                               self.processing_class, self.data_collator, self.needs)
        self._stats = TrainingStats(self.label_space.teacher_names, self.accelerator.device)
        self._finite_loss = FiniteLossGuard(self.accelerator.device)
        self._final_save = self._pushing = False  # a save of the final model (merge_adapter applies) / push_to_hub
        self._teacher_digests: Optional[list[str]] = None  # hashed once, by checkpoints.run_fingerprint
        self._resume_guard = checkpoints.ResumeGuard()
        self.add_callback(self._resume_guard)

    # ------------------------------------------------------------------ set-up helpers
    def _check_dataset(self, dataset, split: str, args: KnowledgeIntegrationConfig):
        return check_dataset(dataset, split, args, self.teachers, self.label_space)

    def call_model_init(self, trial=None) -> torch.nn.Module:
        """A fresh student per ``train()`` / trial, with the union labels (and ``peft_config``) applied."""
        if self._model_init_probe is not None:
            model, self._model_init_probe = self._model_init_probe, None
            return model
        return next_student(super().call_model_init(trial), self.teachers, self.label_space, self.processing_class,
                            self.args, self._peft_config)

    def _hp_search_setup(self, trial) -> None:
        # A trial sets fields on self.args (e.g. kd_temperature): rebuild the strategy from them.
        super()._hp_search_setup(trial)
        self.strategy = get_strategy(self.args.strategy)(self.label_space, self.args.strategy_options())
        self.scoring.follow(self.args)

    def _set_signature_columns_if_needed(self) -> None:
        # Keep raw text, gold labels, ids and lengths: the collator and the length-grouped sampler need
        # them, the student's forward does not take them.
        super()._set_signature_columns_if_needed()
        keep = (self.args.text_column, self.args.label_column, self.args.id_column, self.args.length_column_name)
        for column in keep:
            if column and column not in self._signature_columns:
                self._signature_columns.append(column)

    @property
    def needs(self) -> SignalNeeds:
        """What the strategy and router read from the teachers (which certainty, pooled features)."""
        return signal_needs(self.strategy, self.router)

    @property
    def router(self) -> Optional[Router]:
        return self.scoring.router

    @property
    def certainty_statistics(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-teacher (mean, std) of the scores over the training rows (``certainty_normalization``)."""
        return self.scoring.statistics

    @certainty_statistics.setter
    def certainty_statistics(self, value) -> None:
        self.scoring.statistics = value

    # ------------------------------------------------------------------ the KI step
    def query_signals(self, student_inputs: dict, teacher_batches: Optional[dict] = None,
                      certainty_source: Optional[str] = "strategy", example_ids: Optional[Sequence[str]] = None,
                      features: Optional[bool] = None) -> TeacherSignals:
        """Query the ensemble (no gradients) for the signals the strategy/router needs, or for ``certainty_source``.
        ``example_ids`` are named in a NaN/inf error; ``features`` (default: when the router needs them) adds
        each teacher's pooled features."""
        needs = self.needs
        source = needs.certainty_source if certainty_source == "strategy" else certainty_source
        return self.querier.signals(student_inputs, teacher_batches, source, example_ids,
                                    needs.features if features is None else features)

    teacher_signals = renamed_method(query_signals, "teacher_signals")  # the earlier name (FutureWarning)

    def batch_signals(self, student_inputs: dict, teacher_batches: dict, example_ids, training: bool) -> TeacherSignals:
        """The teachers' signals for one batch: looked up in the cache (the training rows', or while evaluating the
        evaluation set's) when its rows have ids, else queried."""
        cache = self.signal_cache if training else self._eval_signal_cache
        if cache is not None and example_ids is not None:
            return cache.lookup(example_ids, self.needs.certainty_source)
        return self.query_signals(student_inputs, teacher_batches, example_ids=example_ids)

    def route(self, signals: TeacherSignals) -> TeacherSignals:
        """Replace ``signals.certainty`` by the router's competence scores (no-op without a router)."""
        return self.scoring.route(signals)

    def normalize_certainty(self, signals: TeacherSignals) -> TeacherSignals:
        """Apply ``certainty_normalization`` (identity for 'none' or signals without certainty)."""
        return self.scoring.standardize(signals)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs, teacher_batches, example_ids = split_batch(inputs)
        outputs = model(**student_inputs)
        student_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        signals = self.batch_signals(student_inputs, teacher_batches, example_ids, model.training)
        signals = self.scoring(signals)
        result = self.strategy.compute(student_logits, signals)
        if model.training:
            self._finite_loss.record(result.loss)  # no host sync here
            self._stats.accumulate(result, signals)
        self._last_signals = signals
        return (result.loss, outputs) if return_outputs else result.loss

    # ------------------------------------------------------------------ set-up: cached signals, router, statistics
    def signal_fingerprint(self, features: Optional[bool] = None, mc: Optional[bool] = None) -> str:
        """Hash of teacher weights, labels, tokenization, truncation, MC samples and dtype, and of what the cache
        holds: pooled features (default: when the router needs them) and MC statistics (default: when the
        strategy/router reads them; a cache without them hashes K=0)."""
        needs = self.needs
        kind = (needs.mc if mc is None else mc, needs.features if features is None else features)
        return self.cached_signals.fingerprints([kind])[0]

    def precompute_teacher_signals(
        self, dataset=None, *, mc: Optional[bool] = None, features: Optional[bool] = None
    ) -> TeacherSignalCache:
        """Compute (or load) the teacher signals of every row of ``dataset`` (default: the train set), then fit the
        router and the certainty statistics on them.

        The cache file is ``<signal_cache_dir>/<fingerprint>.safetensors``; rows already cached are reused, new
        ids are added (under several processes each computes its share; see :class:`SignalPrecompute`). Only what
        the strategy and router read is computed (K Monte-Carlo-dropout passes per teacher only for MC statistics,
        pooled features only for feature routers); a richer cache of another run serves this one too.
        ``mc=True`` / ``features=True`` compute them anyway, e.g. to compare every router on one cache.
        """
        dataset = dataset if dataset is not None else self.train_dataset
        self.signal_cache = self.cached_signals.load(dataset, mc=mc, features=features, needs=self.needs)
        if self.scoring.router_unfitted:
            self.fit_router(dataset)
        if self.scoring.normalization != "none" and self.needs.certainty_source is not None:
            self.scoring.fit_statistics(self.signal_cache, self.cached_signals.dataset_ids(dataset),
                                        self.needs.certainty_source)
        return self.signal_cache

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
            self.signal_cache = self.cached_signals.load(dataset, needs=self.needs)
        rows = self.scoring.fit_router(self.signal_cache, self.cached_signals.dataset_ids(dataset),
                                       self.needs.certainty_source, self.args.router_fit_rows, self.args.seed)
        shares, weights = self.scoring.share_notes([t.name for t in self.teachers])
        found = (f"; {shares}" if shares else "") + (f"; share_weighting='balanced': {weights}" if weights else "")
        logger.info(f"Router {self.router.name!r} fitted on {rows} unlabeled rows{found}.")
        if self.args.should_save:
            save_router_state(self.router, self.args.output_dir)
        return self.router

    def _fit_scoring(self) -> None:
        """Set-up of evaluate()/predict(): fit the router and the certainty statistics (on the training rows) if
        train() has not, so that a step only scores."""
        if self.router is not None and not self.router.fitted:
            self.fit_router()
        if self.args.certainty_normalization != "none" and self.needs.certainty_source is not None \
                and self.certainty_statistics is None:
            self.precompute_teacher_signals()

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resume_from_checkpoint = self._checked_resume(resume_from_checkpoint)
        if resume_from_checkpoint is not None:
            load_router_state(self.router, str(resume_from_checkpoint))
        # A second run writing the same output_dir while this one is alive is refused (see ki_trainer.launch).
        with output_dir_lock(self.args.output_dir, is_main_process=self.is_world_process_zero()):
            if self.args.signals_are_cached:
                self.precompute_teacher_signals()
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._check_finite_loss("at the end of training")
        return output

    def get_train_dataloader(self):
        """Training batches carry no gold labels (see :func:`~ki_trainer.collator.without_gold_labels`)."""
        collator = self.data_collator
        self.data_collator = without_gold_labels(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        self._check_finite_loss("at a logging step")  # before the Trainer logs a NaN loss as a finite number
        if "loss" in logs:
            logs.update(self._stats.logs(self.accelerator, self.args, self.strategy.certainty_source is not None))
        super().log(logs, start_time)

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
        if labels is not None:
            self._eval_rows.add(self._last_signals, self.label_space, self.accelerator.gather_for_metrics)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return loss, logits.detach(), labels

    def routed_teacher_predictions(self, signals: TeacherSignals) -> torch.Tensor:
        """``[B]`` union ids: each row's most competent teacher's prediction (its accuracy is that of the
        hard-routed ensemble the student compresses; see :func:`~ki_trainer.metrics.routed_teacher_predictions`)."""
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
        """Set-up of an evaluation: the router and certainty statistics fitted; with cached signals ``dataset``'s rows
        read from their own cache file (:meth:`SignalPrecompute.for_evaluation`): computed by the first evaluation and
        reused, so repeated evaluations score the same teacher draws. Rows without ids are queried live."""
        self._fit_scoring()
        previous = self._eval_signal_cache
        cached = self.args.signals_are_cached
        cache = self.cached_signals.for_evaluation(dataset, metric_key_prefix, self.needs) if cached else None
        self._eval_signal_cache = cache if cache is not None else previous
        try:
            yield
        finally:
            self._eval_signal_cache = previous

    def evaluation_loop(self, *args, **kwargs):
        self._eval_rows.reset()
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self._eval_rows.reset()

    def _compute_metrics(self, eval_pred: EvalPrediction) -> dict[str, float]:
        user = self._user_compute_metrics
        return self._eval_rows.metrics(eval_pred.predictions, eval_pred.label_ids, self.label_space,
                                       (lambda: user(eval_pred)) if user is not None else None)
