"""The eval stage: validation loss, perplexity and bits per byte, MLM accuracy (BERT), generated samples
(GPT) or fill-mask examples (BERT), optional lm-evaluation-harness scores; `eval/report.json` and a
human-readable `eval/summary.txt`.

Validation scores the fixed window set of pipeline/eval/validation.py, the same function and windows
as the training loop's in-loop validation: the whole val split when it has at most eval.max_windows
windows, else that many spread evenly over it. Losses are summed over scored tokens, then divided by
their number, overall and per source (the mixture view: `<source>/loss` metrics when there are several).

Bits per byte. A loss in nats per token depends on the tokenizer; bits per byte does not:

    bits_per_byte = (nats per scored token / ln 2) / (source bytes per scored token)

When the whole split is scored, the bytes per token are the split's, from the shard index: the
figure is the split's code length per byte, up to each source's first token and a tail shorter than
one window. Otherwise, with the trained byte-level tokenizer, they are the scored windows' own: their
target tokens decoded to UTF-8 (special tokens count no bytes), so the figure rests on the text actually
scored. An existing tokenizer (tokenizer.path) need not decode to the source text (WordPiece lowercases
and drops spaces), so then the split's source bytes per token stand for the sample's. The separator closing each
document is a scored token with no source bytes: the end of a document is information too, and every
tokenizer has one per document, so figures compare across tokenizers. Each window restarts its
context, so figures compare at equal train.seq_len.

Bits per byte is reported for GPT only: a causal LM's loss is the log-likelihood of the text (the
chain rule over every token), hence a code length. BERT's MLM loss scores ~15% of tokens, each given
the other 85% of the text on both sides; it is no likelihood of the text and no code length.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import TokenDataset
from pipeline.data.shards import SHARD_TOKENIZER_DIR
from pipeline.data.special_tokens import SpecialTokenIds, special_token_ids
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import DataError
from pipeline.eval.harness import run_lm_eval
from pipeline.eval.validation import Scoring, ValidationSums, WindowSet, scoring_for, validate, window_set
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
        examples = make_examples(
            config, model, tokenizer, special_token_ids(Path(shard_dir) / SHARD_TOKENIZER_DIR, family)
        )
    finally:
        model.train(was_training)
    metrics = {
        "val_loss": validation["loss"],
        "perplexity": validation["perplexity"],
        "bits_per_byte": validation.get("bits_per_byte"),
        "mlm_accuracy": validation.get("mlm_accuracy"),
    }
    if len(validation["sources"]) > 1:  # the mixture view: every source's figures as metrics too
        for name, figures in validation["sources"].items():
            metrics |= {f"{name}/{key}": figures.get(key) for key in ("loss", "perplexity", "bits_per_byte")}
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


def validation_metrics(config: Config, model: nn.Module, tokenizer, dataset: TokenDataset) -> dict:
    """Token-weighted loss over the fixed validation windows (pipeline/eval/validation.py, the in-loop
    validation's too), perplexity, and bits per byte (GPT) or MLM accuracy (BERT), overall and per
    source."""
    windows = window_set(dataset, config.model.family, config.train.seq_len, config.eval.max_windows)
    scoring = scoring_for(config, dataset)
    device = next(model.parameters()).device
    sums = validate(model, dataset, windows, scoring, micro_batch_size=config.train.micro_batch_size, device=device)
    if sums.tokens.sum() == 0:
        raise DataError(
            f"{dataset.shard_dir}: the val split gave no token to score; raise data.val_permille or lower train.seq_len"
        )
    per_source_bytes = None
    # Decoding gives the scored text back only for the trained byte-level BPE.
    own_bytes = config.model.family == "gpt" and config.tokenizer.path is None and not windows.whole_split
    if config.model.family == "gpt":
        per_source_bytes = (
            window_bytes(dataset, windows, scoring, tokenizer) if own_bytes else split_bytes_per_token(dataset)
        )
    names = dataset.source_names()
    result = source_figures(config, sums, None, per_source_bytes) | {
        "windows": len(windows.ids),
        "split_windows": int(windows.source_starts[-1]),
        "whole_split": windows.whole_split,
        "bytes_from": "windows" if own_bytes else "split",
        "seq_len": config.train.seq_len,
        "sources": {name: source_figures(config, sums, i, per_source_bytes) for i, name in enumerate(names)},
    }
    if config.model.family == "bert":
        result["note"] = (
            "loss and accuracy over the masked positions (15%: 80% [MASK], 10% random, 10% kept); no bits per "
            "byte: the MLM loss is no likelihood of the text"
        )
    return result


def source_figures(config: Config, sums: ValidationSums, source: int | None, bytes_per_token) -> dict:
    """Loss, perplexity and bits per byte (GPT) or MLM accuracy (BERT) of one source (None: all)."""
    picked = slice(None) if source is None else source
    tokens = float(sums.tokens[picked].sum())
    loss = sums.loss(source)
    figures = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "scored_tokens": int(tokens)}
    if config.model.family == "bert":
        return figures | {"mlm_accuracy": float(sums.correct[picked].sum()) / tokens if tokens else math.nan}
    scored_bytes, bytes_tokens = bytes_per_token
    ratio = float(scored_bytes[picked].sum()) / float(bytes_tokens[picked].sum())
    return figures | {"bits_per_byte": bits_per_byte(loss, ratio), "bytes_per_token": ratio}


def split_bytes_per_token(dataset: TokenDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per source: the validation split's source bytes and tokens, from the shard index (exact when the
    whole split is scored)."""
    shards = dataset.index["splits"][dataset.split]["shards"]
    n = len(dataset.streams)
    source_bytes = np.array([sum(s["source_bytes"] for s in shards if s["source"] == i) for i in range(n)], float)
    tokens = np.array([sum(s["tokens"] for s in shards if s["source"] == i) for i in range(n)], float)
    return source_bytes, tokens


def window_bytes(dataset: TokenDataset, windows: WindowSet, scoring: Scoring, tokenizer) -> tuple:
    """Per source: the UTF-8 bytes of the scored windows' target tokens, decoded (special tokens carry no
    source bytes), and those tokens: bits per byte from the scored text itself when only a part of the
    split is scored."""
    n = len(dataset.streams)
    source_bytes, tokens = np.zeros(n), np.zeros(n)
    for item in range(len(windows.ids)):
        targets = windows.tokens(dataset, item, scoring.window, scoring.seq_len)[1:]
        source = int(windows.sources[item])
        source_bytes[source] += len(tokenizer.decode(targets.tolist(), skip_special_tokens=True).encode("utf-8"))
        tokens[source] += len(targets)
    return source_bytes, tokens


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    return nats_per_token / math.log(2) / bytes_per_token


# ---------------------------------------------------------------------------------------------
# Samples and fill-mask examples


@torch.no_grad()
def gpt_samples(config: Config, model: nn.Module, tokenizer, special: SpecialTokenIds) -> list[dict]:
    """One continuation per eval prompt, sampled with eval.* settings from one generator seeded by
    run.seed (the same text for the same weights); it stops at the document separator."""
    settings, separator = config.eval, special.separator
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.run.seed)
    samples = []
    for prompt in settings.prompts:
        # Every training document follows a separator (and the bos, if any): so does the prompt.
        prompt_ids = [separator, *special.prefix] + tokenizer.encode(prompt, add_special_tokens=False).ids
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
def fill_mask_examples(config: Config, model: nn.Module, tokenizer, special: SpecialTokenIds) -> list[dict]:
    """Mask ~15% of each eval prompt's tokens (at least one; positions drawn with run.seed) and show
    the originals next to the model's top predictions, and the prompt refilled with its top choices."""
    rng = np.random.default_rng(config.run.seed)
    device = next(model.parameters()).device
    examples = []
    for prompt in config.eval.prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids[: config.model.max_seq_len - 2]
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
    scored = "the whole split" if v["whole_split"] else f"{v['windows']} of the split's {v['split_windows']} windows"
    lines = [
        f"validation: {scored} ({v['seq_len']} tokens each), {v['scored_tokens']:,} tokens scored",
        f"  loss           {v['loss']:.4f} nats/token",
        f"  perplexity     {v['perplexity']:.3f}",
    ]
    if "bits_per_byte" in v:
        source = "the scored windows' own bytes" if v.get("bytes_from") == "windows" else "the split's bytes per token"
        lines.append(f"  bits per byte  {v['bits_per_byte']:.4f} ({v['bytes_per_token']:.3f} bytes/token, {source})")
    if "mlm_accuracy" in v:
        lines.append(f"  MLM accuracy   {v['mlm_accuracy']:.4f} (masked positions)")
    if len(v["sources"]) > 1:
        for name, figures in v["sources"].items():
            shown = ", ".join(f"{key} {figures[key]:.4f}" for key in ("loss", "bits_per_byte") if key in figures)
            lines.append(f"  source {name}: {shown}")
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
