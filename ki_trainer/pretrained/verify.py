"""Checks that an assembled directory is a faithful, usable model.

Reconstruction is only trustworthy if measured: the ONNX-derived model must reproduce the ONNX
runtime's outputs, the dequantised e5 must still align translations, and every directory must
load through the Auto classes with a pad token (the trainer pads batches).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

E5_PAIRS = [  # (English, translation) — e5 expects a "query: " prefix
    ("The cat is sleeping on the sofa.", "Die Katze schläft auf dem Sofa."),
    ("The cat is sleeping on the sofa.", "Le chat dort sur le canapé."),
    ("How much protein should I eat per day?", "Wie viel Eiweiß sollte ich pro Tag essen?"),
    ("How much protein should I eat per day?", "Combien de protéines dois-je manger par jour ?"),
]
E5_UNRELATED = [
    ("The cat is sleeping on the sofa.", "Wie viel Eiweiß sollte ich pro Tag essen?"),
    ("How much protein should I eat per day?", "Le chat dort sur le canapé."),
    ("The stock market fell sharply today.", "Die Katze schläft auf dem Sofa."),
]


def load_check(model_dir: str | Path, num_labels: int = 3) -> dict[str, object]:
    """Load with AutoModel, AutoModelForSequenceClassification and AutoTokenizer; report
    seconds, parameter count and the pad token."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir)
    t1 = time.perf_counter()
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    t2 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t3 = time.perf_counter()
    if tok.pad_token is None:
        raise ValueError(f"tokenizer in {model_dir} has no pad token")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "load_s": {"AutoModel": t1 - t0, "AutoModelForSequenceClassification": t2 - t1, "AutoTokenizer": t3 - t2},
        "pad_token": tok.pad_token,
        "tokenizer": type(tok).__name__,
    }


def mean_pooled(model_dir: str | Path, texts: list[str]) -> np.ndarray:
    """L2-normalised mean-pooled last hidden states (the sentence-transformers recipe)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cross_lingual_cosines(model_dir: str | Path, prefix: str = "query: ") -> dict[str, list[float]]:
    """Cosines of translation pairs and of unrelated pairs."""
    out: dict[str, list[float]] = {}
    for key, pairs in (("translations", E5_PAIRS), ("unrelated", E5_UNRELATED)):
        a = mean_pooled(model_dir, [prefix + p[0] for p in pairs])
        b = mean_pooled(model_dir, [prefix + p[1] for p in pairs])
        out[key] = [float(x) for x in (a * b).sum(1)]
    return out


def onnx_max_abs_diff(model_dir: str | Path, onnx_path: str | Path, texts: list[str]) -> float:
    """Max |difference| between BertModel's last hidden states and the ONNX model's token
    outputs (onnxruntime), over the non-padding tokens of ``texts``."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy().astype(np.int64) for i in sess.get_inputs()}
    token_outputs = [o for o in sess.run(None, feeds) if np.shape(o) == ours.shape]
    if not token_outputs:
        raise ValueError("the ONNX model has no output shaped like the last hidden state")
    keep = batch["attention_mask"].numpy().astype(bool)
    return float(min(np.abs(o[keep] - ours[keep]).max() for o in token_outputs))
