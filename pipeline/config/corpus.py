"""The corpus sections: `data` and its `sources`, and the names sources go by in metrics and reports."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section, check


class SourceConfig(Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Short name of the source in per-source metrics (`val/<name>/loss`) and reports. Default: "
        "derived from the path (a file's stem, a glob's directory, the dataset name).",
    )
    path: str = Field(
        description="A file, a glob, a directory saved by `datasets.save_to_disk`, "
        "`builtin:python-stdlib` (the running interpreter's standard library sources), or "
        "`hf:NAME` for a Hugging Face hub dataset (needs internet)."
    )
    format: Literal["auto", "text", "jsonl", "parquet", "saved", "hub", "builtin"] = Field(
        "auto", description="How to read `path`; `auto` decides by extension or prefix."
    )
    text_field: str = Field(
        "text", description="Column holding the document text (jsonl, parquet, saved and hub datasets)."
    )
    text_unit: Literal["file", "line", "paragraph"] = Field(
        "file", description="For plain text: one document per file, per line, or per blank-line paragraph."
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Share of training tokens drawn from this source, relative to the other sources' weights.",
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name (hub sources only).")
    split: str = Field("train", description="Dataset split to read (saved and hub sources).")
    validation: Literal["auto", "hash", "tail"] = Field(
        "auto",
        description="How this source's text reaches the validation split. `hash`: data.val_permille of its "
        "documents, by a stable hash of each document's MinHash key (near-copies stay together). `tail`: the "
        "last data.val_permille of each file's "
        "bytes, cut at a line boundary (plain text and uncompressed JSONL only), the rule for a corpus of few "
        "documents such as one input.txt. `auto`: `tail` for plain text read one document per file when fewer "
        "than 10 files would fall into validation by hash, `hash` otherwise.",
    )


class DataConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="builtin:python-stdlib")],
        min_length=1,
        description="The corpus: one or more sources, mixed by weight.",
    )
    val_permille: int = Field(
        20,
        ge=0,
        le=500,
        description="Per thousand of the corpus assigned to validation: documents by a stable hash of their "
        "MinHash key (near-copies stay together), or the tail of each file (see data.sources[].validation).",
    )
    shard_tokens: int = Field(16_777_216, gt=0, description="Target number of tokens per shard file.")
    num_workers: int = Field(
        2,
        ge=1,
        description="Partitions read, tokenized and written at once, each by one Ray task on any node of the "
        "cluster (1: in the driver process, without Ray).",
    )
    partition_bytes: int = Field(
        8 << 20,
        ge=1024,
        description="Target input bytes per partition, the unit of parallel work of the tokenizer and shard "
        "stages: files are cut at line boundaries (plain text, uncompressed JSONL) or by Parquet row groups, and "
        "small files are grouped. The plan depends on the input and this value only, never on the workers.",
    )
    max_documents: int | None = Field(
        None,
        gt=0,
        description="Read at most this many documents per source (for quick experiments); None reads everything.",
    )
    verify_checksums: bool = Field(True, description="Check every shard's sha256 against index.json when a run starts.")

    @model_validator(mode="after")
    def _names_differ(self) -> DataConfig:
        names = [source.name for source in self.sources]
        for position, name in enumerate(names):
            check(
                name is None or names.index(name) == position,
                f"data.sources[{names.index(name)}] and data.sources[{position}] are both named `{name}`; give "
                f"one another name (data.sources[{position}].name=...)",
            )
        return self

    def source_names(self) -> list[str]:
        """Every source's name (`source_name`); a derived name that another source has too gets `-<position>`."""
        names = [source_name(source) for source in self.sources]
        return [
            name if source.name or names.count(name) == 1 else f"{name}-{position}"
            for position, (name, source) in enumerate(zip(names, self.sources))
        ]


def source_name(source: SourceConfig) -> str:
    """The source's `name`, or one derived from its path: `python-stdlib` for the builtin corpus, the
    dataset's last path part for the hub, a file's stem without its suffixes, a glob's last plain
    directory."""
    if source.name:
        return source.name
    path = source.path.rstrip("/")
    if path.startswith("builtin:"):
        return path.removeprefix("builtin:")
    if path.startswith("hf:"):
        return path.rsplit("/", 1)[-1]
    parts = [part for part in path.split("/") if part]
    plain = [part for part in parts if not any(c in part for c in "*?[")]
    last = parts[-1] if parts and plain and parts[-1] == plain[-1] else (plain[-1] if plain else "source")
    stem = last.split(".")[0] or last
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip("_.-") or "source"
