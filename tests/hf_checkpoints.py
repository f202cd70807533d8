"""Tiny Hugging Face model directories made by the tests themselves: transformers' random initialisation
(widened, so that a model loaded from them is told apart from our own init) and tokenizers trained on
local text. Nothing is downloaded.

    make_hf_dir(root, "gpt2" | "llama" | "bert") -> a directory as `save_pretrained` writes it
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SEQ = 64
# Local text to train the tokenizers on: a few stdlib modules.
_TEXT_MODULES = ("argparse", "json/__init__", "pathlib", "textwrap", "string", "functools")


def local_texts() -> list[str]:
    lib = Path(sys.modules["json"].__file__).parents[1]
    return [(lib / f"{name}.py").read_text(encoding="utf-8") for name in _TEXT_MODULES]


def byte_level_tokenizer(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(local_texts(), trainer=trainer)
    return tokenizer


def wordpiece_tokenizer(vocab_size: int = 500) -> Tokenizer:
    """BERT's uncased WordPiece: lowercases, strips accents, drops spaces (no exact round trip)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(local_texts(), trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, kind: str) -> None:
    import transformers

    if kind == "gpt2":
        roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)
    elif kind == "llama":
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    else:
        fast = transformers.BertTokenizerFast(tokenizer_object=tokenizer)
    fast.save_pretrained(directory)


def make_tokenizer(kind: str) -> Tokenizer:
    if kind == "gpt2":
        return byte_level_tokenizer(["<|endoftext|>"])
    if kind == "llama":
        tokenizer = byte_level_tokenizer(["<unk>", "<s>", "</s>"])
        # Llama's tokenizer puts <s> before every text it encodes with special tokens.
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return tokenizer
    return wordpiece_tokenizer()


def hf_config(kind: str, vocab_size: int):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, bos_token_id=0,
            eos_token_id=0,
            embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
        )  # fmt: skip
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def hf_model(kind: str, vocab_size: int, seed: int = 7):
    """transformers' model of `kind`, its weights drawn wider than any init (std 0.2, norms around 1)."""
    import transformers

    torch.manual_seed(seed)
    cls = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}[kind]
    model = getattr(transformers, cls)(hf_config(kind, vocab_size))
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_weight = param.dim() == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith("weight")
            param.copy_(1 + 0.1 * torch.randn_like(param) if is_norm_weight else 0.2 * torch.randn_like(param))
    return model.eval()


def make_hf_dir(root: Path, kind: str, tokenizer: Tokenizer | None = None) -> Path:
    """A save_pretrained directory of a tiny `kind` model with its tokenizer."""
    directory = Path(root) / kind
    tokenizer = tokenizer or make_tokenizer(kind)
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    hf_model(kind, vocab_size).save_pretrained(directory)
    save_tokenizer(tokenizer, directory, kind)
    return directory


def gpt2_124m_description(directory: Path) -> Path:
    """config.json and a 50,257-token tokenizer.json shaped as openai-community/gpt2's (no weights):
    enough for a config to validate and a plan to be made."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    transformers.GPT2Config().save_pretrained(directory)  # its defaults are GPT-2 small's
    vocab = {f"t{i}": i for i in range(50_256)} | {"<|endoftext|>": 50_256}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
