"""The train stage: DeepSpeed ZeRO training of a GPT or BERT on token shards.

run.py        what a rank holds (Run), a step's outcome, the result, the callback interface
loop.py       setup, train, train_step, evaluate: the loop, readable on one screen
callbacks.py  periodic concerns with their own cadence: metrics, validation, checkpoints, profiler
health.py     non-finite steps and rollback (the first callback)
meter.py      loss, throughput, MFU and memory over a logging window
checkpoint.py the checkpoint manager: layout, discovery, save, retention, storage checks, resume
async_checkpoint.py  checkpoints written in the background and sealed once every rank's are durable
rng.py        the per-rank RNG states a checkpoint holds
engine.py     the DeepSpeed wrapper, the only module that imports deepspeed
ds_config.py  the DeepSpeed JSON, derived from the `train` section by one pure function
modeling.py   the model a config describes (GPT or BERT from models/)
pretrained.py Hugging Face weights for model.init_from: files, sha256, loading tensor by tensor
plan.py       `pretrain plan`: parameters, FLOPs, memory and checkpoint size before a run
requests.py   checkpoint requests from signals and from the driver
ray_train.py  the driver: a Ray Train worker group (imports ray; ranks never need it)
torchrun.py   the torchrun entry (`python -m pipeline.training`), without Ray or MLflow
"""
