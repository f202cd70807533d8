"""The DeepSpeed config derived from the `train` section: a pure function, checked without deepspeed
(and once against DeepSpeed's own config parser)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.training.ds_config import MAX_BUCKET, MIN_BUCKET, bucket_sizes, deepspeed_config

SIZE = {"num_parameters": 124_000_000, "d_model": 768}


def derive(*overrides: str, **kwargs):
    config = load_config(None, list(overrides))
    return deepspeed_config(config.train, config.data_parallel_size, **(SIZE | kwargs))


def test_batch_sizes_come_from_the_resolved_config():
    ds = derive("train.global_batch_size=64", "train.micro_batch_size=4", "cluster.num_workers=4")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4,
        4,
        64,
    )


def test_zero0_fp32_uses_torch_adamw_and_no_zero_extras():
    ds = derive("train.zero_stage=0", "train.grad_clip=0.5", "train.lr=3e-4", "train.beta2=0.99")
    assert ds["zero_optimization"] == {"stage": 0}
    assert ds["gradient_clipping"] == 0.5 and "bf16" not in ds and "fp16" not in ds
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_get_buckets_sized_for_the_model(stage):
    zero = derive(f"train.zero_stage={stage}")["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 124_000_000 // 8
    assert zero["stage3_param_persistence_threshold"] == 7680


def test_bucket_sizes_are_clamped():
    assert bucket_sizes(1000, 32)["reduce_bucket_size"] == MIN_BUCKET
    assert bucket_sizes(10**12, 8192)["reduce_bucket_size"] == MAX_BUCKET
    assert bucket_sizes(10**12, 8192)["stage3_max_live_parameters"] == 10**12 // 4


def test_offload_uses_deepspeed_cpu_adam():
    ds = derive("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true")
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeed then builds DeepSpeedCPUAdam
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_precisions():
    assert derive("train.precision=bf16")["bf16"] == {"enabled": True}
    fp16 = derive("train.precision=fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    assert derive(on_gpu=True)["optimizer"]["params"]["fused"] is True


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_accumulates_and_reduces_gradients_in_fp32(precision):
    ds = derive(f"train.precision={precision}")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert "data_types" not in derive() and "communication_data_type" not in derive()  # fp32 needs neither


def test_half_precision_at_zero_stage_0_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"train.precision=bf16 accumulates .* set train.zero_stage=1"):
        load_config(None, ["train.precision=bf16", "train.zero_stage=0"])
    load_config(None, ["train.precision=bf16", "train.zero_stage=1"])  # the fix


ENGINE_DTYPES = """
import json, os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
from pipeline.config import load_config
from pipeline.training import engine
from pipeline.training.ds_config import deepspeed_config
from pipeline.training.modeling import build_model
engine.init_distributed()
for stage in (1, 2, 3):
    config = load_config(None, ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "tokenizer.vocab_size=300",
        "train.precision=bf16", f"train.zero_stage={stage}", "cluster.num_workers=1", "train.grad_accum_steps=2"])
    model_engine = engine.initialize(build_model(config), config.train, deepspeed_config(config.train, 1,
        num_parameters=10**5, d_model=32))
    optimizer = model_engine.optimizer
    names = ("fp32_groups_flat_partition", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
    masters = next(getattr(optimizer, name) for name in names if hasattr(optimizer, name))
    print(json.dumps({"stage": stage, "optimizer": type(optimizer).__name__,
        "masters": sorted({str(t.dtype) for t in masters}), "accumulation": str(model_engine.get_data_types()[1]),
        "reduction": str(model_engine.communication_data_type)}))
"""
OPTIMIZERS = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.slow
def test_a_real_bf16_engine_keeps_fp32_master_weights_and_fp32_gradient_accumulation():
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_DTYPES, "x", "29541"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    engines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert engines == [
        {
            "stage": stage,
            "optimizer": OPTIMIZERS[stage],
            "masters": ["torch.float32"],
            "accumulation": "torch.float32",
            "reduction": "torch.float32",
        }
        for stage in (1, 2, 3)
    ]


def test_universal_loading_is_opt_in():
    assert "checkpoint" not in derive()
    assert derive(load_universal=True)["checkpoint"] == {"load_universal": True}


def test_raw_overrides_merge_and_warn_per_key():
    with pytest.warns(UserWarning) as warnings:
        ds = derive(
            "train.zero_stage=2",
            "train.deepspeed={zero_optimization: {reduce_bucket_size: 1000, "
            "round_robin_gradients: true}, gradient_clipping: 2.0}",
        )
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["gradient_clipping"] == 2.0
    messages = sorted(str(w.message) for w in warnings)
    assert len(messages) == 2
    assert messages[0].startswith("train.deepspeed.gradient_clipping=2.0 overrides the derived value 1.0")
    assert messages[1].startswith("train.deepspeed.zero_optimization.reduce_bucket_size=1000 overrides")


def test_module_does_not_import_deepspeed():
    code = (
        "import sys, pipeline.training.ds_config; assert 'deepspeed' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.zero_stage=0"],
        ["train.zero_stage=1", "train.precision=bf16"],
        ["train.zero_stage=2", "train.precision=fp16", "train.grad_accum_steps=4"],
        ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"],
    ],
)
def test_deepspeed_accepts_the_config(overrides):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_config(None, [*overrides, "cluster.num_workers=1"])
    parsed = DeepSpeedConfig(deepspeed_config(config.train, 1, **SIZE))
    assert parsed.train_batch_size == config.train.global_batch_size
    assert parsed.zero_optimization_stage == config.train.zero_stage
