"""The runtime layer: accelerator and backend choice, Ray worker environment."""

from __future__ import annotations

import torch

from pipeline.run.runtime import accelerator_name, distributed_backend, worker_environment


def test_backend_follows_the_workers_devices():
    assert distributed_backend(use_gpu=False) == "gloo"
    assert distributed_backend(use_gpu=True) == "nccl"


def test_accelerator_is_detected_unless_pinned(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert accelerator_name() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert accelerator_name() == "xpu"


def test_ray_workers_get_the_accelerator_of_their_devices():
    assert worker_environment(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    assert worker_environment(use_gpu=True)["DS_ACCELERATOR"] == "cuda"
    assert worker_environment(use_gpu=False)["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
