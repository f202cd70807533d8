"""The eval stage: validation loss, perplexity and bits per byte, MLM accuracy (BERT), generated samples
(GPT) or fill-mask examples (BERT), optional lm-evaluation-harness scores; `eval/report.json` and a
human-readable `eval/summary.txt`.

Validation batches are the first `eval.batches` micro-batches (train.micro_batch_size windows of
train.seq_len tokens) of the val split in order, read by the same loader as the training loop's
in-loop validation (windows at stride seq_len, BERT masks seeded by (run.seed, position)), so every
checkpoint is scored on the same tokens. When eval.batches asks for more than the split holds, every
window is scored once. Losses are summed over scored tokens, then divided by their number.

Bits per byte. A loss in nats per token depends on the tokenizer; bits per byte does not:

    bits_per_byte = (nats per scored token / ln 2) / (val source bytes / val tokens)

The denominator is the val split's bytes of UTF-8 source text per token, from the shard index.
Exactness: when every window is scored (`bits_per_byte_exact` in the report), the scored tokens are
the whole split except each source's first token and a tail shorter than one window, and the figure
is the split's code length per byte up to those. Otherwise (fewer batches) it assumes the scored
part has the split's average bytes per token: an estimate, with its coverage in the report. The
separator closing each document is a scored token with no source bytes: the end of a document is
information too, and every tokenizer has one per document, so figures compare across tokenizers.
Each window restarts its context, so figures compare at equal train.seq_len.

Bits per byte is reported for GPT only: a causal LM's loss is the log-likelihood of the text (the
chain rule over every token), hence a code length. BERT's MLM loss scores ~15% of tokens, each given
the other 85% of the text on both sides; it is no likelihood of the text and no code length.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import BatchLoader, TokenDataset
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.tokenizer import bert_masking_ids, load_tokenizer, special_token_ids
from pipeline.errors import DataError
from pipeline.eval.harness import run_lm_eval
from pipeline.run.artifacts import atomic_write_json, atomic_write_text
from pipeline.run.rundir import EVAL_DIR, REPORT_FILE, SUMMARY_FILE
from pipeline.training.checkpoint import checkpoints_dir, read_trainer_state

FILL_MASK_TOP_K = 5
FILL_MASK_FRACTION = 0.15  # of each prompt's tokens, as in MLM training


def evaluate(config: Config, model: nn.Module, tokenizer, shard_dir: str | Path, out_dir: str | Path) -> dict:
    """Evaluate an in-memory model (a `tokenizers.Tokenizer` for its vocabulary) on the shards' val
    split; writes `<out_dir>/eval/report.json` and `summary.txt` and returns the report."""
    report = evaluation_report(config, model, tokenizer, shard_dir)
    write_report(out_dir, report)
    return report


def evaluate_run(
    config: Config,
    run_dir: str | Path,
    shard_dir: str | Path,
    tokenizer_dir: str | Path,
    checkpoint_tag: str | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_include: str | Path | None = None,
    lm_eval_limit: int | float | None = None,
) -> dict:
    """Evaluate a run's latest (or `checkpoint_tag`) checkpoint into `<run_dir>/eval/`; with lm-eval
    tasks (default eval.lm_eval_tasks) the model is also exported to a temporary HF directory and
    scored by lm-evaluation-harness. Returns the report."""
    from pipeline.eval.export import export_model, load_checkpoint_model

    tasks = list(config.eval.lm_eval_tasks if lm_eval_tasks is None else lm_eval_tasks)
    model, tag = load_checkpoint_model(config, run_dir, checkpoint_tag)
    if torch.cuda.is_available():
        model.cuda()
    trained = read_trainer_state(checkpoints_dir(Path(run_dir)) / tag)
    report = {
        "checkpoint": tag,
        "step": trained["step"],
        "tokens_seen": trained["tokens_seen"],
        **evaluation_report(config, model, load_tokenizer(tokenizer_dir), shard_dir),
    }
    if tasks:
        with tempfile.TemporaryDirectory(prefix=".lm-eval-", dir=run_dir) as scratch:
            export_dir = export_model(model, tokenizer_dir, Path(scratch) / "hf", generation=config.eval)
            scores = run_lm_eval(export_dir, tasks, include_path=lm_eval_include, limit=lm_eval_limit)
        merge_lm_eval(report, scores)
    write_report(run_dir, report)
    return report


def evaluation_report(config: Config, model: nn.Module, tokenizer, shard_dir: str | Path) -> dict:
    """Compute everything the report holds (nothing written)."""
    family = config.model.family
    was_training = model.training
    model.eval()
    try:
        validation = validation_metrics(config, model, tokenizer, TokenDataset(shard_dir, "val"))
        make_examples = gpt_samples if family == "gpt" else fill_mask_examples
        examples = make_examples(config, model, tokenizer)
    finally:
        model.train(was_training)
    metrics = {
        "val_loss": validation["loss"],
        "perplexity": validation["perplexity"],
        "bits_per_byte": validation.get("bits_per_byte"),
        "mlm_accuracy": validation.get("mlm_accuracy"),
    }
    report = {
        "run": config.run.name,
        "family": family,
        "shard_dir": str(Path(shard_dir).resolve()),
        # Only numbers: the orchestrator logs `metrics` as MLflow metrics.
        "metrics": {name: value for name, value in metrics.items() if value is not None},
        "validation": validation,
    }
    if family == "bert":
        return report | {"fill_mask": examples}
    sampling = config.eval.model_dump(include={"temperature", "top_k", "top_p", "max_new_tokens"})
    return report | {"sampling": sampling | {"seed": config.run.seed}, "samples": examples}


# ---------------------------------------------------------------------------------------------
# Validation


def validation_loader(config: Config, dataset: TokenDataset, tokenizer, micro_batch_size: int) -> BatchLoader:
    """The val split in order, as the training loop's in-loop validation reads it on one rank."""
    family = config.model.family
    masking = bert_masking_ids(tokenizer) if family == "bert" else {}
    separator = dataset.index["separator_id"] if config.train.document_masking else None
    return BatchLoader(
        dataset,
        family=family,
        seq_len=config.train.seq_len,
        micro_batch_size=micro_batch_size,
        rank=0,
        world_size=1,
        seed=config.run.seed,
        shuffle=False,
        separator_id=separator,
        **masking,
    )


def validation_batches(config: Config, dataset: TokenDataset, tokenizer) -> tuple[list[int], int, Iterator[dict]]:
    """(micro-batch sizes, windows in the split, the micro-batches): the split's first eval.batches
    micro-batches or, when that asks for more than the split holds, every window of it once (those
    that do not fill a last micro-batch come one by one)."""
    micro = config.train.micro_batch_size
    loader = validation_loader(config, dataset, tokenizer, micro)
    windows = loader.samples_per_epoch
    sizes = [micro] * min(config.eval.batches, windows // micro)
    if config.eval.batches * micro >= windows:
        sizes += [1] * (windows % micro)

    def batches() -> Iterator[dict]:
        tail = None
        for size in sizes:
            if size == micro:
                yield loader.next_batch()
                continue
            if tail is None:  # a loader of single windows, from where the full micro-batches ended
                tail = validation_loader(config, dataset, tokenizer, 1)
                tail.load_state_dict({"epoch": 0, "samples_consumed": loader.samples_consumed})
            yield tail.next_batch()

    return sizes, windows, batches()


@torch.no_grad()
def validation_metrics(config: Config, model: nn.Module, tokenizer, dataset: TokenDataset) -> dict:
    """Token-weighted loss over the validation micro-batches, perplexity, and bits per byte (GPT) or
    MLM accuracy (BERT)."""
    sizes, windows, batches = validation_batches(config, dataset, tokenizer)
    device = next(model.parameters()).device
    nats, scored, correct = 0.0, 0, 0
    for batch in batches:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        nats += F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        scored += int(keep.sum())
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    if scored == 0:
        raise DataError(
            f"{dataset.shard_dir}: the val split gave no token to score; raise data.val_permille or lower train.seq_len"
        )
    loss = nats / scored
    result = {
        "batches": len(sizes),
        "windows": sum(sizes),
        "split_windows": windows,
        "seq_len": config.train.seq_len,
        "scored_tokens": scored,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }
    if config.model.family == "gpt":
        return result | bits_per_byte_figures(loss, scored, dataset, whole_split=sum(sizes) == windows)
    return result | {
        "mlm_accuracy": correct / scored,
        "note": "loss and accuracy over the masked positions (15%: 80% [MASK], 10% random, "
        "10% kept); no bits per byte: the MLM loss is no likelihood of the text",
    }


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    return nats_per_token / math.log(2) / bytes_per_token


def bits_per_byte_figures(loss: float, scored_tokens: int, dataset: TokenDataset, whole_split: bool) -> dict:
    """Bits per byte and what it rests on (see the module docstring for when it is exact)."""
    bytes_per_token = dataset.source_bytes / dataset.total_tokens
    return {
        "bits_per_byte": bits_per_byte(loss, bytes_per_token),
        "bytes_per_token": bytes_per_token,
        "split_tokens": dataset.total_tokens,
        "split_source_bytes": dataset.source_bytes,
        "coverage": scored_tokens / dataset.total_tokens,
        # Every window scored: all tokens but each source's first and its tail shorter than a window.
        "bits_per_byte_exact": whole_split,
    }


# ---------------------------------------------------------------------------------------------
# Samples and fill-mask examples


@torch.no_grad()
def gpt_samples(config: Config, model: nn.Module, tokenizer) -> list[dict]:
    """One continuation per eval prompt, sampled with eval.* settings from one generator seeded by
    run.seed (the same text for the same weights); it stops at the document separator."""
    settings, separator = config.eval, special_token_ids(tokenizer, "gpt").separator
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.run.seed)
    samples = []
    for prompt in settings.prompts:
        # Every training document follows a separator: leading with one makes the prompt a document's start.
        prompt_ids = [separator] + tokenizer.encode(prompt).ids
        ids = model.generate(
            torch.tensor([prompt_ids], device=device),
            settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            eos_token_id=separator,
            generator=generator,
        )[0, len(prompt_ids) :].tolist()
        ended = separator in ids
        ids = ids[: ids.index(separator)] if ended else ids
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(ids), "new_tokens": len(ids), "ended_document": ended}
        )
    return samples


@torch.no_grad()
def fill_mask_examples(config: Config, model: nn.Module, tokenizer) -> list[dict]:
    """Mask ~15% of each eval prompt's tokens (at least one; positions drawn with run.seed) and show
    the originals next to the model's top predictions, and the prompt refilled with its top choices."""
    special = special_token_ids(tokenizer, "bert")
    rng = np.random.default_rng(config.run.seed)
    device = next(model.parameters()).device
    examples = []
    for prompt in config.eval.prompts:
        ids = tokenizer.encode(prompt).ids[: config.model.max_seq_len - 2]
        if not ids:
            continue
        positions = np.sort(rng.choice(len(ids), size=max(1, round(FILL_MASK_FRACTION * len(ids))), replace=False))
        masked = [special.mask if i in set(positions.tolist()) else token for i, token in enumerate(ids)]
        # Training text is documents each closed by [SEP]: framing the prompt so reads it as one document.
        inputs = torch.tensor([[special.separator, *masked, special.separator]], device=device)
        top = model(inputs).logits[0, 1:-1].float().softmax(-1)[positions].topk(FILL_MASK_TOP_K)
        filled, predictions = list(ids), []
        for position, probabilities, candidates in zip(positions.tolist(), top.values.tolist(), top.indices.tolist()):
            filled[position] = candidates[0]
            predictions.append(
                {
                    "position": position,
                    "original": tokenizer.decode([ids[position]]),
                    "correct": candidates[0] == ids[position],
                    "top": [
                        {"token": tokenizer.decode([c]), "probability": p} for c, p in zip(candidates, probabilities)
                    ],
                }
            )
        examples.append(
            {
                "prompt": prompt,
                "masked_text": tokenizer.decode(masked, skip_special_tokens=False),
                "filled_text": tokenizer.decode(filled),
                "predictions": predictions,
            }
        )
    return examples


def merge_lm_eval(report: dict, scores: dict[str, dict[str, float]]) -> None:
    """Scores under report["lm_eval"], and as `lm_eval/<task>/<metric>` metrics for MLflow."""
    report["lm_eval"] = scores
    for task, values in scores.items():
        report["metrics"].update(
            {f"lm_eval/{task}/{metric}": value for metric, value in values.items() if metric != "samples"}
        )


# ---------------------------------------------------------------------------------------------
# Report files


def write_report(out_dir: str | Path, report: dict) -> Path:
    """`<out_dir>/eval/report.json` and `summary.txt`, each replaced atomically; returns the eval dir."""
    directory = Path(out_dir) / EVAL_DIR
    atomic_write_json(directory / REPORT_FILE, report)
    atomic_write_text(directory / SUMMARY_FILE, format_summary(report))
    return directory


def format_summary(report: dict) -> str:
    checkpoint = ""
    if report.get("checkpoint"):
        checkpoint = f", checkpoint {report['checkpoint']}, {report['tokens_seen']:,} tokens seen"
    lines = [f"Evaluation of run {report['run']} ({report['family']}{checkpoint})", ""]
    lines += _validation_lines(report["validation"])
    for task, values in report.get("lm_eval", {}).items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items() if name != "samples")
        lines.append(f"lm-eval {task}: {shown} ({values.get('samples', '?')} documents)")
    lines.append("")
    if "samples" in report:
        lines += [f"samples ({', '.join(f'{k} {v}' for k, v in report['sampling'].items())}):", ""]
        lines += _sample_lines(report["samples"])
    else:
        lines += _fill_mask_lines(report["fill_mask"])
    return "\n".join(lines) + "\n"


def _validation_lines(v: dict) -> list[str]:
    lines = [
        f"validation: {v['windows']} of the split's {v['split_windows']} windows of {v['seq_len']} tokens "
        f"({v['batches']} micro-batches), {v['scored_tokens']:,} tokens scored",
        f"  loss           {v['loss']:.4f} nats/token",
        f"  perplexity     {v['perplexity']:.3f}",
    ]
    if "bits_per_byte" in v:
        exact = "the whole split" if v["bits_per_byte_exact"] else f"{v['coverage']:.1%} of the split, an estimate"
        lines.append(
            f"  bits per byte  {v['bits_per_byte']:.4f} ({v['bytes_per_token']:.3f} source bytes/token; scored {exact})"
        )
    if "mlm_accuracy" in v:
        lines.append(f"  MLM accuracy   {v['mlm_accuracy']:.4f} (masked positions)")
    return lines


def _sample_lines(samples: list[dict]) -> list[str]:
    lines = []
    for sample in samples:
        end = " <end of document>" if sample["ended_document"] else ""
        lines += [
            f"--- sample from prompt {sample['prompt']!r} ({sample['new_tokens']} new tokens)",
            sample["prompt"] + sample["completion"] + end,
            "",
        ]
    return lines


def _fill_mask_lines(examples: list[dict]) -> list[str]:
    lines = []
    for example in examples:
        lines += [f"--- fill-mask: {example['masked_text']!r}", f"    filled:  {example['filled_text']!r}"]
        for p in example["predictions"]:
            top = ", ".join(f"{t['token']!r} {t['probability']:.2f}" for t in p["top"])
            lines.append(f"    position {p['position']}: original {p['original']!r}, predicted {top}")
        lines.append("")
    return lines
