"""Reward model on Anthropic HH-RLHF harmless-base (test split: 2,312 human preference pairs,
MIT licence), read from ../shared/data (outside the repository).

COMMAND (after an SFT run):
  python -m experiments.run --config=experiments/configs/reward_hh.py --workdir=workdirs/reward_hh \
      --config.init_from=workdirs/sft \
      --config.data.train=../shared/data/hh_rlhf_harmless_base/test.jsonl.gz

Each record is two full dialogues; the prompt is their longest common prefix (up to the last
shared assistant turn) and the completions are what follows. 312 pairs (a seeded 13.5%) are held
out for pairwise accuracy. Dialogues longer than the context lose the start of their prompt
(counted in the log). There is no gold scorer, so the report has accuracy, calibration and
reward distributions but no best-of-N.
Args: `runlocal`.
"""

from experiments.configs import common, reward


def get_config(arg=None):
    config = reward.get_config(arg)
    runlocal = common.parse_arg(arg, runlocal=False).runlocal
    config.data.train = '../shared/data/hh_rlhf_harmless_base/test.jsonl.gz'
    config.data.validation = ''
    config.data.val_fraction = 312 / 2312
    config.data.completions = 2
    # A group is the dialogue before the last assistant turn and its two endings: half of them
    # fit in 256 tokens, 84% in a row of 512 (the rest lose the dialogue's start, counted, as do
    # those whose dialogue and longer ending exceed the model's context).
    config.data.seq_len = 64 if runlocal else 512
    config.data.batch_size = 8
    config.data.truncate = True
    config.data.eval_batches = 64  # every held-out group
    config.best_of_n.prompts = 0
    return config
