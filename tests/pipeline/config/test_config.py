from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, config_reference_markdown, dump_config, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    return message


def test_defaults_resolve_derived_values():
    config = load_config(None)
    assert config.model.vocab_size == 8192  # tokenizer.vocab_size rounded up to a multiple of 64
    assert config.train.seq_len == config.model.max_seq_len
    t = config.train
    assert t.global_batch_size == t.micro_batch_size * t.grad_accum_steps * config.cluster.num_workers


def test_vocab_is_padded_to_the_multiple():
    config = load_config(None, ["tokenizer.vocab_size=50257"])
    assert config.model.vocab_size == 50304


@pytest.mark.parametrize(
    "overrides, derived",
    [
        (["train.micro_batch_size=4", "train.grad_accum_steps=3"], (4, 3, 24)),
        (["train.micro_batch_size=4", "train.global_batch_size=32"], (4, 4, 32)),
        (["train.grad_accum_steps=2", "train.global_batch_size=32"], (8, 2, 32)),
        (["train.global_batch_size=64"], (32, 1, 64)),
        (["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.global_batch_size=8"], (2, 2, 8)),
        (["cluster.num_workers=4", "train.micro_batch_size=2", "train.global_batch_size=32"], (2, 4, 32)),
    ],
)
def test_batch_triple_any_two_given_derives_the_third(overrides, derived):
    t = load_config(None, overrides).train
    assert (t.micro_batch_size, t.grad_accum_steps, t.global_batch_size) == derived


def test_inconsistent_batch_triple_is_rejected_with_the_arithmetic():
    message = error_of(None, ["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.global_batch_size=10"])
    assert "train.global_batch_size=10" in message and "= 8" in message


def test_indivisible_global_batch_names_the_multiple():
    message = error_of(None, ["train.micro_batch_size=4", "train.global_batch_size=12"])
    assert "train.global_batch_size=12" in message and "multiple of 8" in message


def test_max_tokens_derives_steps():
    config = load_config(None, ["train.max_tokens=409600", "train.warmup_steps=10"])
    assert config.train.max_steps == 409600 // (16 * 256)


def test_heads_must_divide_d_model_names_file_and_key(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 128\n  n_heads: 5\n")
    assert error_of(path) == f"{path}: model.n_heads=5 must divide model.d_model=128"


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 0.1\n")
    message = error_of(path)
    assert "unknown key `train.learning_rate`" in message and str(path) in message


def test_unknown_section_is_rejected(tmp_path):
    message = error_of(write(tmp_path, "trian:\n  lr: 0.1\n"))
    assert "`trian`" in message and "did you mean `train`" in message


def test_bad_type_names_key_and_value(tmp_path):
    message = error_of(write(tmp_path, "train:\n  lr: fast\n"))
    assert "train.lr='fast'" in message


def test_bad_literal_lists_allowed_values(tmp_path):
    message = error_of(write(tmp_path, "model:\n  norm: batchnorm\n"))
    assert "model.norm='batchnorm'" in message and "layernorm" in message and "rmsnorm" in message


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(write(tmp_path, "train: [\n"))
    assert "no such config file" in error_of(tmp_path / "absent.yaml")
    assert "top level must be a mapping" in error_of(write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "did you mean `train.lr`"),
        ("nosection.x=1", "must start with one of"),
        ("train.lr", "must look like section.key=value"),
        ("data.sources.3.path=x", "needs an index from 0 to 0"),
        ("model.n_heads=5", "model.n_heads=5 must divide"),
        ("train.zero_stage=4", "train.zero_stage=4"),
        ("train.offload_params=true", "needs train.zero_stage=3"),
        ("train.seq_len=4096", "exceeds model.max_seq_len"),
        ("tokenizer.vocab_size=100", "at least 264"),
    ],
)
def test_override_errors(override, fragment):
    assert fragment in error_of(None, [override])


def test_overrides_parse_yaml_scalars_and_reach_nested_keys():
    config = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.n_layers=2",
            "train.compile=true",
            "data.sources.0.path=corpus/*.jsonl",
            "eval.prompts=[a, b]",
            "train.deepspeed.zero_optimization.reduce_bucket_size=1000",
        ],
    )
    assert config.train.lr == 3e-4 and config.model.n_layers == 2 and config.train.compile is True
    assert config.data.sources[0].path == "corpus/*.jsonl"
    assert config.eval.prompts == ["a", "b"]
    assert config.train.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_run_name_defaults_to_config_stem(tmp_path):
    assert load_config(write(tmp_path, "{}\n")).run.name == "exp"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_resolved_config_round_trips_through_yaml(preset, tmp_path, preset_overrides):
    config = load_config(preset, preset_overrides(preset))
    again_path = tmp_path / "resolved.yaml"
    again_path.write_text(dump_config(config))
    assert load_config(again_path) == config


def test_every_field_has_a_description():
    missing = [
        f"{section.__name__}.{name}"
        for section in Config.model_fields.values()
        for name, field in section.annotation.model_fields.items()
        if not field.description
    ]
    assert missing == []


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    assert begin in readme and end in readme, "README lacks the config reference markers"
    current = readme.split(begin, 1)[1].split(end, 1)[0]
    assert current == config_reference_markdown(), (
        "README's config reference is stale: regenerate it with `python -m launch.readme`"
    )


def test_config_module_imports_no_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys, pipeline.config; heavy = [m for m in ('torch', 'deepspeed', 'ray', 'mlflow') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_yaml_dump_is_plain_yaml():
    assert isinstance(yaml.safe_load(dump_config(load_config(None))), dict)


def test_derived_source_names_are_made_unique_and_explicit_duplicates_are_refused_with_a_fix():
    data = load_config(None, ["data.sources=[{path: a/input.txt}, {path: b/input.txt}]"]).data
    assert data.source_names() == ["input-0", "input-1"]
    with pytest.raises(ConfigError, match=r"both named `web`; give one another name \(data.sources\[1\].name=...\)"):
        load_config(None, ["data.sources=[{path: a.txt, name: web}, {path: b.txt, name: web}]"])
    fixed = load_config(
        None, ["data.sources=[{path: a.txt, name: web}, {path: b.txt, name: web}]", "data.sources.1.name=code"]
    )
    assert fixed.data.source_names() == ["web", "code"]
