"""Pretraining on TinyShakespeare (character-level classic, here with a BPE tokenizer).

COMMAND (2-core CPU, about 10 minutes; the data lives outside the repository):
  python -m experiments.run --config=experiments/configs/pretrain_shakespeare.py \
      --workdir=workdirs/shakespeare \
      --config.data.sources.shakespeare.paths=../shared/data/tinyshakespeare/input.txt

The file is one document, so validation holds out the last 5% of it (as nanoGPT does). Expected:
validation loss about 4.3 nats per token (2.1 bits per byte) after 1200 steps of 16 x 256
tokens with a 2048-token vocabulary, samples in the shape of a play (speaker names, verse lines).
Args: as experiments/configs/pretrain.py (`size=<preset>`, `runlocal`).
"""

from experiments.configs import pretrain


def get_config(arg=None):
    config = pretrain.get_config(arg)
    config.data.sources = {'shakespeare': {'paths': '../shared/data/tinyshakespeare/input.txt',
                                           'weight': 1.0}}
    config.data.val_fraction = 0.05
    config.tokenizer.vocab_size = 2048 if config.tokenizer.vocab_size > 512 else 512
    config.sample.prompts = ('ROMEO:\n', 'First Citizen:\n', 'KING HENRY VI:\n')
    return config
