"""Launch footguns: launched processes that would train alone, a lost `--cpu --num_processes N` launch,
and two runs writing one output directory; the quieter console (new-head line, no load-report table)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
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


# ---------------------------------------------------------------------------------------------- real launches
ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
CONFIGS = Path(__file__).resolve().parents[2] / "ki_trainer" / "launch_configs"


def _launch(tmp_path: Path, config: Path, *flags: str) -> subprocess.CompletedProcess:
    from test_cli import save_tiny_models

    models = save_tiny_models(tmp_path / "models")
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "teachers": [str(models["teacher_0"]), str(models["teacher_1"])], "student": str(models["student"]),
        "dataset": str(models["data"]), "mc_samples": 2, "signal_source": "cached", "max_length": 16,
        "num_train_epochs": 1, "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no",
        "disable_tqdm": True, "output_dir": str(tmp_path / "out"),
    }))  # fmt: skip
    cmd = [ACCELERATE, "launch", "--config_file", str(config), "-m", "ki_trainer", "integrate", str(run), *flags]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(CONFIGS.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.launch
@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate CLI is not installed beside this python")
def test_accelerate_launch_of_the_console_command_with_the_fsdp_config_on_cpu(tmp_path: Path) -> None:
    """Two gloo processes form ONE run (24 rows / (4 per rank x 2 ranks) = 3 steps); FSDP is not available on
    CPU through Accelerate, which runs DDP instead: the run says so instead of pretending to shard."""
    config = tmp_path / "fsdp_cpu.yaml"
    text = (CONFIGS / "fsdp.yaml").read_text().replace("fsdp_cpu_ram_efficient_loading: true",
                                                       "fsdp_cpu_ram_efficient_loading: false")
    config.write_text(text.replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    result = _launch(tmp_path, config, "--use_cpu", "true")
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "test_accuracy" in json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert "FSDP was requested but Accelerate runs this job as MULTI_CPU" in result.stderr
    assert result.stdout.count("==> training the student on 24 unlabeled rows ... ") == 1  # banners on rank 0 only


@pytest.mark.launch
@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate CLI is not installed beside this python")
def test_two_processes_without_use_cpu_are_refused(tmp_path: Path) -> None:
    result = _launch(tmp_path, CONFIGS / "cpu_ddp.yaml")
    assert result.returncode != 0
    assert "LaunchError: The launcher started 2 processes" in result.stderr and "--use_cpu true" in result.stderr
    assert not (tmp_path / "out" / "test_metrics.json").exists()


def test_teachers_load_whole_under_deepspeed_zero3(tmp_path: Path) -> None:
    """With ZeRO-3 configured, from_pretrained partitions a model (which needs deepspeed, not installed here);
    teachers never enter the engine, so they load whole. The setting is left in place for the student."""
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    class Zero3:  # what HfDeepSpeedConfig registers (it cannot be built without deepspeed installed)
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    tok = build_tokenizer()
    tiny_bert(2, len(tok), labels=["alpha", "beta"]).save_pretrained(tmp_path / "teacher")
    zero3 = Zero3()
    set_hf_deepspeed_config(zero3)
    try:
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(ImportError):  # the ZeRO-3 partitioned load path
            AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
        teacher = Teacher(str(tmp_path / "teacher"))
        assert teacher.model.classifier.weight.shape == (2, 32)
        assert all(p.numel() > 0 for p in teacher.model.parameters())
        assert is_deepspeed_zero3_enabled()  # restored for the student
    finally:
        unset_hf_deepspeed_config()


def test_training_progress_is_counted_in_rows(tmp_path: Path, capfd) -> None:
    from transformers.trainer_callback import ProgressCallback

    from ki_trainer.console import RowProgressCallback, use_row_progress

    tok = build_tokenizer()
    data = Dataset.from_list([{"text": r["text"]} for r in make_rows(3, seed=0)])
    teachers = [Teacher(tiny_bert(2, len(tok), labels=["alpha", "beta"]), name="t")]
    trainer = KnowledgeIntegrationTrainer(model=tiny_bert(2, len(tok)), teachers=teachers, train_dataset=data,
                                          processing_class=tok, args=_args(tmp_path, max_steps=2, save_strategy="no",
                                                                           mc_samples=2, disable_tqdm=False,
                                                                           per_device_train_batch_size=4,
                                                                           gradient_accumulation_steps=2))
    use_row_progress(trainer)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert RowProgressCallback in kinds and ProgressCallback not in kinds
    capfd.readouterr()
    trainer.train()
    err = capfd.readouterr().err
    assert "16/16" in err and "rows/s" in err  # 2 steps x 4 rows x 2 accumulation steps


# ------------------------------------------------------------------------------- leaving the process group
def _join_group(tmp_path: Path) -> None:
    """What `accelerate launch` leaves a rank with: a joined gloo process group (here a group of one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.mark.parametrize("fails", [False, True])
def test_the_console_command_leaves_the_process_group(tmp_path: Path, monkeypatch, fails: bool) -> None:
    """`ki-trainer integrate` under `accelerate launch` destroys the process group before the interpreter exits (a
    group alive at exit can abort a rank after its work), also when the command stops with a usage error."""
    import torch.distributed as dist

    import ki_trainer.cli as cli
    from ki_trainer.errors import UsageError

    seen = {}

    def runner(argv, prog):
        _join_group(tmp_path)
        seen["joined"] = dist.is_initialized()
        if fails:
            raise UsageError("a mistake the message names")

    monkeypatch.setattr(cli, "commands", lambda: {"integrate": (runner, "merge")})
    try:
        assert cli.main(["integrate"]) == (2 if fails else 0)
        assert seen["joined"] is True
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
