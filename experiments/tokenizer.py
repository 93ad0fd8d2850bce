"""Stage 0: train the tokenizer on the corpus mixture and report on it.

Pretraining obtains its tokenizer through `gptstack.stage.obtain_tokenizer` (the configured one,
the workdir's own, or one trained here the same way); the pipeline trains it once with this stage
and hands the file to every later stage.
"""

from __future__ import annotations

import logging
import pathlib

from gptstack import stage
from gptstack.config import check_bounds
from gptstack.data.sources import specs_from_config
from gptstack.lineage import Workdir
from gptstack.reports import tokenizer as tokenizer_report

log = logging.getLogger(__name__)


def validate(config) -> None:
    """The cheap checks: the numeric keys' ranges, the mixture's sources and weights."""
    check_bounds(config)
    specs_from_config(config.data.sources)


def run(config, workdir: pathlib.Path) -> str:
    tokenizer, stats = stage.train_tokenizer_on(config)
    tokenizer.save(Workdir(workdir).tokenizer_path)
    rows = tokenizer_report.write(workdir, tokenizer, stats)
    log.info('tokenizer: %d tokens, bytes/token %s; saved %s', tokenizer.vocab_size,
             {r[0]: round(r[2], 2) for r in rows}, Workdir(workdir).tokenizer_path)
    return 'finished'
