"""YAML I/O: loading a config file with overrides into a validated Config, and dumping one back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.base import shown
from pipeline.config.overrides import apply_override, dotted, lookup, model_at, parse_override, suggest, yaml_value
from pipeline.config.schema import Config
from pipeline.config.sections import SECTIONS
from pipeline.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate, resolve."""
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    if config.run.name is None:
        config.run.name = Path(path).stem if path is not None else "default"
    return config


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; see configs/ for presets")
    try:
        raw = yaml_value(path.read_text(encoding="utf-8"), f"{path}:")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8; save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    if raw is None:  # an empty file: all defaults
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def dump_config(config: Config) -> str:
    """The config as YAML in section order: every value the user set or left at its default, and the
    derived values as null (loading it derives them again, so it can be edited and rerun), followed by
    a comment listing what they resolve to now."""
    given = config.model_dump(mode="json")
    derived = {key: lookup(given, key) for key in sorted(config._derived)}
    for key in derived:
        section, name = key.split(".")
        given[section][name] = None
    text = yaml.safe_dump(given, sort_keys=False)
    if derived:
        text += "# Derived from the values above (null means derived; set one to pin it):\n"
        text += "".join(f"#   {key}: {value}\n" for key, value in derived.items())
    return text


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc, value = first["loc"], first.get("input")
    if first["type"] == "invalid_key":  # a key that is no string: show it as written (False, not 0)
        loc = (*loc[:-1], value)
    if first["type"] == "string_unicode" and model_at(loc) is not None:
        loc = (*loc, value)  # a key that is no valid string
    if first["type"] in ("extra_forbidden", "invalid_key", "string_unicode"):
        return f"{source}: unknown key `{dotted(loc)}`{suggest(loc)}; remove it or fix its spelling"
    if loc and loc[-1] == "[key]":  # a key of a free-form mapping such as train.deepspeed
        return f"{source}: {dotted(loc[:-2])} has the non-string key {shown(value)}; quote it"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"{source}: {message}"
    given = "" if value is None or isinstance(value, dict) else f"={shown(value)}"
    return f"{source}: {dotted(loc) or 'the top level'}{given}: {message}"
