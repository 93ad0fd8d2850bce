"""Stage 1: pretrain a GPT on a weighted mixture of corpora (next-token prediction).

COMMAND (the default: embedded corpus, no downloads; 2-core CPU, about 6 minutes):
  python -m experiments.run --config=experiments/configs/pretrain.py --workdir=workdirs/pretrain

Trains a SentencePiece tokenizer (4096 tokens) on the mixture (Python's standard library, the
English prose that ships with Python, and solved train-split tasks written as plain text, half of
the tokens), then a 4-layer, d=256 GPT-2-style model with smeared keys (4.3M parameters) for 600
steps of 16 x 256 tokens (2.5M tokens); what it reaches is in docs/results.md.
Longer runs keep improving: --config.train.total_steps=3000. The report is
`<workdir>/report.md`.

Args (after a colon, comma-separated):
  size=<preset>   a model preset of gptstack.config.PRESETS instead of the default CPU model
                  (e.g. size=mini is the 13.9M peer-benchmark shape; size=llama-7b for a pod);
  worked=<w>      the share w of training tokens from the embedded worked examples (solved
                  train-split tasks as plain text), code and prose sharing the rest;
  runlocal        a tiny model for a few steps: a smoke test of the whole command (seconds).
Any field can be overridden: --config.train.total_steps=3000 --config.optim.lr=1e-3.
"""

import ml_collections

from experiments.configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, size='', runlocal=False, worked=common.WORKED_SHARE)
    config = ml_collections.ConfigDict()
    config.stage = 'pretrain'
    # Seeds parameter init, data order and sampling (every random draw is fold_in(seed, step)).
    config.seed = 0

    config.tokenizer = common.tokenizer_config(vocab_size=4096)

    config.data = ml_collections.ConfigDict()
    # The mixture: {name: {paths, weight}}; a weight is the source's share of training tokens.
    config.data.sources = common.embedded_sources(code_weight=0.8, worked_weight=arg.worked)
    # Tokens per row and rows per step (global, over all processes).
    config.data.seq_len = 256
    config.data.batch_size = 16
    # Fraction of each source held out for validation.
    config.data.val_fraction = 0.02
    # Validation batches per source at each evaluation (the same batches every time).
    config.data.eval_batches = 8
    # Batches of random validation tokens repeated twice at each evaluation: the in-context
    # copying metrics val/copy/* (gptstack.evals.copying); 0 turns them off.
    config.data.copy_batches = 2
    # Malformed records that may be skipped (counted and logged) before the run fails.
    config.data.max_skips = 0
    # Where tokenized corpora are cached; None means <workdir>/cache.
    config.data.cache_dir = ml_collections.config_dict.placeholder(str)

    if arg.size:
        config.model = common.model_config(arg.size, vocab_size=None)
    else:
        # Four layers, unrolled: faster than a layer scan on CPU, and as quick to compile.
        # Smeared keys: with them (and SFT's copy drills) the model reads back its prompt
        # (sorting 0.43 -> 0.66, strings 0.00 -> 0.18 greedy; docs/results.md).
        config.model = common.model_config('mini', vocab_size=None, n_layer=4, d_model=256,
                                           n_head=4, scan_layers=False, smeared_keys=True)
    config.model.max_seq_len = config.data.get_ref('seq_len')

    config.train = common.train_config(600, eval_every=100, sample_every=300,
                                       checkpoint_every=100)

    config.optim = common.optim_config(lr=2e-3, warmup_steps=30, weight_decay=0.1)
    config.optim.total_steps = config.train.get_ref('total_steps')

    config.mesh = common.mesh_config()
    config.precision = common.PRECISION

    config.sample = ml_collections.ConfigDict()
    # Prompts continued at every sampling point (each starts a new document).
    config.sample.prompts = ('def fibonacci(n):\n', 'import os\n', 'The ', 'This module ')
    config.sample.max_new_tokens = 64
    config.sample.temperature = 0.8
    config.sample.top_k = 50
    config.sample.top_p = 0.95

    if arg.runlocal:
        config.tokenizer.vocab_size = 512
        config.tokenizer.max_lines = 20_000
        config.model = common.model_config('toy', vocab_size=None, n_layer=1, d_model=32,
                                           n_head=2, smeared_keys=True)
        config.model.max_seq_len = config.data.get_ref('seq_len')
        config.data.seq_len = 32
        config.data.batch_size = 8
        config.data.eval_batches = 2
        config.data.copy_batches = 1
        config.train.total_steps = 2
        config.train.log_every = 1
        config.train.eval_every = 2
        config.train.sample_every = 2
        config.train.checkpoint_every = 1
        config.optim.warmup_steps = 1
        config.sample.max_new_tokens = 8
        config.sample.prompts = ('def ', 'The ')
    return config
