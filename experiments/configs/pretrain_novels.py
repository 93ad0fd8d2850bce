"""Pretraining on 98 public-domain English novels (77 MB of text).

COMMAND (2-core CPU, about 15 minutes for the default 1200 steps; a TPU slice for real runs):
  python -m experiments.run --config=experiments/configs/pretrain_novels.py \
      --workdir=workdirs/novels \
      --config.data.sources.novels.paths=../shared/data/english_novels_100/corpus

Every `.txt` file under the path is one novel; with more than 20 documents, whole novels are held
out for validation. Expected after the default steps: validation loss about 4.6 nats per token;
samples are English narrative with dialogue.
Args: as experiments/configs/pretrain.py (`size=<preset>`, e.g. gpt2-124m on an accelerator;
`runlocal`).
"""

from experiments.configs import pretrain


def get_config(arg=None):
    config = pretrain.get_config(arg)
    config.data.sources = {'novels': {'paths': '../shared/data/english_novels_100/corpus',
                                      'weight': 1.0}}
    config.sample.prompts = ('It was a dark and stormy night', '"Good morning," said',
                             'CHAPTER I\n\n')
    return config
