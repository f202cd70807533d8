"""Validation documents with a near-copy in the training split, found by MinHash over the shards.

A document is a run of tokens between separators. Its shingles are its token 5-grams, each hashed to
64 bits; its signature is the minimum of SIGNATURE_SIZE independent hash permutations over its
shingles. Two documents whose shingle sets have Jaccard similarity J agree on each signature value
with probability J: banding (BANDS bands of ROWS values) finds the pairs likely above about 0.6, and
the share of agreeing values estimates J; pairs at or above THRESHOLD count. `pretrain data inspect`
reports the count, so a leak across the split is visible before anyone trains on it.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.loader import TokenDataset

SHINGLE = 5
BANDS, ROWS = 8, 4
SIGNATURE_SIZE = BANDS * ROWS
THRESHOLD = 0.8
CHUNK = 1 << 16  # shingles hashed at once: 16 MB of uint64 x SIGNATURE_SIZE / 8
MAX_DOCUMENTS = 200_000  # per split: beyond this, the first ones (stated in the report)
_rng = np.random.default_rng(20_240_607)
_A = _rng.integers(1, 2**63, SIGNATURE_SIZE, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, 2**63, SIGNATURE_SIZE, dtype=np.uint64)


def documents(dataset: TokenDataset, separator: int) -> list[np.ndarray]:
    """Every source's token stream cut at the separators, empty pieces dropped, at most MAX_DOCUMENTS."""
    found = []
    for stream in dataset.streams:
        tokens = stream.read(0, stream.total) if stream.total else np.zeros(0, np.int64)
        for piece in np.split(tokens, np.flatnonzero(tokens == separator)):
            piece = piece[piece != separator]
            if len(piece):
                found.append(piece.astype(np.uint64))
            if len(found) == MAX_DOCUMENTS:
                return found
    return found


def signature(tokens: np.ndarray) -> np.ndarray:
    """SIGNATURE_SIZE minimum hashes of the document's token 5-grams (the whole document when shorter)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64
        width = min(SHINGLE, len(tokens))
        shingles = np.zeros(len(tokens) - width + 1, dtype=np.uint64)
        for offset in range(width):
            shingles = shingles * np.uint64(0x100000001B3) + tokens[offset : len(shingles) + offset]
        result = np.full(SIGNATURE_SIZE, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), CHUNK):  # bounded memory for long documents
            hashed = shingles[start : start + CHUNK, None] * _A[None, :] + _B[None, :]
            result = np.minimum(result, (hashed ^ (hashed >> np.uint64(31))).min(axis=0))
        return result


def near_duplicate_count(shard_dir, separator: int) -> dict:
    """How many validation documents have a training document of estimated Jaccard >= THRESHOLD."""
    train = [signature(d) for d in documents(TokenDataset(shard_dir, "train"), separator)]
    val = [signature(d) for d in documents(TokenDataset(shard_dir, "val"), separator)]
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for index, sig in enumerate(train):
        for band in range(BANDS):
            buckets.setdefault((band, sig[band * ROWS : (band + 1) * ROWS].tobytes()), []).append(index)
    matched = 0
    for sig in val:
        candidates = {
            i for band in range(BANDS) for i in buckets.get((band, sig[band * ROWS : (band + 1) * ROWS].tobytes()), [])
        }
        if any(np.mean(train[i] == sig) >= THRESHOLD for i in candidates):
            matched += 1
    return {
        "val_documents": len(val),
        "with_near_duplicate_in_train": matched,
        "train_documents_compared": len(train),
        "threshold": THRESHOLD,
        "capped": len(train) == MAX_DOCUMENTS or len(val) == MAX_DOCUMENTS,
    }
