"""Cached signals and checkpoints written before a refactoring are still found: the hashes that name cache files
and identify teachers are pinned to the values this version computed (same torch/transformers, CPU).

The values were computed with the code before the signal cache became a package (commit c3c7027)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import build_tokenizer, teacher_words, tiny_bert

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher, checkpoints
from ki_trainer.merge_distill.signals import topk_fingerprint

PINNED = {
    "signal_default": "1fe3c587cd80725378b9",
    "signal_mc": "d7c5c32ef2564ef51936",
    "signal_features": "1fe3c587cd80725378b9",
    "signal_mc_features": "a6b74d008b9dfdccde2d",
    "checkpoint_weights": "d18293f60fe7aafaf91a",
    "topk": "15f16915f3c56998eb5a",
}


def _trainer(tmp_path, **kw):
    tok = build_tokenizer()
    own = build_tokenizer(teacher_words(["alpha", "beta"]))
    teachers = [
        Teacher(tiny_bert(2, len(own), labels=["alpha", "beta"], seed=11), tokenizer=own, name="own"),
        Teacher(tiny_bert(2, len(tok), labels=["gamma", "delta"], seed=12), name="shared", max_length=24),
    ]
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), teacher_signals="cached", mc_samples=3, max_length=32,
                                      report_to=[], use_cpu=True, save_strategy="no", **kw)
    return KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=13), args=args, teachers=teachers,
                                       train_dataset=[{"id": "a", "text": "alpha"}], processing_class=tok)


def current(tmp_path) -> dict:
    trainer = _trainer(tmp_path)
    teacher = trainer.teachers[1]
    md_teacher = SimpleNamespace(name="md", languages=["en"], tokenizer=trainer.processing_class, model=teacher.model)
    return {
        "signal_default": trainer.signal_fingerprint(),
        "signal_mc": trainer.signal_fingerprint(mc=True, features=False),
        "signal_features": trainer.signal_fingerprint(mc=False, features=True),
        "signal_mc_features": trainer.signal_fingerprint(mc=True, features=True),
        "checkpoint_weights": checkpoints.weights_digest(teacher.model),
        "topk": topk_fingerprint([md_teacher], [torch.arange(5)], {"k": 4, "temperature": 1.0}),
    }


def test_cache_and_checkpoint_fingerprints_are_unchanged(tmp_path):
    assert current(tmp_path) == PINNED
