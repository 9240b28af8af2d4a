"""Reliability, round 3 (issue 24): silent wrong results, lost work and unclear errors found by the third audit.

Each test pins one row of docs/reliability.md; all use the public API and tiny in-process models.
"""

import pytest
import torch
from conftest import TEACHER_SPLIT, make_rows, rows_with_ids, tiny_bert
from conftest import flat_weights as weights
from conftest import ki_config as config
from conftest import make_ki_trainer as make_trainer
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher


def tiny_config(tok, **kw):
    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


# ---------------------------------------------------------------- a teacher without a trained head
def test_a_bare_encoder_given_as_a_classifier_teacher_is_an_error(tmp_path, tok):
    BertModel(tiny_config(tok)).save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"classification model .*initialise 2 weight\(s\) at random .*classifier"):
        Teacher(str(tmp_path / "encoder"), labels=["alpha", "beta"])


def test_a_classifier_or_encoder_given_as_a_masked_lm_teacher_is_an_error(tmp_path, tok):
    from ki_trainer.merge_distill import MaskedLMTeacher

    BertForSequenceClassification(tiny_config(tok)).save_pretrained(tmp_path / "classifier")
    BertModel(tiny_config(tok)).save_pretrained(tmp_path / "encoder")
    for name in ("classifier", "encoder"):
        tok.save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match=r"masked-LM model .*at random .*cls\.predictions"):
            MaskedLMTeacher(str(tmp_path / name), languages=["en"])
    BertForMaskedLM(tiny_config(tok)).save_pretrained(tmp_path / "mlm")  # a complete masked LM loads
    tok.save_pretrained(tmp_path / "mlm")
    assert MaskedLMTeacher(str(tmp_path / "mlm"), languages=["en"]).vocab_size == len(tok)
    trained = tiny_bert(2, len(tok), labels=["alpha", "beta"])
    trained.save_pretrained(tmp_path / "trained")
    assert Teacher(str(tmp_path / "trained")).labels == ["alpha", "beta"]


# ---------------------------------------------------------------- label names that only look the same
@pytest.mark.parametrize("variant", ["cafe\u0301", "caf\u00e9\u200b", "\uff43\uff41\uff46\u00e9", "\u00a0Caf\u00e9"],
                         ids=["nfd", "zero-width-space", "full-width", "nbsp-and-case"])
def test_labels_differing_only_by_unicode_form_are_warned_about(caplog, variant):
    import logging

    from ki_trainer.label_space import LabelSpace

    with caplog.at_level(logging.WARNING):
        space = LabelSpace([["caf\u00e9", "news"], [variant, "x11"]])
    assert space.num_labels == 4  # still different classes, as the names are different strings ...
    assert any("Unicode form" in r.getMessage() for r in caplog.records)  # ... but never silently
    with pytest.raises(ValueError, match="differs only in case, whitespace or Unicode form"):
        LabelSpace([["caf\u00e9", "news"], ["tea", "x11"]]).encode([variant])


# ---------------------------------------------------------------- a teacher that is not a softmax classifier
@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_a_multi_label_or_regression_teacher_is_an_error(tmp_path, tok, problem_type):
    model = tiny_bert(2, len(tok), labels=["alpha", "beta"], problem_type=problem_type)
    with pytest.raises(ValueError, match=f"'{problem_type}' model .*not one softmax distribution"):
        Teacher(model)
    model.save_pretrained(tmp_path / "saved")  # the same through a path (the CLI's way)
    with pytest.raises(ValueError, match=f"'{problem_type}' model"):
        Teacher(str(tmp_path / "saved"))
    single = tiny_bert(2, len(tok), labels=["alpha", "beta"], problem_type="single_label_classification")
    assert Teacher(single).labels == ["alpha", "beta"]


# ---------------------------------------------------------------- ties never go to the first teacher listed
def _signals(logits, features):
    from ki_trainer.numerics import certainty_from_logits
    from ki_trainer.strategies import TeacherSignals

    rows = logits[0].shape[0]
    return TeacherSignals(logits=logits, certainty=torch.stack([certainty_from_logits(x) for x in logits], 1),
                          mutual_information=torch.zeros(rows, len(logits)), top_variance=torch.zeros(rows, len(logits)),
                          features=features)


@pytest.mark.parametrize("seed_router", ["relative_mahalanobis", "max_prob"])
def test_self_training_gives_tied_rows_to_no_teacher(seed_router):
    from ki_trainer.routing import build_router

    torch.manual_seed(0)
    logits, features = torch.randn(40, 2) * 3, torch.randn(40, 8)
    twins = _signals([logits, logits.clone()], [features, features.clone()])  # every row a tie
    scores = build_router("self_training", {"seed_router": seed_router}).fit(twins).score(twins)
    assert torch.allclose(scores, torch.full_like(scores, 0.5))  # was ~1.0 for teacher 0 on every row
    # Half the rows tie exactly under max_prob (both teachers flat); listing the teachers the other way round
    # permutes the routing and changes nothing else.
    other_logits, other_features = torch.randn(40, 3) * 3, torch.randn(40, 8)
    logits[:20], other_logits[:20] = 0.0, 0.0
    forward = _signals([logits, other_logits], [features, other_features])
    backward = _signals([other_logits, logits], [other_features, features])
    a = build_router("self_training", {"seed_router": seed_router}).fit(forward).score(forward)
    b = build_router("self_training", {"seed_router": seed_router}).fit(backward).score(backward)
    assert torch.allclose(a, b.flip(1), atol=2e-3)


# ---------------------------------------------------------------- teacher outputs that do not fit
def test_a_teacher_head_with_more_outputs_than_label_names_is_a_clear_error(tmp_path, tok):
    model = tiny_bert(3, len(tok), seed=20)  # a 3-way head ...
    model.config.id2label = {0: "alpha", 1: "beta"}  # ... whose config names two classes
    teachers = [Teacher(model, name="wide"), Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=21))]
    rows = [{"text": r["text"]} for r in make_rows(2, seed=1)]
    trainer = make_trainer(tmp_path, tok, teachers, rows, max_steps=1)
    with pytest.raises(ValueError, match=r"'wide' outputs 3 logits per row but has 2 label names"):
        trainer.compute_loss(trainer.model, trainer.data_collator(rows[:3]))


def test_nan_in_pooled_features_with_finite_logits_names_the_teacher_and_rows(tmp_path, tok):
    rows = rows_with_ids()
    apple_ids = [r["id"] for r in rows if "apple" in r["text"].split()]
    model = tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids("apple")] = float("nan")
    model.classifier.register_forward_hook(lambda module, args, out: torch.nan_to_num(out))  # finite logits
    teachers = [Teacher(model, name="poisoned"), Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=21))]
    trainer = make_trainer(tmp_path, tok, teachers, rows, max_steps=1, signal_source="cached", strategy="muki",
                           router="prototype", per_device_eval_batch_size=len(rows))
    with pytest.raises(FloatingPointError, match="'poisoned' on example ids .*pooled features") as info:
        trainer.precompute_teacher_signals()
    assert sorted(r["id"] for r in rows if repr(r["id"]) in str(info.value)) == sorted(apple_ids[:10])


# ---------------------------------------------------------------- teacher_average needs one architecture
@pytest.mark.parametrize("change,named", [
    ({"num_hidden_layers": 3}, r"weight\(s\) the student lacks \(bert\.encoder\.layer\.2\."),
    ({"num_attention_heads": 4}, r"num_attention_heads=4 \(student: 2\)"),
    ({"hidden_act": "relu"}, r"hidden_act='relu' \(student: 'gelu'\)"),
], ids=["deeper", "heads", "activation"])
def test_teacher_average_refuses_teachers_built_differently(tmp_path, tok, change, named):
    base = tiny_bert(2, len(tok), seed=5)
    teachers = []
    for i, labels in enumerate(TEACHER_SPLIT):
        torch.manual_seed(30 + i)
        fields = dict(vocab_size=len(tok), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, num_hidden_layers=2, num_labels=2,
                      id2label=dict(enumerate(labels)), label2id={l: j for j, l in enumerate(labels)})
        model = BertForSequenceClassification(BertConfig(**{**fields, **(change if i == 1 else {})}))
        own = model.state_dict()  # a fine-tune of `base` where the shapes allow (the extra layer stays its own)
        model.load_state_dict({k: v for k, v in base.state_dict().items()
                               if not k.startswith("classifier") and k in own and own[k].shape == v.shape}, strict=False)
        teachers.append(Teacher(model, name=f"t{i}"))
    train = Dataset.from_list([{"text": r["text"]} for r in make_rows(2, seed=3)])
    with pytest.raises(ValueError, match=f"teacher 't1' .*{named}"):
        KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), labels=[l for ls in TEACHER_SPLIT for l in ls]),
                                    args=config(tmp_path, student_init="teacher_average"), teachers=teachers,
                                    train_dataset=train, processing_class=tok)


# ---------------------------------------------------------------- run files
def test_a_key_given_twice_in_a_run_file_is_an_error_naming_file_key_and_lines(tmp_path):
    from ki_trainer.cli.arguments import RunFileError
    from ki_trainer.cli.integrate import build_parser

    run = tmp_path / "run.yaml"
    run.write_text("output_dir: out\nmax_steps: 5\nstrategy: muki\nmax_steps: 50\n")
    with pytest.raises(RunFileError, match=r"run\.yaml.*duplicate key 'max_steps' \(first on line 2, again on line 4\)"):
        build_parser().parse([str(run)])
    nested = tmp_path / "nested.yaml"  # also inside a teacher entry
    nested.write_text("output_dir: out\nteachers:\n  - path: a\n    labels: [x, y]\n    labels: [y, x]\n")
    with pytest.raises(RunFileError, match=r"duplicate key 'labels' \(first on line 4, again on line 5\)"):
        build_parser().parse([str(nested)])
    as_json = tmp_path / "run.json"
    as_json.write_text('{"output_dir": "out", "max_steps": 5, "max_steps": 50}')
    with pytest.raises(RunFileError, match=r"run\.json.*duplicate key 'max_steps'"):
        build_parser().parse([str(as_json)])


@pytest.mark.parametrize("line,problem", [
    ("max_steps: true", r"option 'max_steps' must be an integer, got bool True"),
    ("mc_samples: 2.5", r"option 'mc_samples' must be an integer, got float 2\.5"),
    ("learning_rate: [0.001]", r"option 'learning_rate' must be a number, got list \[0\.001\]"),
    ("use_cpu: 3", r"option 'use_cpu' must be true or false, got int 3"),
])
def test_a_run_file_value_of_the_wrong_type_names_the_option_file_and_line(tmp_path, line, problem):
    from ki_trainer.cli.arguments import RunFileError
    from ki_trainer.cli.integrate import build_parser

    run = tmp_path / "run.yaml"
    run.write_text(f"output_dir: out\nstrategy: muki\n{line}\n")
    with pytest.raises(RunFileError, match=rf"run\.yaml, line 3: {problem}"):
        build_parser().parse([str(run)])
    run.write_text("output_dir: out\nmax_steps: 7\nmc_samples: '4'\nlearning_rate: 1.0e-3\nuse_cpu: true\n")
    _, args = build_parser().parse([str(run)])  # right types (and strings, converted like flags) still work
    assert (args.max_steps, args.mc_samples, args.learning_rate, args.use_cpu) == (7, 4, 1e-3, True)


# ---------------------------------------------------------------- what a teacher reads: truncation side and length
LONG = [{"id": f"long{i}", "text": " ".join(["apple", "basil"] * 3 + ["the"] * 10 + ["grape", "dill"] * 3)}
        for i in range(4)]


def test_a_teacher_tokenizer_that_truncates_on_the_left_is_honoured_and_fingerprinted(tmp_path, tok):
    import copy

    left = copy.deepcopy(tok)
    left.truncation_side = "left"

    def trainer_with(teacher_tok):
        teachers = [Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20), tokenizer=teacher_tok, name="t0"),
                    Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=21), name="t1")]
        return make_trainer(tmp_path, tok, teachers, LONG, max_steps=1, max_length=8, signal_source="cached")

    right_trainer, left_trainer = trainer_with(copy.deepcopy(tok)), trainer_with(left)
    batch = left_trainer.data_collator(LONG[:1])
    key = left_trainer.data_collator.teacher_input_key(0)
    assert key is not None  # its own encoding, not the student's right-truncated one
    read = tok.convert_ids_to_tokens(batch["teacher_inputs"][key]["input_ids"][0])
    assert read[-3:] == ["grape", "dill", "[SEP]"] and "apple" not in read  # the END of the text
    # ... and the cache of the right-truncating teacher is never reused for it (logits differ)
    assert right_trainer.signal_fingerprint() != left_trainer.signal_fingerprint()


def test_resuming_with_a_teachers_max_length_changed_is_another_run(tmp_path, tok):
    from ki_trainer.checkpoints import CheckpointMismatchError

    def run(max_length):
        teachers = [Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20), max_length=max_length, name="t0"),
                    Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[1], seed=21), name="t1")]
        return make_trainer(tmp_path, tok, teachers, [{"text": r["text"]} for r in LONG * 4], max_steps=2,
                            save_strategy="steps", save_steps=1)

    run(None).train()
    with pytest.raises(CheckpointMismatchError, match="belongs to another run.*teacher_inputs.*'max_length': 6"):
        run(6).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))


# ---------------------------------------------------------------- checkpoints cut off mid-save, finished runs
def checkpointed(tmp_path, tok, out, **kw):
    teachers = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=20 + i), name=f"t{i}")
                for i, labels in enumerate(TEACHER_SPLIT)]
    train = [{"id": f"r{i}", "text": r["text"]} for i, r in enumerate(make_rows(8, seed=7))]
    return make_trainer(tmp_path, tok, teachers, train, max_steps=4, save_strategy="steps", save_steps=2,
                        learning_rate=1e-3, output_dir=str(out), **kw)


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_checkpoint_with_a_cut_off_router_state_or_optimizer_falls_back_or_names_the_file(tmp_path, tok, caplog):
    import logging

    routed = dict(signal_source="cached", strategy="muki", router="relative_mahalanobis",
                  signal_cache_dir=str(tmp_path / "cache"))
    full = checkpointed(tmp_path, tok, tmp_path / "full", **routed)
    full.train()
    out = tmp_path / "killed"
    checkpointed(tmp_path, tok, out, **routed).train()
    assert (out / "checkpoint-4" / "router_state.pt").is_file()
    _cut_in_half(out / "checkpoint-4" / "router_state.pt")
    resumed = checkpointed(tmp_path, tok, out, **routed)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)  # was: OSError from torch.load
    assert any("checkpoint-4" in r.getMessage() and "router_state.pt" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(weights(resumed.model), weights(full.model))
    _cut_in_half(out / "checkpoint-2" / "optimizer.pt")  # a full disk while saving the optimizer
    with pytest.raises(ValueError, match=r"checkpoint-2: its optimizer\.pt is not a complete torch file"):
        checkpointed(tmp_path, tok, out, **routed).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    _cut_in_half(out / "checkpoint-2" / "model.safetensors")
    from ki_trainer.checkpoints import incomplete_reason

    assert "model.safetensors is" in incomplete_reason(str(out / "checkpoint-2"))


def test_resuming_a_finished_runs_own_final_checkpoint_returns_its_model(tmp_path, tok, caplog):
    import logging

    first = checkpointed(tmp_path, tok, tmp_path / "out")
    first.train()
    again = checkpointed(tmp_path, tok, tmp_path / "out")  # the same script run again
    with caplog.at_level(logging.WARNING):
        again.train(resume_from_checkpoint=True)  # was: "belongs to a longer run"
    assert any("final checkpoint" in r.getMessage() for r in caplog.records)
    assert again.state.global_step == 4
    torch.testing.assert_close(weights(again.model), weights(first.model))


# ---------------------------------------------------------------- a read-only shared cache
@pytest.fixture
def read_only_view(tmp_path):
    """``make(source)``: a read-only view of directory ``source`` (chmod; as root, whom chmod does not stop, a
    read-only bind mount). Skips where neither works."""
    import os
    import stat
    import subprocess

    mounted = []

    def make(source):
        view = tmp_path / "read-only"
        if os.geteuid() != 0:
            source.chmod(stat.S_IRUSR | stat.S_IXUSR)
            return source
        view.mkdir()
        try:
            subprocess.run(["mount", "--bind", str(source), str(view)], check=True, capture_output=True)
            mounted.append(view)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("cannot make a read-only directory here (root without mount rights)")
        return view

    yield make
    for view in mounted:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_a_read_only_directory_holding_a_complete_cache_is_read(tmp_path, tok, read_only_view, caplog):
    import logging

    rows = rows_with_ids(16)

    def trainer(cache_dir, train):
        teachers = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=20 + i), name=f"t{i}")
                    for i, labels in enumerate(TEACHER_SPLIT)]
        return make_trainer(tmp_path, tok, teachers, train, max_steps=1, signal_source="cached",
                            signal_cache_dir=str(cache_dir))

    written = trainer(tmp_path / "cache", rows).precompute_teacher_signals()
    shared = read_only_view(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        reader = trainer(shared, rows)  # was: PermissionError at construction
    assert any("cannot be written: its cached teacher signals are read" in r.getMessage() for r in caplog.records)
    read = reader.precompute_teacher_signals()
    ids = [r["id"] for r in rows]
    torch.testing.assert_close(read.lookup(ids, None).logits[0], written.lookup(ids, None).logits[0])
    reader.train()
    more = rows + [{"id": "new", "text": "apple the of"}]  # a row it lacks: refused before any teacher work
    with pytest.raises(PermissionError, match=r"lacks 1 of the 17 rows \(e\.g\. id 'new'\).*cannot be written"):
        trainer(shared, more).precompute_teacher_signals()


def test_teacher_labels_given_as_one_string_are_an_error(tok):
    model = tiny_bert(3, len(tok), seed=20)
    with pytest.raises(TypeError, match="labels must be a list of label names .*got str 'abc'"):
        Teacher(model, labels="abc")  # was: three classes 'a', 'b', 'c'
    assert Teacher(model, labels=("a", "b", "c")).labels == ["a", "b", "c"]


def test_selection_shares_split_exact_ties_instead_of_crediting_the_first_teacher(tmp_path, tok):
    from transformers import TrainerCallback

    teachers = []
    for i, labels in enumerate(TEACHER_SPLIT):
        model = tiny_bert(2, len(tok), labels=labels, seed=20 + i)
        with torch.no_grad():  # uniform outputs: both teachers exactly equally (un)certain on every row
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
        teachers.append(Teacher(model, name=f"t{i}"))
    logged = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = make_trainer(tmp_path, tok, teachers, [{"text": r["text"]} for r in make_rows(2, seed=1)], max_steps=1,
                           logging_steps=1, strategy="muki")
    trainer.add_callback(Recorder())
    trainer.train()
    shares = next(logs for logs in logged if "selection_share_t0" in logs)
    assert (shares["selection_share_t0"], shares["selection_share_t1"]) == (0.5, 0.5)  # was (1.0, 0.0)


def test_a_multi_label_student_is_not_trained_and_saved_as_one(tmp_path, tok):
    teachers = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=20 + i), name=f"t{i}")
                for i, labels in enumerate(TEACHER_SPLIT)]
    rows = [{"text": r["text"]} for r in make_rows(2, seed=1)]
    student = tiny_bert(4, len(tok), seed=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match="student is a 'multi_label_classification' model"):
        KnowledgeIntegrationTrainer(model=student, args=config(tmp_path), teachers=teachers, train_dataset=rows,
                                    processing_class=tok)
    student.save_pretrained(tmp_path / "base")  # from a path: trained and saved as a softmax classifier
    tok.save_pretrained(tmp_path / "base")
    trainer = KnowledgeIntegrationTrainer(model=str(tmp_path / "base"), args=config(tmp_path, max_steps=1),
                                          teachers=teachers, train_dataset=rows)
    assert trainer.model.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("field,value,expected", [
    ("max_steps", True, "an integer"), ("mc_samples", 2.5, "an integer"), ("mc_top_layers", 1.5, "an integer"),
    ("kd_temperature", "2", "a number"), ("margin_reweighting", "no", "True or False"),
])
def test_config_fields_of_the_wrong_type_are_rejected_by_name(tmp_path, field, value, expected):
    from ki_trainer.merge_distill import MergeDistillConfig

    with pytest.raises(TypeError, match=f"{field} must be {expected}, got {type(value).__name__} {value!r}"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], **{field: value})
    if field in ("max_steps", "kd_temperature"):
        with pytest.raises(TypeError, match=f"{field} must be {expected}"):
            MergeDistillConfig(output_dir=str(tmp_path), report_to=[], **{field: value})
    ok = KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], max_steps=3, kd_temperature=2)
    assert ok.max_steps == 3


def test_an_adapter_teacher_saved_without_its_classifier_is_an_error(tmp_path, tok):
    from peft import LoraConfig, TaskType, get_peft_model

    BertModel(tiny_config(tok)).save_pretrained(tmp_path / "encoder")  # the base has no classifier
    tok.save_pretrained(tmp_path / "encoder")
    from transformers import AutoModelForSequenceClassification

    for task, name in ((None, "headless"), (TaskType.SEQ_CLS, "with_head")):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=2)
        adapter = get_peft_model(model, LoraConfig(task_type=task, r=2, target_modules=["query"]))
        adapter.save_pretrained(str(tmp_path / name))
    with pytest.raises(ValueError, match=r"classifier\.bias, classifier\.weight would be random"):
        Teacher(str(tmp_path / "headless"), labels=["alpha", "beta"])  # was: a random classifier
    assert Teacher(str(tmp_path / "with_head"), labels=["alpha", "beta"]).labels == ["alpha", "beta"]


def test_teacher_selection_accuracy_does_not_depend_on_the_teachers_order_on_ties():
    import numpy as np

    from ki_trainer.label_space import LabelSpace
    from ki_trainer.metrics import selection_accuracy

    space = LabelSpace([["a", "b"], ["c", "d"]], ["t0", "t1"])
    swapped = LabelSpace([["c", "d"], ["a", "b"]], ["t1", "t0"])
    certainty = np.array([[0.5, 0.5], [0.9, 0.1]])
    gold = ["c", "a"]
    forward = selection_accuracy(certainty, np.array(space.encode(gold)), space)
    backward = selection_accuracy(certainty[:, ::-1], np.array(swapped.encode(gold)), swapped)
    assert forward == backward == 0.75  # the tie counts half; was 0.5 one way and 1.0 the other
