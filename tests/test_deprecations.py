"""Earlier names keep working, each with a FutureWarning that names the new name; the library's own code never
triggers one."""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_rows, tiny_bert
from datasets import Dataset

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer
from ki_trainer.merge_distill import MergeDistillConfig

OURS = ".* is deprecated and will be removed in a future version; use "  # the library's rename warnings


@pytest.mark.parametrize("config", [KnowledgeIntegrationConfig, MergeDistillConfig])
def test_the_teacher_signals_flag_is_signal_source_with_a_future_warning(config, tmp_path):
    with pytest.warns(FutureWarning, match=r"teacher_signals=\.\.\.\) is deprecated .* use signal_source='cached'"):
        old = config(output_dir=str(tmp_path), report_to=[], use_cpu=True, teacher_signals="cached")
    assert old.signal_source == "cached" and old.teacher_signals is None and old.signals_are_cached
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=OURS, category=FutureWarning)  # the new name: no warning
        new = config(output_dir=str(tmp_path), report_to=[], use_cpu=True, signal_source="cached")
    assert new.signal_source == "cached" and new.signals_are_cached
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="contradicts signal_source='cached'"):
        config(output_dir=str(tmp_path), report_to=[], use_cpu=True, signal_source="cached", teacher_signals="on_the_fly")


def test_merge_distill_signal_source_cached_forces_static_masking_and_shares_the_cache_directory(tmp_path):
    args = MergeDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, signal_source="cached")
    assert args.static_masking
    ki = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert args.resolved_signal_cache_dir() == ki.resolved_signal_cache_dir() == str(tmp_path / "teacher_signals")
    elsewhere = MergeDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, signal_cache_dir="/x/c")
    assert elsewhere.resolved_signal_cache_dir() == "/x/c"


def test_merge_distill_checkpoints_record_the_flag_under_its_earlier_key():
    """Checkpoints written before the rename recorded ``teacher_signals``: the run fingerprint keeps that key (with
    signal_source's value), so those checkpoints still resume."""
    from types import SimpleNamespace

    from ki_trainer.merge_distill.guards import RunGuards

    args = MergeDistillConfig(output_dir="unused", report_to=[], use_cpu=True, signal_source="cached")
    guards = RunGuards()
    guards.args, guards.teachers, guards.vocabulary = args, [], SimpleNamespace(tokens=["a"])
    settings = guards.run_fingerprint()["settings"]
    assert settings["teacher_signals"] == "cached" and "signal_source" not in settings


def test_the_teacher_signals_method_is_query_signals_with_a_future_warning(tmp_path, tok, teachers):
    train = Dataset.from_list([{"text": r["text"]} for r in make_rows(2, seed=1)])
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, strategy="entropy",
                                      max_length=16)
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                          train_dataset=train, processing_class=tok)
    batch = trainer._prepare_inputs(trainer.data_collator([train[0], train[1]]))
    teacher_batches = batch.pop("teacher_inputs", {})
    inputs = {k: v for k, v in batch.items() if k != "example_ids"}
    with pytest.warns(FutureWarning, match=r"teacher_signals\(\) is deprecated .* use query_signals\(\)"):
        old = trainer.teacher_signals(inputs, teacher_batches)
    new = trainer.query_signals(inputs, teacher_batches)
    for a, b in zip(old.logits, new.logits):
        torch.testing.assert_close(a, b)


def test_the_earlier_merge_distill_cli_module_warns_and_still_imports():
    sys.modules.pop("ki_trainer.merge_distill.cli", None)
    with pytest.warns(FutureWarning, match="ki_trainer.merge_distill.cli is deprecated .* use ki_trainer.cli.merge_distill"):
        old = importlib.import_module("ki_trainer.merge_distill.cli")
    from ki_trainer.cli.merge_distill import build_parser

    assert old.build_parser is build_parser


def test_importing_the_package_and_its_commands_raises_no_deprecation_warning():
    code = (f"import warnings; warnings.filterwarnings('error', message={OURS!r}, category=FutureWarning);"
            "import ki_trainer, ki_trainer.cli, ki_trainer.cli.merge_distill, ki_trainer.cli.integrate;"
            "from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, merge_distill;"
            "KnowledgeIntegrationConfig(output_dir='unused', report_to=[], use_cpu=True, signal_source='cached');"
            "merge_distill.MergeDistillConfig(output_dir='unused', report_to=[], use_cpu=True, signal_source='cached')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
