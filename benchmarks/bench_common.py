"""What the benchmark scripts share: labelled data files, label splits, teacher training, teacher signals.

``benchmarks/routing.py`` and ``benchmarks/quality.py`` are thin scripts over this module (and over
``examples/train_teachers.py``, which trains the teachers exactly as a user would): one place decides
how a data file is read, how its classes are carved among teachers, how teachers are trained and
cached, and what the teachers say about a set of rows.

Everything is cached on disk and keyed by its settings, so an interrupted benchmark resumes:
a teacher set lives in ``<root>/teachers/<data>/<split>/`` (``teachers.json`` beside it), and the
teachers' signals in the trainer's own fingerprinted signal cache (``<root>/cache/<data>/<split>/``), which every
router and student of that teacher set reuses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ki_trainer import Teacher  # noqa: E402
from ki_trainer.data import DEFAULT_DATA_PATH, load_debian_sections, partition_labels  # noqa: E402


def load_train_teachers_module():
    """examples/train_teachers.py as a module: the teachers are trained exactly as that script does."""
    if "train_teachers" in sys.modules:
        return sys.modules["train_teachers"]
    spec = importlib.util.spec_from_file_location("train_teachers", REPO / "examples" / "train_teachers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def data_name(path: Optional[str]) -> str:
    """A short name for a data file (``debian_sections20`` for the default)."""
    name = Path(path or DEFAULT_DATA_PATH).name
    for suffix in (".xz", ".jsonl", ".json"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def load_labelled(path: Optional[str] = None, language: str = "en"):
    """Any labelled JSON Lines file (plain or .xz) with ``text``, ``label``, ``split`` → ``DatasetDict``."""
    return load_debian_sections(path, language=language)


def split_slug(spec: str, seed: int = 0) -> str:
    slug = spec.replace(":", "-").replace("[", "").replace("]", "").replace('"', "").replace(",", "_").replace(" ", "")
    return f"{slug}-seed{seed}" if spec.startswith("random:") else slug


def teacher_subsets(data, spec: str, seed: int = 0) -> list[list[str]]:
    return partition_labels(data["train"]["label"], spec, seed=seed)


def train_teacher_set(
    data_path: Optional[str],
    spec: str,
    out_dir: Path,
    model: str,
    max_length: int,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    split_seed: int = 0,
    language: str = "en",
) -> dict[str, Any]:
    """Train (or reuse) one teacher per label subset with ``examples/train_teachers.py``; returns teachers.json."""
    module = load_train_teachers_module()
    argv = [
        "--model_name_or_path", model, "--split_spec", spec, "--split_seed", str(split_seed),
        "--max_length", str(max_length), "--language", language,
        "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(batch_size),
        "--learning_rate", str(learning_rate), "--seed", str(seed), "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out_dir),
        "--use_cpu", str(not torch.cuda.is_available()).lower(),
    ]
    if data_path is not None:
        argv += ["--data_path", str(data_path)]
    if torch.cuda.is_available():
        argv += ["--bf16", "true"]
    return module.main(argv)


def load_teacher_set(out_dir: Path) -> list[Teacher]:
    summary = json.loads((Path(out_dir) / "teachers.json").read_text())
    return [
        Teacher(str(Path(out_dir) / record["path"]), tokenizer=str(Path(out_dir) / record["path"]), name=f"teacher_{i}")
        for i, record in enumerate(summary["teachers"])
    ]


def machine() -> dict[str, Any]:
    """Hardware and versions for a results file."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


# ---------------------------------------------------------------------- signals through the trainer's cache
def ki_trainer_for(
    teacher_dir: Path,
    student: str,
    output_dir: Path,
    cache_dir: Path,
    max_length: int,
    mc_samples: int,
    mc_top_layers: Optional[int],
    train_dataset,
    seed: int = 0,
    **config: Any,
):
    """A KnowledgeIntegrationTrainer over a cached teacher set, reading its signals from ``cache_dir``.

    Every trainer built with the same teachers and settings shares one signal cache: the teachers are
    queried once per row (MC passes included), then every router and student seed reuses the signals.
    """
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer
    from ki_trainer.pretrained import resolve_model

    cuda = torch.cuda.is_available()
    defaults = dict(
        output_dir=str(output_dir), signal_source="cached", signal_cache_dir=str(cache_dir), max_length=max_length,
        mc_samples=mc_samples, mc_top_layers=mc_top_layers, per_device_eval_batch_size=64, seed=seed, data_seed=seed,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), strategy="muki",
    )
    defaults.update(config)
    return KnowledgeIntegrationTrainer(
        model=str(resolve_model(student)), args=KnowledgeIntegrationConfig(**defaults),
        teachers=load_teacher_set(teacher_dir), train_dataset=train_dataset,
    )


def cached_pool_and_test(trainer, pool, test):
    """(pool signals, test signals) as TeacherSignals from the trainer's fingerprinted cache (computed once).

    Both caches hold every signal any router reads (MC statistics and pooled features), so every router is
    compared on the same teacher outputs; a transductive ``router`` of the trainer is fitted on ``pool``.
    """
    pool_cache = trainer.precompute_teacher_signals(pool, mc=True, features=True)
    test_cache = trainer.cached_signals.load(test, file_suffix=".test", mc=True, features=True)
    as_ids = lambda rows: [str(x) for x in rows["id"]]  # noqa: E731
    return pool_cache.lookup(as_ids(pool), "mc"), test_cache.lookup(as_ids(test), "mc")
