"""Pure PyTorch models: GPT (causal LM), BERT (masked LM), their shared blocks, size arithmetic and
Hugging Face weight mapping. Imports torch only (transformers lazily, inside models.hf)."""

from models.bert import BERT
from models.gpt import GPT, sample_next_token
from models.hf import (
    check_hf_tensor_names,
    hf_arch,
    hf_tensor_names,
    load_hf_state_dict,
    parameter_from_hf,
    to_hf,
    to_hf_config,
    to_hf_state_dict,
)
from models.layers import (
    ModelOutput,
    TransformerConfig,
    activation_memory_bytes,
    flops_per_token,
    matmul_parameters,
    num_parameters,
)

__all__ = [
    "BERT",
    "GPT",
    "TransformerConfig",
    "ModelOutput",
    "activation_memory_bytes",
    "flops_per_token",
    "check_hf_tensor_names",
    "hf_arch",
    "hf_tensor_names",
    "load_hf_state_dict",
    "matmul_parameters",
    "num_parameters",
    "parameter_from_hf",
    "sample_next_token",
    "to_hf",
    "to_hf_config",
    "to_hf_state_dict",
]
