"""Stage workdirs as inputs: the tokenizer and latest checkpoint a later stage starts from, and
the language model a sampling tool loads.

A workdir holds `tokenizer.model`, `checkpoints/<step>/{state,data,meta}` (the meta names the
model config, the tokenizer's sha256 and the resolved stage config), `metrics.jsonl`,
`tensorboard/` and `report.md`.
"""

from __future__ import annotations

import os
import pathlib

from gptstack import sharding
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import ConfigError, GPTConfig, MeshConfig
from gptstack.data.tokenizer import Tokenizer
from gptstack.model import GPT, ScoreModel
from gptstack.state import abstract_model

# Where the language model sits in a stage's checkpointed state (default: `state.params`).
POLICY_WITHIN = {'rl': ('actor',)}


def load_base(init_from: str | None, purpose: str = 'the pretraining workdir to finetune'):
    """`(tokenizer, model config, checkpointer, step)` of the workdir a stage starts from."""
    if not init_from:
        raise ConfigError(f'init_from: name {purpose} (--config.init_from=workdirs/...)')
    base = pathlib.Path(init_from)
    if not (base / 'tokenizer.model').exists():
        raise ConfigError(f'init_from={base}: no tokenizer.model there; is it a stage workdir?')
    tokenizer = Tokenizer.load(base / 'tokenizer.model')
    checkpointer = Checkpointer(base / 'checkpoints')
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f'init_from={base}: no checkpoint in {base / "checkpoints"}')
    meta = checkpointer.read_meta(step)
    if meta.get('tokenizer_sha256') != tokenizer.sha256:
        raise ConfigError(f'init_from={base}: checkpoint {step} was trained with tokenizer '
                          f'{meta.get("tokenizer_sha256")}, but {base / "tokenizer.model"} is '
                          f'{tokenizer.sha256}')
    return tokenizer, GPTConfig.from_dict(meta['model']), checkpointer, step


def latest_meta(workdir: str | os.PathLike) -> dict:
    """The metadata of a workdir's latest checkpoint (model config, tokenizer, stage config)."""
    checkpointer = Checkpointer(pathlib.Path(workdir) / 'checkpoints')
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f'{checkpointer.directory} holds no checkpoint')
        return checkpointer.read_meta(step)
    finally:
        checkpointer.close()


def load_model(workdir: str | os.PathLike, step: int | None = None):
    """`(tokenizer, model config, graphdef, params, mesh, meta)` of a workdir's language model
    (the latest checkpoint, or `step`; the policy of a PPO run), its parameters laid out over all
    local devices by FSDP; no optimizer state is read."""
    return _load(workdir, step, GPT, language_model=True)


def load_reward_model(workdir: str | os.PathLike, step: int | None = None):
    """Like `load_model`, for the `ScoreModel` of a reward-model workdir."""
    return _load(workdir, step, ScoreModel, language_model=False)


def _load(workdir, step, model_cls, language_model: bool):
    workdir = pathlib.Path(workdir)
    tokenizer = Tokenizer.load(workdir / 'tokenizer.model')
    checkpointer = Checkpointer(workdir / 'checkpoints')
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint')
    meta = checkpointer.read_meta(step)
    if meta.get('tokenizer_sha256') != tokenizer.sha256:
        raise ValueError(f'{workdir}/tokenizer.model is not the tokenizer of checkpoint {step}')
    config = GPTConfig.from_dict(meta['model'])
    stage = meta.get('config', {}).get('stage')
    if language_model and stage == 'reward':
        raise ValueError(f'{workdir} is a reward-model run: it scores text, it does not write it')
    if not language_model and stage != 'reward':
        raise ValueError(f'{workdir} is a {stage!r} run, not a reward model')
    mesh = sharding.make_mesh(MeshConfig(fsdp=-1))
    graphdef, abstract = abstract_model(lambda rngs: model_cls(config, rngs=rngs))
    params = checkpointer.restore_params(step, abstract_with_shardings(
        abstract, sharding.param_shardings(abstract, mesh, 'fsdp')),
        within=POLICY_WITHIN.get(stage, ()))
    checkpointer.close()
    return tokenizer, config, graphdef, params, mesh, meta
