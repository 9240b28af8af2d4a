"""Command-line parsing shared by the ``ki-trainer`` subcommands.

* A run file (YAML or JSON, first argument) gives values for any option of the command, including
  the teachers; flags given on the command line override it.
* ``--help`` starts with the command's description, shows the command's own options and the
  knowledge-integration options in their own groups, then the most used ``TrainingArguments``;
  ``--help-all`` lists every ``TrainingArguments`` option as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import HfArgumentParser, TrainingArguments

from ..errors import UsageError

RUN_FILE_SUFFIXES = (".yaml", ".yml", ".json")
HELP_ALL = "--help-all"

# The TrainingArguments shown by --help; --help-all shows all of them.
COMMON_TRAINING_OPTIONS = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "seed",
    "bf16",
    "fp16",
    "use_cpu",
    "eval_strategy",
    "save_strategy",
    "logging_steps",
    "report_to",
    "disable_tqdm",
    "push_to_hub",
    "hub_model_id",
    "resume_from_checkpoint",
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout; show each option's default."""


class RunFileError(UsageError):
    """A run file that cannot be read, or that names options the command does not have."""


class RunFileValues(dict):
    """The options of a run file; ``lines`` maps each top-level option to its line in the file (YAML)."""

    lines: dict[str, int]


def _yaml_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml  # PyYAML: installed with transformers / accelerate

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first}, again on line {line}); PyYAML would "
                        "silently keep the last value", key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"duplicate key {key!r} (json would silently keep the last value)")
        values[key] = value
    return values


def load_run_file(path: str) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON run file into a flat ``{option: value}`` mapping.

    A key given twice (in any mapping of the file) is a :class:`RunFileError` naming the key and its lines.
    """
    file = Path(path)
    if not file.is_file():
        raise RunFileError(f"Run file not found: {path}")
    text = file.read_text(encoding="utf-8")
    lines: dict[str, int] = {}
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            loader = _yaml_loader()(text)
            try:
                node = loader.get_single_node()
                values = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as error:
            raise RunFileError(f"{path} is not valid YAML: {error}") from error
        if isinstance(node, yaml.MappingNode):
            lines = {str(k.value).lstrip("-").replace("-", "_"): k.start_mark.line + 1 for k, _ in node.value}
    else:
        try:
            values = json.loads(text, object_pairs_hook=_json_pairs)
        except ValueError as error:
            raise RunFileError(f"{path} is not valid JSON: {error}") from error
    if values is None:
        return RunFileValues()
    if not isinstance(values, dict):
        raise RunFileError(f"{path} must hold a mapping of option names to values, got {type(values).__name__}.")
    result = RunFileValues((str(key).lstrip("-").replace("-", "_"), value) for key, value in values.items())
    result.lines = lines
    return result


def _type_problem(action: argparse.Action, value: Any) -> Optional[str]:
    """Why a run-file value cannot be the value of ``action`` (None when it can).

    argparse converts STRING defaults with the option's type, as it converts flags, but passes any other
    value through untouched: ``max_steps: true`` would be the int 1, ``mc_samples: 2.5`` a float in an int
    field, ``learning_rate: [0.001]`` a list. Only the number and boolean types are checked here; string
    options also take mappings and lists (``router_options``, ``teachers`` entries) that their fields parse.
    """
    from transformers.hf_argparser import string_to_bool

    kind = {int: "an integer", float: "a number", string_to_bool: "true or false"}.get(action.type)
    if kind is None or value is None or isinstance(value, str):
        return None  # None: the field's own check; str: argparse converts it like a flag
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__} {value!r}"
        problems = [_type_problem(argparse.Action([], "x", type=action.type), item) for item in value]
        return next((f"element {item!r}: {p}" for item, p in zip(value, problems) if p), None)
    if action.type is string_to_bool:
        return None if isinstance(value, bool) else f"must be {kind}, got {type(value).__name__} {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (action.type is int and isinstance(value, float)):
        return f"must be {kind}, got {type(value).__name__} {value!r}"
    return None


def split_run_file(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``[run.yaml, --flag, ...]`` -> (``run.yaml``, flags); a run file is only ever the first argument."""
    argv = list(argv)
    for i, arg in enumerate(argv):  # TRL's `--config run.yaml` names the run file too
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if not path or path.startswith("-"):
                raise RunFileError("--config needs a run file: --config run.yaml")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            if rest and not rest[0].startswith("-"):
                raise RunFileError(f"Two run files: {rest[0]!r} and --config {path!r}; give one.")
            argv = [path, *rest]
            break
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(RUN_FILE_SUFFIXES):
            raise RunFileError(
                f"{argv[0]!r}: the first argument is a run file ending in {', '.join(RUN_FILE_SUFFIXES)}; every "
                "other option is a --flag."
            )
        return argv[0], argv[1:]
    return None, argv


def own_fields(config_class: type, base: type = TrainingArguments) -> list[str]:
    """Fields a ``TrainingArguments`` subclass adds (in declaration order)."""
    inherited = {f.name for f in dataclasses.fields(base)}
    return [f.name for f in dataclasses.fields(config_class) if f.init and f.name not in inherited]


class CommandParser(HfArgumentParser):
    """``HfArgumentParser`` whose help groups options and whose defaults may come from a run file.

    Args:
        dataclass_types: the command's dataclasses, in the order ``parse`` returns them.
        prog: the command's name in usage lines.
        description: shown first by ``--help``.
        groups: ``[(title, [field names])]`` shown in this order before the TrainingArguments.
        epilog: shown last by ``--help``.
        full_help: list every TrainingArguments option in ``--help`` (``--help-all``).
    """

    def __init__(
        self,
        dataclass_types: Sequence[type],
        prog: str,
        description: str,
        groups: Sequence[tuple[str, Sequence[str]]],
        epilog: Optional[str] = None,
        full_help: bool = False,
    ) -> None:
        super().__init__(
            dataclass_types,
            prog=prog,
            description=description,
            epilog=epilog,
            usage=f"{prog} [RUN_FILE.yaml|.json] [--option VALUE ...]",
            formatter_class=_HelpFormatter,
        )
        self._group_fields(groups, full_help)

    def _group_fields(self, groups: Sequence[tuple[str, Sequence[str]]], full_help: bool) -> None:
        optionals = self._optionals
        grouped: set[str] = set()
        new_groups = []
        for title, names in groups:
            group = argparse._ArgumentGroup(self, title)
            wanted = set(names)
            moved = [a for a in optionals._group_actions if a.dest in wanted]
            optionals._group_actions[:] = [a for a in optionals._group_actions if a.dest not in wanted]
            moved.sort(key=lambda a: list(names).index(a.dest))
            group._group_actions.extend(moved)
            grouped |= wanted
            new_groups.append(group)
        for action in self._actions:
            if action.option_strings and action.option_strings[0].startswith("--no_") and action.help != argparse.SUPPRESS:
                action.help = f"Turn {action.option_strings[0][len('--no_'):]} off."
            elif action.help and "%" in action.help and "%(" not in action.help:
                action.help = action.help.replace("%", "%%")  # a literal "15%" would break argparse's help formatting
        hidden = 0
        for action in optionals._group_actions:
            if action.dest == "help" or action.dest in grouped:
                continue
            if not full_help and action.dest not in COMMON_TRAINING_OPTIONS:
                if action.help != argparse.SUPPRESS and action.option_strings and not action.option_strings[0].startswith("--no_"):
                    hidden += 1
                action.help = argparse.SUPPRESS
        if not any(issubclass(t, TrainingArguments) for t in self.dataclass_types):
            optionals.title = "other options"
        elif full_help:
            optionals.title = "training options (transformers.TrainingArguments, all of them)"
        else:
            optionals.title = (f"training options (transformers.TrainingArguments: the most used; {HELP_ALL} lists "
                               f"all {hidden + len(COMMON_TRAINING_OPTIONS)})")
        self.add_argument(HELP_ALL, action="store_true", help="Show every TrainingArguments option and exit.")
        positionals = self._positionals
        self._action_groups[:] = [positionals, *new_groups, optionals]

    def parse(self, argv: Sequence[str]) -> tuple:
        """Parse ``[RUN_FILE] --flags``: the run file's values become defaults that the flags override."""
        run_file, flags = split_run_file(argv)
        if run_file is not None:
            self._apply_run_file(run_file)
        namespace = self.parse_args(flags)
        if vars(namespace).pop("help_all", False):
            self.print_help()
            self.exit(0)
        outputs = []
        for dtype in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(dtype) if f.init}
            inputs = {k: v for k, v in vars(namespace).items() if k in keys}
            outputs.append(dtype(**inputs))
        return tuple(outputs)

    def _apply_run_file(self, run_file: str) -> None:
        values = load_run_file(run_file)
        known = {a.dest: a for a in self._actions if a.dest not in ("help", "help_all")}
        aliases = {option.lstrip("-"): action.dest for action in self._actions for option in action.option_strings
                   if option.startswith("--") and option.lstrip("-") not in known
                   and not isinstance(action, argparse._StoreFalseAction)}  # --no_x is no alias of x
        lines = {aliases.get(key, key): line for key, line in getattr(values, "lines", {}).items()}
        values = {aliases.get(key, key): value for key, value in values.items()}  # e.g. model_name_or_path: -> student
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = {key: difflib.get_close_matches(key, list(known), n=1) for key in unknown}
            described = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise RunFileError(f"{run_file}: unknown option(s) {described}. `{self.prog} --help-all` lists them all.")
        for key, value in values.items():
            problem = _type_problem(known[key], value)
            if problem is not None:
                where = f", line {lines[key]}" if key in lines else ""
                raise RunFileError(f"{run_file}{where}: option {key!r} {problem}.")
            known[key].required = False  # the run file gave it
        self.set_defaults(**values)  # argparse converts string values with the option's type, like flags


def is_help_all(argv: Sequence[str]) -> bool:
    return HELP_ALL in argv


def teacher_spec_list(specs: Any) -> list:
    """``teachers:`` as given: one string or mapping (a run file's ``teachers: path``) is one teacher, never a
    list of characters or keys."""
    return [specs] if isinstance(specs, (str, dict)) else list(specs or [])


def teacher_mapping(i: int, spec: dict, allowed: set) -> dict:
    """A copy of teacher ``i`` given as a mapping, after checking it has ``path`` and no key outside ``allowed``."""
    unknown = set(spec) - allowed
    if "path" not in spec or unknown:
        raise ValueError(
            f"Teacher {i}: a mapping needs 'path' and may hold {sorted(allowed - {'path'})}; got "
            f"{sorted(spec)}" + (f" (unknown: {sorted(unknown)})" if unknown else "") + "."
        )
    return dict(spec)

