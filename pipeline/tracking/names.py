"""Metric names shared by training, evaluation and `compare`; cleaning of names and secrets; the store URI.

Imports nothing heavy: training ranks, the Slurm job helpers and the CLI use it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config, flatten

METRIC_TRAIN_LOSS = "train/loss"
METRIC_VAL_LOSS = "val/loss"
METRIC_BITS_PER_BYTE = "val/bits_per_byte"  # logged by the eval stage
METRIC_TOKENS_PER_S = "train/tokens_per_s"
METRIC_TOKENS_SEEN = "train/tokens_seen"
METRIC_SKIPPED_STEPS = "train/skipped_steps"
METRIC_ROLLBACKS = "train/rollbacks"
METRIC_MODEL_PARAMS = "model/params"  # a metric or a param

# MLflow's limits (mlflow.utils.validation), repeated here so the journal needs no mlflow import.
MAX_NAME_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000

TRUNCATION_MARK = "...[truncated]"
REDACTED = "<redacted>"

_SECRET_KEY = re.compile(
    r"(^|[._/-])(password|passwd|secret|token|api_?key|access_?key|private_?key|"
    r"credentials?|auth)([._/-]|$)",
    re.IGNORECASE,
)
_SECRET_VALUES = [
    re.compile(r"(?<=://)[^/@\s]+(?=@)"),  # user:password@ in URLs
    re.compile(r"\b(hf|gh[pousr]|github_pat|glpat|xox[abprs])[_-][A-Za-z0-9_-]{16,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
]
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested mappings and lists -> {"a.b.0.c": "value"} (the dot-path override syntax), as strings."""
    return {
        key: json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        for key, value in flatten(dict(params)).items()
    }


def redact(key: str, value: str) -> str:
    """The value with anything secret-looking replaced; all of it when the key names a secret."""
    if _SECRET_KEY.search(key):
        return REDACTED
    for pattern in _SECRET_VALUES:
        value = pattern.sub(REDACTED, value)
    return value


def hide_credentials(uri: str) -> str:
    return redact("uri", uri)


def safe_name(name: str) -> str:
    """A param/metric/tag name MLflow accepts: allowed characters, no path tricks, at most 250 chars."""
    name = _INVALID_NAME_CHARS.sub("_", name)
    normal = posixpath.normpath(name)
    # MLflow refuses names that would resolve to another path or leave the run's directory.
    if normal != name or normal == "." or normal.startswith(("..", "/")):
        name = "_" + name.replace("/", "_")
    if len(name) > MAX_NAME_LENGTH:  # keep long names distinct with a hash of the full name
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9]}-{digest}"
    return name


def clean(items: Mapping[str, Any], value_limit: int) -> dict[str, str]:
    """Names made safe, secrets redacted, values cut to `value_limit` characters."""
    return {safe_name(k): _truncate(redact(k, str(v)), value_limit) for k, v in items.items()}


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def tracking_uri(config: Config) -> str:
    """tracking.uri, or the sqlite store `<workdir>/mlflow.db`."""
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{Path(config.run.workdir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
