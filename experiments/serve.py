"""Serve a trained model over OpenAI's API, with a chat page at `/`.

    python -m experiments.serve --workdir=workdirs/pipeline/sft [--port=8000] [--host=127.0.0.1] \
        [--max_batch=8] [--max_new_tokens=N] [--max_queue=256] [--gather_ms=20] [--step=N] \
        [--name=NAME]

Any language-model workdir (pretraining, SFT, DPO, RL) or Hugging Face directory (`hf:DIR`) is
served with the same model code, sharding and precision as training, on all local devices. A
reward-model workdir is served too: it scores conversations at `POST /v1/score`.
The server compiles every program it can run (each prompt bucket for generation, each length
bucket for scoring) before it opens its port, then prints one line saying it is ready: clients
that probe at connect time (lm-eval) find it answering at once.

SIGTERM or Ctrl-C stops taking requests, lets the ones in flight finish, and exits 0.
See docs/serving.md for the API, the `openai` client and `lm-eval` against it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import jax
from absl import app, flags

from gptstack import environment
from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.lineage import HF_PREFIX, Workdir, load_policy, load_reward_model

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage workdir, or hf:DIR.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every '
                            'interface).')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.', lower_bound=1,
                             upper_bound=65535)
_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Rows per compiled call: requests that '
                                  'arrive together share one.', lower_bound=1)
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'The most tokens a reply may take '
                                '(default: half the context, at most 256); prompts may use the '
                                'rest of the context.', lower_bound=1)
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 256, 'Rows that may wait; past it requests get '
                                  '503 with Retry-After.', lower_bound=1)
_GATHER_MS = flags.DEFINE_float('gather_ms', 20, 'How long a batch waits for more rows once '
                                'its first is there (when fewer than --max_batch wait).',
                                lower_bound=0)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_NAME = flags.DEFINE_string('name', None, 'The model id clients name (default: the workdir\'s '
                            'folder name).')
flags.mark_flag_as_required('workdir')


def main(argv) -> int:
    del argv
    environment.start_tool()
    import uvicorn  # the `serve` extra

    from gptstack.serving.api import create_app
    from gptstack.serving.engine import Engine

    logging.getLogger('gptstack').setLevel(logging.INFO)
    try:
        model = load_model(_WORKDIR.value, _STEP.value)
    except (ConfigError, DataError) as error:  # not a workdir of a language model
        raise app.UsageError(str(error)) from None
    context = model.config.max_seq_len
    max_new = _MAX_NEW.value or min(256, context // 2)
    try:
        engine = Engine(model, batch_size=_MAX_BATCH.value, max_new_tokens=max_new,
                        max_queue=_MAX_QUEUE.value, gather_s=_GATHER_MS.value / 1000)
    except ConfigError as error:
        raise app.UsageError(f'--max_new_tokens: {error}') from None
    name = _NAME.value or _WORKDIR.value.rstrip('/').split('/')[-1]
    about = describe(model)
    what = (f'replies of up to {max_new} tokens' if engine.generates
            else 'a reward model: POST /v1/score')
    print(f'serving {name}: {about["stage"]}, step {about["step"]}, '
          f'{about["parameters"] / 1e6:.1f}M parameters, context {context}, {what}, batches of '
          f'{engine.batch_size}', flush=True)
    start = time.perf_counter()
    engine.warm_up(progress=lambda line: print(f'  {line}', flush=True))
    print(f'compiled in {time.perf_counter() - start:.0f} s', flush=True)
    engine.start()
    server = uvicorn.Server(uvicorn.Config(
        create_app(engine, name, about), host=_HOST.value, port=_PORT.value, workers=1,
        log_level='warning', access_log=False))
    # Signals stay with this thread: the server runs in another, and is asked to stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, 'should_exit', True))
    thread = threading.Thread(target=server.run, name='http')
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        engine.stop()
        print(f'could not listen on {_HOST.value}:{_PORT.value}', file=sys.stderr)
        return 1
    print(f'ready: http://{_HOST.value}:{_PORT.value} (chat page at /, OpenAI API at /v1)',
          flush=True)
    while thread.is_alive():
        thread.join(0.2)
    engine.stop()
    print('stopped', flush=True)
    return 0


def load_model(source: str, step: int | None):
    """A reward workdir's reward model, or any other source's language model."""
    if not source.startswith(HF_PREFIX):
        try:
            stage = Workdir(source).latest_meta().get('config', {}).get('stage')
        except (ConfigError, DataError):
            stage = None  # load_policy says what is wrong
        if stage == 'reward':
            return load_reward_model(source, step)
    return load_policy(source, step)


def describe(model) -> dict:
    """What the server tells clients about its model: stage, step and size."""
    meta = model.meta
    stage = meta.get('config', {}).get('stage', 'hf' if 'config' not in meta else None)
    return {'stage': stage or 'unknown', 'step': meta.get('step', 0),
            'parameters': int(sum(x.size for x in jax.tree.leaves(model.params)))}


if __name__ == '__main__':
    sys.exit(app.run(main))
