"""The override language: `section.key=value` dot paths (list items by index), and the key-path helpers
the error messages share (which model sits at a path, the closest key to a misspelt one).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel

from pipeline.config.base import shown
from pipeline.config.schema import Config
from pipeline.config.sections import SECTIONS
from pipeline.errors import ConfigError


def dotted(loc: tuple | list) -> str:
    return ".".join(str(part) if part != "" else "''" for part in loc)


def suggest(loc: tuple) -> str:
    model = model_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if model else []
    return f" (did you mean `{dotted((*loc[:-1], close[0]))}`?)" if close else ""


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _child_type(kind: Any, key: Any) -> Any:
    """The declared type one step below `kind`: a model's field, a list's item, a mapping's value."""
    if _is_model(kind):
        field = kind.model_fields.get(key) if isinstance(key, str) else None
        return field.annotation if field is not None else Any
    args = get_args(kind)
    return args[-1] if get_origin(kind) in (list, dict) and args else Any


def model_at(loc: tuple | list) -> type[BaseModel] | None:
    """The section model at a key path (`("data", "sources", 0)` -> SourceConfig), or None."""
    kind: Any = Config
    for part in loc:
        kind = _child_type(kind, part)
    return kind if _is_model(kind) else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); values are YAML scalars or flow collections."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like section.key=value, e.g. train.lr=3e-4")
    path, value = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or keys[0] not in SECTIONS:
        raise ConfigError(f"override `{text}`: the key must start with one of {', '.join(SECTIONS)}")
    return keys, yaml_value(value, f"override `{text}`: the value is") if value.strip() else None


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set raw[k0][k1]...= value; path segments must name existing fields (list items by index)."""
    node: Any = raw
    kind: Any = Config
    for depth in range(1, len(keys)):
        node, kind = _descend(node, kind, keys[:depth])
    node[_slot(node, kind, keys)] = value


def _descend(node: Any, kind: Any, path: list[str]) -> tuple[Any, Any]:
    """One step down the raw dict, materializing defaults so `data.sources.0.path=x` works."""
    slot, child = _slot(node, kind, path), _child_type(kind, path[-1])
    if _is_model(kind):
        if not (_is_model(child) or get_origin(child) in (list, dict)):
            raise ConfigError(
                f"override: `{dotted(path)}` is a single value with no keys below it; set it as {dotted(path)}=VALUE"
            )
        if node.get(slot) is None:
            # A section starts empty, so that only what the user set counts as set (model.init_from checks
            # explicit keys); a list such as data.sources starts as its default, so `.0.path=x` edits it.
            default = None if _is_model(child) else kind.model_fields[slot].get_default(call_default_factory=True)
            node[slot] = to_plain(default) if default is not None else {}
    elif isinstance(node, dict):  # free-form mapping such as train.deepspeed
        node.setdefault(slot, {})
    return node[slot], child


def _slot(node: Any, kind: Any, path: list[str]) -> str | int:
    """The dict key or list index that path[-1] names in node, or a ConfigError saying why none."""
    key = path[-1]
    free = kind is Any and isinstance(node, list)  # a list inside a free-form mapping
    expected = list if get_origin(kind) is list or free else dict
    if not isinstance(node, expected):
        raise ConfigError(
            f"override: cannot set `{dotted(path)}`: `{dotted(path[:-1])}` is {shown(node)}, "
            f"not a {'list' if expected is list else 'mapping'}; fix the file or override it whole"
        )
    if expected is list:
        return _list_index(node, key, path)
    if _is_model(kind) and key not in kind.model_fields:
        close = difflib.get_close_matches(key, list(kind.model_fields), n=1)
        hint = f" (did you mean `{dotted(path[:-1] + [close[0]])}`?)" if close else ""
        raise ConfigError(f"override: unknown key `{dotted(path)}`{hint}")
    return key


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not node:
        raise ConfigError(
            f"override: `{dotted(path)}` indexes an empty list; set the whole list instead, "
            f"e.g. {dotted(path[:-1])}=[...]"
        )
    if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
        raise ConfigError(f"override: `{dotted(path)}` needs an index from 0 to {len(node) - 1}")
    return int(key)


def to_plain(value: Any) -> Any:
    """Models, paths, tuples and nested containers as plain JSON-able dicts, lists and scalars."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf} (the dot-path override syntax); empty ones stay leaves."""
    if isinstance(tree, (list, tuple)) and tree:
        tree = {str(i): item for i, item in enumerate(tree)}
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """The value at a dot path of nested dicts."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def yaml_value(text: str, what: str) -> Any:
    """yaml.safe_load; a problem ends in `<what> not valid YAML (line N: what PyYAML found)`."""
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        problem = f"character {char!r} at offset {exc.position}: {exc.reason}"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = (f"line {mark.line + 1}: " if mark else "") + (getattr(exc, "problem", None) or str(exc))
    except RecursionError:
        problem = "nested too deeply"
    raise ConfigError(f"{what} not valid YAML ({problem})")


def config_changes(saved: dict[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every leaf that differs."""
    old, new = flatten(saved), flatten(config.model_dump(mode="json"))
    return {
        key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
    }
