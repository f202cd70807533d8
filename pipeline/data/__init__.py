"""The data stages and the loader: raw text in, reproducible micro-batches out.

sources.py      what a `data.sources[]` entry names (files, globs, saved and hub datasets, builtin)
partitions.py   the partition plan: units of parallel work that depend on the input alone
readers.py      a streaming document reader for each partition
tokenizer.py    the tokenizer stage: byte-level BPE trained on a per-partition sample, or tokenizer.path's
special_tokens.py  which token plays which role (separator, bos, [MASK], [PAD]), read from the tokenizer
shard.py        the shard stage: one Ray task per partition tokenizes and writes its own shards
shard_index.py  shard writing, completion records and the merge into index.json
shards.py       the shard format (index.json, token files) and its integrity checks
loader.py       memory-mapped shards -> windows -> seeded, resumable micro-batches per rank
masking.py      BERT's MLM corruption and the document ids of packed windows
inspect.py      `pretrain data inspect`
"""
