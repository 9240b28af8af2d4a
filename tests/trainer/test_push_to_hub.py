"""push_to_hub sends the merged student and its model card to a real HTTP endpoint on 127.0.0.1."""

import json
import os
import subprocess
import sys

import yaml
from hub.stub_hub import StubHub


def test_push_to_hub_uploads_student_and_card(tmp_path):
    with StubHub() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test_token",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        script = os.path.join(os.path.dirname(__file__), "..", "hub", "push_student.py")
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
    header, body = card[len("---\n"):].split("\n---\n", 1)
    meta = yaml.safe_load(header)
    assert meta["pipeline_tag"] == "text-classification" and meta["language"] == ["en", "it"]
    assert {"knowledge-integration", "ki-trainer", "muki"} <= set(meta["tags"])
    metrics = {m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert {"accuracy", "macro_f1", "accuracy_t0", "accuracy_t1"} <= metrics
    assert meta["model-index"][0]["name"] == "merged-student"
    for section in ("## How to use", "## Knowledge integration", "### Strategy and router", "## Training",
                    "## Evaluation results", "## Framework versions", "## Citations"):
        assert section in body, section
    assert 'pipeline("text-classification", model="me/merged-student")' in body
    assert "| t1 | local model `t1` | BertForSequenceClassification | gamma, delta | it |" in body
    assert "arXiv:2210.05230" in body and "arXiv:2112.07327" in body and "MergeDistill" not in body
