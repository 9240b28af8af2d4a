"""The merged student's Hub model card, rendered from the packaged template ``templates/model_card.md.j2``.

A merged student is only trustworthy with its provenance: which teachers it was distilled from (by Hub
id or name, never a local path), their architectures, labels and languages, how their predictions
were integrated (strategy, router and their hyper-parameters), what it was trained on and how it
scored. ``save_model()`` and ``push_to_hub()`` both write it as ``README.md``.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .pretrained.resolve import hub_id_of
from .teacher import Teacher

MODEL_CARD_TAGS = ["generated_from_trainer", "knowledge-integration", "ki-trainer", "text-classification"]
TEMPLATE = "model_card.md.j2"

# Evaluation outputs that are counts or timings, not quality metrics: never in the card's model-index.
NOT_METRICS = ("loss", "labelled_rows", "runtime", "samples_per_second", "steps_per_second", "epoch",
               "jit_compilation_time", "model_preparation_time")
# Framework versions the card lists when the package is installed (peft: only for a PEFT student).
FRAMEWORKS = ("transformers", "torch", "datasets", "tokenizers", "accelerate")

# The strategy / router block reads whatever of these the config has (getattr with a default), so
# fields added later (router hyper-parameters, ...) appear without touching this module: any config
# field whose name starts with one of ROUTER_PREFIXES is listed too.
STRATEGY_FIELDS = (
    "selection",
    "mc_samples",
    "mc_top_layers",
    "kd_temperature",
    "teacher_score_temperature",
    "margin_reweighting",
    "normalize_margin_weights",
    "within_teacher_kd",
    "certainty_normalization",
    "signal_source",
    "student_init",
)
# What a strategy that does not weigh teachers by certainty (vanilla_kd, uhc) reads of STRATEGY_FIELDS; the
# selection, Monte-Carlo and margin settings mean nothing to it and are not listed.
PLAIN_KD_FIELDS = ("kd_temperature", "signal_source", "student_init")
# Read only when the certainty comes from Monte-Carlo dropout (muki).
MC_FIELDS = ("mc_samples", "mc_top_layers")
ROUTER_PREFIXES = ("router",)
TRAINING_FIELDS = ("num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size", "seed")


def teacher_source(teacher: Teacher) -> str:
    """A teacher's public identity: its Hub id when it has one, else its name (never a local path)."""
    hub_id = hub_id_of(teacher.source) if teacher.source and not os.path.exists(os.path.join(
        teacher.source, "adapter_config.json")) else None
    base = hub_id or f"local model `{teacher.name}`"
    return base + (f" (adapter `{teacher.adapter}`)" if getattr(teacher, "adapter", None) else "")


def _languages(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _router(args: Any) -> str:
    """The router the run used: the configured one, else the strategy's default for the signal mode."""
    resolved = args.resolved_router() if hasattr(args, "resolved_router") else getattr(args, "router", None)
    if not resolved:
        return "none (the strategy does not select teachers)"
    return resolved if getattr(args, "router", None) else f"{resolved} (the default of strategy {args.strategy!r})"


def _certainty_source(args) -> Optional[str]:
    """The strategy's ``certainty_source`` (``None``: it does not weigh teachers by certainty), "mc" if unknown."""
    from .strategies import get_strategy

    try:
        return get_strategy(getattr(args, "strategy", "")).certainty_source
    except ValueError:
        return "mc"  # an unregistered name: list every setting rather than hide one


def _strategy_settings(args) -> dict[str, Any]:
    """The settings the run's strategy actually reads (MUKI's selection/MC/margin knobs only for certainty
    strategies, the MC ones only for Monte-Carlo certainty), plus the router fields for strategies with a router."""
    source = _certainty_source(args)
    names = PLAIN_KD_FIELDS if source is None else [n for n in STRATEGY_FIELDS if source == "mc" or n not in MC_FIELDS]
    settings = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if settings.get("within_teacher_kd", 0.0) is None:
        settings["within_teacher_kd"] = "None (auto: 1.0 only where the router found the pool skewed; see the router fit)"
    if source is not None:
        for name in sorted(vars(args)):
            if name.startswith(ROUTER_PREFIXES) and name != "router":
                settings[name] = getattr(args, name)
    return settings


def framework_versions(peft_used: bool = False) -> dict[str, str]:
    """ki-trainer and the installed versions of the frameworks a user needs to reproduce the run."""
    import importlib.metadata

    from ._version import __version__

    versions = {"ki-trainer": __version__}
    for name in FRAMEWORKS + (("peft",) if peft_used else ()):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def final_metrics(log_history: Sequence[Mapping[str, Any]], prefixes: Sequence[str] = ("eval", "test")) -> dict[str, float]:
    """The last logged metrics of each evaluation prefix (``eval_*`` of the last evaluate on the validation set,
    ``test_*`` of the last one on the test set), merged."""
    found: dict[str, float] = {}
    for prefix in prefixes:
        log = next((log for log in reversed(log_history) if any(k.startswith(prefix + "_") for k in log)), {})
        found.update({k: v for k, v in log.items() if k.startswith(prefix + "_")})
    return found


def is_metric(key: str) -> bool:
    """True for a quality metric; False for losses, row counts and timings (``eval_labelled_rows``, ...)."""
    name = _split_of(key)[1]
    return not (name in NOT_METRICS or name.endswith(tuple("_" + n for n in NOT_METRICS)))


def base_model_license(base_model: Optional[str], hub_id: Optional[str]) -> Optional[str]:
    """The base model's license, as transformers' card infers it: from a local model card's header, else from the
    Hub's ``license:`` tag (skipped offline); ``None`` when neither says."""
    if base_model and os.path.isfile(os.path.join(base_model, "README.md")):
        text = open(os.path.join(base_model, "README.md"), encoding="utf-8").read()
        if text.startswith("---\n") and "\n---" in text[4:]:
            try:
                header = yaml.safe_load(text[4:].split("\n---", 1)[0]) or {}
            except yaml.YAMLError:
                header = {}
            if isinstance(header, dict) and header.get("license"):
                return str(header["license"])
    if hub_id and os.environ.get("HF_HUB_OFFLINE", "0").upper() not in ("1", "ON", "YES", "TRUE"):
        try:
            from huggingface_hub import model_info

            tags = model_info(hub_id, timeout=5).tags or []
        except Exception:  # noqa: BLE001 - like transformers: no network, no license
            return None
        return next((tag[len("license:"):] for tag in tags if tag.startswith("license:")), None)
    return None


def _round(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


SPLITS = {"eval": "validation", "test": "test"}


def _split_of(key: str) -> tuple[str, str]:
    """``"test_accuracy"`` -> (``"test"``, ``"accuracy"``); keys without a known prefix count as validation."""
    prefix, _, name = key.partition("_")
    return (SPLITS[prefix], name) if prefix in SPLITS and name else ("validation", key)


def _metrics_by_split(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"validation": {"accuracy": ...}, "test": {...}}`` for the card's results tables."""
    tables: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        split, name = _split_of(key)
        tables.setdefault(split, {})[name] = _round(value)
    return tables


def _model_index(model_name: str, metrics: Mapping[str, float], dataset: Optional[str]) -> list[dict]:
    """transformers' ``model-index``: one result per evaluated split, quality metrics only."""
    by_split: dict[str, list[dict]] = {}
    for key, value in metrics.items():
        if not is_metric(key):  # the KI loss against the teachers, row counts and timings are no quality metric
            continue
        split, name = _split_of(key)
        by_split.setdefault(split, []).append({"type": name, "value": _round(value), "name": name})
    return [{
        "name": model_name,
        "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": dataset or "evaluation data", "type": dataset or "custom", "split": split},
            "metrics": results,
        } for split, results in by_split.items()],
    }] if by_split else []


def render_model_card(
    *,
    teachers: Sequence[Teacher],
    args,
    labels: Sequence[str],
    model_name: str,
    repo_id: str,
    base_model: Optional[str] = None,
    is_adapter: bool = False,
    train_rows: Optional[int] = None,
    max_length: Optional[Union[int, str]] = None,
    eval_metrics: Optional[Mapping[str, float]] = None,
    versions: Optional[Mapping[str, str]] = None,
    tags: Optional[Sequence[str]] = None,
    language: Optional[Sequence[str]] = None,
    license: Optional[str] = None,
    dataset: Optional[str] = None,
    example_text: str = "Text to classify",
    routing_report: Optional[str] = None,
    router_fit: Optional[str] = None,
) -> str:
    """Render the card: a YAML header (base_model, tags, languages, model-index) and the sections."""
    import jinja2

    hub_base = hub_id_of(base_model) if base_model else None
    metrics = {k: v for k, v in (eval_metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and is_metric(k)}
    languages = list(dict.fromkeys(language or [lang for t in teachers for lang in _languages(t.language)]))
    all_tags = list(dict.fromkeys(list(tags or []) + MODEL_CARD_TAGS + [getattr(args, "strategy", "")]))
    header: dict[str, Any] = {"library_name": "peft" if is_adapter else "transformers"}
    if hub_base:
        header["base_model"] = hub_base
    if languages:
        header["language"] = languages
    license = license or base_model_license(base_model, hub_base)
    if license:
        header["license"] = license
    header["tags"] = [tag for tag in all_tags if tag]
    header["pipeline_tag"] = "text-classification"
    if dataset:
        header["datasets"] = [dataset]
    model_index = _model_index(model_name, metrics, dataset)
    if model_index:
        header["model-index"] = model_index

    context = {
        "yaml_header": yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(),
        "model_name": model_name,
        "repo_id": repo_id,
        "base_model": hub_base,
        "is_adapter": is_adapter,
        "labels": list(labels),
        "teachers": [
            {
                "name": t.name,
                "source": teacher_source(t),
                "architecture": type(getattr(t.model, "get_base_model", lambda: t.model)()).__name__,
                "labels": t.labels,
                "language": ", ".join(_languages(t.language)) or "not given",
            }
            for t in teachers
        ],
        "strategy": getattr(args, "strategy", "unknown"),
        "router": _router(args),
        "strategy_settings": _strategy_settings(args),
        "train_rows": train_rows,
        "max_length": max_length,
        "training_settings": {name: getattr(args, name) for name in TRAINING_FIELDS if hasattr(args, name)},
        "eval_metrics": _metrics_by_split(metrics),
        "dataset": dataset,
        "routing_report": routing_report,
        "versions": dict(versions or {}),
        "ki_trainer_version": (versions or {}).get("ki-trainer", "unknown"),
        "example_text": example_text.replace('"', "'"),
        "router_fit": router_fit,
    }
    source = importlib.resources.files("ki_trainer").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    template = jinja2.Environment(keep_trailing_newline=True, trim_blocks=False, autoescape=False).from_string(source)
    return template.render(**context)


def integration_section(teachers: Sequence[Teacher], args) -> str:
    """A short markdown "Knowledge integration" section (for cards built elsewhere, e.g. by other trainers)."""
    lines = [
        "## Knowledge integration",
        "",
        "This student was trained **without gold labels** with [ki-trainer](https://github.com/ki-trainer/ki-trainer): "
        "it learned from the predictions of the teachers below on unlabeled text, over the union of their labels.",
        "",
        "| teacher | source | labels |",
        "|---|---|---|",
    ]
    for teacher in teachers:
        lines.append(f"| {teacher.name} | {teacher_source(teacher)} | {', '.join(teacher.labels)} |")
    settings = {
        "strategy": args.strategy,
        "selection": args.selection,
        "mc_samples": args.mc_samples,
        "mc_top_layers": args.mc_top_layers,
        "kd_temperature": args.kd_temperature,
        "teacher_score_temperature": args.teacher_score_temperature,
        "margin_reweighting": args.margin_reweighting,
        "normalize_margin_weights": args.normalize_margin_weights,
        "within_teacher_kd": "None (auto)" if args.within_teacher_kd is None else args.within_teacher_kd,
        "certainty_normalization": args.certainty_normalization,
        "signal_source": args.signal_source,
    }
    lines += ["", "Integration settings:", ""] + [f"- `{k}`: {v}" for k, v in settings.items()]
    lines += [
        "",
        "Gold labels, where the evaluation data had them, were used for evaluation only. Classes the teachers "
        "disagree on or never saw are where a merged student is weakest: check the per-teacher accuracies above.",
        "",
    ]
    return "\n".join(lines)


def card_facts(trainer, output_dir: str, **kwargs) -> dict[str, Any]:
    """The keyword arguments of :func:`render_model_card` for a trained ``KnowledgeIntegrationTrainer``
    (``kwargs``: ``create_model_card``'s ``language``, ``license``, ``tags``, ``model_name``, ``finetuned_from``,
    ``dataset``; ``trainer.model_card_kwargs``, e.g. ``{"dataset": name}``, fills what they omit).

    The card carries the last validation (``eval_*``) and test (``test_*``) metrics of ``log_history`` as
    ``model-index``; its usage snippet names the Hub repo, else the folder the model was saved to.
    """
    from .collator import KnowledgeIntegrationCollator
    from .dataset_checks import column_names, column_values, is_streaming
    from .peft_support import is_peft_model

    kwargs = {**getattr(trainer, "model_card_kwargs", {}), **{k: v for k, v in kwargs.items() if v is not None}}
    tags = kwargs.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    dataset = kwargs.get("dataset")
    dataset = dataset[0] if isinstance(dataset, (list, tuple)) and dataset else dataset
    language = kwargs.get("language")
    language = [language] if isinstance(language, str) else language
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_adapter = is_peft_model(model) and not args.merge_adapter
    versions = framework_versions(peft_used=is_peft_model(model))
    # the snippet must run as written: the Hub repo when pushing (push_to_hub without hub_model_id names it in
    # init_hf_repo: trainer.hub_model_id), else the folder the model was saved to
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or os.path.abspath(output_dir)
    eval_metrics = final_metrics(trainer.state.log_history)
    report_png = os.path.join(output_dir, "routing_report.png")  # ki_trainer.report.REPORT_PNG
    collator = trainer.data_collator
    max_length = getattr(collator, "max_length", None) if isinstance(collator, KnowledgeIntegrationCollator) else None
    train_dataset = trainer.train_dataset
    if train_dataset is not None and not is_streaming(train_dataset) and "input_ids" in column_names(train_dataset):
        longest = max(len(ids) for ids in column_values(train_dataset, "input_ids"))
        max_length = f"{longest} (longest pre-tokenized training row; the user's own truncation)"
    return dict(
        teachers=trainer.teachers,
        args=args,
        labels=trainer.label_space.labels,
        model_name=kwargs.get("model_name") or os.path.basename(os.path.normpath(repo_id)),
        repo_id=repo_id,
        base_model=kwargs.get("finetuned_from") or trainer.student_source,
        is_adapter=is_adapter,
        train_rows=len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        max_length=max_length,
        eval_metrics=eval_metrics,
        routing_report="routing_report.png" if os.path.isfile(report_png) else None,
        versions=versions,
        tags=tags,
        language=language,
        license=kwargs.get("license"),
        dataset=dataset,
        router_fit=router_fit_summary(trainer),
    )


def router_fit_summary(trainer) -> Optional[str]:
    """What the transductive router found in the pool it was fitted on, in words (``"fitted on 4,700 unlabeled rows;
    the pool looks 88% teacher A, 12% teacher B"``), or ``None`` without a fitted pool router."""
    router = getattr(trainer, "router", None)
    if router is None or not router.needs_fit or not router.fitted or not hasattr(router, "describe_shares"):
        return None
    rows = router.state.get("fit_rows")
    seen = f"fitted on {rows:,} unlabeled pool rows; " if rows is not None else ""
    shares, weights = trainer.scoring.share_notes([teacher.name for teacher in trainer.teachers])
    line = seen + shares
    if weights:
        line += f"; so that every teacher's domain counts alike, {weights}"
    return line


def write_model_card(trainer, output_dir: str, **kwargs) -> str:
    """Render the card of ``trainer``'s student into ``<output_dir>/README.md`` and return its path."""
    text = render_model_card(**card_facts(trainer, output_dir, **kwargs))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as card:
        card.write(text)
    return path
