"""The Slurm job template `pretrain submit` renders, with its README and examples: package data."""
