"""Sample continuations from a trained stage's latest checkpoint.

    python -m experiments.sample --workdir=workdirs/pretrain --prompt='def parse(' \
        [--num_samples=4] [--max_new_tokens=128] [--temperature=0.8] [--top_k=50] [--top_p=0.95]

Loads the workdir's tokenizer, model config and parameters (not the optimizer state), and
generates with the same KV-cache sampler, dtypes and sharding as training. Each sample starts a
new document (`<|endoftext|>` + prompt) and stops at the next `<|endoftext|>`.
"""

from __future__ import annotations

import math
import pathlib
import sys

import jax
from absl import app, flags

from gptstack import sharding
from gptstack.checkpoint import Checkpointer
from gptstack.config import GPTConfig, MeshConfig
from gptstack.data.tokenizer import Tokenizer
from gptstack.model import GPT
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import abstract_model

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage workdir with checkpoints.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations to draw.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Generation budget per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 50, '0 disables.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, '1 disables.')
_SEED = flags.DEFINE_integer('seed', 0, 'Same seed, same samples.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.mark_flag_as_required('workdir')


def load(workdir: pathlib.Path, step: int | None = None):
    """`(tokenizer, model config, graphdef, params, mesh)` of a workdir's checkpoint, with the
    parameters laid out over all local devices by FSDP."""
    tokenizer = Tokenizer.load(workdir / 'tokenizer.model')
    checkpointer = Checkpointer(workdir / 'checkpoints')
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint')
    meta = checkpointer.read_meta(step)
    if meta.get('tokenizer_sha256') != tokenizer.sha256:
        raise ValueError(f'{workdir}/tokenizer.model is not the tokenizer of checkpoint {step}')
    config = GPTConfig.from_dict(meta['model'])
    mesh = sharding.make_mesh(MeshConfig(fsdp=-1))
    graphdef, abstract = abstract_model(lambda rngs: GPT(config, rngs=rngs))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, sharding.param_shardings(abstract, mesh, 'fsdp'))
    params = checkpointer.restore_params(step, target)
    checkpointer.close()
    return tokenizer, config, graphdef, params, mesh


def main(argv) -> int:
    del argv
    workdir = pathlib.Path(_WORKDIR.value)
    tokenizer, config, graphdef, params, mesh = load(workdir, _STEP.value)
    shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    n = _NUM_SAMPLES.value
    sampler = Sampler(graphdef, config, mesh, 'fsdp', batch_size=shards * math.ceil(n / shards),
                      max_new_tokens=_MAX_NEW.value, stop_ids=[tokenizer.eot_id],
                      pad_id=tokenizer.pad_id)
    prompt = [tokenizer.eot_id, *tokenizer.encode(_PROMPT.value)]
    out = sampler(params, [prompt] * n, jax.random.key(_SEED.value),
                  SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value))
    for i in range(n):
        text = tokenizer.decode(out['tokens'][i, :out['lengths'][i]])
        print(f'--- sample {i + 1} of {n} ---\n{_PROMPT.value}{text}')
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
