"""Stage 0: train the SentencePiece BPE tokenizer on the corpus mixture.

COMMAND (any CPU; about 10 s on the embedded default, no downloads):
  python -m experiments.run --config=experiments/configs/tokenizer.py --workdir=workdirs/tokenizer

Writes `<workdir>/tokenizer.model` and a report with the vocabulary size, the training time and
the bytes per token of each source (about 3 on the embedded code, 4 on its prose). Later stages
use it through `--config.tokenizer.path=<workdir>/tokenizer.model`.
Args: `vocab=<int>` (default 8192).
"""

import ml_collections

from experiments.configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, vocab=8192)
    config = ml_collections.ConfigDict()
    config.stage = 'tokenizer'
    config.seed = 0
    config.tokenizer = common.tokenizer_config(arg.vocab)
    config.data = ml_collections.ConfigDict()
    # Corpora to learn from: {name: {paths: 'file,dir,glob or embedded:...', weight}}.
    config.data.sources = common.embedded_sources()
    # Malformed records that may be skipped (counted and logged) before the run fails.
    config.data.max_skips = 0
    return config
