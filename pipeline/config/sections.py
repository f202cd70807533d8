"""The experiment config: typed sections, YAML loading, dot-path overrides, one-line errors.

This module imports no torch, deepspeed or ray, so a config validates anywhere in milliseconds.
Every field has a description; `pretrain config reference` and the README render them.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false/yes/no/on/off as booleans, which pydantic would take as 1 and 0."""
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "bool_number", "expected a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)"
            )
        return value


def _is_number(annotation: Any) -> bool:
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType, Literal) else (annotation,)
    return any(option in (int, float) or type(option) is int for option in options)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_json(value: Any, key: str, open_ids: set[int]) -> None:
    """DeepSpeed configs are JSON: strings, finite numbers, booleans, null, lists, string-keyed mappings."""
    if isinstance(value, (dict, list)):
        _check(id(value) not in open_ids, f"{key} contains itself (a YAML alias loop); write it out")
        open_ids.add(id(value))
        for item_key, item in value.items() if isinstance(value, dict) else enumerate(value):
            _check(
                isinstance(item_key, str) or isinstance(value, list),
                f"{key} has the non-string key {item_key!r}; quote it",
            )
            _check_json(item, f"{key}.{item_key}", open_ids)
        open_ids.discard(id(value))
        return
    _check(
        value is None or isinstance(value, (str, int)) or isinstance(value, float) and math.isfinite(value),
        f"{key}={_shown(value)} is not a JSON value (string, finite number, boolean, null, list or mapping); quote it",
    )


class RunConfig(Section):
    name: str | None = Field(
        None,
        description="Run name; the run directory is `<workdir>/runs/<name>`. "
        "Default: the config file's stem. Starting a run whose directory holds a "
        "checkpoint resumes it.",
    )
    workdir: str = Field(
        "work",
        description="Directory for the artifact cache, runs and the default MLflow "
        "store. Relative paths are resolved against the current directory.",
    )
    seed: int = Field(1337, ge=0, description="Seed for model init, data order and MLM masking.")


class SourceConfig(Section):
    path: str = Field(
        description="A file, a glob, a directory saved by `datasets.save_to_disk`, "
        "`builtin:python-stdlib` (the running interpreter's standard library sources), or "
        "`hf:NAME` for a Hugging Face hub dataset (needs internet)."
    )
    format: Literal["auto", "text", "jsonl", "parquet", "saved", "hub", "builtin"] = Field(
        "auto", description="How to read `path`; `auto` decides by extension or prefix."
    )
    text_field: str = Field(
        "text", description="Column holding the document text (jsonl, parquet, saved and hub datasets)."
    )
    text_unit: Literal["file", "line", "paragraph"] = Field(
        "file", description="For plain text: one document per file, per line, or per blank-line paragraph."
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Share of training tokens drawn from this source, relative to the other sources' weights.",
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name (hub sources only).")
    split: str = Field("train", description="Dataset split to read (saved and hub sources).")
    validation: Literal["auto", "hash", "tail"] = Field(
        "auto",
        description="How this source's text reaches the validation split. `hash`: data.val_permille of its "
        "documents, by a stable hash of each document's text. `tail`: the last data.val_permille of each file's "
        "bytes, cut at a line boundary (plain text and uncompressed JSONL only), the rule for a corpus of few "
        "documents such as one input.txt. `auto`: `tail` for plain text read one document per file when fewer "
        "than 10 files would fall into validation by hash, `hash` otherwise.",
    )


class DataConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="builtin:python-stdlib")],
        min_length=1,
        description="The corpus: one or more sources, mixed by weight.",
    )
    val_permille: int = Field(
        20,
        ge=0,
        le=500,
        description="Per thousand of the corpus assigned to validation: documents by a stable hash of their "
        "text, or the tail of each file (see data.sources[].validation).",
    )
    shard_tokens: int = Field(16_777_216, gt=0, description="Target number of tokens per shard file.")
    num_workers: int = Field(
        2,
        ge=1,
        description="Partitions read, tokenized and written at once, each by one Ray task on any node of the "
        "cluster (1: in the driver process, without Ray).",
    )
    partition_bytes: int = Field(
        8 << 20,
        ge=1024,
        description="Target input bytes per partition, the unit of parallel work of the tokenizer and shard "
        "stages: files are cut at line boundaries (plain text, uncompressed JSONL) or by Parquet row groups, and "
        "small files are grouped. The plan depends on the input and this value only, never on the workers.",
    )
    max_documents: int | None = Field(
        None,
        gt=0,
        description="Read at most this many documents per source (for quick experiments); None reads everything.",
    )
    verify_checksums: bool = Field(True, description="Check every shard's sha256 against index.json when a run starts.")


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, description="Vocabulary size of the byte-level BPE, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    sample_bytes: int = Field(
        64_000_000, gt=0, description="Train the tokenizer on at most this many bytes of text drawn from the corpus."
    )
    nfc: bool = Field(False, description="Apply Unicode NFC normalization before tokenizing.")

    @model_validator(mode="after")
    def _vocab_covers_bytes(self) -> TokenizerConfig:
        _check(
            self.vocab_size >= 256 + 8,
            f"tokenizer.vocab_size={self.vocab_size} is too small: a byte-level "
            "BPE needs the 256 byte tokens plus the special tokens; use at least 264",
        )
        return self


class ModelSection(Section):
    family: Literal["gpt", "bert"] = Field(
        "gpt", description="`gpt`: decoder-only causal LM; `bert`: encoder with a masked-LM head."
    )
    vocab_size: int | None = Field(
        None, gt=0, description="Embedding rows. Default: tokenizer.vocab_size rounded up to `pad_vocab_multiple`."
    )
    pad_vocab_multiple: int = Field(
        64, ge=1, description="Round the default vocab_size up to a multiple of this, for faster matmuls on GPUs."
    )
    max_seq_len: int = Field(256, gt=0, description="Longest sequence the position embeddings cover.")
    d_model: int = Field(128, gt=0, description="Hidden size.")
    n_layers: int = Field(4, gt=0, description="Number of transformer blocks.")
    n_heads: int = Field(4, gt=0, description="Attention heads; must divide d_model.")
    n_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads for grouped-query attention; None means n_heads; must divide n_heads."
    )
    d_ff: int | None = Field(
        None,
        gt=0,
        description="MLP hidden size. Default: 4*d_model for GELU, "
        "8/3*d_model rounded up to a multiple of 64 for SwiGLU.",
    )
    activation: Literal["gelu", "swiglu"] = Field("gelu", description="MLP activation.")
    gelu_approximate: Literal["tanh", "none"] = Field(
        "tanh", description="GELU variant: `tanh` (GPT-2) or `none`, the exact erf form (BERT)."
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalization layer.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the normalization layers.")
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="`pre`: GPT-2/Llama pre-norm blocks; `post`: original BERT post-norm blocks."
    )
    position: Literal["learned", "sinusoidal", "rope"] = Field("learned", description="Position encoding.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (position=rope only).")
    bias: bool = Field(True, description="Biases in linear and norm layers.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output projection.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, attention and residuals.")
    type_vocab_size: int = Field(0, ge=0, description="BERT token-type (segment) embeddings; 0 for none.")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal weight init.")

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelSection:
        _check(
            self.d_model % self.n_heads == 0, f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
        )
        kv = self.n_kv_heads or self.n_heads
        _check(self.n_heads % kv == 0, f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads}")
        if self.position == "rope":
            _check(
                (self.d_model // self.n_heads) % 2 == 0,
                f"model.position=rope needs an even head "
                f"size, but d_model/n_heads = {self.d_model}/{self.n_heads} is odd",
            )
        _check(
            self.type_vocab_size == 0 or self.family == "bert",
            f"model.type_vocab_size={self.type_vocab_size} only applies to family=bert; set it to 0",
        )
        return self


class TrainConfig(Section):
    seq_len: int | None = Field(None, gt=0, description="Tokens per training sequence. Default: model.max_seq_len.")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences per rank per forward pass. "
        "Give any two of micro_batch_size, grad_accum_steps and "
        "global_batch_size; the third is derived.",
    )
    grad_accum_steps: int | None = Field(None, gt=0, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences per optimizer step over "
        "all ranks = micro_batch_size x grad_accum_steps x data-parallel "
        "size.",
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to train. Give max_steps or max_tokens.")
    max_tokens: int | None = Field(
        None, gt=0, description="Token budget; max_steps is derived from it and the global batch."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup down to min_lr_ratio x lr."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay; norms, biases and embeddings get none.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision (bf16/fp16 keep fp32 master weights)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states on CPU (DeepSpeedCPUAdam); ZeRO stage >= 1."
    )
    offload_params: bool = Field(False, description="Keep parameters on CPU; ZeRO stage 3 only.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    document_masking: bool = Field(
        True,
        description="Attend only within each document packed into a window (GPT: block-causal; BERT: "
        "bidirectional within the document), with positions restarting at each document. Boundaries "
        "come from the separator tokens; on CUDA FlexAttention skips the masked blocks.",
    )
    log_every: int = Field(10, gt=0, description="Log training metrics every N optimizer steps.")
    eval_every: int = Field(100, ge=0, description="Validation loss every N steps; 0 disables.")
    eval_batches: int = Field(8, gt=0, description="Micro-batches per rank in each in-loop validation.")
    checkpoint_every: int = Field(
        500, ge=0, description="Checkpoint every N steps (and always at the end); 0 checkpoints only at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    profile_at_step: int | None = Field(
        None,
        gt=0,
        description="Record a torch profiler trace of "
        "train.profile_steps optimizer steps from this step into "
        "`<run_dir>/profile/` (Chrome trace: open it in Perfetto); None: off.",
    )
    profile_steps: int = Field(3, gt=0, description="Optimizer steps the profiler records.")
    max_bad_steps: int = Field(
        5,
        ge=0,
        description="Steps with a non-finite loss or gradient (their update "
        "is skipped) tolerated within train.bad_step_window steps; one more rolls back "
        "to the last checkpoint and continues with the data after the bad batch.",
    )
    bad_step_window: int = Field(100, gt=0, description="Optimizer steps over which train.max_bad_steps counts.")
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for MFU. Default: looked up for known GPUs; required for MFU on CPU.",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config keys merged over the derived config (a warning names each overridden key).",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_is_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json(value, "train.deepspeed", set())
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        _check(
            self.offload_params is False or self.zero_stage == 3,
            f"train.offload_params=true needs train.zero_stage=3 (got {self.zero_stage})",
        )
        _check(
            self.offload_optimizer is False or self.zero_stage >= 1,
            "train.offload_optimizer=true needs train.zero_stage >= 1",
        )
        return self


class EvalConfig(Section):
    batches: int = Field(32, gt=0, description="Validation micro-batches per rank in the eval stage.")
    prompts: list[str] = Field(
        default_factory=lambda: ["def ", "import "],
        description="GPT: prompts to sample from; BERT: texts in which tokens are masked and filled.",
    )
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per prompt (GPT).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 is greedy (GPT).")
    top_k: int | None = Field(50, gt=0, description="Sample among the k most likely tokens (GPT).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (GPT).")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks to run on the exported model (needs the `eval` extra).",
    )


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log the run to MLflow.")
    uri: str | None = Field(None, description="MLflow tracking URI. Default: a sqlite store `<workdir>/mlflow.db`.")
    experiment: str = Field("pretrain", description="MLflow experiment name.")
    request_timeout_s: float = Field(10.0, gt=0, description="Timeout of one request to a tracking server.")
    max_retries: int = Field(
        1,
        ge=0,
        description="Retries of one request to a tracking server before metrics are kept locally for a later sync.",
    )


class ClusterConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster: None starts an embedded local Ray; `auto` or `HOST:PORT` attaches to a running one.",
    )
    num_workers: int = Field(2, ge=1, description="Training workers (ranks); the data-parallel size.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; otherwise CPU and gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per training worker.")
    max_failures: int = Field(
        0, ge=0, description="Restarts of the training worker group from the latest checkpoint after a worker dies."
    )


SECTIONS: dict[str, type[Section]] = {
    "run": RunConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelSection,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


# The keys `Config._resolve` fills in when they are left unset.
_DERIVABLE = {
    "model": ("vocab_size",),
    "train": ("seq_len", "micro_batch_size", "grad_accum_steps", "global_batch_size", "max_steps"),
}


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and places.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and sharding.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer.")
    model: ModelSection = Field(default_factory=ModelSection, description="Architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization and DeepSpeed.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray and workers.")

    # Dotted keys whose values `_resolve` derived (the user left them unset): `dump_config` writes them
    # back as unset, so a dumped config re-derives them (after a world-size or vocabulary change too).
    _derived: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _resolve(self) -> Config:
        """Fill derived values (vocab size, seq_len, batch triple, steps) and check they agree."""
        m, t = self.model, self.train
        self._derived = {
            f"{section}.{key}"
            for section, keys in _DERIVABLE.items()
            for key in keys
            if getattr(getattr(self, section), key) is None
        }
        if m.vocab_size is None:
            m.vocab_size = math.ceil(self.tokenizer.vocab_size / m.pad_vocab_multiple) * m.pad_vocab_multiple
        _check(
            m.vocab_size >= self.tokenizer.vocab_size,
            f"model.vocab_size={m.vocab_size} is smaller than "
            f"tokenizer.vocab_size={self.tokenizer.vocab_size}; raise it or leave it unset",
        )
        t.seq_len = t.seq_len or m.max_seq_len
        _check(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        self._resolve_batch()
        tokens_per_step = t.global_batch_size * t.seq_len
        _check(
            t.max_tokens is None or t.max_tokens >= tokens_per_step,
            f"train.max_tokens={t.max_tokens} is "
            f"less than one optimizer step ({tokens_per_step} tokens = global batch x seq_len); raise it",
        )
        if t.max_steps is not None and t.max_tokens is not None:
            _check(
                t.max_tokens // tokens_per_step == t.max_steps,
                f"train.max_steps={t.max_steps} and "
                f"train.max_tokens={t.max_tokens} disagree ({tokens_per_step} tokens per step); give one",
            )
        t.max_steps = t.max_steps or max(1, (t.max_tokens or 1000 * tokens_per_step) // tokens_per_step)
        _check(
            t.warmup_steps <= t.max_steps, f"train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}"
        )
        return self

    def _resolve_batch(self) -> None:
        """global = micro x accum x data-parallel size: any two given, the third derived and checked."""
        t, dp = self.train, self.cluster.num_workers
        micro, accum, glob = t.micro_batch_size, t.grad_accum_steps, t.global_batch_size
        if glob is None:
            micro, accum = micro or 8, accum or 1
        elif micro is None or accum is None:
            accum = accum or (1 if micro is None else None)
            known, per_rank_parts = (accum, "grad_accum_steps") if micro is None else (micro, "micro_batch_size")
            _check(
                glob % (known * dp) == 0,
                f"train.global_batch_size={glob} is not divisible by "
                f"train.{per_rank_parts}={known} x cluster.num_workers={dp}; pick a multiple of {known * dp}",
            )
            micro, accum = (glob // (accum * dp), accum) if micro is None else (micro, glob // (micro * dp))
        product = micro * accum * dp
        _check(
            glob is None or glob == product,
            f"train.global_batch_size={glob} must equal "
            f"train.micro_batch_size={micro} x train.grad_accum_steps={accum} x cluster.num_workers={dp} "
            f"= {product}; change one of them or leave one unset",
        )
        t.micro_batch_size, t.grad_accum_steps, t.global_batch_size = micro, accum, product

    def model_args(self) -> dict[str, Any]:
        """The model section as keyword arguments for `models.ModelConfig`."""
        return self.model.model_dump(exclude={"pad_vocab_multiple"})

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.num_workers


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error formatting


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc, value = first["loc"], first.get("input")
    if first["type"] == "invalid_key":  # a key that is no string: show it as written (False, not 0)
        loc = (*loc[:-1], value)
    if first["type"] == "string_unicode" and _model_at(loc) is not None:
        loc = (*loc, value)  # a key that is no valid string
    if first["type"] in ("extra_forbidden", "invalid_key", "string_unicode"):
        return f"{source}: unknown key `{_dotted(loc)}`{_suggest(loc)}; remove it or fix its spelling"
    if loc and loc[-1] == "[key]":  # a key of a free-form mapping such as train.deepspeed
        return f"{source}: {_dotted(loc[:-2])} has the non-string key {_shown(value)}; quote it"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"{source}: {message}"
    shown = "" if value is None or isinstance(value, dict) else f"={_shown(value)}"
    return f"{source}: {_dotted(loc) or 'the top level'}{shown}: {message}"


def _dotted(loc: tuple | list) -> str:
    return ".".join(str(part) if part != "" else "''" for part in loc)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if model else []
    return f" (did you mean `{_dotted((*loc[:-1], close[0]))}`?)" if close else ""


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _child_type(kind: Any, key: Any) -> Any:
    """The declared type one step below `kind`: a model's field, a list's item, a mapping's value."""
    if _is_model(kind):
        field = kind.model_fields.get(key) if isinstance(key, str) else None
        return field.annotation if field is not None else Any
    args = get_args(kind)
    return args[-1] if get_origin(kind) in (list, dict) and args else Any


def _model_at(loc: tuple | list) -> type[BaseModel] | None:
    """The section model at a key path (`("data", "sources", 0)` -> SourceConfig), or None."""
    kind: Any = Config
    for part in loc:
        kind = _child_type(kind, part)
    return kind if _is_model(kind) else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); values are YAML scalars or flow collections."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like section.key=value, e.g. train.lr=3e-4")
    path, value = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or keys[0] not in SECTIONS:
        raise ConfigError(f"override `{text}`: the key must start with one of {', '.join(SECTIONS)}")
    return keys, _safe_load(value, f"override `{text}`: the value is") if value.strip() else None


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set raw[k0][k1]...= value; path segments must name existing fields (list items by index)."""
    node: Any = raw
    kind: Any = Config
    for depth in range(1, len(keys)):
        node, kind = _descend(node, kind, keys[:depth])
    node[_slot(node, kind, keys)] = value


def _descend(node: Any, kind: Any, path: list[str]) -> tuple[Any, Any]:
    """One step down the raw dict, materializing defaults so `data.sources.0.path=x` works."""
    slot, child = _slot(node, kind, path), _child_type(kind, path[-1])
    if _is_model(kind):
        if not (_is_model(child) or get_origin(child) in (list, dict)):
            raise ConfigError(
                f"override: `{_dotted(path)}` is a single value with no keys below it; set it as {_dotted(path)}=VALUE"
            )
        if node.get(slot) is None:
            default = kind.model_fields[slot].get_default(call_default_factory=True)
            node[slot] = to_plain(default) if default is not None else {}
    elif isinstance(node, dict):  # free-form mapping such as train.deepspeed
        node.setdefault(slot, {})
    return node[slot], child


def _slot(node: Any, kind: Any, path: list[str]) -> str | int:
    """The dict key or list index that path[-1] names in node, or a ConfigError saying why none."""
    key = path[-1]
    free = kind is Any and isinstance(node, list)  # a list inside a free-form mapping
    expected = list if get_origin(kind) is list or free else dict
    if not isinstance(node, expected):
        raise ConfigError(
            f"override: cannot set `{_dotted(path)}`: `{_dotted(path[:-1])}` is {_shown(node)}, "
            f"not a {'list' if expected is list else 'mapping'}; fix the file or override it whole"
        )
    if expected is list:
        return _list_index(node, key, path)
    if _is_model(kind) and key not in kind.model_fields:
        close = difflib.get_close_matches(key, list(kind.model_fields), n=1)
        hint = f" (did you mean `{_dotted(path[:-1] + [close[0]])}`?)" if close else ""
        raise ConfigError(f"override: unknown key `{_dotted(path)}`{hint}")
    return key


def to_plain(value: Any) -> Any:
    """Models, paths, tuples and nested containers as plain JSON-able dicts, lists and scalars."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf} (the dot-path override syntax); empty ones stay leaves."""
    if isinstance(tree, (list, tuple)) and tree:
        tree = {str(i): item for i, item in enumerate(tree)}
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not node:
        raise ConfigError(
            f"override: `{_dotted(path)}` indexes an empty list; set the whole list instead, "
            f"e.g. {_dotted(path[:-1])}=[...]"
        )
    if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
        raise ConfigError(f"override: `{_dotted(path)}` needs an index from 0 to {len(node) - 1}")
    return int(key)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate, resolve."""
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    if config.run.name is None:
        config.run.name = Path(path).stem if path is not None else "default"
    return config


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; see configs/ for presets")
    try:
        raw = _safe_load(path.read_text(encoding="utf-8"), f"{path}:")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8; save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    if raw is None:  # an empty file: all defaults
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def _safe_load(text: str, what: str) -> Any:
    """yaml.safe_load; a problem ends in `<what> not valid YAML (line N: what PyYAML found)`."""
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        problem = f"character {char!r} at offset {exc.position}: {exc.reason}"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = (f"line {mark.line + 1}: " if mark else "") + (getattr(exc, "problem", None) or str(exc))
    except RecursionError:
        problem = "nested too deeply"
    raise ConfigError(f"{what} not valid YAML ({problem})")


def dump_config(config: Config) -> str:
    """The config as YAML in section order: every value the user set or left at its default, and the
    derived values as null (loading it derives them again, so it can be edited and rerun), followed by
    a comment listing what they resolve to now."""
    given = config.model_dump(mode="json")
    derived = {key: lookup(given, key) for key in sorted(config._derived)}
    for key in derived:
        section, name = key.split(".")
        given[section][name] = None
    text = yaml.safe_dump(given, sort_keys=False)
    if derived:
        text += "# Derived from the values above (null means derived; set one to pin it):\n"
        text += "".join(f"#   {key}: {value}\n" for key, value in derived.items())
    return text


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """The value at a dot path of nested dicts."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def config_reference_markdown() -> str:
    """A Markdown reference of every section and field, generated from the descriptions."""
    lines: list[str] = []
    for name, section in SECTIONS.items():
        lines += [
            f"### `{name}`: {Config.model_fields[name].description}",
            "",
            "| key | default | description |",
            "| --- | --- | --- |",
        ]
        for field_name, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = [d.model_dump(exclude_defaults=True) if isinstance(d, BaseModel) else d for d in default]
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{name}.{field_name}` | `{shown}` | {field.description} |")
        lines.append("")
    lines += ["### `data.sources[]` items", "", "| key | default | description |", "| --- | --- | --- |"]
    for field_name, field in SourceConfig.model_fields.items():
        default = "required" if field.is_required() else field.get_default()
        lines.append(f"| `{field_name}` | `{default}` | {field.description} |")
    return "\n".join(lines) + "\n"
