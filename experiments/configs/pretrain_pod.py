"""Stage 1 at published scale: LLaMA-7B, LLaMA-65B or GPT-3 175B pretraining on a TPU pod slice.

COMMAND (check that it fits first, on any machine with libtpu; then on the slice's workers):
  python -m experiments.run --config=experiments/configs/pretrain_pod.py:model=llama-7b \
      --compile_only --topology=v5p-128
  launch/tpu.sh run my-slice python -m experiments.run \
      --config=experiments/configs/pretrain_pod.py:model=llama-7b \
      --config.data.sources.web.paths='/data/web/*.jsonl' --workdir=/mnt/gcs/runs/llama-7b

The shapes, batch sizes (about 4M tokens per step), learning rates and schedules are the papers'
(Touvron et al. 2023, Table 2; Brown et al. 2020, Table 2.1). Parameters and Adam moments are
float32 and fully sharded (FSDP over every chip; GPT-3 adds 8-way tensor parallelism);
activations are bfloat16 and each block is recomputed in the backward pass. The mixture is a
placeholder: point `data.sources` at your corpora (the LLaMA table's weights are a good start).
The slice each model is sized for, and what the ahead-of-time check measured there, are in
docs/scaling.md.

Args: model=llama-7b (default) | llama-65b | gpt3-175b.
"""

import ml_collections

from experiments.configs import common, pretrain

# model: (tokenizer vocabulary, global batch rows of 2048 tokens, peak lr, training steps,
#         tensor-parallel width)
RECIPES = {
    'llama-7b': (32_000, 2048, 3e-4, 250_000, 1),
    'llama-65b': (32_000, 2048, 1.5e-4, 350_000, 1),
    # GPT-3's 50,257 rounded up to a multiple of 128, so the vocabulary splits over 8 devices.
    'gpt3-175b': (50_304, 1536, 0.6e-4, 200_000, 8),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, model='llama-7b')
    if arg.model not in RECIPES:
        raise ValueError(f'pretrain_pod model {arg.model!r}: expected one of {sorted(RECIPES)}')
    vocab, rows, lr, steps, tensor = RECIPES[arg.model]
    config = pretrain.get_config(f'size={arg.model}')
    config.tokenizer.vocab_size = vocab
    config.tokenizer.max_lines = 10_000_000
    config.precision = 'bfloat16'
    config.model.remat = True
    config.data.seq_len = 2048
    config.data.batch_size = rows
    config.data.eval_batches = 16
    config.data.sources = ml_collections.ConfigDict({
        'web': {'paths': 'embedded:python_prose', 'weight': 1.0}})
    config.mesh.fsdp = -1
    config.mesh.tensor = tensor
    config.mesh.rules = 'fsdp_tp' if tensor > 1 else 'fsdp'
    config.train.total_steps = steps
    config.train.eval_every = 1000
    config.train.sample_every = 5000
    config.train.checkpoint_every = 1000
    config.train.log_every = 10
    config.optim.lr = lr
    config.optim.warmup_steps = 2000
    config.optim.weight_decay = 0.1
    config.optim.end_lr_ratio = 0.1
    return config
