"""Pure PyTorch models: GPT (causal LM), BERT (masked LM), their shared blocks, size arithmetic and
Hugging Face weight mapping. Imports torch only (transformers lazily, inside models.hf)."""

from models.bert import BERT
from models.gpt import GPT, sample_next_token
from models.hf import from_hf, from_hf_config, hf_arch, load_hf_state_dict, to_hf, to_hf_config, to_hf_state_dict
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
    "from_hf",
    "from_hf_config",
    "hf_arch",
    "load_hf_state_dict",
    "matmul_parameters",
    "num_parameters",
    "sample_next_token",
    "to_hf",
    "to_hf_config",
    "to_hf_state_dict",
]
