"""benchmarks/quality.py's data selection and analysis: the code that turns runs into reported numbers.

Training is not exercised here (that is the benchmark's job); these tests pin which rows each
language reads, how teachers get their classes, and how routing rows are scored, on real data
with synthetic teacher signals whose right answers are known.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ki_trainer.data import cap_per_class, load_debian_sections, partition_labels

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quality = _load_benchmark()


def small_mixed_config(**overrides):
    cfg = dict(quality.CONFIGS["mixed"], train_per_class=3, test_per_class=2)
    cfg.update(overrides)
    return cfg


def test_every_language_reads_the_same_packages():
    cfg = small_mixed_config()
    english, italian = quality.load_data(cfg, "en"), quality.load_data(cfg, "it")
    for en_rows, it_rows, cap in zip(english, italian, (3, None, 2)):
        assert en_rows["id"] == it_rows["id"] and en_rows["label"] == it_rows["label"]
        assert all(a != b for a, b in zip(en_rows["text"], it_rows["text"]))  # translated, not copied
        counts = np.unique(en_rows["label"], return_counts=True)[1]
        assert len(counts) == 20 and (cap is None or counts.max() <= cap)


def test_rows_missing_in_a_language_are_an_error():
    cfg = small_mixed_config(parallel_languages=("en",))  # rows chosen without asking for German text
    with pytest.raises(ValueError, match="no 'de' text"):
        quality.load_data(cfg, "de")


def test_reduced_configuration_keeps_its_original_rows():
    """The settings refactor must not change which rows the published reduced table used."""
    train, val, test = quality.load_data(quality.CONFIGS["reduced"])
    data = load_debian_sections()
    assert train["id"] == cap_per_class(data["train"], 30, seed=quality.DATA_SEED)["id"]
    assert test["id"] == cap_per_class(data["test"], 30, seed=quality.DATA_SEED)["id"]
    assert val["id"] == data["val"]["id"]


def test_teacher_labels_per_split():
    labels = load_debian_sections(split="train")["label"]
    halves = quality.teacher_labels(quality.MIXED_SETTINGS["cross-lingual-halves"], labels)
    assert halves == partition_labels(labels, "2x10")
    everything = quality.teacher_labels(quality.MIXED_SETTINGS["cross-lingual-languages"], labels)
    assert everything == [sorted(set(labels))] * 2
    three = quality.Setting("2x10", ((quality.MINILM_L6, "en"),) * 3, quality.MINILM_L6)
    with pytest.raises(ValueError, match="2 label subsets for 3 teachers"):
        quality.teacher_labels(three, labels)


def test_settings_with_the_same_student_and_text_share_one_oracle():
    names = list(quality.MIXED_SETTINGS)
    assert quality.oracle_settings(quality.MIXED_SETTINGS, names) == ["homogeneous", "cross-lingual-halves"]


def _write_signals(cfg, out: Path, setting: str, certainty) -> dict[str, list]:
    """Teachers that are right on their own classes (else predict their first class); certainty chosen by the caller."""
    spec = cfg["settings"][setting]
    tests = {lang: quality.load_data(cfg, lang)[2] for lang in spec.transfer}
    subsets = quality.teacher_labels(spec, tests["en"]["label"])
    root = quality.teacher_set_dir(out, setting, 0)
    root.mkdir(parents=True)
    for lang, test in tests.items():
        for t, own in enumerate(subsets):
            logits = np.zeros((len(test), len(own)), np.float32)
            for i, label in enumerate(test["label"]):
                logits[i, own.index(label) if label in own else 0] = 5.0
            scores = np.array([certainty(t, lang, label, own) for label in test["label"]], np.float32)
            np.savez(quality.signals_path(out, setting, 0, t, lang), logits=logits, mc=scores, deterministic=scores)
    return {lang: test["label"] for lang, test in tests.items()}


def test_ensemble_rows_score_class_and_language_routing(tmp_path: Path):
    cfg = small_mixed_config()
    setting = "cross-lingual-halves"  # teacher 0 reads English, teacher 1 Italian; disjoint halves

    def by_language(t, lang, label, own):  # each teacher is most certain on its own language
        return 1.0 if quality.MIXED_SETTINGS[setting].teachers[t][1] == lang else 0.0

    labels = _write_signals(cfg, tmp_path, setting, by_language)
    rows = quality.teacher_and_ensemble_rows(cfg, tmp_path, setting, 0)
    first_half = set(partition_labels(labels["en"], "2x10")[0])
    expected_en = np.mean([label in first_half for label in labels["en"]])  # English rows all go to teacher 0
    expected_it = np.mean([label not in first_half for label in labels["it"]])
    mc = rows["ensemble routed by MC certainty (K=8)"]
    assert mc["language_routing"] == 1.0
    assert mc["accuracy_en"] == pytest.approx(expected_en) and mc["accuracy_it"] == pytest.approx(expected_it)
    assert mc["routing_accuracy"] == pytest.approx((expected_en + expected_it) / 2)  # equal row counts per language
    # standardized by statistics under which teacher 0 always looks LESS certain than usual: all rows go to teacher 1
    rows = quality.teacher_and_ensemble_rows(cfg, tmp_path, setting, 0, {"mean": [2.0, 0.0], "std": [1.0, 1.0]})
    standardized = rows[quality.STANDARDIZED_ENSEMBLE]
    assert standardized["language_routing"] == pytest.approx(0.5)
    assert standardized["accuracy_en"] == pytest.approx(1 - expected_en) and standardized["accuracy_it"] == pytest.approx(expected_it)
    for t in (0, 1):  # alone, each teacher is right on every row of its own classes, in both languages
        teacher_row = next(v for k, v in rows.items() if k.startswith(f"teacher {t + 1}/2"))
        assert teacher_row["accuracy_en"] == teacher_row["accuracy_it"] == 1.0


def test_all_class_teachers_report_language_routing_only(tmp_path: Path):
    cfg = small_mixed_config()
    setting = "cross-lingual-languages"
    _write_signals(cfg, tmp_path, setting, lambda t, lang, label, own: float(t == 0))  # always teacher 0 (English)
    rows = quality.teacher_and_ensemble_rows(cfg, tmp_path, setting, 0)
    mc = rows["ensemble routed by MC certainty (K=8)"]
    assert "routing_accuracy" not in mc  # every teacher owns every class: class routing means nothing
    assert mc["language_routing"] == pytest.approx(0.5) and mc["accuracy"] == 1.0


def test_markdown_has_a_column_per_language():
    table = {"cross-lingual-halves": {"student: muki_soft": {
        key: {"mean": 0.5, "std": 0.1, "n": 3} for key in ("accuracy", "accuracy_en", "accuracy_it", "macro_f1", "language_routing")
    }}}
    text = quality.markdown(table, "## header", quality.MIXED_SETTINGS)
    assert "| method | test accuracy % | accuracy on en % | accuracy on it % | test macro-F1 % | routed to own-language teacher % | n |" in text
    assert "| student: muki_soft | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 10.0 | 3 |" in text
