"""SFT on Dolly open-QA (3,742 human-written question/answer pairs, CC BY-SA 3.0).

COMMAND (after a pretraining run; the data lives outside the repository):
  python -m experiments.run --config=experiments/configs/sft_dolly.py --workdir=workdirs/sft_dolly \
      --config.init_from=workdirs/pretrain_novels \
      --config.data.train=../shared/data/dolly15k_open_qa/open_qa.prompt_response.jsonl

5% of the pairs are held out for the validation loss on answer tokens; there is no gold scorer
for open questions, so the report shows losses and sample answers. Long answers are cut to the
context (counted in the report). A base model pretrained on English (the novels) suits it better
than the default code-heavy one.
Args: `runlocal`.
"""

from experiments.configs import sft


def get_config(arg=None):
    config = sft.get_config(arg)
    config.data.train = '../shared/data/dolly15k_open_qa/open_qa.prompt_response.jsonl'
    config.data.copy_drills = 0
    config.data.validation = ''
    config.data.truncate = True
    return config
