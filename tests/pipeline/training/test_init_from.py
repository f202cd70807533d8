"""Continued pretraining from Hugging Face weights on real DeepSpeed (2 CPU ranks, gloo): GPT-2, Llama (GQA,
untied) and BERT (WordPiece), each at ZeRO 1 and ZeRO 3, loaded, trained, resumed and exported; and a
fresh model on a vocabulary above 65,535 (uint32 shards).

Phase 1 trains one step at lr 1e-12, so the checkpoint still holds the loaded weights: its export must
give transformers' logits of the original model, which proves the load at both stages and the export's
round trip. Phase 2 resumes the same runs with a real learning rate for three more steps: the export
then gives the trained model's logits and no longer the original's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import dump_config, load_config
from pipeline.data.loader import TokenDataset
from pipeline.data.shard import shard_stage
from pipeline.eval.export import export_hf, load_checkpoint_model
from pipeline.training.checkpoint import latest_tag, read_trainer_state
from pipeline.training.modeling import build_model
from pipeline.training.pretrained import load_pretrained
from tests.hf_checkpoints import make_hf_dir
from tests.pipeline.data.test_special_tokens import big_vocabulary
from tests.pipeline.training.test_train import losses, torchrun

KINDS = ("gpt2", "llama", "bert")
DATA = ["data.max_documents=40", "data.num_workers=1", "data.val_permille=100", "data.verify_checksums=false"]
RUN = [
    "run.seed=3",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "tracking.enabled=false",
    "cluster.num_workers=2",
    "eval.max_windows=8",
]
FIRST, SECOND = ["train.max_steps=1", "train.lr=1e-12"], ["train.max_steps=4", "train.lr=1e-2"]
BIG = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "train.lr=1e-2"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def write_config(run_dir: Path, overrides: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, overrides)))


def train(runs: dict[str, tuple[Path, Path]], tmp: Path) -> None:
    """Every run in one torchrun launch of test_train.py's entry: {name: (run_dir, shard_dir)}."""
    script = str(Path(__file__).with_name("test_train.py"))
    process = torchrun(2, [script, *(f"{run_dir}={shards}" for run_dir, shards in runs.values())], tmp)
    output, _ = process.communicate(timeout=800)
    assert process.returncode == 0, output[-6000:]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """{"dirs": {kind: HF dir}, "runs": {name: (run_dir, shard_dir)}, "phase1": {name: export dir}}
    after both phases."""
    root = tmp_path_factory.mktemp("continued")
    dirs = {kind: make_hf_dir(root / "hf", kind) for kind in KINDS}
    big = root / "big" / "tokenizer.json"
    big.parent.mkdir()
    big_vocabulary(70_000).save(str(big))
    data = {kind: [f"model.init_from={dirs[kind]}", *DATA] for kind in KINDS}
    data["big"] = [f"tokenizer.path={big}", "tokenizer.special_tokens.eos=<eos>", *DATA, *BIG]
    shards = {
        name: shard_stage(load_config(None, [f"run.workdir={root / 'work'}", *o])).path for name, o in data.items()
    }
    overrides = {f"{kind}-zero{z}": [*data[kind], *RUN, f"train.zero_stage={z}"] for kind in KINDS for z in (1, 3)}
    overrides["big"] = [*data["big"], *RUN, "train.zero_stage=1"]
    runs = {name: (root / "runs" / name, shards[name.split("-")[0]]) for name in overrides}
    for name, (run_dir, _) in runs.items():
        write_config(run_dir, [*overrides[name], *FIRST])
    train(runs, root / "tmp")
    phase1 = {name: export(*runs[name], root / "export1" / name) for name in runs if name != "big"}
    for name, (run_dir, _) in runs.items():
        write_config(run_dir, [*overrides[name], *SECOND])
    train(runs, root / "tmp")
    return {"dirs": dirs, "runs": runs, "phase1": phase1}


def export(run_dir: Path, shards: Path, out_dir: Path) -> Path:
    return export_hf(load_config(run_dir / "config.yaml"), run_dir, out_dir, tokenizer_dir=shards / "tokenizer")


def auto_model(directory: Path):
    import transformers

    config = json.loads((directory / "config.json").read_text())
    auto = transformers.AutoModelForMaskedLM if config["model_type"] == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(directory).eval()


def ids_for(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_logits_equal_transformers(continued, kind):
    """Straight after loading (no DeepSpeed), in fp32."""
    directory = continued["dirs"][kind]
    config = load_config(None, [f"model.init_from={directory}"])
    ours = build_model(config)
    load_pretrained(ours, directory)
    ids = ids_for(config.model.vocab_size)
    assert_close(ours.eval()(ids).logits, auto_model(directory)(input_ids=ids).logits)


@pytest.mark.parametrize("name", [f"{kind}-zero{z}" for kind in KINDS for z in (1, 3)])
def test_training_starts_from_the_weights_at_both_zero_stages(continued, name):
    kind = name.split("-")[0]
    exported = auto_model(continued["phase1"][name])
    original = auto_model(continued["dirs"][kind])
    assert type(exported) is type(original)
    ids = ids_for(original.config.vocab_size)
    assert_close(exported(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    for file in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer, unchanged
        assert (continued["phase1"][name] / file).read_bytes() == (continued["dirs"][kind] / file).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_sees_the_same_first_loss_as_zero1(continued, kind):
    runs = continued["runs"]
    first1, first3 = losses(runs[f"{kind}-zero1"][0])[1], losses(runs[f"{kind}-zero3"][0])[1]
    assert first3 == pytest.approx(first1, rel=1e-4)


@pytest.mark.parametrize("name", [f"{kind}-zero{z}" for kind in KINDS for z in (1, 3)])
def test_a_resumed_run_trains_on_and_exports_its_trained_weights(continued, name, tmp_path):
    run_dir, shards = continued["runs"][name]
    assert read_trainer_state(run_dir / "checkpoints" / latest_tag(run_dir))["step"] == 4
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    config = load_config(run_dir / "config.yaml")
    model, _ = load_checkpoint_model(config, run_dir)
    exported = auto_model(export(run_dir, shards, tmp_path / "hf"))
    original = auto_model(continued["dirs"][name.split("-")[0]])
    ids = ids_for(config.model.vocab_size)
    assert_close(exported(input_ids=ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert (exported(input_ids=ids).logits - original(input_ids=ids).logits).abs().max() > 1e-2


def test_a_vocabulary_above_65535_trains(continued):
    run_dir, shards = continued["runs"]["big"]
    assert json.loads((shards / "index.json").read_text())["dtype"] == "uint32"
    assert TokenDataset(shards, "train").vocab_size == 70_000
    trained = losses(run_dir)
    assert sorted(trained) == [1, 2, 3, 4] and all(loss == loss for loss in trained.values())
    assert trained[4] < trained[1]
