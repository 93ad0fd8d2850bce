"""DPO: the SFT policy trained straight from ranked comparisons (no reward model, no sampling).

COMMAND (after the default SFT and reward runs, on the comparisons the reward stage's simulated
labeler wrote; 2-core CPU):
  python -m experiments.run --config=experiments/configs/dpo.py --workdir=workdirs/dpo \
      --config.init_from=workdirs/sft \
      --config.data.train=workdirs/reward/comparisons/train.jsonl \
      --config.data.validation=workdirs/reward/comparisons/validation.jsonl

Any comparison layout of the reward stage reads here (pairwise, K-way rankings, Anthropic HH).
The report compares the SFT policy (step 0) and the DPO policy on the held-out comparisons
(implicit-reward accuracy, margins) and on held-out task prompts (gold score).
Args: `runlocal` (a few steps of a smoke test).
"""

import dataclasses

import ml_collections

from experiments.configs import common
from gptstack.steps.dpo import DPOLoss


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.stage = 'dpo'
    config.seed = 0
    # The SFT workdir: the policy starts from its latest checkpoint, which is also the frozen
    # reference.
    config.init_from = ml_collections.config_dict.placeholder(str)

    config.data = ml_collections.ConfigDict()
    # Comma-separated JSONL files/globs of comparisons; an empty validation holds out
    # val_fraction of the training records instead.
    config.data.train = ''
    config.data.validation = ''
    config.data.val_fraction = 0.05
    # Completions per comparison at most (K; pairs have 2), tokens per completion row.
    config.data.completions = 4
    config.data.seq_len = 128
    # Comparison groups per step.
    config.data.batch_size = 8
    config.data.truncate = False
    config.data.max_skips = 0
    config.data.eval_batches = 64

    config.loss = ml_collections.ConfigDict(dataclasses.asdict(DPOLoss()))

    config.train = common.train_config(300, eval_every=100, sample_every=0,
                                       checkpoint_every=100)
    config.optim = common.optim_config(lr=3e-5, warmup_steps=10, weight_decay=0.0,
                                       end_lr_ratio=1.0)
    config.optim.total_steps = config.train.get_ref('total_steps')
    config.mesh = common.mesh_config()
    config.precision = common.PRECISION

    config.eval = ml_collections.ConfigDict()
    # Held-out task prompts (test split) answered greedy and sampled at every evaluation;
    # 0 for comparisons of other prompts.
    config.eval.gold_prompts = 256
    config.eval.batch_size = 64
    config.eval.max_new_tokens = 48
    config.eval.temperature = 1.0

    if arg.runlocal:
        config.data.seq_len = 64
        config.data.truncate = True
        config.data.eval_batches = 2
        config.train.total_steps = 2
        config.train.log_every = 1
        config.train.eval_every = 2
        config.train.checkpoint_every = 1
        config.optim.warmup_steps = 1
        config.eval.gold_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
    return config
