"""Launch footguns: launched processes that would train alone, a lost `--cpu --num_processes N` launch,
and two runs writing one output directory; the quieter console (new-head line, no load-report table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import build_tokenizer, make_rows, tiny_bert
from datasets import Dataset

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
from ki_trainer.console import describe_new_head
from ki_trainer.launch import LOCK_NAME, LaunchError, check_launch, output_dir_lock

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _args(tmp_path: Path, **overrides) -> KnowledgeIntegrationConfig:
    return KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)


def test_processes_that_would_train_alone_raise(clean_env, tmp_path: Path) -> None:
    args = _args(tmp_path)
    check_launch(args)  # a plain single process is fine
    clean_env.setenv("WORLD_SIZE", "2")
    check_launch(args)  # WORLD_SIZE alone (no RANK/LOCAL_RANK) is not a launcher's
    clean_env.setenv("RANK", "1")
    clean_env.setenv("LOCAL_RANK", "1")
    assert args.world_size == 1  # the arguments were resolved before the variables appeared: one process
    with pytest.raises(LaunchError, match=r"started 2 processes .* world_size=1: each process would train its own copy"):
        check_launch(args)


def test_missing_use_cpu_is_named_in_the_error(clean_env, tmp_path: Path) -> None:
    args = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[])
    args.world_size  # resolve devices as a single process
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        clean_env.setenv(name, value)
    with pytest.raises(LaunchError, match="--use_cpu true"):
        check_launch(args)


def test_lost_cpu_launch_warns(clean_env, tmp_path: Path) -> None:
    args = _args(tmp_path)
    clean_env.setenv("ACCELERATE_USE_CPU", "True")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_launch(args)  # `accelerate launch --cpu` with one process: nothing to say
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")  # what --cpu --num_processes 2 sets, and then runs ONE process
    with pytest.warns(UserWarning, match="started ONE process"):
        check_launch(args)


def test_output_dir_lock(tmp_path: Path) -> None:
    with output_dir_lock(str(tmp_path)) as path:
        assert json.loads(Path(path).read_text())["pid"] == os.getpid()
        with output_dir_lock(str(tmp_path), is_main_process=False) as other:
            assert other is None  # the other ranks of the same run never take it
    assert not (tmp_path / LOCK_NAME).exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_NAME
        import socket

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "earlier"}))
        with pytest.raises(LaunchError, match=f"Another run is writing .* pid {sleeper.pid}, started earlier"):
            with output_dir_lock(str(tmp_path)):
                pass
        assert lock.exists()  # the live run keeps its lock
    finally:
        sleeper.kill()
        sleeper.wait()
    with output_dir_lock(str(tmp_path)):  # its process is gone: a stale lock is taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path: Path, clean_env) -> None:
    tok = build_tokenizer()
    data = Dataset.from_list([{"text": r["text"]} for r in make_rows(2, seed=0)])
    teachers = [Teacher(tiny_bert(2, len(tok), labels=["alpha", "beta"]), name="t")]
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(2, len(tok)), teachers=teachers, train_dataset=data,
                                          processing_class=tok, args=_args(tmp_path, max_steps=1, save_strategy="no",
                                                                           mc_samples=2, disable_tqdm=True))
    assert trainer.args.dataloader_pin_memory is False  # nothing to pin on CPU: no torch warning
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(LaunchError, match="Another run is writing"):
            trainer.train()
    finally:
        sleeper.kill()
        sleeper.wait()
    trainer.train()  # once that run is gone, training proceeds
    assert not (tmp_path / LOCK_NAME).exists()


def test_new_head_is_one_line_and_other_missing_weights_are_named() -> None:
    info = {"missing_keys": {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"}, "mismatched_keys": set()}
    line, others = describe_new_head(info, 20, "minilm")
    assert line.startswith("Student from minilm: new classification head over 20 labels (3 tensors newly initialised")
    assert others == []
    info["missing_keys"].add("bert.encoder.layer.0.attention.self.query.weight")
    assert describe_new_head(info, 20, "minilm")[1] == ["bert.encoder.layer.0.attention.self.query.weight"]


def test_student_from_a_directory_logs_no_load_report_table(tmp_path: Path) -> None:
    import logging

    tok = build_tokenizer()
    base = tmp_path / "base"
    from transformers import BertModel

    BertModel(tiny_bert(2, len(tok)).config).save_pretrained(base)
    tok.save_pretrained(base)
    teachers = [Teacher(tiny_bert(2, len(tok), labels=["alpha", "beta"]), name="t")]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        trainer = KnowledgeIntegrationTrainer(model=str(base), teachers=teachers, args=_args(tmp_path / "out"),
                                              train_dataset=Dataset.from_list([{"text": "apple"}]))
    finally:
        library.removeHandler(handler)
    messages = [record.getMessage() for record in records if record.levelno >= logging.WARNING]
    assert not [m for m in messages if "LOAD REPORT" in m or "newly initialized" in m], messages
    assert trainer.model.config.num_labels == 2
