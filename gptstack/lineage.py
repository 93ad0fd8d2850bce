"""Where a stage starts from, and how a finished stage's model is loaded.

- `Workdir` owns the layout of a stage folder.
- A lineage is what a later stage starts from (`init_from`, `reward_from`): the tokenizer, the
  model config and the parameters to restore. Either an earlier stage's workdir
  (`CheckpointLineage`: its latest checkpoint, or its best by validation loss, refusing a
  workdir of the wrong kind) or a Hugging Face model directory named `hf:DIR`
  (`HFLineage`: `tokenizer.json`, `config.json` and safetensors, read by `gptstack.hf`). Both
  answer `restore_params` with parameters laid out on the stage's mesh.
- `start_from(config, key, ...)` resolves `config.<key>` into a lineage and copies its
  tokenizer into the new workdir, so the lineage is on disk.
- `load_policy` and `load_reward_model` load a finished stage's model (or, for a policy, a
  Hugging Face directory) as one object that makes its own sampler or scorer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
from flax import nnx

from gptstack import hf, sharding
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import COMPUTE_FIELDS, ConfigError, GPTConfig, MeshConfig
from gptstack.data.tokenizer import Tokenizer
from gptstack.evals.best_of_n import ScoreFn, reward_scorer
from gptstack.model import GPT, ScoreModel
from gptstack.sampling import Sampler
from gptstack.state import abstract_model
from gptstack.steps.reward import make_score_fn

# The stages whose checkpoint holds a language model, and where in their state it sits.
POLICY_WITHIN = {'pretrain': (), 'sft': (), 'rl': ('actor',), 'dpo': ()}
# What each stage's checkpoint holds, for messages.
KINDS = {'pretrain': 'a base model', 'sft': 'an SFT model', 'reward': 'a reward model',
         'rl': 'an RL policy', 'dpo': 'a DPO policy', 'hf': 'a Hugging Face model'}
HF_PREFIX = 'hf:'


class Workdir:
    """A stage's folder: its tokenizer (`tokenizer.model`, or `tokenizer.json` when the lineage
    began at a Hugging Face model), `checkpoints/<step>/{state,data,meta}` (the meta names the
    model config, the tokenizer's sha256 and the resolved stage config), `metrics.jsonl`,
    `tensorboard/`, `samples.jsonl` and `report.md`."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.checkpoints = self.path / 'checkpoints'
        self.samples = self.path / 'samples.jsonl'

    @property
    def tokenizer_path(self) -> pathlib.Path:
        """The tokenizer file there is (a SentencePiece model's name when there is none)."""
        hf_file = self.path / 'tokenizer.json'
        return hf_file if hf_file.exists() else self.path / 'tokenizer.model'

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save(self.path / tokenizer.file_name)

    def lineage(self, key: str, stages: tuple[str, ...] | None = None,
                best: bool = False, local: bool = False) -> CheckpointLineage:
        """The start of a later stage whose config names this workdir under `key` (say
        `init_from`); `stages`: the kinds of run it may be. Its checkpoint is the latest one,
        or with `best` the one of the lowest validation loss (the latest if none has one).
        `local`: read by this process alone (see `Checkpointer`)."""
        hint = (f' (a Hugging Face model directory is named {HF_PREFIX}{self.path})'
                if _hugging_face_directory(self.path) else '')
        if not self.tokenizer_path.exists():
            raise ConfigError(f'{key}={self.path}: no tokenizer.model or tokenizer.json there; '
                              f'is it a stage workdir?{hint}')
        no_checkpoint = f'{key}={self.path}: no checkpoint in {self.checkpoints}'
        if not self.checkpoints.is_dir():  # looked at before the checkpointer makes the folder
            raise ConfigError(no_checkpoint + hint)
        tokenizer = Tokenizer.load(self.tokenizer_path)
        checkpointer = Checkpointer(self.checkpoints, local=local)
        try:
            step = checkpointer.latest_step()
            if step is None:
                raise ConfigError(no_checkpoint)
            if best:
                step = checkpointer.best_step() or step
            meta = checkpointer.read_meta(step)
            if meta.get('tokenizer_sha256') != tokenizer.sha256:
                raise ConfigError(f'{key}={self.path}: checkpoint {step} was trained with '
                                  f'tokenizer {meta.get("tokenizer_sha256")}, but '
                                  f'{self.tokenizer_path} is {tokenizer.sha256}')
            stage = meta.get('config', {}).get('stage')
            if stages is not None and stage not in stages:
                raise ConfigError(f'{key}={self.path} is a {stage!r} run, not {_kinds(stages)}')
            return CheckpointLineage(tokenizer, GPTConfig.from_dict(meta['model']), step, meta,
                                     checkpointer)
        except BaseException:
            # The checkpointer's background threads must stop before the error ends the
            # process: left running, they raise at interpreter shutdown ("cannot schedule new
            # futures after shutdown") under the one-line error.
            checkpointer.close()
            raise

    def best_step(self) -> int:
        """The step a later stage takes with `best`: of the lowest validation loss (the
        latest if none has one), read by this process alone."""
        lineage = self.lineage('workdir', best=True, local=True)
        lineage.close()
        return lineage.step

    def latest_meta(self) -> dict:
        """The metadata of the latest checkpoint (model config, tokenizer, stage config), read
        by this process alone."""
        lineage = self.lineage('workdir', local=True)
        lineage.close()
        return lineage.meta


def _hugging_face_directory(path: pathlib.Path) -> bool:
    """Whether `path` looks like a Hugging Face model directory (its `config.json` names an
    architecture; a stage's `config.json` does not)."""
    try:
        return 'architectures' in json.loads((path / hf.CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _kinds(stages: tuple[str, ...]) -> str:
    kinds = [KINDS.get(s, repr(s)) for s in stages]
    return ' or '.join([', '.join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)


# --- lineages -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointLineage:
    """An earlier stage's tokenizer, model config and checkpoint (`step`)."""

    tokenizer: Tokenizer
    model_config: GPTConfig
    step: int
    meta: dict
    checkpointer: Checkpointer

    def restore_params(self, model_cls, mesh, rules: str, step: int | None = None,
                       model_config: GPTConfig | None = None):
        """`(graphdef, params)` of the checkpoint's `model_cls` (`GPT` or `ScoreModel`), laid
        out over `mesh` by `rules`; no optimizer state is read. The graphdef computes as
        `model_config` says (default: as the checkpoint's run did)."""
        config = model_config or self.model_config
        graphdef, abstract = abstract_model(lambda rngs: model_cls(config, rngs=rngs))
        within = POLICY_WITHIN.get(self.meta.get('config', {}).get('stage'), ())
        params = self.checkpointer.restore_params(
            self.step if step is None else step,
            abstract_with_shardings(abstract, sharding.param_shardings(abstract, mesh, rules)),
            within=within)
        return graphdef, params

    def restore_transformer(self, abstract_placed, mesh, rules: str) -> dict:
        """`{'transformer': ...}` of the checkpoint onto `abstract_placed` (the transformer's
        abstract arrays with their shardings over `mesh` by `rules`), as a pure dict."""
        del mesh, rules  # the abstract arrays carry their shardings
        restored = self.checkpointer.restore_params(
            self.step, {'transformer': abstract_placed},
            within=POLICY_WITHIN.get(self.meta.get('config', {}).get('stage'), ()))
        return nnx.to_pure_dict(nnx.State(restored))

    def close(self) -> None:
        self.checkpointer.close()


@dataclasses.dataclass(frozen=True)
class HFLineage:
    """A Hugging Face model directory (`hf:DIR`): a language model to start from at step 0.
    The tokenizer gains the reserved special tokens it lacks, and the embedding a row for each
    (`gptstack.data.hf_tokenizer`)."""

    directory: pathlib.Path
    tokenizer: Tokenizer
    model_config: GPTConfig
    step: int = 0

    @classmethod
    def open(cls, directory: str | os.PathLike) -> HFLineage:
        """Reads `tokenizer.json` and `config.json`, and checks the safetensors files' headers
        against them (no tensor is read yet), so that a bad directory fails before any work.

        Raises:
            ConfigError: a model the architecture mapping refuses.
            DataError: a missing, truncated or unreadable file, a missing, misshapen or
                unexpected tensor, or a tokenizer larger than the embedding.
        """
        from gptstack.data.hf_tokenizer import HFTokenizer
        directory = pathlib.Path(directory)
        config = hf.gpt_config(hf.read_config(directory), str(directory / hf.CONFIG_FILE))
        hf.check(hf.Checkpoint(directory), config)
        tokenizer = HFTokenizer.load(directory / HFTokenizer.file_name)
        hf.check_tokenizer(directory, config, tokenizer)
        return cls(directory, tokenizer,
                   dataclasses.replace(config, vocab_size=max(config.vocab_size,
                                                              tokenizer.vocab_size)))

    @property
    def meta(self) -> dict:
        return {'config': {'stage': 'hf'}, 'model': dataclasses.asdict(self.model_config),
                'tokenizer_sha256': self.tokenizer.sha256, 'source': str(self.directory)}

    def restore_params(self, model_cls, mesh, rules: str, step: int | None = None,
                       model_config: GPTConfig | None = None):
        if model_cls is not GPT:
            raise ConfigError(f'{HF_PREFIX}{self.directory} holds a language model; a reward '
                              'model comes from a reward stage\'s workdir')
        config = model_config or self.model_config
        _, graphdef, params = hf.load_hf(
            self.directory, mesh, rules, tokenizer=self.tokenizer,
            **{field: getattr(config, field) for field in ('param_dtype', *COMPUTE_FIELDS)})
        return graphdef, params

    def restore_transformer(self, abstract_placed, mesh, rules: str) -> dict:
        del abstract_placed  # the language model's transformer is laid out by the same rules
        params = self.restore_params(GPT, mesh, rules)[1]
        return {'transformer': nnx.to_pure_dict(params['transformer'])}

    def close(self) -> None:
        pass


Lineage = CheckpointLineage | HFLineage


def start_from(config, key: str, stages: tuple[str, ...], purpose: str,
               workdir: pathlib.Path | None = None, best: bool = False) -> Lineage:
    """The lineage that `config.<key>` names: a workdir of one of `stages` (its best
    checkpoint by validation loss with `best`) or, where `stages` are language models,
    `hf:DIR`. With `workdir`, its tokenizer is copied there so the lineage is on disk."""
    if not config.get(key):
        raise ConfigError(f'{key}: name {purpose} (--config.{key}=workdirs/...)')
    source = str(config[key])
    if source.startswith(HF_PREFIX):
        if not any(stage in POLICY_WITHIN for stage in stages):
            raise ConfigError(f'{key}={source}: a Hugging Face directory holds a language '
                              f'model, not {_kinds(stages)}')
        lineage = HFLineage.open(source.removeprefix(HF_PREFIX))
    else:
        lineage = Workdir(source).lineage(key, stages, best)
    if workdir is not None and jax.process_index() == 0:
        Workdir(workdir).save_tokenizer(lineage.tokenizer)
    return lineage


# --- finished models ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A finished stage's model with what it needs to run: the tokenizer, its config and
    graphdef, its parameters over all local devices, and its checkpoint's metadata."""

    tokenizer: Tokenizer
    config: GPTConfig
    graphdef: object
    params: object
    mesh: jax.sharding.Mesh
    meta: dict


class Policy(LoadedModel):
    """A language model, ready to sample."""

    def sampler(self, batch_size: int, max_new_tokens: int, chat: bool = True) -> Sampler:
        """A sampler of at least `batch_size` rows; `chat` stops at the end of the assistant's
        turn too, otherwise only at `<|endoftext|>`."""
        tok = self.tokenizer
        stops = [tok.end_of_turn_id, tok.eot_id] if chat else [tok.eot_id]
        return Sampler(self.graphdef, self.config, self.mesh, 'fsdp', batch_size=batch_size,
                       max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=tok.pad_id,
                       vocab_size=tok.vocab_size)


class RewardModel(LoadedModel):
    """A reward model, ready to score replies."""

    def scorer(self, batch_size: int, fixed_width: bool = False) -> ScoreFn:
        """`scorer(prompts, completions) -> rewards`, rows at most as long as the model was
        trained on and its context (`best_of_n.reward_scorer`)."""
        batch_size = sharding.round_to_batch_shards(self.mesh, batch_size)
        shardings = jax.tree.map(lambda x: x.sharding, self.params)
        score_fn = make_score_fn(self.graphdef, self.mesh, 'fsdp', shardings, batch_size,
                                 self.tokenizer.reward_id)
        seq_len = min(self.meta['config']['data']['seq_len'], self.config.max_seq_len)
        return reward_scorer(score_fn, self.params, self.tokenizer, batch_size, seq_len,
                             fixed_width=fixed_width)


def load_policy(source: str | os.PathLike, step: int | None = None) -> Policy:
    """The language model of a pretraining, SFT, DPO or RL workdir (the latest checkpoint, or
    `step`) or of a Hugging Face directory (`hf:DIR`), its parameters laid out over all local
    devices by FSDP; no optimizer state is read."""
    if str(source).startswith(HF_PREFIX):
        if step is not None:
            raise ConfigError(f'{source}: a Hugging Face directory has no checkpoint steps')
        lineage = HFLineage.open(str(source).removeprefix(HF_PREFIX))
        return Policy(*_restore(lineage, GPT, None, source))
    lineage = Workdir(source).lineage('workdir', tuple(POLICY_WITHIN))
    return Policy(*_restore(lineage, GPT, step, source))


def load_reward_model(workdir: str | os.PathLike, step: int | None = None) -> RewardModel:
    """Like `load_policy`, for the `ScoreModel` of a reward-model run; by default its
    checkpoint of the lowest held-out loss."""
    lineage = Workdir(workdir).lineage('workdir', ('reward',), best=True)
    return RewardModel(*_restore(lineage, ScoreModel, step, workdir))


def _restore(lineage: Lineage, model_cls, step: int | None, source):
    if step is not None and step not in lineage.checkpointer.all_steps():
        raise ConfigError(f'workdir={source}: no checkpoint of step {step} (there are '
                          f'{lineage.checkpointer.all_steps()})')
    mesh = sharding.make_mesh(MeshConfig(fsdp=-1))
    graphdef, params = lineage.restore_params(model_cls, mesh, 'fsdp', step)
    lineage.close()
    return lineage.tokenizer, lineage.model_config, graphdef, params, mesh, lineage.meta
