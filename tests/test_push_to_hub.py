"""push_to_hub sends the merged student and its model card to a real HTTP endpoint on 127.0.0.1."""

import json
import os
import subprocess
import sys

from hub.stub_hub import StubHub


def test_push_to_hub_uploads_student_and_card(tmp_path):
    with StubHub() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test_token",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        script = os.path.join(os.path.dirname(__file__), "hub", "push_student.py")
        result = subprocess.run([sys.executable, script, str(tmp_path / "out")], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:] + "\n" + "\n".join(hub.requests)
    files = hub.repos["me/merged-student"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files), sorted(files)
    config = json.loads(files["config.json"])
    assert config["id2label"] == {"0": "alpha", "1": "beta", "2": "gamma", "3": "delta"}
    assert hub.cards_validated >= 1  # the card's YAML header went through the Hub's validation endpoint
    card = files["README.md"].decode()
    assert "## Knowledge integration" in card and "gamma, delta" in card
