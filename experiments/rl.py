"""Stage 4: reinforcement learning from an SFT workdir (`init_from`: actor and frozen
reference) and a reward-model workdir (`reward_from`: frozen reward model and PPO's critic's
starting point), by PPO, GRPO or RLOO (`rl.algorithm`).

Each iteration samples `data.batch_size` responses (`rl.ppo.group_size` to each training
prompt) with our KV-cache sampler, scores them with the reward model (or, with
`rl.reward='gold'`, with the task gold scorer: the verifiable-reward mode), holds the policy
near the reference by a KL penalty in the reward or the loss and runs clipped policy-gradient
epochs (see `gptstack.rollout` and `gptstack.steps.ppo`). GRPO and RLOO build no critic.
Evaluation samples held-out prompts and reports their gold score (sampled and greedy),
reward-model score and KL to the reference, for the SFT policy at step 0 and then during
training, so the report can plot proxy reward and gold score against KL: over-optimisation of
the reward model shows as the two parting ways. Re-running resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptstack import lineage as lineages
from gptstack import sharding, stage, stats
from gptstack.chat import reply_text
from gptstack.config import ConfigError, GPTConfig, OptimConfig, flatten
from gptstack.data import answers, tasks
from gptstack.data import pretrain as pretrain_data
from gptstack.data import prompts as prompts_data
from gptstack.data.sources import read_records, specs_from_config
from gptstack.data.tokenizer import render_prompt
from gptstack.evals import gold as gold_eval
from gptstack.metrics import read_metrics, train_flops_per_token, truncate_jsonl
from gptstack.model import GPT, ScoreModel
from gptstack.reports import rl as rl_report
from gptstack.rollout import PPOIteration
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState
from gptstack.steps import ppo

log = logging.getLogger(__name__)
HELD_OUT = 'held_out.jsonl'


def validate(config) -> stage.Setup:
    setup = stage.setup(config)
    ppo.PPOConfig.from_config(config.rl).check_batch(config.data.batch_size)
    if config.rl.reward not in ('model', 'gold'):
        raise ConfigError(f"rl.reward={config.rl.reward!r}: expected 'model' or 'gold'")
    for key, allowed in (('answer_format', prompts_data.ANSWER_FORMATS),
                         ('match', prompts_data.MATCHES)):
        if config.data[key] not in allowed:
            raise ConfigError(f'data.{key}={config.data[key]!r}: expected one of '
                              f'{", ".join(allowed)}')
    if config.rl.format_reward and (config.rl.reward != 'gold'
                                    or config.data.match not in answers.RULES):
        raise ConfigError(f'rl.format_reward={config.rl.format_reward}: a format reward is paid '
                          f"with verifiable rewards of a number match (rl.reward='gold' and "
                          f'data.match one of {", ".join(answers.RULES)}), not rl.reward='
                          f'{config.rl.reward!r} with data.match={config.data.match!r}')
    if config.rl.critic_head not in CRITIC_HEADS:
        raise ConfigError(f'rl.critic_head={config.rl.critic_head!r}: expected one of '
                          f'{CRITIC_HEADS}')
    if config.eval.baseline_from and (pathlib.Path(config.eval.baseline_from) /
                                      'config.json').exists():
        check_baseline(config)  # now, if it has run; otherwise when this stage starts
    return setup


# --- the SFT policy's evaluation, shared between runs ------------------------------------------
# Settings that shape training but not the evaluation of the SFT policy before it (step 0), as
# dotted prefixes; every other setting (the SFT and reward workdirs, the held-out prompts, the
# evaluation's size, sampler batch, precision, mesh, seed) must be equal for two runs to share
# that evaluation.
TRAINING_ONLY = ('stage', 'optim.', 'critic_optim.', 'train.', 'rl.', 'data.train',
                 'data.max_skips', 'eval.baseline_from')
EVALUATED_WITH = ('rl.ppo.temperature',)


def evaluation_differs(mine: dict, theirs: dict) -> list[str]:
    """The flattened settings (`config.flatten`) in which two RL runs' step-0 evaluations
    could differ."""
    def matters(key):
        return key in EVALUATED_WITH or not key.startswith(TRAINING_ONLY)

    return sorted(k for k in mine.keys() | theirs.keys()
                  if matters(k) and mine.get(k) != theirs.get(k))


def check_baseline(config) -> None:
    """Refuses an `eval.baseline_from` run whose step-0 evaluation would not be this run's."""
    source = pathlib.Path(config.eval.baseline_from)
    path = source / 'config.json'
    if not path.exists():
        raise ConfigError(f'eval.baseline_from={source}: no config.json there (expected the '
                          'workdir of an RL run from the same SFT model)')
    differs = evaluation_differs(flatten(config.to_dict()), flatten(json.loads(path.read_text())))
    if differs:
        raise ConfigError(f'eval.baseline_from={source}: its step-0 evaluation ran with other '
                          f'settings ({", ".join(differs[:4])}); drop eval.baseline_from to '
                          'evaluate the SFT policy here')


def baseline_evaluation(config) -> tuple[dict, dict | None]:
    """The step-0 metrics and per-prompt scores of `eval.baseline_from`, checked to be the
    evaluation this run would make: the same SFT policy on the same prompts with the same
    draws gives the same numbers, so runs that differ only in training share it."""
    check_baseline(config)
    source = pathlib.Path(config.eval.baseline_from)
    metrics = next((r for r in read_metrics(source) if r['step'] == 0), None)
    if metrics is None:
        raise ConfigError(f'eval.baseline_from={source}: its metrics.jsonl has no step-0 '
                          'evaluation (has the run started?)')
    lines = (source / HELD_OUT).read_text().splitlines() if (source / HELD_OUT).exists() else []
    per_prompt = next((r for r in map(json.loads, lines) if r['step'] == 0), None)
    if per_prompt is None and 'gold/sampled' in metrics:
        raise ConfigError(f'eval.baseline_from={source}: {HELD_OUT} there has no step-0 scores')
    return {k: v for k, v in metrics.items() if k != 'step'}, per_prompt


# How the critic's value head starts (its transformer is always the reward model's).
CRITIC_HEADS = ('zero', 'reward')


def critic_start(params: nnx.State, head: str) -> nnx.State:
    """The critic's first parameters: the reward model's, its score head zeroed for `zero`.

    With the reward model's head, the first values are the reward model's reading of every
    prefix, on its own arbitrary scale, not the value of the centred, KL-penalised return PPO
    optimises; until the critic is refit (the value clip moves it 0.2 per update), each token's
    advantage is the return minus that reading. A zero head makes the first advantages the
    returns themselves, as a critic-free policy gradient has them, and the critic learns from
    there.
    """
    if head == 'zero':
        params['score_head'] = jax.tree.map(jnp.zeros_like, params['score_head'])
    return params


def read_split(config, split: str) -> list[prompts_data.Prompt]:
    """Task prompts (train split for training, test split held out) or JSONL prompt files."""
    paths = config.data.train if split == 'train' else config.data.validation
    if paths == tasks.EMBEDDED_TASKS:
        n = config.data.train_prompts if split == 'train' else config.data.validation_prompts
        return prompts_data.task_prompts('train' if split == 'train' else 'test', n, config.seed)
    reader = functools.partial(prompts_data.read_prompts, prompt_field=config.data.prompt_field,
                               answer_field=config.data.answer_field,
                               answer_format=config.data.answer_format, match=config.data.match)
    return read_records(paths, reader, 'rl prompts', config.data.max_skips)


def load_roles(config, workdir: pathlib.Path) -> tuple[lineages.Lineage, lineages.Lineage]:
    """The SFT (actor, reference) and reward-model (reward, critic) lineages, checked to share
    one tokenizer."""
    sft = lineages.start_from(config, 'init_from', ('sft', 'rl', 'dpo'),
                           'the SFT workdir the policy starts from', workdir)
    # The reward model of the lowest held-out loss (the reward stage stops early and keeps it).
    rm = lineages.start_from(config, 'reward_from', ('reward',), 'the reward-model workdir',
                          best=True)
    if rm.tokenizer.sha256 != sft.tokenizer.sha256:
        raise ConfigError(f'reward_from={config.reward_from} uses tokenizer '
                          f'{rm.tokenizer.sha256}, but init_from={config.init_from} uses '
                          f'{sft.tokenizer.sha256}: they must share one tokenizer')
    return sft, rm


def load_prompts(config, workdir, tokenizer, ppo_config: ppo.PPOConfig, max_prompt: int):
    """The training and held-out prompts and the iterator over training prompt batches (zipped
    with PPO-ptx's pretraining rows, so both resume together)."""
    train, held_out = read_split(config, 'train'), read_split(config, 'validation')
    if config.eval.prompts > len(held_out):
        raise ConfigError(f'eval.prompts={config.eval.prompts} exceeds the {len(held_out)} '
                          f'held-out prompts of data.validation={config.data.validation} '
                          '(raise data.validation_prompts for the embedded suite)')
    if config.rl.reward == 'gold' and train[0].gold('') is None:
        raise ConfigError("rl.reward='gold' needs prompts with a gold scorer (embedded:tasks) "
                          "or an 'answer' field")
    data_iterator = iter(prompts_data.prompt_dataset(
        train, tokenizer, max_prompt,
        ppo_config.oversample * config.data.batch_size // ppo_config.group_size, config.seed))
    if ppo_config.ptx_coef > 0:
        data_iterator = prompts_data.ZipIterator(
            prompts=data_iterator, ptx=iter(ptx_dataset(config, workdir, tokenizer, ppo_config)))
    return train, held_out, data_iterator


def ptx_dataset(config, workdir, tokenizer, ppo_config: ppo.PPOConfig):
    """Packed pretraining rows for PPO-ptx: `rl.ptx.batch_size` rows for each of the
    iteration's `epochs * minibatches` updates, from the `rl.ptx.sources` mixture."""
    specs = specs_from_config(config.rl.ptx.sources)
    cache_dir = pathlib.Path(config.rl.ptx.cache_dir or workdir / 'cache')
    tokenized = [pretrain_data.tokenize_source(spec, tokenizer, cache_dir, seed=config.seed)
                 for spec in specs]
    rows = config.rl.ptx.batch_size * ppo_config.epochs * ppo_config.minibatches
    return pretrain_data.make_train_dataset(tokenized, config.rl.ptx.seq_len, rows,
                                            seed=config.seed)


def make_judge(tokenizer, train_prompts: list[prompts_data.Prompt], format_reward: float = 0.0):
    """`judge(prompt_batch, responses, lengths)`: the gold score of each reply (logged; with
    verifiable rewards also the reward, plus `format_reward` for each reply whose final answer
    is in the form its prompt reads, `formatted`), or nothing for prompts without a scorer."""
    def judge(prompt_batch, responses, lengths):
        replies = [reply_text(tokenizer, row[:n]) for row, n in zip(responses, lengths,
                                                                     strict=True)]
        prompts = [train_prompts[int(i)] for i in prompt_batch['index']]
        gold = [p.gold(r) for p, r in zip(prompts, replies, strict=True)]
        if any(g is None for g in gold):
            return {}
        gold = np.asarray(gold)
        if not format_reward:
            return {'reward': gold.astype(np.float32), 'gold': gold}
        formatted = np.asarray([p.formatted(r) for p, r in zip(prompts, replies, strict=True)])
        return {'reward': (gold + format_reward * formatted).astype(np.float32), 'gold': gold,
                'formatted': formatted}

    return judge


def iteration_mfu(metrics: dict, ppo_config: ppo.PPOConfig, actor: GPTConfig,
                  critic: GPTConfig | None, reward: GPTConfig, batch_size: int,
                  peak_flops: float) -> float:
    """Model FLOPs utilisation of one iteration, from its timings and token counts: each new
    token's forward pass through the actor; the scoring of the trained rollouts by the actor,
    the reference, the reward model and the critic (forward); and the update's epochs of the
    actor and the critic (forward and backward), over the iteration's generation, scoring and
    update time. (Prompts' prefill and, with oversampling, the scoring of the replies left out
    are not counted.)"""
    row_tokens = metrics['tokens_per_sec/score'] * metrics['time/score']
    seq_len = round(row_tokens / batch_size)

    def train(config, lm_head=True):
        return train_flops_per_token(config, seq_len, lm_head)

    generated = metrics['tokens_per_sec/generate'] * metrics['time/generate']
    flops = generated * train(actor) / 3
    flops += row_tokens * (2 * train(actor) + train(reward, lm_head=False)) / 3
    flops += ppo_config.epochs * row_tokens * train(actor)
    if critic is not None:
        flops += row_tokens * train(critic, lm_head=False) * (1 / 3 + ppo_config.epochs)
    seconds = metrics['time/generate'] + metrics['time/score'] + metrics['time/update']
    return flops / seconds / peak_flops


def make_evaluate(config, trainer: PPOIteration, tokenizer, prompts: list[prompts_data.Prompt],
                  max_prompt: int, workdir: pathlib.Path):
    """`evaluate(state)`: on the held-out prompts, the gold score of `eval.samples` sampled
    replies per prompt (a prompt scores their mean) and of one greedy reply, each with its
    standard error over prompts and its mean by task family and level; for the sampled replies the
    reward-model score and the KL to the reference (summed over each response). Every
    evaluation's per-prompt scores go to `<workdir>/held_out.jsonl`, so the gain over the SFT
    policy (step 0) is paired over prompts: the same prompts and the same random draws, far less
    noisy than two separate means."""
    chosen = prompts[:config.eval.prompts]
    families = [p.task.family if p.task else None for p in chosen]
    levels = [p.task.level if p.task else None for p in chosen]
    samples = config.eval.samples
    rendered = [render_prompt(tokenizer, p.messages)[-max_prompt:] for p in chosen]
    modes = {'sampled': (SamplingParams(temperature=trainer.config.temperature), samples),
             'greedy': (SamplingParams(temperature=0.0), 1)}
    path = workdir / HELD_OUT

    def evaluate(state) -> dict:
        key = jax.random.fold_in(jax.random.key(config.seed + 1), 0)  # the same draws each time
        metrics, per_prompt = {}, {}
        for mode, (sampling, n) in modes.items():
            sample = trainer.evaluate(state, [row for row in rendered for _ in range(n)], key,
                                      sampling, score=mode == 'sampled')
            if mode == 'sampled':
                kls, scores = sample.kl, sample.rm_score
            gold = [chosen[i // n].gold(reply_text(tokenizer, reply))
                    for i, reply in enumerate(sample.replies)]
            if any(g is None for g in gold):
                continue
            gold = np.asarray(gold).reshape(len(chosen), n).mean(axis=1)
            per_prompt[mode] = gold.tolist()
            metrics.update(gold_eval.summary(gold, mode))
            metrics.update(gold_eval.by_family(gold, families, mode))
            metrics.update(gold_eval.by_level(gold, levels, mode))
        metrics['val/kl'] = float(np.mean(kls))
        metrics['val/rm_score'], metrics['val/rm_score_stderr'] = stats.mean_and_stderr(scores)
        if per_prompt and jax.process_index() == 0:
            step = int(state.step)
            earlier = [json.loads(line) for line in path.read_text().splitlines()] \
                if path.exists() else []
            baseline = next((r for r in earlier if r['step'] == 0), None)
            with open(path, 'a') as f:
                f.write(json.dumps({'step': step, **per_prompt}) + '\n')
            for mode, values in per_prompt.items():
                if baseline is not None and step > 0:
                    metrics[f'gold/{mode}_gain'], metrics[f'gold/{mode}_gain_stderr'] = \
                        stats.paired(values, baseline[mode])
        return metrics

    return evaluate


def run(config, workdir: pathlib.Path) -> str:
    setup = validate(config)
    mesh, rules = setup.mesh, setup.rules
    ppo_config = ppo.PPOConfig.from_config(config.rl)
    sft, rm = load_roles(config, workdir)
    tokenizer = sft.tokenizer
    actor_config, critic_config = (setup.computing(x.model_config) for x in (sft, rm))
    batch_size, max_new = config.data.batch_size, config.data.max_new_tokens
    max_prompt = actor_config.max_seq_len - max_new - 1
    train_prompts, eval_prompts, data_iterator = load_prompts(config, workdir, tokenizer,
                                                              ppo_config, max_prompt)

    # --- state: resumed, or SFT actor (+ RM critic for PPO) with fresh optimizers -----------
    actor = stage.Trainable.create(lambda rngs: GPT(actor_config, rngs=rngs), setup.optim,
                                   mesh, rules)
    critic = None
    if ppo_config.critic:
        critic = stage.Trainable.create(lambda rngs: ScoreModel(critic_config, rngs=rngs),
                                        OptimConfig.from_dict(config.critic_optim), mesh, rules)
    abstract_state = ppo.PPOState.structure(
        actor.abstract_state, critic and critic.abstract_state, ppo_config,
        jax.ShapeDtypeStruct((), jnp.float32))
    shardings = ppo.PPOState.structure(actor.shardings, critic and critic.shardings,
                                       ppo_config, sharding.replicated(mesh))
    reward_graphdef, reward_params = rm.restore_params(ScoreModel, mesh, rules,
                                                       model_config=critic_config)
    reference = ppo.Frozen(actor.graphdef, sft.restore_params(GPT, mesh, rules)[1])
    reward = ppo.Frozen(reward_graphdef, reward_params)

    def init():
        def fresh(trainable, params):
            return TrainState(jnp.zeros((), jnp.int32), params, trainable.tx.init(params))

        critic_start_params = None
        if critic is not None:
            critic_start_params = critic_start(rm.restore_params(ScoreModel, mesh, rules)[1],
                                               config.rl.critic_head)
        return jax.jit(lambda a, c: ppo.PPOState.create(
            fresh(actor, a), None if c is None else fresh(critic, c), ppo_config),
            out_shardings=shardings)(sft.restore_params(GPT, mesh, rules)[1],
                                     critic_start_params)

    run_ = stage.Stage(config, workdir, setup)
    state = run_.start(abstract_state, shardings, tokenizer, actor_config, data_iterator,
                       init=init)
    sft.close()
    rm.close()

    # --- the PPO iteration, evaluation and the loop -------------------------------------------
    sampler = Sampler(actor.graphdef, actor_config, mesh, rules, batch_size=batch_size,
                      max_new_tokens=max_new, stop_ids=[tokenizer.end_of_turn_id,
                                                        tokenizer.eot_id],
                      pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    trainer = PPOIteration(ppo_config, actor_graphdef=actor.graphdef,
                           critic_graphdef=critic and critic.graphdef, reference=reference,
                           reward=reward, sampler=sampler, tx_actor=actor.tx,
                           tx_critic=critic and critic.tx, mesh=mesh,
                           rules=rules, reward_id=tokenizer.reward_id,
                           verifiable=config.rl.reward == 'gold',
                           judge=make_judge(tokenizer, train_prompts,
                                            config.rl.format_reward))

    def step_fn(state, batch):
        key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
        if ppo_config.ptx_coef > 0:
            state, metrics = trainer(state, batch['prompts'], key, batch['ptx'])
        else:
            state, metrics = trainer(state, batch, key)
        metrics['mfu'] = iteration_mfu(metrics, ppo_config, actor_config,
                                       critic_config if ppo_config.critic else None,
                                       critic_config, batch_size, setup.peak_flops)
        return state, metrics

    evaluate = make_evaluate(config, trainer, tokenizer, eval_prompts, max_prompt, workdir)
    truncate_jsonl(workdir / HELD_OUT, run_.resumed_from or 0)
    if run_.resumed_from is None:  # the SFT policy: step 0 of the curves
        (workdir / HELD_OUT).unlink(missing_ok=True)
        if config.eval.baseline_from:
            metrics, per_prompt = baseline_evaluation(config)
            log.info('step 0: the SFT policy\'s evaluation of %s', config.eval.baseline_from)
            if per_prompt is not None and jax.process_index() == 0:
                (workdir / HELD_OUT).write_text(json.dumps(per_prompt) + '\n')
        else:
            metrics = evaluate(state)
        run_.metrics().write(0, metrics)
    meta = run_.meta(tokenizer, actor_config, algorithm=ppo_config.algorithm,
                     **({'critic_model': dataclasses.asdict(critic_config)} if critic else {}),
                     init_from=str(config.init_from), reward_from=str(config.reward_from))
    result = run_.train(state, step_fn, data_iterator, data_iterator, meta=meta,
                        evaluate=evaluate, tokens_per_step=batch_size * max_new)
    if run_.finished(result):
        log.debug('report: %s', rl_report.write(workdir, config))
    return result.status
