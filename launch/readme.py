"""Regenerate the README's config reference from the field descriptions: `python -m launch.readme`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.config import config_reference_markdown

BEGIN, END = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme(path: Path = README) -> bool:
    """Rewrite the text between the markers; returns whether anything changed."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = head + BEGIN + config_reference_markdown() + END + tail
    if updated == text:
        return False
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as tmp:
        tmp.write(updated)
    os.replace(tmp.name, path)
    return True


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already current")
