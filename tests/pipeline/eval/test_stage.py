"""The eval stage on tiny models: bits per byte on a case with a known answer, the report files,
seeded samples, BERT fill-mask, and lm-evaluation-harness on a local task, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ExportError
from pipeline.eval.export import export_model
from pipeline.eval.harness import run_lm_eval
from pipeline.eval.stage import (
    bits_per_byte,
    evaluate,
    evaluate_run,
    format_summary,
    merge_lm_eval,
    write_report,
)
from pipeline.training.modeling import build_model
from tests.pipeline.eval.test_export import random_model, tiny_config

LM_EVAL_TASKS = Path(__file__).parent / "lm_eval"
TINY_TASK = "pretrain_tiny_mc"
TINY_TASK_DOCUMENTS = sum(1 for line in (LM_EVAL_TASKS / "tiny_mc.jsonl").open() if line.strip())


def test_bits_per_byte_converts_nats_per_token():
    assert bits_per_byte(nats_per_token=2 * math.log(2), bytes_per_token=4.0) == pytest.approx(0.5)


def test_bits_per_byte_of_a_uniform_model_over_the_whole_val_split(tiny_shard_dir, tmp_path):
    """All-zero weights give all-zero logits: every token costs ln(vocab) nats, so bits per byte is
    log2(vocab) x tokens / bytes of the val split, read here straight from index.json."""
    config = tiny_config(
        "gpt2", "train.seq_len=64", "train.micro_batch_size=16", "eval.max_windows=100000", "eval.max_new_tokens=2"
    )
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    report = evaluate(config, model, load_tokenizer(tiny_shard_dir / "tokenizer"), tiny_shard_dir, tmp_path)
    val = json.loads((tiny_shard_dir / "index.json").read_text())["splits"]["val"]
    vocab = config.model.vocab_size
    assert report["metrics"]["val_loss"] == pytest.approx(math.log(vocab))
    assert report["metrics"]["perplexity"] == pytest.approx(vocab)
    assert report["metrics"]["bits_per_byte"] == pytest.approx(math.log2(vocab) * val["tokens"] / val["source_bytes"])
    validation = report["validation"]
    assert validation["whole_split"] and validation["windows"] == validation["split_windows"]
    assert 0.95 < validation["scored_tokens"] / val["tokens"] <= 1  # all but each source's first token and tail


def test_gpt_report_files_and_seeded_samples(tiny_shard_dir, tmp_path):
    config = tiny_config("gpt2", "eval.max_windows=12", "eval.max_new_tokens=12", "eval.prompts=['def ', 'import ']")
    model, tokenizer = random_model(config), load_tokenizer(tiny_shard_dir / "tokenizer")
    report = evaluate(config, model, tokenizer, tiny_shard_dir, tmp_path / "a")
    on_disk = json.loads((tmp_path / "a" / "eval" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(report["metrics"]) == {"val_loss", "perplexity", "bits_per_byte"}
    assert report["validation"]["scored_tokens"] == 12 * 32 and not report["validation"]["whole_split"]
    assert report["metrics"]["bits_per_byte"] > 0  # from the 12 scored windows' own bytes
    assert [s["prompt"] for s in report["samples"]] == ["def ", "import "]
    assert all(0 < s["new_tokens"] <= 12 for s in report["samples"])
    again = evaluate(config, model, tokenizer, tiny_shard_dir, tmp_path / "b")
    assert again["samples"] == report["samples"]  # seeded by run.seed
    summary = (tmp_path / "a" / "eval" / "summary.txt").read_text()
    assert "bits per byte" in summary and "def " + report["samples"][0]["completion"] in summary
    assert sorted(p.name for p in (tmp_path / "a" / "eval").iterdir()) == ["report.json", "summary.txt"]


def test_bert_report_has_mlm_accuracy_and_fill_mask_examples(tiny_bert_shard_dir, tmp_path):
    config = tiny_config("bert", "eval.max_windows=8", "eval.prompts=['import os\nprint(os.getcwd())']")
    report = evaluate(
        config, random_model(config), load_tokenizer(tiny_bert_shard_dir / "tokenizer"), tiny_bert_shard_dir, tmp_path
    )
    assert set(report["metrics"]) == {"val_loss", "perplexity", "mlm_accuracy"}
    assert 0 <= report["metrics"]["mlm_accuracy"] <= 1
    assert 0 < report["validation"]["scored_tokens"] < 2 * 4 * 32  # masked positions only
    (example,) = report["fill_mask"]
    assert example["masked_text"].count("[MASK]") == len(example["predictions"]) >= 1
    assert all(len(p["top"]) == 5 and p["original"] for p in example["predictions"])
    summary = (tmp_path / "eval" / "summary.txt").read_text()
    assert "MLM accuracy" in summary and "fill-mask" in summary and "bits per byte" not in summary


def test_lm_eval_runs_a_local_task_offline(tiny_shard_dir, tmp_path, monkeypatch):
    config = tiny_config("gpt2")
    export_dir = export_model(random_model(config), tiny_shard_dir / "tokenizer", tmp_path / "hf")
    monkeypatch.chdir(tmp_path)  # the task's relative data_files must not depend on the caller's directory
    scores = run_lm_eval(export_dir, [TINY_TASK], include_path=LM_EVAL_TASKS)
    assert 0 <= scores[TINY_TASK]["acc"] <= 1
    assert scores[TINY_TASK]["samples"] == TINY_TASK_DOCUMENTS
    report = {
        "run": "r",
        "family": "gpt",
        "metrics": {},
        "validation": {
            "whole_split": True,
            "sources": {"python-stdlib": {}},
            "windows": 1,
            "split_windows": 1,
            "seq_len": 1,
            "scored_tokens": 1,
            "loss": 1.0,
            "perplexity": math.e,
        },
        "sampling": {"seed": 1},
        "samples": [],
    }
    merge_lm_eval(report, scores)
    assert report["metrics"][f"lm_eval/{TINY_TASK}/acc"] == scores[TINY_TASK]["acc"]
    write_report(tmp_path, report)
    assert f"lm-eval {TINY_TASK}: acc" in format_summary(report)


def test_lm_eval_refuses_a_masked_lm(tiny_bert_shard_dir, tmp_path):
    config = tiny_config("bert")
    export_dir = export_model(random_model(config), tiny_bert_shard_dir / "tokenizer", tmp_path / "hf")
    with pytest.raises(ExportError, match="causal"):
        run_lm_eval(export_dir, [TINY_TASK], include_path=LM_EVAL_TASKS)


@pytest.mark.slow
def test_evaluate_run_on_a_trained_checkpoint_with_lm_eval(trained_run):
    config, run_dir, shard_dir = trained_run("gpt2")
    config = config.model_copy(deep=True)
    config.eval.max_windows, config.eval.max_new_tokens = 16, 8
    report = evaluate_run(
        config, run_dir, shard_dir, shard_dir / "tokenizer", lm_eval_tasks=[TINY_TASK], lm_eval_include=LM_EVAL_TASKS
    )
    assert (report["checkpoint"], report["step"]) == ("step-00000002", 2)
    assert json.loads((run_dir / "eval" / "report.json").read_text())["checkpoint"] == "step-00000002"
    assert 0 <= report["metrics"][f"lm_eval/{TINY_TASK}/acc"] <= 1
    assert report["metrics"]["bits_per_byte"] > 0
    assert not list(run_dir.glob(".lm-eval-*"))  # the temporary export is gone
