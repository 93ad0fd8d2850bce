"""Whether language models copy from their context: the copy gain of any model of the lineage.

    python -m experiments.copying --policy=workdirs/pipeline/pretrain \
        [--policy=workdirs/pipeline/sft ...] [--rows=64] [--length=40] [--out=copying.json]

For each model: rows of `--length` tokens drawn from the embedded prose (`--text`, by their
frequency there, special tokens left out), each followed by the same tokens again, and the mean
loss of the first copy's tokens and of the second's (`gptstack.evals.copying`; the pretraining
stage logs the same figures as `val/copy/*` at every evaluation). A gain near 0 means the model
does not read back what its context holds. What the main job's models give is in
docs/results.md.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

from absl import app, flags, logging

from gptstack import environment
from gptstack.config import ConfigError
from gptstack.data import sources
from gptstack.data.sources import DataError
from gptstack.evals import copying
from gptstack.lineage import load_policy

_POLICY = flags.DEFINE_multi_string('policy', None, 'Workdirs (pretraining, SFT, DPO, RL) or '
                                    'hf:DIR; repeat the flag for several.')
_ROWS = flags.DEFINE_integer('rows', 64, 'Repeated rows per model.')
_LENGTH = flags.DEFINE_integer('length', 40, 'Tokens in each copy.')
_TEXT = flags.DEFINE_enum('text', 'python_prose', sorted(sources.EMBEDDED),
                          'The embedded source the tokens are drawn from.')
_SEED = flags.DEFINE_integer('seed', 0, 'Draws of the rows.')
_OUT = flags.DEFINE_string('out', '', 'Write the figures here as JSON.')
flags.mark_flag_as_required('policy')


def measure(policy, text: str, rows: int, length: int, seed: int) -> dict[str, float]:
    """`{val/copy/first, val/copy/second, val/copy_gain}` of one model, on tokens of the
    embedded source `text`."""
    documents = list(itertools.islice(sources.EMBEDDED[text](), 200))
    pool = copying.encoded_pool(policy.tokenizer, documents)
    return copying.measure(policy, pool, rows, length, seed)


def main(argv) -> int:
    del argv
    environment.start_tool()
    results = {}
    try:
        for source in _POLICY.value:
            results[source] = measure(load_policy(source), _TEXT.value, _ROWS.value,
                                      _LENGTH.value, _SEED.value)
            r = results[source]
            print(f'{source}: seen once {r["val/copy/first"]:.3f}, seen again '
                  f'{r["val/copy/second"]:.3f} nats per token, copy gain '
                  f'{r["val/copy_gain"]:+.3f}')
    except (ConfigError, DataError) as error:
        logging.error('%s', error)
        return 1
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
