"""Two processes under `accelerate launch` (gloo on CPU): DDP keeps the students in sync, in both
teacher-signal modes, and evaluation gathers across ranks."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate CLI is not installed beside this python")
@pytest.mark.parametrize("mode", ["on_the_fly", "cached"])
def test_two_processes_train_in_sync(tmp_path, mode):
    script = os.path.join(os.path.dirname(__file__), "..", "dist", "train_tiny.py")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", script, str(tmp_path), mode]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    written = sorted(p.name for p in tmp_path.glob("rank*.json"))
    assert result.returncode == 0, f"rank results written: {written}\n" + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    assert ranks[0]["eval"]["eval_accuracy"] == ranks[1]["eval"]["eval_accuracy"]
    assert "eval_teacher_selection_accuracy" in ranks[0]["eval"]
    logged = ranks[0]["logged"][0]
    assert logged["selection_share_t0"] + logged["selection_share_t1"] == pytest.approx(1.0)
