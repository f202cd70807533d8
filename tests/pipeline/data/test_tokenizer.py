import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.data.readers import source_texts
from pipeline.data.special_tokens import declared_roles, resolve_roles, special_token_ids, write_roles
from pipeline.data.tokenizer import (
    FAMILY_SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_stage,
    train_tokenizer,
)
from pipeline.errors import ConfigError, DataError

SMALL = ["data.max_documents=30", "tokenizer.vocab_size=400", "tokenizer.sample_bytes=200000"]


@pytest.fixture(scope="module")
def stdlib_texts():
    return list(source_texts(0, load_config(None, ["data.max_documents=20"]).data))


@pytest.fixture(scope="module")
def gpt_tokenizer(stdlib_texts):
    return train_tokenizer(stdlib_texts, family="gpt", vocab_size=400, min_frequency=2)


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "  leading and trailing  ",
    "def f(x):\n\treturn x ** 2\r\n",
    "naïve café — “quotes” ✓",
    "日本語のテキスト",
    "emoji 🎉👩‍👩‍👧 and ZWJ",
    "\x00\x01 control \x7f",
    "replacement \ufffd char",
    "<|endoftext|> looks special",
    "[MASK] [SEP] [CLS]",
    "e\u0301 (not NFC)",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_examples(gpt_tokenizer, text):
    ids = gpt_tokenizer.encode(text).ids
    assert gpt_tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_round_trip_any_text(gpt_tokenizer, text):
    assert gpt_tokenizer.decode(gpt_tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_take_the_first_ids(stdlib_texts, tmp_path):
    bert = train_tokenizer(stdlib_texts, family="bert", vocab_size=300, min_frequency=2)
    assert [bert.token_to_id(t) for t in FAMILY_SPECIAL_TOKENS["bert"]] == [0, 1, 2, 3, 4]
    save_tokenizer(bert, "bert", tmp_path)
    write_roles(tmp_path, resolve_roles(bert, declared_roles(tmp_path), {}, "bert", "test"))
    ids = special_token_ids(tmp_path, "bert")
    assert (ids.pad, ids.separator, ids.mask, ids.all, ids.prefix) == (0, 2, 3, (0, 1, 2, 3, 4), ())
    with pytest.raises(DataError, match=r"no eos token for model.family=gpt"):
        special_token_ids(tmp_path, "gpt")


def test_byte_alphabet_is_always_in_the_vocabulary():
    tokenizer = train_tokenizer(["aaaa bbbb"] * 10, family="gpt", vocab_size=300, min_frequency=2)
    assert tokenizer.get_vocab_size() >= 257
    text = "\u00ff\u4e00 never seen"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_nfc_normalizes(stdlib_texts):
    tokenizer = train_tokenizer(stdlib_texts[:5], family="gpt", vocab_size=300, min_frequency=2, nfc=True)
    decomposed = "e\u0301"
    assert tokenizer.decode(tokenizer.encode(decomposed).ids) == unicodedata.normalize("NFC", decomposed)


def test_stage_caches_and_loads_in_transformers(workdir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(None, [f"run.workdir={workdir}", *SMALL])
    first = tokenizer_stage(config)
    assert not first.reused and first.manifest["figures"]["sample_bytes"] <= 200000
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(first.manifest["outputs"])
    second = tokenizer_stage(config)
    assert second.reused and second.path == first.path
    assert (
        tokenizer_stage(load_config(None, [f"run.workdir={workdir}", *SMALL, "tokenizer.vocab_size=300"])).fingerprint
        != first.fingerprint
    )

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = load_tokenizer(first.path)
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = loader.from_pretrained(str(first.path))
        text = "import os\nprint('héllo')  # done\n"
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids and hf.decode(ids) == text
        assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0


def test_bert_tokenizer_loads_in_transformers(workdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    result = tokenizer_stage(load_config(None, [f"run.workdir={workdir}", *SMALL, "model.family=bert"]))
    hf = AutoTokenizer.from_pretrained(str(result.path))
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.unk_token_id) == (0, 1, 2, 3, 4)
    assert hf.convert_ids_to_tokens(hf("a [MASK] b")["input_ids"]).count("[MASK]") == 1


def test_vocab_smaller_than_bytes_plus_specials_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size=260 is too small.*use at least 264"):
        load_config(None, ["tokenizer.vocab_size=260"])


def test_load_tokenizer_from_a_directory_without_one(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json; build it with `pretrain tokenizer CONFIG`"):
        load_tokenizer(tmp_path)


def test_one_huge_line_trains_the_tokenizer_and_gets_a_validation_tail(workdir, tmp_path):
    """A corpus of one document larger than the tokenizer's sample: its first bytes are sampled (the BPE
    trainer gets them in pieces), and the tail rule cuts the line by bytes, after a space."""
    from pipeline.data.shard import shard_stage
    from pipeline.data.shards import read_index

    words = " ".join(f"word{i % 977}" for i in range(400_000))  # one line, about 3.6 MB
    (tmp_path / "one.txt").write_text(words)
    config = load_config(
        None,
        [
            f"run.workdir={workdir}",
            f"data.sources=[{{path: {tmp_path / 'one.txt'}}}]",
            "data.num_workers=1",
            "tokenizer.vocab_size=600",
            "tokenizer.sample_bytes=1000000",
        ],
    )
    result = tokenizer_stage(config)
    assert 950_000 <= result.manifest["figures"]["sample_bytes"] <= 1_000_000  # its first bytes, not nothing
    splits = read_index(shard_stage(config).path)["splits"]
    assert splits["train"]["documents"] == 1 and splits["val"]["documents"] == 1
    assert splits["val"]["source_bytes"] == pytest.approx(len(words) * 0.02, rel=0.01)
