"""The train stage on real DeepSpeed, torchrun and Ray Train: 2 CPU ranks, gloo, fp32, a tiny GPT.

Most runs share one torchrun launch (`torchrun ... tests/pipeline/training/test_train.py --shards DIR RUN_DIR...`
runs `train_worker` once per run directory in the same process group), because starting torchrun,
DeepSpeed and Ray costs far more than training the tiny model.

The golden loss file tests/pipeline/golden/gpt_tiny_losses.json holds the per-step losses of the
`zero0` run (TINY on the `tiny_shard_dir` fixture). A deliberate change of the model, its init, the
data pipeline or the loop changes them; regenerate the file with

    PRETRAIN_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/pipeline/training/test_train.py -k golden

and say why in the commit message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import dump_config, load_config
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError
from pipeline.run.rundir import REQUEST_FILE, TRAIN_RESULT_FILE
from pipeline.tracking.journal import read_metrics
from pipeline.tracking.names import METRIC_TRAIN_LOSS, METRIC_VAL_LOSS
from pipeline.training import checkpoint
from pipeline.training.meter import peak_flops_per_device
from pipeline.training.requests import CHECKPOINT, CHECKPOINT_AND_STOP, CheckpointRequests

REPO = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).parent / "golden" / "gpt_tiny_losses.json"
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node"]

TINY = [
    "run.seed=1234",
    "model.family=gpt",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "tokenizer.vocab_size=512",
    "train.micro_batch_size=8",
    "train.grad_accum_steps=1",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.eval_every=5",
    "eval.max_windows=16",
    "train.checkpoint_every=0",
    "train.zero_stage=0",
    "tracking.enabled=false",
    "cluster.num_workers=2",
    "data.verify_checksums=false",
]
LONG = ["train.max_steps=60", "train.zero_stage=2", "train.eval_every=0"]
RUNS = {  # name -> overrides of TINY, all trained in one torchrun launch, in this order
    "zero0": [],
    "zero1": ["train.zero_stage=1"],
    "zero2": ["train.zero_stage=2"],
    "accum": ["train.micro_batch_size=4", "train.grad_accum_steps=2"],
    "recompute": ["train.activation_checkpointing=true"],
    "offload": ["train.zero_stage=2", "train.offload_optimizer=true"],
    "long": LONG,
    "bert": ["model.family=bert", "model.norm_position=post", "train.zero_stage=2"],  # on tiny_bert_shard_dir
    "bert_accum": [  # on tiny_bert_shard_dir too
        "model.family=bert",
        "model.norm_position=post",
        "train.zero_stage=2",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
    ],
    # torch.compile (inductor on the CPU), document masking on as by default.
    "compiled0": ["train.compile=true"],
    "compiled2": ["train.zero_stage=2", "train.compile=true"],
    "profiled": ["train.profile_at_step=3", "train.profile_steps=2"],
    # Last: zero.Init swaps F.linear for the rest of the process (see pipeline.training.engine.create_model).
    "zero3": ["train.zero_stage=3"],
}
pytestmark = pytest.mark.timeout(900)


# ---------------------------------------------------------------------------------------------
# Helpers


def make_run_dir(path: Path, overrides: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(dump_config(load_config(None, [*TINY, *overrides])))
    return path


def torchrun(nproc: int, args: list[str], tmp: Path, **popen) -> subprocess.Popen:
    """torchrun with its per-run /tmp/torchelastic_* files under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*TORCHRUN, str(nproc), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def train_with_torchrun(run_dir: Path, shards: Path, tmp: Path, nproc: int = 2) -> str:
    process = torchrun(nproc, ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(shards)], tmp)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def losses(run_dir: Path, name: str = METRIC_TRAIN_LOSS) -> dict[int, float]:
    """{step: value}; a step logged again after a resume keeps its last value."""
    return {r["step"]: r["metrics"][name] for r in read_metrics(run_dir / "metrics.jsonl") if name in r["metrics"]}


def result(run_dir: Path) -> dict:
    """What the torchrun entry recorded: {"figures": {...}, "stopped": bool, "steps": int, ...}."""
    return json.loads((run_dir / TRAIN_RESULT_FILE).read_text())


def figures(run_dir: Path) -> dict:
    return result(run_dir)["figures"]


def assert_close(actual: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert actual.keys() == expected.keys()
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=rel, abs=0), f"step {step}"


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, (
            f"training ended before the test could interrupt it:\n{process.stdout.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, "timed out waiting for training to progress"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def trained(tiny_shard_dir, tiny_bert_shard_dir, tmp_path_factory) -> dict[str, Path]:
    """Every run of RUNS, trained in one torchrun launch: {name: run_dir}."""
    root = tmp_path_factory.mktemp("train-runs")
    run_dirs = {name: make_run_dir(root / name, overrides) for name, overrides in RUNS.items()}
    shards = {name: tiny_bert_shard_dir if name.startswith("bert") else tiny_shard_dir for name in RUNS}
    process = torchrun(2, [__file__, *(f"{run_dirs[name]}={shards[name]}" for name in RUNS)], root / "tmp")
    output, _ = process.communicate(timeout=800)
    assert process.returncode == 0, output[-6000:]
    return run_dirs


# ---------------------------------------------------------------------------------------------
# Correctness on 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero0(trained, stage):
    reference = losses(trained["zero0"])
    assert len(reference) == 10
    assert_close(losses(trained[f"zero{stage}"]), reference, rel=1e-5)
    assert_close(losses(trained[f"zero{stage}"], METRIC_VAL_LOSS), losses(trained["zero0"], METRIC_VAL_LOSS), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero0", "zero3", "bert"])
def test_in_loop_validation_at_2_ranks_equals_the_eval_stage_on_one_process(trained, tiny_shard_dir, name, request):
    """The same checkpoint, the same validation loss: the loop's (2 ranks, micro-batch 8, DeepSpeed) and
    the eval stage's (1 process, another micro-batch, the consolidated fp32 model)."""
    from pipeline.data.loader import TokenDataset
    from pipeline.eval.export import load_checkpoint_model
    from pipeline.eval.stage import validation_metrics

    run_dir = trained[name]
    shards = request.getfixturevalue("tiny_bert_shard_dir") if name == "bert" else tiny_shard_dir
    config = load_config(run_dir / "config.yaml", ["train.micro_batch_size=3", "cluster.num_workers=1"])
    model, _ = load_checkpoint_model(config, run_dir)
    stage = validation_metrics(config, model, load_tokenizer(shards / "tokenizer"), TokenDataset(shards, "val"))
    assert stage["windows"] == 16
    assert stage["loss"] == pytest.approx(losses(run_dir, METRIC_VAL_LOSS)[10], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("accumulated, reference", [("accum", "zero0"), ("bert_accum", "bert")])
def test_grad_accumulation_4x2_matches_micro_batch_8(trained, accumulated, reference):
    """Equal losses at every step mean equal updates: the loss is weighted by target tokens over the
    whole step, which for BERT (masked counts differ between micro-batches) is not a mean of means."""
    assert_close(losses(trained[accumulated]), losses(trained[reference]), rel=1e-5)


@pytest.mark.slow
def test_activation_checkpointing_and_optimizer_offload_match(trained):
    assert_close(losses(trained["recompute"]), losses(trained["zero0"]), rel=1e-6)
    assert_close(losses(trained["offload"]), losses(trained["zero2"]), rel=1e-5)  # DeepSpeedCPUAdam


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_compiled_training_matches_eager_and_really_compiles(trained, stage):
    """train.compile gives eager mode's losses within 1e-3 relative per step (inductor fuses and
    reorders fp32 arithmetic, so not bit for bit), and dynamo compiled the model without a graph
    break (a break would silently run parts of the model eagerly)."""
    assert_close(losses(trained[f"compiled{stage}"]), losses(trained[f"zero{stage}"]), rel=1e-3)
    compiled = figures(trained[f"compiled{stage}"])
    assert compiled["compiled_graphs"] >= 1 and compiled["graph_breaks"] == 0


@pytest.mark.slow
def test_profiler_traces_the_asked_steps_with_labelled_phases(trained):
    """train.profile_at_step=3, profile_steps=2: one Chrome trace per rank and rank 0's operator table,
    the forward/backward/optimizer phases labelled; profiling changes no loss."""
    profile = trained["profiled"] / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        "top-ops-step3.txt",
        "trace-rank00000-step3.json",
        "trace-rank00001-step3.json",
    ]
    events = json.loads((profile / "trace-rank00000-step3.json").read_text())["traceEvents"]
    labels = {event.get("name") for event in events}
    assert {"forward", "backward", "optimizer"} <= labels
    assert sum(event.get("name") == "optimizer" for event in events) == 2  # two steps recorded
    assert losses(trained["profiled"]) == losses(trained["zero0"])


@pytest.mark.slow
def test_golden_losses(trained):
    """The zero0 run against the committed per-step losses (see the module docstring to regenerate)."""
    actual = losses(trained["zero0"])
    if os.environ.get("PRETRAIN_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(
            json.dumps(
                {
                    "about": "per-step train loss of tests/pipeline/training/test_train.py TINY on the tiny_shard_dir "
                    "fixture, "
                    "2 ranks, fp32, ZeRO 0; regenerate: PRETRAIN_REGENERATE_GOLDEN=1 pytest "
                    "tests/pipeline/training/test_train.py -k golden",
                    "config_overrides": TINY,
                    "losses": {str(k): v for k, v in sorted(actual.items())},
                },
                indent=1,
            )
            + "\n"
        )
    golden = {int(step): loss for step, loss in json.loads(GOLDEN.read_text())["losses"].items()}
    # 1e-5, not bit equality: other CPUs' fp32 kernels round differently.
    assert_close(actual, golden, rel=1e-5)


@pytest.mark.slow
def test_bert_trains_on_masked_tokens(trained):
    curve = losses(trained["bert"])
    assert len(curve) == 10 and curve[10] < curve[1]
    assert figures(trained["bert"])["val_loss"] > 0


@pytest.mark.slow
def test_figures_metrics_and_checkpoint_layout(trained):
    run_dir = trained["zero2"]
    recorded = figures(run_dir)
    assert recorded["steps"] == 10 and recorded["world_size"] == 2 and not result(run_dir)["stopped"]
    assert recorded["tokens_seen"] == 10 * 16 * 32
    assert recorded["val_loss"] == losses(run_dir, METRIC_VAL_LOSS)[10]
    assert recorded["tokens_per_s"] > 0 and recorded["mfu"] is None  # no train.peak_flops on CPU
    record = read_metrics(run_dir / "metrics.jsonl")[0]
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_seen",
        "train/step_time_s",
        "train/rss_gib",
        "train/rss_peak_gib",
    } <= record["metrics"].keys()
    tag_dir = checkpoint.checkpoints_dir(run_dir) / checkpoint.latest_tag(run_dir)
    assert tag_dir.name == "step-00000010" and (tag_dir / checkpoint.COMPLETE).is_file()
    assert {p.name for p in (tag_dir / "rng").iterdir()} == {"rank-00000.pt", "rank-00001.pt"}
    state = checkpoint.read_trainer_state(tag_dir)
    assert state["step"] == 10 and state["loader"] == {"epoch": 0, "samples_consumed": 160}


@pytest.mark.slow
def test_consolidated_fp32_state_dict_from_any_stage(trained):
    from pipeline.training.engine import consolidated_state_dict

    def state(name):
        run_dir = trained[name]
        return consolidated_state_dict(checkpoint.checkpoints_dir(run_dir), checkpoint.latest_tag(run_dir))

    reference = state("zero0")
    assert reference["lm_head.weight"].dtype == torch.float32
    for name in ("zero1", "zero2", "zero3"):
        other = state(name)
        assert other.keys() == reference.keys(), name
        for key, tensor in reference.items():
            torch.testing.assert_close(other[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.slow
def test_sigkill_resume_and_sigterm_stop_match_uninterrupted(trained, tiny_shard_dir, tmp_path):
    """SIGKILL a run after its first checkpoints, resume it, stop the resumed run with SIGTERM to one
    worker (checkpoint and clean exit), resume again to the end: every loss equals the uninterrupted
    run's, bit for bit."""
    run_dir = make_run_dir(tmp_path / "run", [*LONG, "train.checkpoint_every=4"])
    args = ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(tiny_shard_dir)]

    killed = torchrun(2, args, tmp_path / "tmp")
    wait_for(lambda: (checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST).exists(), killed)
    agent = psutil.Process(killed.pid)
    for process in [*agent.children(recursive=True), agent]:  # workers run in sessions of their own
        process.kill()
    killed.communicate()
    first_leg = max(losses(run_dir))
    assert first_leg < 60

    stopped = torchrun(2, args, tmp_path / "tmp")
    wait_for(lambda: max(losses(run_dir)) > first_leg + 3, stopped)
    workers = [p for p in psutil.Process(stopped.pid).children() if "pipeline.training" in " ".join(p.cmdline())]
    signalled_at = max(losses(run_dir))
    workers[0].send_signal(signal.SIGTERM)  # one worker: the ranks agree on the request at the next step
    output, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == 0, output[-4000:]
    stop_landed = result(run_dir)["stopped"] and figures(run_dir)["steps"] < 60
    assert stop_landed, f"first leg ended at step {first_leg}, SIGTERM at step {signalled_at}: {figures(run_dir)}"
    assert "resumed from" in output

    train_with_torchrun(run_dir, tiny_shard_dir, tmp_path / "tmp")
    assert figures(run_dir)["steps"] == 60 and figures(run_dir)["resumed_from_step"] > first_leg - 4
    assert losses(run_dir) == losses(trained["long"])
    complete = [p for p in checkpoint.checkpoints_dir(run_dir).glob("step-*") if (p / checkpoint.COMPLETE).exists()]
    assert len(complete) == 2  # train.keep_checkpoints


@pytest.mark.slow
def test_resume_on_fewer_ranks_maps_data_position(trained, tiny_shard_dir, tmp_path):
    """A ZeRO-3 checkpoint of 2 ranks continues on 1 rank (through DeepSpeed's universal format) from
    the same global sample."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["zero3"], run_dir)
    make_run_dir(run_dir, ["train.zero_stage=3", "train.max_steps=14", "cluster.num_workers=1"])
    output = train_with_torchrun(run_dir, tiny_shard_dir, tmp_path / "tmp", nproc=1)
    assert "resume: cluster.num_workers changed from 2 to 1" in output
    assert "resume: train.max_steps changed from 10 to 14" in output
    state = checkpoint.read_trainer_state(checkpoint.checkpoints_dir(run_dir) / "step-00000014")
    assert state["loader"]["samples_consumed"] == 10 * 16 + 4 * 8 and state["world_size"] == 1
    assert figures(run_dir)["resumed_from_step"] == 10
    assert losses(run_dir)[11] == pytest.approx(losses(run_dir)[10], rel=0.01)  # continues, no jump
    assert not (checkpoint.checkpoints_dir(run_dir) / "universal").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_model(trained):
    config = load_config(None, [*TINY, "train.zero_stage=2", "model.d_model=64"])
    with pytest.raises(ConfigError, match=r"^model\.d_model: .* trained with 32, the config now says 64"):
        checkpoint.resume_point(trained["zero2"], config)
    allowed = load_config(None, [*TINY, "train.zero_stage=2", "train.max_steps=20", "train.eval_every=3"])
    _, state, changes = checkpoint.resume_point(trained["zero2"], allowed)
    assert changes == {"train.max_steps": (10, 20), "train.eval_every": (5, 3)} and state["step"] == 10


@pytest.mark.slow
def test_ray_train_run_matches_torchrun(trained, tiny_shard_dir, tmp_path):
    from pipeline.training.ray_train import run_training

    config = load_config(None, TINY)
    make_run_dir(tmp_path / "run", [])
    trained_here = run_training(config, tiny_shard_dir, tmp_path / "run")
    assert trained_here.steps == 10 and trained_here.figures["world_size"] == 2 and not trained_here.stopped
    assert losses(tmp_path / "run") == losses(trained["zero0"])


# ---------------------------------------------------------------------------------------------
# Fast unit tests


def test_peak_flops_configured_or_unknown_on_cpu():
    assert peak_flops_per_device(5e11, torch.device("cpu")) == 5e11
    assert peak_flops_per_device(None, torch.device("cpu")) is None


def test_signals_become_checkpoint_requests(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    requests = CheckpointRequests(tmp_path, rank=0)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert requests.flag == CHECKPOINT
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.flag == CHECKPOINT_AND_STOP
    finally:
        requests.close()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_driver_forwards_signals_as_a_request_file(tmp_path):
    from pipeline.training.requests import forward_signals

    with forward_signals(tmp_path):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert (tmp_path / REQUEST_FILE).read_text() == "checkpoint"
        os.kill(os.getpid(), signal.SIGTERM)
        assert (tmp_path / REQUEST_FILE).read_text() == "stop"


# ---------------------------------------------------------------------------------------------
# Under torchrun: several runs in one process group


def _train_runs(argv: list[str]) -> None:
    """`torchrun --nproc_per_node N tests/pipeline/training/test_train.py RUN_DIR=SHARD_DIR...`"""
    import torch.distributed as dist

    from pipeline.training.engine import init_distributed
    from pipeline.training.torchrun import train_and_record

    init_distributed()
    for pair in argv:
        run_dir, shard_dir = pair.split("=")
        train_and_record(Path(run_dir), Path(shard_dir))
    sys.stdout.flush()
    dist.destroy_process_group()
    os._exit(0)  # see pipeline.training.torchrun.main


if __name__ == "__main__":
    _train_runs(sys.argv[1:])
