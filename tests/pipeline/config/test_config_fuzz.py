"""Property-based tests (hypothesis) of configs and overrides.

Every invalid config (YAML text, mappings with wrong types, unknown keys, out-of-range values or
inconsistent batch/shape/budget values, malformed overrides) ends in a one-line `ConfigError` that names
the key, and `pretrain config check` reports it as one stderr line with exit code 2; every valid config
round-trips through YAML. The example tests are in test_config.py; the `@example`s below are the inputs
that once escaped as raw exceptions, multi-line messages or round-trip mismatches.
"""

from __future__ import annotations

import contextlib
import io
import re
import string
import subprocess
import sys
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from launch.cli import main
from pipeline.config import SECTIONS, Config, SourceConfig, dump_config, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ROUND_TRIP = settings(FUZZ, max_examples=60)  # three pure-Python YAML loads and dumps per example

SOURCE_KEY = "data.sources.0."
FIELDS = {
    f"{section}.{name}": field for section, model in SECTIONS.items() for name, field in model.model_fields.items()
}
FIELDS |= {SOURCE_KEY + name: field for name, field in SourceConfig.model_fields.items()}
# Values that validators check against each other; valid_raw_configs() draws them together.
COUPLED = {
    # Files: the keys that read Hugging Face directories are tested in test_pretrained.py.
    "model.init_from",
    "tokenizer.path",
    "tokenizer.special_tokens",
    "tokenizer.vocab_size",
    "train.optimizer",
    "train.grad_clip",
    "model.vocab_size",
    "model.max_seq_len",
    "model.d_model",
    "model.n_heads",
    "model.n_kv_heads",
    "model.position",
    "model.family",
    "model.type_vocab_size",
    "train.seq_len",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.global_batch_size",
    "train.max_steps",
    "train.max_tokens",
    "train.warmup_steps",
    "train.zero_stage",
    "train.offload_params",
    "train.offload_optimizer",
    "train.precision",
    "train.schedule",
    "train.decay_fraction",
    "cluster.num_workers",
}
NAMES = sorted(set(SECTIONS) | {key.rsplit(".", 1)[1] for key in FIELDS})
BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}  # pydantic's
NAMES_A_KEY = re.compile(r"`[^`]+`|\b(?:" + "|".join(SECTIONS) + r")\b")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------
# Checks


def one_line(message: str) -> str:
    assert message.isprintable(), f"not one printable line: {message!r}"  # no \n, \r, \x85, \u2028...
    return message


def error_of(path: Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return one_line(str(info.value))


def load_or_error(path: Path | None, overrides: list[str] = ()) -> Config | str:
    """The loaded config, or the ConfigError's message; any other exception fails the test."""
    try:
        return load_config(path, list(overrides))
    except ConfigError as exc:
        return one_line(str(exc))


def assert_round_trips(config: Config, directory: Path) -> None:
    text = dump_config(config)
    path = directory / "dumped.yaml"
    path.write_text(text, encoding="utf-8")
    again = load_config(path)
    assert again == config
    assert dump_config(again) == text


def write_yaml(directory: Path, raw: Any) -> Path:
    path = directory / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def place(key: str, value: Any) -> dict[str, Any]:
    """A minimal raw config holding `value` at the dotted key (a source item also gets a path)."""
    if key.startswith(SOURCE_KEY):
        name = key.removeprefix(SOURCE_KEY)
        return {"data": {"sources": [{"path": "corpus.txt", name: value}]}}
    section, name = key.split(".")
    return {section: {name: value}}


def flow(value: Any) -> str:
    """A value as override text: YAML in flow style on one line."""
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=float("inf"))


# ---------------------------------------------------------------------------------------------
# Strategies


def describe(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not NoneType]
        return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def bounds(field) -> dict[str, Any]:
    found = {}
    for rule in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if isinstance(rule, getattr(at, name.capitalize())):
                found[name] = getattr(rule, name)
    return found


text = st.text(max_size=12)
letters = st.text(string.ascii_letters, min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
collections = st.lists(st.integers(), max_size=2) | st.dictionaries(letters, st.integers(), max_size=2)


def valid_values(field) -> st.SearchStrategy:
    """Values this field accepts on its own (cross-field checks aside)."""
    kind, optional = describe(field.annotation)
    b = bounds(field)
    if kind is bool:
        values = st.booleans()
    elif kind is int:
        values = st.integers(
            min_value=b.get("ge", b["gt"] + 1 if "gt" in b else None),
            max_value=b.get("le", b["lt"] - 1 if "lt" in b else None),
        )
    elif kind is float:
        values = st.floats(
            min_value=b.get("ge", b.get("gt")),
            max_value=b.get("le", b.get("lt")),
            exclude_min="gt" in b,
            exclude_max="lt" in b,
            allow_nan=False,
            allow_infinity=False,
        )
    elif kind is str:
        pattern = next((rule.pattern for rule in field.metadata if getattr(rule, "pattern", None)), None)
        values = st.from_regex(pattern, fullmatch=True) if pattern else text
    elif get_origin(kind) is Literal:
        values = st.sampled_from(get_args(kind))
    elif kind == list[str]:
        values = st.lists(text, max_size=3)
    elif kind == list[SourceConfig]:
        # explicit source names must differ (derived ones are made to)
        values = st.lists(sources, min_size=1, max_size=3, unique_by=lambda s: s.get("name") or id(s))
    else:
        assert kind == dict[str, Any], kind
        values = st.dictionaries(text, json_values, max_size=3)
    return st.none() | values if optional else values


def wrong_values(field) -> st.SearchStrategy:
    """Values of a type this field never accepts."""
    kind, optional = describe(field.annotation)
    nothing = st.nothing() if optional else st.none()
    if kind in (int, float):
        fractional = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))
        return letters | st.booleans() | collections | nothing | (fractional if kind is int else st.nothing())
    if kind is str:
        return st.integers() | st.floats() | st.booleans() | collections | nothing
    if kind is bool:
        return (
            letters.filter(lambda s: s.lower() not in BOOL_WORDS)
            | collections
            | nothing
            | st.integers().filter(lambda i: i not in (0, 1))
        )
    if get_origin(kind) is Literal:
        options = get_args(kind)
        if isinstance(options[0], int):
            return st.integers().filter(lambda i: i not in options) | st.booleans() | letters | collections
        return letters.filter(lambda s: s not in options) | st.integers() | collections | nothing
    if kind == list[str]:
        return letters | st.integers() | st.lists(st.integers(), min_size=1, max_size=2) | nothing
    if kind == list[SourceConfig]:
        return letters | st.integers() | st.just([]) | st.lists(st.integers() | letters, min_size=1, max_size=2)
    return letters | st.integers() | st.lists(st.integers(), max_size=2)  # train.deepspeed


def out_of_range(field) -> st.SearchStrategy:
    """Numbers of the field's own type just or far outside its bounds."""
    kind, _ = describe(field.annotation)
    b, options = bounds(field), []
    if kind is int:
        options += [st.integers(max_value=b["gt"])] if "gt" in b else []
        options += [st.integers(max_value=b["ge"] - 1)] if "ge" in b else []
        options += [st.integers(min_value=b["lt"])] if "lt" in b else []
        options += [st.integers(min_value=b["le"] + 1)] if "le" in b else []
    else:
        options += [st.floats(max_value=b["gt"])] if "gt" in b else []
        options += [st.floats(max_value=b["ge"], exclude_max=True)] if "ge" in b else []
        options += [st.floats(min_value=b["lt"])] if "lt" in b else []
        options += [st.floats(min_value=b["le"], exclude_min=True)] if "le" in b else []
        options += [st.sampled_from([float("nan"), float("inf"), float("-inf")])]
    return st.one_of(options)


sources = st.fixed_dictionaries(
    {"path": text},
    optional={name: valid_values(field) for name, field in SourceConfig.model_fields.items() if name != "path"},
)
BOUNDED = sorted(
    key for key, field in FIELDS.items() if bounds(field) and describe(field.annotation)[0] in (int, float)
)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def valid_raw_configs(draw) -> dict[str, Any]:
    """A raw mapping that must load: free fields drawn alone, coupled ones drawn to agree."""
    raw = {
        section: draw(
            st.fixed_dictionaries(
                {},
                optional={
                    name: valid_values(field)
                    for name, field in model.model_fields.items()
                    if f"{section}.{name}" not in COUPLED
                },
            )
        )
        for section, model in SECTIONS.items()
    }
    tok, model, train = raw["tokenizer"], raw["model"], raw["train"]
    tok["vocab_size"] = draw(st.integers(264, 70_000))
    model["vocab_size"] = draw(st.none() | st.integers(tok["vocab_size"], tok["vocab_size"] + 999))
    model["position"] = draw(st.sampled_from(["learned", "sinusoidal", "rope"]))
    model["n_heads"] = draw(st.integers(1, 16))
    head = draw(st.integers(1, 32)) * (2 if model["position"] == "rope" else 1)
    model["d_model"] = model["n_heads"] * head
    model["n_kv_heads"] = draw(st.none() | st.sampled_from(divisors(model["n_heads"])))
    model["family"] = draw(st.sampled_from(["gpt", "bert"]))
    model["type_vocab_size"] = draw(st.integers(0, 4)) if model["family"] == "bert" else 0
    model["max_seq_len"] = draw(st.integers(1, 4096))
    train["seq_len"] = draw(st.none() | st.integers(1, model["max_seq_len"]))
    dp = raw["cluster"]["num_workers"] = draw(st.integers(1, 8))
    micro, accum = draw(st.integers(1, 64)), draw(st.integers(1, 16))
    batch = {"micro_batch_size": micro, "grad_accum_steps": accum, "global_batch_size": micro * accum * dp}
    given_keys = draw(st.sets(st.sampled_from(sorted(batch))))  # any subset agrees
    train |= {key: batch[key] for key in given_keys}
    if "global_batch_size" not in given_keys:  # derived from the defaults micro=8, accum=1
        micro, accum = train.get("micro_batch_size", 8), train.get("grad_accum_steps", 1)
    tokens_per_step = micro * accum * dp * (train["seq_len"] or model["max_seq_len"])
    steps = draw(st.integers(1, 10**6))
    budget = draw(st.sampled_from(["default", "steps", "tokens", "both"]))
    if budget in ("steps", "both"):
        train["max_steps"] = steps
    if budget in ("tokens", "both"):
        train["max_tokens"] = steps * tokens_per_step + draw(st.integers(0, tokens_per_step - 1))
    train["warmup_steps"] = draw(st.integers(0, steps if budget != "default" else 1000))
    train["zero_stage"] = draw(st.sampled_from([0, 1, 2, 3]))
    train["offload_params"] = train["zero_stage"] == 3 and draw(st.booleans())
    train["optimizer"] = draw(st.sampled_from(["adamw", "muon"]))
    muon = train["optimizer"] == "muon"  # DeepSpeed's Muon: no gradient clipping, no offloaded optimizer
    train["grad_clip"] = 0.0 if muon else draw(st.floats(0, 10, allow_nan=False))
    train["offload_optimizer"] = train["zero_stage"] >= 1 and not muon and draw(st.booleans())
    train["precision"] = draw(st.sampled_from(["fp32", "bf16", "fp16"])) if train["zero_stage"] else "fp32"
    total = steps if budget != "default" else 1000
    wsd_fits = train["warmup_steps"] <= total // 2
    train["schedule"] = draw(st.sampled_from(["cosine", "linear", "constant"] + (["wsd"] if wsd_fits else [])))
    train["decay_fraction"] = draw(st.floats(0.001, 0.5))
    return raw


YAML_SCALARS = [
    "1",
    "0",
    "-1",
    "1.5",
    "1e3",
    "1.0e+3",
    ".inf",
    ".nan",
    "true",
    "no",
    "null",
    "~",
    "''",
    "x",
    "gpt",
    "rope",
    "[]",
    "{}",
    "[1, 2]",
    "{a: 1}",
    "[{path: x}]",
    "2020-01-01",
    "!!binary aGk=",
    "&a [1]",
    "*a",
    "|",
    ">",
    "'",
    '"',
    "[",
    "{",
    "!!python/name:os.system",
    "0x10",
    "1_000",
    "\t",
    "!!set {a}",
    "? [a]",
    "\x07",
    "\x85",
    "\u2028",
    "\ud800",
]
scalar_texts = st.sampled_from(YAML_SCALARS) | st.text(max_size=6)
keyish = st.sampled_from(NAMES) | st.text(max_size=5)
yaml_lines = st.tuples(
    st.sampled_from(["", "  ", "    ", "- ", "  - "]), keyish, st.sampled_from([": ", ":", " "]), scalar_texts
).map("".join)
yaml_texts = st.lists(yaml_lines, max_size=8).map("\n".join) | st.text(max_size=40)

segments = st.sampled_from(NAMES + ["0", "1", "3", "-1", "²", "", " ", "zero_optimization"]) | st.text(max_size=4)
override_texts = st.builds(
    lambda first, rest, sep, value: ".".join([first, *rest]) + sep + value,
    st.sampled_from(list(SECTIONS)) | segments,
    st.lists(segments, max_size=3),
    st.sampled_from(["=", "=", " = ", ""]),
    scalar_texts,
) | st.text(max_size=20)
# Files whose shapes overrides must step around (a section or list that is not one).
ODD_FILES = [
    "",
    "{}\n",
    "train: 5\n",
    "train: [1]\n",
    "run:\n",
    "data: {sources: [5]}\n",
    "data: {sources: foo}\n",
    "data: {sources: []}\n",
    "train: {deepspeed: {a: 5}}\n",
    "train: {deepspeed: [1]}\n",
    "eval: {prompts: []}\n",
    "model: {n_layers: {a: 1}}\n",
]


# ---------------------------------------------------------------------------------------------
# Valid configs round-trip; overrides mean what the file means


@ROUND_TRIP
@given(raw=valid_raw_configs())
@example(raw={"train": {"deepspeed": {"a": 1.5, "b": [None, True, "x"], "c": {"d": {}}}}})
@example(raw={"run": {"name": "a\x85b\u2028c\ud7ff\ufeff", "workdir": " 'x': y # z"}})
def test_valid_configs_load_and_round_trip_through_yaml(raw, config_dir):
    config = load_config(write_yaml(config_dir, raw))
    t = config.train
    assert t.global_batch_size == t.micro_batch_size * t.grad_accum_steps * config.cluster.num_workers
    assert_round_trips(config, config_dir)


@ROUND_TRIP
@given(raw=valid_raw_configs())
def test_overrides_set_the_same_values_as_the_file(raw, config_dir):
    raw["run"]["name"] = raw["run"].get("name") or "exp"
    overrides = [f"{section}.{name}={flow(value)}" for section, values in raw.items() for name, value in values.items()]
    assert load_config(None, overrides) == load_config(write_yaml(config_dir, raw))


# ---------------------------------------------------------------------------------------------
# Invalid mappings: wrong types, out-of-range values, unknown keys


@FUZZ
@given(data=st.data())
@example(data=None).via("bool as int: model.n_layers=yes loaded as 1")
def test_wrong_types_name_the_key(data, config_dir):
    if data is None:
        key, value = "model.n_layers", True
    else:
        key = data.draw(st.sampled_from(sorted(FIELDS) + list(SECTIONS)), label="key")
        section_wrong = letters | st.integers() | st.lists(st.integers(), max_size=2) | st.none()
        value = data.draw(wrong_values(FIELDS[key]) if key in FIELDS else section_wrong, label="value")
    path = write_yaml(config_dir, place(key, value) if key in FIELDS else {key: value})
    message = error_of(path)
    assert message.startswith(f"{path}: ") and key in message


@FUZZ
@given(data=st.data())
@example(data=None).via("train.lr=.inf loaded; non-finite floats are out of range")
def test_out_of_range_values_name_key_and_value(data, config_dir):
    if data is None:
        key, value = "train.lr", float("inf")
    else:
        key = data.draw(st.sampled_from(BOUNDED + ["tokenizer.vocab_size"]), label="key")
        value = data.draw(
            st.integers(max_value=263) if key == "tokenizer.vocab_size" else out_of_range(FIELDS[key]), label="value"
        )
    message = error_of(write_yaml(config_dir, place(key, value)))
    assert f"{key}=" in message


def test_empty_source_list_is_rejected():
    assert "data.sources=[]" in error_of(None, ["data.sources=[]"])


@FUZZ
@given(
    level=st.sampled_from(["", "train.", "model.", "data.sources.0.", "eval."]),
    key=st.text(min_size=1, max_size=10) | st.integers() | st.booleans() | st.none() | st.floats(0, 9),
)
@example(level="", key="a\nb").via("a newline in a YAML key made a two-line message")
@example(level="train.", key=1).via("int key: `Keys should be strings` did not say `unknown key`")
@example(level="", key="\ud800").via("surrogate key: a message that named no key")
def test_unknown_keys_are_named(level, key, config_dir):
    if level + str(key) in FIELDS or key in SECTIONS:
        return
    if level == SOURCE_KEY:
        raw = place(SOURCE_KEY + "path", "x")
        raw["data"]["sources"][0][key] = 1
    else:
        raw = {level.rstrip("."): {key: 1}} if level else {key: 1}
    message = error_of(write_yaml(config_dir, raw))
    if str(key).isprintable():
        assert f"unknown key `{level}{key}`" in message


@FUZZ
@given(key=st.sampled_from([k for k in FIELDS if len(k.rsplit(".", 1)[1]) >= 4]), data=st.data())
def test_misspelt_keys_get_a_suggestion(key, data, config_dir):
    name = key.rsplit(".", 1)[1]
    cut = data.draw(st.integers(0, len(name) - 1))
    typo = name[:cut] + name[cut + 1 :]
    parent = key.rsplit(".", 1)[0]
    if f"{parent}.{typo}" in FIELDS:
        return
    message = error_of(None, [f"{parent}.{typo}=1"])
    assert f"unknown key `{parent}.{typo}` (did you mean `{parent}." in message


# ---------------------------------------------------------------------------------------------
# Inconsistent values: batch triple, model shapes, budget


@FUZZ
@given(
    micro=st.none() | st.integers(1, 16),
    accum=st.none() | st.integers(1, 8),
    glob=st.none() | st.integers(1, 256),
    dp=st.integers(1, 8),
)
def test_batch_triple_is_derived_or_rejected_naming_the_global_batch(micro, accum, glob, dp):
    overrides = [f"cluster.num_workers={dp}"] + [
        f"train.{key}={value}"
        for key, value in (("micro_batch_size", micro), ("grad_accum_steps", accum), ("global_batch_size", glob))
        if value
    ]
    if glob is None:
        expected = ((micro or 8), (accum or 1), (micro or 8) * (accum or 1) * dp)
    elif micro and accum:
        expected = (micro, accum, glob) if glob == micro * accum * dp else None
    else:
        known = micro or accum or 1
        rest = glob // (known * dp) if glob % (known * dp) == 0 else None
        expected = None if rest is None else (micro, rest, glob) if micro else (rest, known, glob)
    if expected is None:
        assert f"train.global_batch_size={glob}" in error_of(None, overrides)
    else:
        t = load_config(None, overrides).train
        assert (t.micro_batch_size, t.grad_accum_steps, t.global_batch_size) == expected


@FUZZ
@given(
    d_model=st.integers(1, 96),
    n_heads=st.integers(1, 12),
    n_kv=st.none() | st.integers(1, 12),
    position=st.sampled_from(["learned", "rope"]),
    family=st.sampled_from(["gpt", "bert"]),
    type_vocab=st.sampled_from([0, 0, 2]),
)
def test_model_shapes_are_checked_naming_the_key(d_model, n_heads, n_kv, position, family, type_vocab):
    overrides = [
        f"model.d_model={d_model}",
        f"model.n_heads={n_heads}",
        f"model.n_kv_heads={flow(n_kv)}",
        f"model.position={position}",
        f"model.family={family}",
        f"model.type_vocab_size={type_vocab}",
    ]
    problems = [
        ("model.n_heads", d_model % n_heads),
        ("model.n_kv_heads", n_heads % (n_kv or n_heads)),
        ("model.position", position == "rope" and d_model // n_heads % 2),
        ("model.type_vocab_size", type_vocab and family != "bert"),
    ]
    first = next((key for key, bad in problems if bad), None)
    if first is None:
        assert load_config(None, overrides).model.d_model == d_model
    else:
        assert first in error_of(None, overrides)


@FUZZ
@given(
    max_seq_len=st.integers(1, 64),
    seq_len=st.none() | st.integers(1, 80),
    steps=st.none() | st.integers(1, 50),
    tokens=st.none() | st.integers(1, 50_000),
    warmup=st.integers(0, 60),
)
@example(max_seq_len=64, seq_len=None, steps=None, tokens=100, warmup=0).via(
    "max_tokens under one step loaded as max_steps=1, whose dump then failed to load"
)
def test_budget_is_derived_or_rejected_naming_the_key(max_seq_len, seq_len, steps, tokens, warmup):
    overrides = [
        f"model.max_seq_len={max_seq_len}",
        f"train.seq_len={flow(seq_len)}",
        f"train.max_steps={flow(steps)}",
        f"train.max_tokens={flow(tokens)}",
        f"train.warmup_steps={warmup}",
        "train.micro_batch_size=2",
        "cluster.num_workers=1",
    ]
    per_step = 2 * (seq_len or max_seq_len)
    derived = steps or (tokens // per_step if tokens else 1000)
    problems = [
        ("train.seq_len", (seq_len or 0) > max_seq_len),
        ("train.max_tokens", tokens and tokens < per_step),
        ("train.max_steps", steps and tokens and tokens // per_step != steps),
        ("train.warmup_steps", warmup > derived),
    ]
    first = next((key for key, bad in problems if bad), None)
    if first is None:
        assert load_config(None, overrides).train.max_steps == derived
    else:
        assert first in error_of(None, overrides)


# ---------------------------------------------------------------------------------------------
# Arbitrary input: YAML text, bytes, mappings and override strings never escape as raw exceptions


@ROUND_TRIP
@given(content=yaml_texts | st.binary(max_size=40))
@example(content=b"train:\n  lr: \xff\n").via("UnicodeDecodeError escaped")
@example(content="train:\n  lr: \x07\n").via("ReaderError's message spanned two lines")
@example(content="a: " + "[" * 1000).via("RecursionError escaped")
@example(content="0\n").via("a scalar top level silently meant all defaults")
def test_any_yaml_text_loads_and_round_trips_or_fails_in_one_line(content, config_dir):
    path = config_dir / "exp.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    result = load_or_error(path)
    if isinstance(result, Config):
        assert_round_trips(result, config_dir)
    else:
        assert result.startswith(f"{path}: ")


yaml_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.dates() | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keyish | st.integers(), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(list(SECTIONS)) | keyish, yaml_data, max_size=4))
@example(raw={"train": {"deepspeed": {"when": __import__("datetime").date(2020, 1, 1)}}}).via(
    "a date in train.deepspeed loaded but dumped as a string"
)
@example(raw={"train": {"deepspeed": {"a": {1: 2}}}}).via("a non-string deepspeed key did not round-trip")
def test_any_mapping_loads_and_round_trips_or_names_a_key(raw, config_dir):
    result = load_or_error(write_yaml(config_dir, raw))
    if isinstance(result, Config):
        assert_round_trips(result, config_dir)
    else:
        assert NAMES_A_KEY.search(result), result


@FUZZ
@given(file=st.sampled_from(ODD_FILES), overrides=st.lists(override_texts, min_size=1, max_size=3))
@example(file="", overrides=["train.lr.x=1"]).via("TypeError: 'float' object does not support item assignment")
@example(file="train: 5\n", overrides=["train.lr=1"]).via("TypeError from a section that is not a mapping")
@example(file="data: {sources: foo}\n", overrides=["data.sources.0.path=x"]).via("AttributeError: setdefault")
@example(file="", overrides=["eval.prompts.0.path=x"]).via("list items were always taken as sources")
@example(file="", overrides=["data.sources.².path=x"]).via("ValueError from int('²')")
@example(file="", overrides=["train.lr=\x07"]).via("AttributeError: ReaderError has no `problem`")
@example(file="", overrides=["train.l\nr=1"]).via("a newline in an override made a two-line message")
@example(file="", overrides=["eval.lm_eval_tasks.0=x"]).via("said `needs an index from 0 to -1`")
def test_any_override_applies_or_fails_in_one_line(file, overrides, config_dir):
    path = config_dir / "odd.yaml"
    path.write_text(file, encoding="utf-8")
    result = load_or_error(path, overrides)
    if isinstance(result, Config):
        assert_round_trips(result, config_dir)
    else:
        assert NAMES_A_KEY.search(result) or "not valid YAML" in result, result


# ---------------------------------------------------------------------------------------------
# The CLI: `pretrain config check` prints one stderr line and exits 2, never a traceback


def check_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["config", "check", *args])
    return code, out.getvalue(), err.getvalue()


@FUZZ
@given(content=yaml_texts, overrides=st.lists(override_texts.filter(lambda s: not s.startswith("-")), max_size=2))
def test_config_check_prints_one_line_and_exits_2(content, overrides, config_dir):
    path = config_dir / "cli.yaml"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    code, out, err = check_cli([str(path), *overrides])
    if code == 0:
        assert err == "" and len(out.splitlines()) == 1 and ": ok (" in out
    else:
        assert code == 2 and out == "", err
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "traceback" not in err.lower()


@pytest.mark.parametrize(
    "content, override",
    [
        (b"train:\n  lr: \xff\n", "model.n_layers=2"),
        (b"model: {}\n", "train.l\nr=\x07"),
        (b"train: 5\n", "train.lr.x=1"),
    ],
    ids=["not-utf8", "newline-and-bell", "section-not-a-mapping"],
)
def test_config_check_process_reports_one_line(content, override, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "config", "check", str(path), override],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: "), out.stderr
