"""`pretrain run` from an HF model directory, end to end (real Ray, 2 DeepSpeed workers, sqlite MLflow):
a directory without weights fails at once and writes nothing; after the fix the run goes on, records
the weights it started from, and `pretrain export` gives back the same transformers class and tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.run.artifacts import file_sha256
from tests.hf_checkpoints import hf_model, make_hf_dir
from tests.pipeline.run.test_orchestrate import mlflow_run, pretrain

RUN = [
    "data.max_documents=40",
    "data.val_permille=100",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.micro_batch_size=4",
    "train.seq_len=32",
    "train.eval_every=2",
    "train.log_every=1",
    "eval.max_windows=8",
    "eval.max_new_tokens=4",
    "cluster.num_workers=2",
]
pytestmark = pytest.mark.slow


def test_a_run_from_a_directory_without_weights_fails_first_then_starts_from_them(tmp_path):
    model_dir = make_hf_dir(tmp_path / "hf", "llama")
    weights = model_dir / "model.safetensors"
    kept = tmp_path / "model.safetensors"
    shutil.move(weights, kept)
    workdir, config_file = tmp_path / "work", tmp_path / "continued.yaml"
    config_file.write_text(f"model:\n  init_from: {model_dir}\n")
    args = ["run", str(config_file), f"run.workdir={workdir}", *RUN]

    failed = pretrain(*args)
    assert failed.returncode != 0
    line = failed.stderr.strip().splitlines()[-1]
    assert f"model.init_from={model_dir}: no weights" in line and "save_pretrained" in line
    run_dir = workdir / "runs" / "continued"
    assert not (run_dir / "config.yaml").exists() and not (workdir / "cache").exists()

    hf_model("llama", json.loads((model_dir / "config.json").read_text())["vocab_size"]).save_pretrained(model_dir)
    assert file_sha256(weights) == file_sha256(kept)  # the fix the message gives: save_pretrained into it
    done = pretrain(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"from the weights in {model_dir}" in done.stdout
    record = json.loads((run_dir / "init_from.json").read_text())
    assert record["sha256"] == file_sha256(weights)
    assert f"sha256 {record['sha256']}" in (run_dir / "config.yaml").read_text()
    _, run = mlflow_run(workdir, run_dir)
    assert run.data.params["init_from.sha256"] == record["sha256"]
    assert run.data.params["model.init_from"] == str(model_dir)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["validation"]["bytes_from"] == "split"  # an existing tokenizer need not decode to the text

    exported = pretrain("export", str(run_dir), str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
