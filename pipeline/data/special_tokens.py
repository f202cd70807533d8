"""Which token plays which role: the document separator, GPT's BOS, BERT's [SEP], [MASK] and [PAD].

The tokenizer stage resolves the roles once, from the tokenizer's own files (special_tokens_map.json,
then tokenizer_config.json, as transformers reads them) overridden by tokenizer.special_tokens, checks
that the family's roles are all there and in the vocabulary, and writes them to ROLES_FILE in the
tokenizer directory. The shard writer, the loader, validation and the eval stage read the ids from
there, so no code assumes a token's spelling (`<|endoftext|>`, `</s>` and `[SEP]` all work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.errors import DataError
from pipeline.run.artifacts import atomic_write_json

ROLES_FILE = "special_token_roles.json"
ROLES = ("bos", "eos", "pad", "cls", "sep", "mask", "unk")
# What each family needs, and what for (the error says it).
REQUIRED_ROLES = {
    "gpt": {"eos": "appended after every document"},
    "bert": {"sep": "appended after every document", "mask": "hides the masked tokens", "pad": "pads batches"},
}
SEPARATOR_ROLE = {"gpt": "eos", "bert": "sep"}
# The files transformers reads the roles from, most specific first.
ROLE_SOURCES = ("special_tokens_map.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids the shard writer, the loader and the model need; None where the family has no such token."""

    separator: int
    prefix: tuple[int, ...]  # put before every document: GPT's bos when it differs from the separator
    all: tuple[int, ...]  # never masked, never decoded as text
    pad: int | None
    mask: int | None


def declared_roles(directory: Path) -> dict[str, str]:
    """The roles the tokenizer's transformers files declare: {role: token}."""
    roles: dict[str, str] = {}
    for name in reversed(ROLE_SOURCES):  # the most specific file last, so it wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not readable JSON ({exc}); fix or delete it") from None
        for role in ROLES:
            value = data.get(f"{role}_token") if isinstance(data, dict) else None
            token = value.get("content") if isinstance(value, dict) else value
            if isinstance(token, str):
                roles[role] = token
    return roles


def resolve_roles(tokenizer: Tokenizer, declared: dict, overrides: dict, family: str, source: str) -> dict[str, str]:
    """{role: token} from the declared roles and tokenizer.special_tokens; a DataError naming the key that
    fixes a missing role or a token not in the vocabulary."""
    roles = {**declared, **overrides}
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    hint = f" (its special tokens: {', '.join(specials[:8])})" if specials else ""
    for role, use in REQUIRED_ROLES[family].items():
        if role not in roles:
            raise DataError(
                f"{source}: the tokenizer names no {role} token, which model.family={family} needs ({use}); "
                f"set tokenizer.special_tokens.{role}=TOKEN{hint}"
            )
    for role, token in roles.items():
        if tokenizer.token_to_id(token) is None:
            raise DataError(
                f"{source}: the {role} token {token!r} is not in the tokenizer's vocabulary; set "
                f"tokenizer.special_tokens.{role} to one of its tokens{hint}"
            )
    return roles


def write_roles(directory: Path, roles: dict[str, str]) -> None:
    atomic_write_json(directory / ROLES_FILE, roles)


def special_token_ids(directory: str | Path, family: str) -> SpecialTokenIds:
    """The ids of a tokenizer (or shard tokenizer) directory's roles for family."""
    directory = Path(directory)
    path = directory / ROLES_FILE
    if not path.is_file():
        raise DataError(f"{directory}: no {ROLES_FILE}; rebuild it with `pretrain tokenizer CONFIG`")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    roles = json.loads(path.read_text(encoding="utf-8"))
    missing = [role for role in REQUIRED_ROLES[family] if role not in roles]
    if missing:
        raise DataError(
            f"{directory}: the tokenizer has no {' or '.join(missing)} token for model.family={family}: it was "
            "built for another family; rebuild it with `pretrain tokenizer CONFIG`"
        )
    ids = {role: tokenizer.token_to_id(token) for role, token in roles.items()}
    separator = ids[SEPARATOR_ROLE[family]]
    bos = ids.get("bos") if family == "gpt" else None
    special = {t_id for t_id, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return SpecialTokenIds(
        separator=separator,
        prefix=(bos,) if bos is not None and bos != separator else (),
        all=tuple(sorted(special | set(ids.values()))),
        pad=ids.get("pad"),
        mask=ids.get("mask"),
    )


def bert_masking_ids(directory: str | Path) -> dict:
    """The BatchLoader arguments BERT's masking needs: the [MASK] id and the ids never to mask."""
    special = special_token_ids(directory, "bert")
    return {"mask_token_id": special.mask, "special_token_ids": special.all}
