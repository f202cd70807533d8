"""The config reference: every section and field with its default and description, as Markdown
(`pretrain config reference` prints it; the README embeds it)."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from pipeline.config.corpus import SourceConfig
from pipeline.config.schema import Config
from pipeline.config.sections import SECTIONS


def config_reference_markdown() -> str:
    """A Markdown reference of every section and field, generated from the descriptions."""
    lines: list[str] = []
    for name, section in SECTIONS.items():
        lines += [
            f"### `{name}`: {Config.model_fields[name].description}",
            "",
            "| key | default | description |",
            "| --- | --- | --- |",
        ]
        for field_name, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = [d.model_dump(exclude_defaults=True) if isinstance(d, BaseModel) else d for d in default]
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{name}.{field_name}` | `{shown}` | {field.description} |")
        lines.append("")
    lines += ["### `data.sources[]` items", "", "| key | default | description |", "| --- | --- | --- |"]
    for field_name, field in SourceConfig.model_fields.items():
        default = "required" if field.is_required() else field.get_default()
        lines.append(f"| `{field_name}` | `{default}` | {field.description} |")
    return "\n".join(lines) + "\n"
