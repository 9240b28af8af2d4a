"""What a plain `pip install` gets: the console command, the embedded data (a real file, not a link),
the accelerate configs and py.typed."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_entry_point_is_declared() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].strip() == "ki-trainer = ki_trainer.cli:main"


def test_wheel_ships_command_data_configs_and_py_typed(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("ki_trainer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        data = archive.getinfo("ki_trainer/resources/debian_sections20.jsonl.xz")
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "ki-trainer = ki_trainer.cli:main" in archive.read(entry_points).decode()
    assert data.file_size == (REPO / "data" / "debian_sections20.jsonl.xz").stat().st_size  # the file, not a link
    assert "ki_trainer/py.typed" in names and "ki_trainer/__main__.py" in names
    for config in ("single_gpu", "multi_gpu", "cpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        assert f"ki_trainer/launch_configs/{config}.yaml" in names
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
