"""Hugging Face export: a run's checkpoint (or a model in memory) -> a directory that transformers loads
offline with `AutoModelForCausalLM` / `AutoModelForMaskedLM` and `AutoTokenizer`.

    <out_dir>/
        config.json, model.safetensors   GPT2LMHeadModel | LlamaForCausalLM | BertForMaskedLM (fp32)
        generation_config.json           causal LMs only: special tokens and eval.* sampling settings
        tokenizer.json, ...              the run's tokenizer files, copied unchanged

The weight mapping itself lives in models/hf.py. The directory is written next to out_dir under a
temporary name and renamed into place when complete, so a crash never leaves a half export that
loads. Models with no Hugging Face equivalent (sinusoidal positions, pre-norm BERT, ...) are refused
before any work, with the config key to change.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from models.hf import hf_arch, to_hf
from pipeline.config import Config, EvalConfig
from pipeline.data.special_tokens import ROLES_FILE
from pipeline.errors import ExportError
from pipeline.run.artifacts import MANIFEST
from pipeline.run.rundir import RunState
from pipeline.training.checkpoint import checkpoints_dir, resolve_checkpoint
from pipeline.training.modeling import build_model, model_config


def check_exportable(config: Config) -> str:
    """The HF architecture ("gpt2" | "llama" | "bert") of config's model, or ExportError naming the key."""
    return _exportable_arch(model_config(config))


def _exportable_arch(model_cfg) -> str:
    try:
        return hf_arch(model_cfg)
    except ValueError as exc:
        raise ExportError(f"cannot export to Hugging Face format: {exc}") from None


def export_hf(
    config: Config,
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint_tag: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Export a run's latest (or `checkpoint_tag`) checkpoint to out_dir; returns out_dir.

    The tokenizer comes from `tokenizer_dir`, by default the tokenizer stage's output recorded in
    `<run_dir>/run.json`."""
    check_exportable(config)
    model, _ = load_checkpoint_model(config, run_dir, checkpoint_tag)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else run_tokenizer_dir(run_dir)
    return export_model(model, tokenizer_dir, out_dir, generation=config.eval)


def run_tokenizer_dir(run_dir: str | Path) -> Path:
    """The tokenizer directory a run was trained with, from its run.json."""
    return RunState.load(Path(run_dir)).output("tokenizer")


def load_checkpoint_model(
    config: Config, run_dir: str | Path, checkpoint_tag: str | None = None
) -> tuple[nn.Module, str]:
    """(the model consolidated in fp32 from a checkpoint of any ZeRO stage, in eval mode; its tag)."""
    from pipeline.training.engine import consolidated_state_dict  # imports deepspeed: only when a run is loaded

    tag = resolve_checkpoint(Path(run_dir), checkpoint_tag).name
    state = consolidated_state_dict(checkpoints_dir(Path(run_dir)), tag)
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        mismatch = str(exc).splitlines()[-1].strip()  # e.g. "size mismatch for lm_head.weight: ..."
        raise ExportError(
            f"{checkpoints_dir(Path(run_dir)) / tag}: the checkpoint does not fit the config's "
            f"model section ({mismatch}); pass the run's own {run_dir}/config.yaml"
        ) from None
    return model.eval(), tag


def export_model(
    model: nn.Module, tokenizer_dir: str | Path, out_dir: str | Path, generation: EvalConfig | None = None
) -> Path:
    """Export an in-memory GPT or BERT with the tokenizer in tokenizer_dir to out_dir (replacing any
    previous export there, atomically); returns out_dir. `generation` sets the sampling defaults of
    generation_config.json (causal LMs)."""
    _exportable_arch(model.config)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_export(model, Path(tokenizer_dir), temp, generation)
        _replace_dir(temp, out_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def _write_export(model: nn.Module, tokenizer_dir: Path, directory: Path, generation: EvalConfig | None) -> None:
    copy_tokenizer_files(tokenizer_dir, directory)
    tokens = hf_special_token_ids(directory)
    hf_model = to_hf(model)  # fp32 on the CPU whatever the model's dtype and device: weights are copied
    hf_model.config.update(tokens)
    if hf_model.can_generate():
        hf_model.generation_config = generation_config(tokens, generation)
    hf_model.save_pretrained(directory)


def copy_tokenizer_files(tokenizer_dir: Path, directory: Path) -> None:
    """Every file of the tokenizer directory, unchanged, except the stage manifest (which describes the
    cache entry) and our record of the special tokens' roles (transformers reads its own files)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(
            f"{tokenizer_dir}: no tokenizer.json; pass the tokenizer stage's output "
            "directory (`pretrain run CONFIG --only tokenizer` builds it)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for path in tokenizer_dir.iterdir():
        if path.is_file() and path.name not in (MANIFEST, ROLES_FILE):
            shutil.copy2(path, directory / path.name)


def hf_special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids as AutoTokenizer reads them. A GPT tokenizer has one document separator,
    `<|endoftext|>`, appended after every training document: it is both the eos and, as in GPT-2, the
    bos (what precedes a document's first token), so bos falls back to eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # BERT's [CLS]/[SEP] play bos/eos for HF code that asks for them.
    bos = bos if bos is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def generation_config(tokens: dict[str, int | None], generation: EvalConfig | None):
    """HF generation defaults: our special tokens (pad falls back to eos: GPT has no padding token) and,
    when given, the eval section's sampling settings, so `model.generate(ids)` samples as `pretrain eval`."""
    from transformers import GenerationConfig

    pad = tokens["pad_token_id"] if tokens["pad_token_id"] is not None else tokens["eos_token_id"]
    settings = dict(bos_token_id=tokens["bos_token_id"], eos_token_id=tokens["eos_token_id"], pad_token_id=pad)
    if generation is not None:
        sampling = generation.temperature > 0
        settings.update(max_new_tokens=generation.max_new_tokens, do_sample=sampling)
        if sampling:
            settings.update(
                temperature=generation.temperature,
                top_k=generation.top_k or 0,
                top_p=generation.top_p if generation.top_p is not None else 1.0,
            )
    return GenerationConfig(**settings)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is first renamed aside, so readers see old or new."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
