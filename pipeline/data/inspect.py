"""`pretrain data inspect`: what a shard directory holds, per split and per source."""

from __future__ import annotations

from pathlib import Path
from statistics import median

from pipeline.data.near_duplicates import near_duplicate_count
from pipeline.data.shards import read_index


def inspect_shards(shard_dir: str | Path) -> str:
    """`pretrain data inspect DIR`: documents, tokens, bytes per token, val share, shard sizes."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    splits = index["splits"]
    lines = [
        f"{shard_dir}: {index['family']} shards, vocab {index['vocab_size']} ({index['dtype']}), "
        f"tokenizer {index['tokenizer_fingerprint']}, separator id {index['separator_id']}",
        f"{'split':<6} {'documents':>10} {'tokens':>12} {'source bytes':>13} {'bytes/token':>11} "
        f"{'shards':>6}  shard tokens min/median/max",
    ]
    for name, split in splits.items():
        sizes = [s["tokens"] for s in split["shards"]] or [0]
        lines.append(
            f"{name:<6} {split['documents']:>10,} {split['tokens']:>12,} {split['source_bytes']:>13,} "
            f"{split['source_bytes'] / max(split['tokens'], 1):>11.2f} {len(split['shards']):>6}  "
            f"{min(sizes):,}/{int(median(sizes)):,}/{max(sizes):,}"
        )
    documents = sum(s["documents"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    val = splits.get("val", {"documents": 0, "tokens": 0})
    lines.append(
        f"val share: {val['documents'] / max(documents, 1):.1%} of documents, "
        f"{val['tokens'] / max(tokens, 1):.1%} of tokens"
    )
    for source in index["sources"]:
        lines.append(
            f"source {source['name']} ({source.get('path', source['name'])}): weight {source['weight']:g} -> "
            f"{source['target_share']:.1%} of "
            f"training tokens (natural {source['natural_share']:.1%}), {source['documents']:,} documents, "
            f"{source['train_tokens']:,} train tokens, {source['invalid_utf8_bytes']} invalid UTF-8 bytes, "
            f"validation by {source.get('validation', 'hash')}, {source.get('partitions', '?')} partitions"
        )
    leak = near_duplicate_count(shard_dir, index["separator_id"])
    capped = " (the first documents of each split only)" if leak["capped"] else ""
    lines.append(
        f"near-duplicates: {leak['with_near_duplicate_in_train']} of {leak['val_documents']} validation documents "
        f"have a training document with an estimated Jaccard similarity >= {leak['threshold']} of their token "
        f"5-grams (MinHash over {leak['train_documents_compared']:,} training documents{capped})"
    )
    return "\n".join(lines)
