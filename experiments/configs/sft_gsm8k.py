"""SFT on GSM8K train (7,473 grade-school math problems with worked solutions, MIT).

COMMAND (after a pretraining run; the data lives outside the repository):
  python -m experiments.run --config=experiments/configs/sft_gsm8k.py --workdir=workdirs/sft_gsm8k \
      --config.init_from=workdirs/pretrain \
      --config.data.train=../shared/data/gsm8k/train.jsonl

Records are `{question, answer}`; the answer is the worked solution ending in `#### <number>`.
5% of the training problems are held out for the validation loss on solution tokens; the test
file is kept for the RL stage's verifiable reward. Over-long solutions are cut to the context and
counted. Expect small CPU models to learn the format, not the arithmetic.
Args: `runlocal`.
"""

from experiments.configs import sft


def get_config(arg=None):
    config = sft.get_config(arg)
    config.data.train = '../shared/data/gsm8k/train.jsonl'
    config.data.copy_drills = 0
    config.data.validation = ''
    config.data.prompt_field = 'question'
    config.data.response_field = 'answer'
    config.data.truncate = True
    return config
