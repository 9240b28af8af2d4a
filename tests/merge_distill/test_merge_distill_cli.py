"""``ki-trainer merge-distill``: grouped help, a run file end to end on tiny masked-LM teachers saved to
disk (WordPiece English, SentencePiece Italian), early errors, teacher entries and debian_ddtp reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_merge_distill import IT_PIECES, en_sentences, it_sentences, tiny_mlm, unigram_tokenizer, wordpiece_tokenizer
from transformers import AutoModelForMaskedLM, AutoTokenizer

from ki_trainer.cli import commands, main
from ki_trainer.cli.merge_distill import load_texts, teacher_entries


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny teachers of tests/merge_distill/test_merge_distill.py (untrained: the command's plumbing is under test), saved."""
    root = tmp_path_factory.mktemp("md_teachers")
    dirs = {}
    for name, tokenizer, seed in (("en_mlm", wordpiece_tokenizer(), 1), ("it_mlm", unigram_tokenizer(IT_PIECES), 2)):
        dirs[name] = root / name
        tiny_mlm(len(tokenizer), seed=seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def text_rows(n: int, seed: int) -> list[dict]:
    rows = [{"text": t, "language": "en"} for t in en_sentences(n, seed)]
    rows += [{"text": t, "language": "it"} for t in it_sentences(n, seed + 1)]
    return rows


def test_command_is_registered_and_help_groups_the_options(capsys) -> None:
    runner, summary = commands()["merge-distill"]
    assert runner is not None and summary.startswith("merge masked-LM teachers")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge-distill", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: ki-trainer merge-distill [RUN_FILE")
    assert lines[2].startswith("Merge pre-trained masked LMs")
    titles = [line.split(" (")[0].rstrip(":") for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert titles.index("what to merge") < titles.index("MergeDistill options") < titles.index("training options")
    text = "\n".join(lines)
    for option in ("--teachers", "--train_files", "--eval_files", "--data_format", "--student_tokenizer",
                   "--vocabulary_min_count", "--student_num_hidden_layers", "--alpha", "--top_k", "--signal_source",
                   "--mlm_probability", "--output_dir", "--num_train_epochs"):
        assert option in text, option
    assert "80% [MASK]" in text  # a literal % in a help string is printed, not a formatting error
    assert "--adam_beta1" not in text


def test_run_file_end_to_end_saves_a_loadable_student(teacher_dirs: dict, tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", text_rows(12, seed=3))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", text_rows(4, seed=7))
    out = tmp_path / "student"
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "teachers": [{"path": str(teacher_dirs["en_mlm"]), "languages": ["en"], "name": "english"},
                     f"{teacher_dirs['it_mlm']}=it"],
        "train_files": str(train),  # one value where a list is expected
        "eval_files": [str(evaluation)],
        "student_num_hidden_layers": 1,
        "student_intermediate_size": 64,
        "signal_source": "cached",
        "top_k": 4,
        "max_steps": 50,  # overridden by the flag below
        "per_device_train_batch_size": 8,
        "learning_rate": "1e-3",  # a string to YAML: converted like a flag
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }))
    assert main(["merge-distill", str(run), "--max_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "==> training the student" in printed and "student vocabulary:" in printed

    model = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1  # width taken from the teachers
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    vocabulary = tokenizer.get_vocab()
    assert {"cat", "dog", "gatto", "cane", "[MASK]"} <= set(vocabulary)  # the union of both teachers' tokens
    encoded = tokenizer(f"il gatto {tokenizer.mask_token}", return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()

    summary = json.loads((out / "merge_distill.json").read_text())
    assert summary["train_texts_per_language"] == {"en": 12, "it": 12} and summary["eval_texts"] == 8
    assert [t["name"] for t in summary["teachers"]] == ["english", "it_mlm"]
    assert [t["languages"] for t in summary["teachers"]] == [["en"], ["it"]]
    assert summary["student_vocabulary_size"] == len(tokenizer)
    assert 0.0 <= summary["eval"]["eval_masked_accuracy"] <= 1.0 and summary["eval"]["eval_masked_tokens"] > 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2  # the flag won
    assert (out / "README.md").is_file() and any((out / "teacher_signals").glob("*.safetensors"))


def test_a_language_without_a_teacher_fails_before_loading_anything(tmp_path: Path) -> None:
    rows = text_rows(2, seed=1) + [{"text": "le chat", "language": "fr"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = ["merge-distill", "--teachers", str(tmp_path / "missing_en") + "=en", str(tmp_path / "missing_it") + "=it",
            "--train_files", str(train), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    with pytest.raises(ValueError, match=r"train\.jsonl, row 5: language 'fr' has no teacher; teachers cover \['en', 'it'\]"):
        main(argv)
    assert not (tmp_path / "out").exists()


def test_teacher_entries_and_their_errors(tmp_path: Path) -> None:
    entries = teacher_entries([f"{tmp_path}/a=en, de", {"path": str(tmp_path / "b"), "languages": "it", "name": "it"}])
    assert [(e["name"], e["languages"]) for e in entries] == [("a", ["en", "de"]), ("it", ["it"])]
    with pytest.raises(ValueError, match="No teachers"):
        teacher_entries([])
    one = teacher_entries(f"{tmp_path}/a=en")  # `teachers: path=en` in a run file: one teacher, not 13 characters
    assert [(e["name"], e["languages"]) for e in one] == [("a", ["en"])]
    with pytest.raises(ValueError, match=r"Language 'en' is given to two teachers \('a' and 'b'\)"):
        teacher_entries([f"{tmp_path}/a=en", f"{tmp_path}/b=en,it"])
    with pytest.raises(ValueError, match=r"Teacher 1 \(b\) has no languages"):
        teacher_entries([f"{tmp_path}/a=en", f"{tmp_path}/b"])
    with pytest.raises(ValueError, match=r"unknown: \['lang'\]"):
        teacher_entries([{"path": "x", "lang": "en"}])
    with pytest.raises(ValueError, match=r"named \['model'\]"):
        teacher_entries([f"{tmp_path}/a/model=en", f"{tmp_path}/b/model=it"])


def test_debian_ddtp_rows_by_split_and_per_language_cap(tmp_path: Path) -> None:
    def split(source: str) -> str:  # debian_sections20's rule, restated from shared/data/README.md
        u = int(hashlib.sha1(f"split:{source}".encode()).hexdigest(), 16) % 100
        return "train" if u < 70 else "val" if u < 80 else "test"

    sources = [f"pkg{i}" for i in range(40)]
    rows = [{"package": s, "source": s, "section": "x", "lang": lang, "text": f"{lang} text of {s}"}
            for s in sources for lang in ("en", "it", "da")]
    path = write_jsonl(tmp_path / "ddtp.jsonl", rows)
    train = load_texts([str(path)], ["en", "it"], split="train")
    expected = {(f"{lang}:{s}") for s in sources if split(s) == "train" for lang in ("en", "it")}
    assert set(train["id"]) == expected and set(train["language"]) == {"en", "it"}  # 'da' has no teacher: skipped
    evaluation = load_texts([str(path)], ["en", "it"], split="eval")
    assert {i.split(":")[1] for i in evaluation["id"]} == {s for s in sources if split(s) == "val"}
    capped = load_texts([str(path)], ["it", "en"], split="train", ddtp_sources="all", max_rows_per_language=3)
    assert capped["id"] == ["it:pkg0", "it:pkg1", "it:pkg2", "en:pkg0", "en:pkg1", "en:pkg2"]  # languages' order
    with pytest.raises(ValueError, match=r"No training text for language\(s\) \['de'\]"):
        load_texts([str(path)], ["en", "de"], split="train")
