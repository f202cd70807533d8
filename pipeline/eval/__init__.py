"""Evaluation and Hugging Face export.

stage.py    the eval stage: validation loss, perplexity, bits per byte, samples or fill-mask, report
harness.py  lm-evaluation-harness on the exported model (optional `eval` extra)
export.py   `pretrain export`: a checkpoint as a transformers model directory with its tokenizer
"""
