"""A generated corpus for the data benchmarks: the interpreter's standard library as JSONL documents,
copied until the file reaches the asked size (each copy marked, so copies are distinct documents).
Made on the spot, so the benchmarks need no download."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.readers import source_texts


def generated_corpus(path: Path, megabytes: float) -> Path:
    """Write `path` (JSONL, one {"text": ...} per line) of at least `megabytes` MB, unless it is there."""
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return path
    texts = list(source_texts(0, load_config(None).data))
    written, copy = 0, 0
    temp = path.with_suffix(".tmp")
    with temp.open("w", encoding="utf-8") as handle:
        while written < megabytes * 1e6:
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                handle.write(line)
                written += len(line.encode("utf-8"))
                if written >= megabytes * 1e6:
                    break
            copy += 1
    temp.replace(path)
    return path
