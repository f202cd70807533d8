"""The config's sections: one typed pydantic model per YAML section, every field described.

Unknown keys are rejected (`extra="forbid"`), booleans are never taken as numbers, and a validator's
message names the key and the fix. The root model that holds the sections is in schema.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section, _check_json, check
from pipeline.config.corpus import DataConfig


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


class TokenizerConfig(Section):
    path: str | None = Field(
        None,
        description="An existing Hugging Face tokenizer instead of training one: a directory holding "
        "tokenizer.json (and its tokenizer_config.json / special_tokens_map.json) or a tokenizer.json file. "
        "Default: model.init_from's tokenizer when that is set, else a byte-level BPE trained on the corpus.",
    )
    special_tokens: dict[Literal["bos", "eos", "pad", "cls", "sep", "mask"], str] = Field(
        default_factory=dict,
        description="Special tokens by role, over what tokenizer.path's files say, e.g. `{eos: </s>}`. GPT "
        "appends `eos` after every document (and puts `bos` before it when the two differ); BERT needs `sep`, "
        "`mask` and `pad`.",
    )
    vocab_size: int = Field(
        8192,
        description="Vocabulary size of the byte-level BPE, special tokens included; with tokenizer.path it is "
        "read from the tokenizer.",
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    sample_bytes: int = Field(
        64_000_000, gt=0, description="Train the tokenizer on at most this many bytes of text drawn from the corpus."
    )
    nfc: bool = Field(False, description="Apply Unicode NFC normalization before tokenizing.")

    @model_validator(mode="after")
    def _vocab_covers_bytes(self) -> TokenizerConfig:
        check(
            self.path is not None or self.vocab_size >= 256 + 8,
            f"tokenizer.vocab_size={self.vocab_size} is too small: a byte-level "
            "BPE needs the 256 byte tokens plus the special tokens; use at least 264",
        )
        return self


class ModelConfig(Section):
    init_from: str | None = Field(
        None,
        description="Start from Hugging Face weights: a directory holding config.json and model.safetensors "
        "(or sharded safetensors, or pytorch_model.bin) of a GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM. "
        "The architecture keys below come from its config.json (one set to another value is an error), its "
        "tokenizer is used unless tokenizer.path is set, and training starts at step 0 with a fresh optimizer.",
    )
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
    def _shapes_agree(self) -> ModelConfig:
        check(
            self.d_model % self.n_heads == 0, f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
        )
        kv = self.n_kv_heads or self.n_heads
        check(self.n_heads % kv == 0, f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads}")
        if self.position == "rope":
            check(
                (self.d_model // self.n_heads) % 2 == 0,
                f"model.position=rope needs an even head "
                f"size, but d_model/n_heads = {self.d_model}/{self.n_heads} is odd",
            )
        check(
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
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="Decay after warmup down to min_lr_ratio x lr; `wsd` (warmup-stable-decay) holds the peak "
        "and decays over the last train.decay_fraction of the steps.",
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="WSD: the share of train.max_steps, at the end, over which the rate decays."
    )
    decay_shape: Literal["linear", "1-sqrt"] = Field("linear", description="WSD: the shape of the decay.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="`adamw`, or `muon` (DeepSpeed's MuonWithAuxAdam): Muon for the 2-D hidden matrices, AdamW "
        "with lr, betas and eps for embeddings, the output head, norms and biases.",
    )
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate (train.lr is the AdamW half's).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum.")
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
    checkpoint_every: int = Field(
        500, ge=0, description="Checkpoint every N steps (and always at the end); 0 checkpoints only at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    async_checkpoint: bool = Field(
        True,
        description="Periodic checkpoints cost training only a copy of the state in host memory: the files "
        "are written in the background and sealed (`latest` moved) once every rank's are durable. The last "
        "checkpoint and one on a stop are written synchronously.",
    )
    verify_checkpoints: bool = Field(
        True,
        description="Check every file's sha256 against the checkpoint's checksums.json before a resume or a "
        "rollback (sizes are always checked); a damaged checkpoint is skipped for the newest intact one.",
    )
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
        check(
            self.offload_params is False or self.zero_stage == 3,
            f"train.offload_params=true needs train.zero_stage=3 (got {self.zero_stage})",
        )
        check(
            self.offload_optimizer is False or self.zero_stage >= 1,
            "train.offload_optimizer=true needs train.zero_stage >= 1",
        )
        check(
            self.optimizer != "muon" or self.grad_clip == 0,
            f"train.optimizer=muon with train.grad_clip={self.grad_clip}: DeepSpeed's ZeRO 1-2 Muon clips the "
            "orthogonalized updates, not the gradients, which shrinks every Muon step; set train.grad_clip=0",
        )
        check(
            self.optimizer != "muon" or not self.offload_optimizer,
            "train.optimizer=muon does not run on an offloaded optimizer; set train.offload_optimizer=false",
        )
        check(
            self.precision == "fp32" or self.zero_stage >= 1,
            f"train.precision={self.precision} accumulates and reduces gradients in fp32, which DeepSpeed does "
            "from ZeRO stage 1 on; set train.zero_stage=1 (on one GPU it partitions nothing and costs nothing)",
        )
        return self


class EvalConfig(Section):
    max_windows: int = Field(
        256,
        gt=0,
        description="Validation windows scored, by in-loop validation and the eval stage alike: the whole "
        "validation split when it has at most this many, else this many spread evenly over it (a fixed, seeded "
        "draw). The set depends on the split and this value only, not on the world size or the micro-batch.",
    )
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
    parent_run_id: str | None = Field(
        None,
        description="MLflow run id of the sweep this run is a trial of: the run is shown nested under it. Set by "
        "`pretrain sweep` and `pretrain submit --sweep`.",
    )
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
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}
