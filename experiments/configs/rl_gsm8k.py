"""GRPO on GSM8K with a verifiable reward: the number a reply ends on against the number after
`####` of the problem's worked solution.

COMMAND (after `sft_gsm8k.py` and a reward run from it, which the stage reads for the held-out
reward-model score; the data lives outside the repository):
  python -m experiments.run --config=experiments/configs/rl_gsm8k.py --workdir=workdirs/rl_gsm8k \
      --config.init_from=workdirs/sft_gsm8k --config.reward_from=workdirs/reward

Training prompts are the 7,473 train problems, held-out ones the 1,319 test problems (the first
`eval.prompts` of them at every evaluation). A reply scores 1 when its last number equals the
reference (`data.match=last_number`; `marked_number` reads the number after a final `####`,
the format SFT on GSM8K teaches). `--config.rl.format_reward=0.1` adds 0.1 to the reward of
every reply whose final answer can be read, right or wrong (DeepSeek-R1's format reward; with
`marked_number`, a number after `####`). The models this repository trains on a CPU score near zero
here: they learn the solutions' format, not the arithmetic. The recipe is meant for a model of
GPT-2 size or larger on an accelerator (`pipeline.py:large` sizes, `data.max_new_tokens` 256 or
more, `eval.prompts` 1,319).
"""

from experiments.configs import rl


def get_config(arg=None):
    config = rl.get_config(arg)
    config.data.train = '../shared/data/gsm8k/train.jsonl'
    config.data.validation = '../shared/data/gsm8k/test.jsonl'
    config.data.prompt_field = 'question'
    config.data.answer_format = 'gsm8k'
    config.data.match = 'last_number'
    config.rl.reward = 'gold'
    config.rl.algorithm = 'grpo'
    config.rl.ppo.oversample = 2
    return config
