"""Periodic concerns own their cadence: the checkpoint-request check syncs with the host only at the log
cadence and at checkpoint steps, never once per step (on a GPU, a per-step `.item()` stalls the queue)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.training import callbacks
from pipeline.training.callbacks import Checkpointer
from pipeline.training.requests import CheckpointRequests
from pipeline.training.run import StepOutcome


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_requests_are_agreed_only_at_the_log_cadence_and_checkpoint_steps(one_rank_group, tmp_path, monkeypatch):
    synced = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **kw: synced.append(1) or real_all_reduce(tensor, **kw))
    saved = []
    monkeypatch.setattr(callbacks, "save_checkpoint", lambda run: saved.append(run.step))
    config = load_config(None, ["train.max_steps=100", "train.warmup_steps=0", "train.log_every=10"])
    run = SimpleNamespace(config=config, device=torch.device("cpu"), step=0, stopping=False)
    requests = CheckpointRequests(tmp_path, rank=0)
    checkpointer = Checkpointer(every=25, requests=requests, check_every=10, asynchronous=False)
    outcome = StepOutcome(torch.zeros(()), None, 0.0, 0.0, skipped=False)
    try:
        for step in range(1, 43):
            run.step = step
            if step == 33:
                os.kill(os.getpid(), signal.SIGTERM)  # seen at the next check: step 40
            checkpointer.after_step(run, outcome)
            if run.stopping:
                break
    finally:
        requests.close()
    assert len(synced) == 5  # steps 10, 20, 25 (a checkpoint step), 30, 40: not 40 all-reduces
    assert saved == [25, 40] and run.step == 40 and run.stopping
