from models.layers import num_parameters
from pipeline.config import load_config
from pipeline.training.modeling import build_model
from pipeline.training.plan import bytes_per_parameter, format_plan, make_plan, model_state_memory


def test_mixed_precision_accounting_matches_the_zero_paper():
    # ZeRO paper, figure 1: 7.5B parameters, 64 GPUs, K=12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    rows = model_state_memory(7_500_000_000, "bf16", 64)
    assert [round(r.total / 1e9, 1) for r in rows] == [120.0, 31.4, 16.6, 1.9]


def test_fp32_accounting_has_no_master_copy():
    assert bytes_per_parameter("fp32") == (4, 4, 8)
    rows = model_state_memory(1000, "fp32", 2)
    assert rows[0].total == 16000 and rows[3].total == 8000


def test_offload_moves_states_off_the_gpu():
    rows = model_state_memory(1000, "bf16", 4, offload_optimizer=True, offload_params=True)
    assert rows[0].optimizer == 12000  # stage 0 cannot offload
    assert rows[1].optimizer == 0 and rows[3].params == 0


def test_plan_on_meta_device_counts_the_same_parameters_as_a_real_model():
    config = load_config(None, ["model.n_layers=2", "model.d_model=64", "tokenizer.vocab_size=512"])
    plan = make_plan(config)
    assert plan["params"] == num_parameters(build_model(config))


def test_activation_checkpointing_keeps_only_block_inputs():
    # The fp32 logits of the lm head are kept either way; on a 1B model the blocks dominate.
    plan = make_plan(load_config("configs/llama-1b.yaml"))
    assert plan["checkpointed_activation_bytes"] < plan["activation_bytes"] / 3


def test_peak_estimate_follows_the_configured_checkpointing():
    plain = format_plan(make_plan(load_config("configs/gpt2-124m.yaml")))
    checkpointed = format_plan(
        make_plan(load_config("configs/gpt2-124m.yaml", ["train.activation_checkpointing=true"]))
    )
    peak = [float(text.split("estimated peak per GPU")[1].split()[0]) for text in (plain, checkpointed)]
    assert peak[1] < peak[0]
