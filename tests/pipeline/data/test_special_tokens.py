"""An existing tokenizer (tokenizer.path): cached under its files' hash, special tokens by role, shards
without the tokenizer's own template, uint32 shards for vocabularies above 65,535."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.config import load_config
from pipeline.data.loader import TokenDataset
from pipeline.data.shard import shard_stage
from pipeline.data.special_tokens import ROLES_FILE, special_token_ids
from pipeline.data.tokenizer import load_tokenizer, tokenizer_stage
from pipeline.errors import DataError
from pipeline.run.artifacts import file_sha256
from tests.hf_checkpoints import make_tokenizer, save_tokenizer

SMALL = ["data.max_documents=20", "data.num_workers=1", "data.val_permille=100", "data.shard_tokens=65536"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for kind in ("gpt2", "llama", "bert"):
        save_tokenizer(make_tokenizer(kind), root / kind, kind)
        dirs[kind] = root / kind
    return dirs


def config_for(tokenizer_path, workdir: Path, *overrides: str):
    return load_config(None, [f"run.workdir={workdir}", f"tokenizer.path={tokenizer_path}", *SMALL, *overrides])


def test_the_tokenizer_is_copied_unchanged_and_keyed_by_its_files(tokenizer_dirs, workdir, tmp_path):
    source = tokenizer_dirs["llama"]
    result = tokenizer_stage(config_for(source, workdir))
    for file in source.iterdir():
        assert file_sha256(result.path / file.name) == file_sha256(file)
    assert json.loads((result.path / ROLES_FILE).read_text()) == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    assert tokenizer_stage(config_for(source, workdir)).reused
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    config_file = edited / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace('"eos_token": "</s>"', '"eos_token": "<unk>"'))
    other = tokenizer_stage(config_for(edited, workdir))
    assert other.fingerprint != result.fingerprint and not other.reused


def test_gpt_documents_get_bos_and_eos_but_not_the_tokenizers_template(tokenizer_dirs, workdir):
    config = config_for(tokenizer_dirs["llama"], workdir)
    shards = shard_stage(config).path
    special = special_token_ids(shards / "tokenizer", "gpt")
    bos, eos = (load_tokenizer(shards / "tokenizer").token_to_id(t) for t in ("<s>", "</s>"))
    assert (special.separator, special.prefix) == (eos, (bos,))
    tokens = np.asarray(TokenDataset(shards, "train").read(0, 0, 4000))
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) > 3
    assert (tokens[ends[:-1] + 1] == bos).all()  # every document opens with one <s>, never two
    assert not ((tokens[:-1] == bos) & (tokens[1:] == bos)).any()


def test_a_tokenizer_json_alone_needs_its_separator_named_and_the_fix_works(tokenizer_dirs, workdir, tmp_path):
    lone = tmp_path / "tokenizer.json"
    shutil.copy(tokenizer_dirs["gpt2"] / "tokenizer.json", lone)
    with pytest.raises(DataError) as info:
        tokenizer_stage(config_for(lone, workdir))
    message = str(info.value)
    assert "names no eos token" in message and "set tokenizer.special_tokens.eos=TOKEN" in message
    assert "<|endoftext|>" in message  # the hint lists its special tokens
    assert not list((workdir / "cache" / "tokenizer").glob("[!.]*"))  # nothing half-written is cached
    shards = shard_stage(config_for(lone, workdir, "tokenizer.special_tokens.eos=<|endoftext|>")).path
    assert special_token_ids(shards / "tokenizer", "gpt").separator == 0


def test_a_role_token_outside_the_vocabulary_is_named(tokenizer_dirs, workdir):
    with pytest.raises(DataError, match=r"the eos token '</eos>' is not in the tokenizer's vocabulary; set tokenizer"):
        tokenizer_stage(config_for(tokenizer_dirs["llama"], workdir, "tokenizer.special_tokens.eos=</eos>"))


def test_wordpiece_for_bert_has_every_role(tokenizer_dirs, workdir):
    config = config_for(tokenizer_dirs["bert"], workdir, "model.family=bert")
    shards = shard_stage(config).path
    special = special_token_ids(shards / "tokenizer", "bert")
    tokenizer = load_tokenizer(shards / "tokenizer")
    assert [tokenizer.id_to_token(i) for i in (special.separator, special.mask, special.pad)] == [
        "[SEP]",
        "[MASK]",
        "[PAD]",
    ]
    tokens = np.asarray(TokenDataset(shards, "train").read(0, 0, 2000))
    assert tokenizer.token_to_id("[CLS]") not in tokens  # BertProcessing's template is not applied


def test_a_vocabulary_above_65535_gives_uint32_shards(workdir, tmp_path):
    path = tmp_path / "big" / "tokenizer.json"
    path.parent.mkdir()
    big_vocabulary(70_000).save(str(path))
    config = config_for(path, workdir, "tokenizer.special_tokens.eos=<eos>")
    assert config.tokenizer.vocab_size == 70_000
    shards = shard_stage(config).path
    index = json.loads((shards / "index.json").read_text())
    assert (index["dtype"], index["vocab_size"]) == ("uint32", 70_000)
    tokens = np.asarray(TokenDataset(shards, "train").read(0, 0, 5000))
    assert tokens.max() > 65_535  # ids that uint16 would have wrapped


def big_vocabulary(size: int) -> Tokenizer:
    """A word-level tokenizer whose common words sit at ids above 65,535."""
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(size - 2 - 200)]
    words += ["def", "return", "self", "import", "the", "if", "for", "in", "not", "None"] + [
        f"x{i}" for i in range(190)
    ]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<eos>"])
    return tokenizer
