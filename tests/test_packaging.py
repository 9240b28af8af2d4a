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


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """``python -m build`` (sdist, then the wheel built FROM the sdist, as an index user gets them), offline."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (wheel,) = out.glob("ki_trainer-*.whl")
    (sdist,) = out.glob("ki_trainer-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_sdist_and_wheel_carry_what_a_user_needs_and_index_metadata(built: dict) -> None:
    import email
    import tarfile

    with tarfile.open(built["sdist"]) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}
    for needed in ("pyproject.toml", "setup.cfg", "LICENSE", "README.md", "ki_trainer/templates/model_card.md.j2",
                   "ki_trainer/launch_configs/multi_gpu.yaml", "ki_trainer/resources/debian_sections20.jsonl.xz"):
        assert needed in members, needed
    assert members["ki_trainer/resources/debian_sections20.jsonl.xz"].isfile()  # the data, not a dangling link
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert {"ki_trainer/templates/model_card.md.j2", "ki_trainer/resources/debian_sections20.jsonl.xz",
            "ki_trainer/launch_configs/fsdp.yaml", "ki_trainer/cli/env.py"} <= names
    assert any(n.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for n in names)  # setuptools >=/< 72
    assert metadata["Requires-Python"] == ">=3.10"
    assert (metadata["License-Expression"] or metadata["License"]) == "Apache-2.0"
    assert metadata["Home-page"] or any(url.startswith("Source, https://") for url in metadata.get_all("Project-URL"))
    assert {"Documentation", "Source", "Issues"} <= {url.split(",")[0] for url in metadata.get_all("Project-URL")}
    requires = metadata.get_all("Requires-Dist")
    assert "transformers<6,>=5.0" in requires or "transformers>=5.0,<6" in requires, requires
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert metadata["Description-Content-Type"] == "text/markdown" and "# ki-trainer" in metadata.get_payload()


def test_wheel_installs_into_a_fresh_venv_and_runs(built: dict, tmp_path: Path) -> None:
    """The wheel in a new virtual environment (dependencies: this interpreter's, on the path; no network):
    ``ki-trainer --version``, the packaged data, and a tiny integration that renders the packaged card template."""
    import json
    import os
    import sysconfig

    from conftest import TEACHER_SPLIT
    from test_cli import save_tiny_models

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not ki_trainer
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                             "--no-index", "--ignore-installed", str(built["wheel"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    command = str(venv / "bin" / "ki-trainer")

    def run(*args: str) -> str:
        done = subprocess.run([command, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    from ki_trainer import __version__

    assert run("--version").strip() == f"ki-trainer {__version__}"
    where = subprocess.run([str(python), "-c", "import ki_trainer, ki_trainer.data as d; print(ki_trainer.__file__); "
                            "print(len(d.load_debian_sections(split='test')))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    path, rows = where.stdout.split()
    assert path.startswith(str(venv)) and int(rows) > 1000  # the installed copy, with its embedded data
    assert run("launch-config", "fsdp").strip().startswith(str(venv))
    models = save_tiny_models(tmp_path / "models")
    out = tmp_path / "student"
    run("integrate", "--teachers", str(models["teacher_0"]), str(models["teacher_1"]), "--student",
        str(models["student"]), "--dataset", str(models["data"]), "--strategy", "vanilla_kd", "--max_length", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "true", "--disable_tqdm", "true", "--output_dir", str(out))
    assert 0.0 <= json.loads((out / "test_results.json").read_text())["test_accuracy"] <= 1.0
    card = (out / "README.md").read_text()
    assert "## Knowledge integration" in card and ", ".join(TEACHER_SPLIT[1]) in card
