"""Stage 4: reinforcement learning with PPO from an SFT workdir (`init_from`: actor and frozen
reference) and a reward-model workdir (`reward_from`: frozen reward model and the critic's
starting point).

Each iteration samples `data.batch_size` responses (`rl.ppo.group_size` to each training
prompt) with our KV-cache sampler, scores them with the reward model (or, with
`rl.reward='gold'`, with the task gold scorer: the verifiable-reward mode), subtracts a
per-token KL penalty to the reference and runs PPO epochs (see `gptstack.rollout` and
`gptstack.steps.ppo`).
Evaluation samples held-out prompts and reports their gold score (sampled and greedy),
reward-model score and KL to the reference, for the SFT policy at step 0 and then during
training, so the report can plot proxy reward and gold score against KL: over-optimisation of
the reward model shows as the two parting ways. Re-running resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from experiments import pretrain as pretrain_stage
from experiments.sft import EMBEDDED_TASKS
from gptstack import loop, report, sharding, workdirs
from gptstack.chat import reply_text
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import ConfigError, OptimConfig
from gptstack.data import pretrain as pretrain_data
from gptstack.data import prompts as prompts_data
from gptstack.data.sources import DataError, SkipBudget, expand_paths, specs_from_config
from gptstack.data.tokenizer import render_prompt
from gptstack.metrics import MetricsWriter, read_metrics, truncate_jsonl
from gptstack.model import GPT, ScoreModel
from gptstack.optim import make_optimizer
from gptstack.rollout import PPOIteration
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState, abstract_model, abstract_train_state, state_shardings
from gptstack.steps import ppo

log = logging.getLogger(__name__)


def read_split(config, split: str) -> list[prompts_data.Prompt]:
    """Task prompts (train split for training, test split held out) or JSONL prompt files."""
    paths = config.data.train if split == 'train' else config.data.validation
    if paths == EMBEDDED_TASKS:
        n = config.data.train_prompts if split == 'train' else config.data.validation_prompts
        return prompts_data.task_prompts('train' if split == 'train' else 'test', n, config.seed)
    budget = SkipBudget(config.data.max_skips)
    prompts = [p for pattern in paths.split(',')
               for path in expand_paths((pattern.strip(),), 'rl prompts')
               for p in prompts_data.read_prompts(path, budget)]
    if budget.skipped:
        log.warning('skipped %d malformed prompts %s', budget.skipped, dict(budget.by_reason))
    if not prompts:
        raise DataError(f'no prompts in {paths}')
    return prompts


# --- the stage --------------------------------------------------------------------------------
def load_roles(config):
    """Tokenizer, configs and checkpoints of the SFT (actor, reference) and reward-model (reward,
    critic) workdirs, checked to belong together."""
    tokenizer, actor_config, sft_checkpointer, sft_step = workdirs.load_base(
        config.init_from, 'the SFT workdir the policy starts from')
    if not config.reward_from:
        raise ConfigError('reward_from: name the reward-model workdir '
                          '(--config.reward_from=workdirs/reward)')
    rm_tokenizer, critic_config, rm_checkpointer, rm_step = workdirs.load_base(
        config.reward_from, 'the reward-model workdir')
    stage = rm_checkpointer.read_meta(rm_step).get('config', {}).get('stage')
    if stage != 'reward':
        raise ConfigError(f'reward_from={config.reward_from} is a {stage!r} run, not a reward '
                          'model')
    if rm_tokenizer.sha256 != tokenizer.sha256:
        raise ConfigError(f'reward_from={config.reward_from} uses tokenizer '
                          f'{rm_tokenizer.sha256}, but init_from={config.init_from} uses '
                          f'{tokenizer.sha256}: they must share one tokenizer')
    return tokenizer, actor_config, critic_config, (sft_checkpointer, sft_step), (
        rm_checkpointer, rm_step)


def run(config, workdir: pathlib.Path) -> str:
    # --- configs, mesh, the four roles: every check before expensive work --------------------
    setup = pretrain_stage.setup(config)
    mesh, rules = setup.mesh, setup.rules
    if jax.process_count() > 1:
        raise ConfigError('the rl stage runs on one process for now (the rollout sampler takes '
                          'host prompts)')
    ppo_config = ppo.PPOConfig(**config.rl.ppo)
    ppo_config.check_batch(config.data.batch_size)
    if config.rl.reward not in ('model', 'gold'):
        raise ConfigError(f"rl.reward={config.rl.reward!r}: expected 'model' or 'gold'")
    tokenizer, actor_config, critic_config, (sft_ckpt, sft_step), (rm_ckpt, rm_step) = \
        load_roles(config)
    shutil.copyfile(pathlib.Path(config.init_from) / 'tokenizer.model',
                    workdir / 'tokenizer.model')
    train_prompts, eval_prompts = read_split(config, 'train'), read_split(config, 'validation')
    if config.eval.prompts > len(eval_prompts):
        raise ConfigError(f'eval.prompts={config.eval.prompts} exceeds the {len(eval_prompts)} '
                          f'held-out prompts of data.validation={config.data.validation} '
                          '(raise data.validation_prompts for the embedded suite)')
    if config.rl.reward == 'gold' and train_prompts[0].gold('') is None:
        raise ConfigError("rl.reward='gold' needs prompts with a gold scorer (embedded:tasks) "
                          "or an 'answer' field")
    batch_size, max_new = config.data.batch_size, config.data.max_new_tokens
    max_prompt = actor_config.max_seq_len - max_new - 1
    data_iterator = iter(prompts_data.prompt_dataset(train_prompts, tokenizer, max_prompt,
                                                     batch_size // ppo_config.group_size,
                                                     config.seed))
    if ppo_config.ptx_coef > 0:  # PPO-ptx: pretraining rows resume together with the prompts
        data_iterator = prompts_data.ZipIterator(
            prompts=data_iterator, ptx=iter(ptx_dataset(config, workdir, tokenizer, ppo_config)))

    # --- state: resumed, or SFT actor + RM critic with fresh optimizers -----------------------
    tx_actor, _ = make_optimizer(setup.optim)
    tx_critic, _ = make_optimizer(OptimConfig.from_dict(config.critic_optim))
    actor_fn = lambda rngs: GPT(actor_config, rngs=rngs)  # noqa: E731
    critic_fn = lambda rngs: ScoreModel(critic_config, rngs=rngs)  # noqa: E731
    actor_graphdef, _ = abstract_model(actor_fn)
    critic_graphdef, _ = abstract_model(critic_fn)
    abstract_actor = abstract_train_state(actor_fn, tx_actor)
    abstract_critic = abstract_train_state(critic_fn, tx_critic)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    abstract_state = ppo.PPOState.structure(abstract_actor, abstract_critic, ppo_config, scalar)
    shardings = ppo.PPOState.structure(state_shardings(abstract_actor, mesh, rules, tx_actor),
                                       state_shardings(abstract_critic, mesh, rules, tx_critic),
                                       ppo_config, sharding.replicated(mesh))
    actor_params = abstract_with_shardings(abstract_actor.params, shardings.actor.params)
    critic_params = abstract_with_shardings(abstract_critic.params, shardings.critic.params)
    reference_params = sft_ckpt.restore_params(sft_step, actor_params)
    reward_params = rm_ckpt.restore_params(rm_step, critic_params)
    checkpointer = Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    resumed = pretrain_stage.resume(checkpointer, abstract_state, shardings, tokenizer,
                                    actor_config, data_iterator)
    if resumed:
        state, wall_offset = resumed
    else:
        state = jax.jit(lambda actor, critic: ppo.PPOState.create(
            TrainState(jnp.zeros((), jnp.int32), actor, tx_actor.init(actor)),
            TrainState(jnp.zeros((), jnp.int32), critic, tx_critic.init(critic)), ppo_config),
            out_shardings=shardings)(sft_ckpt.restore_params(sft_step, actor_params),
                                     rm_ckpt.restore_params(rm_step, critic_params))
        wall_offset = 0.0
    sft_ckpt.close()
    rm_ckpt.close()

    # --- the PPO iteration and evaluation -----------------------------------------------------
    stops = [tokenizer.end_of_turn_id, tokenizer.eot_id]
    sampler = Sampler(actor_graphdef, actor_config, mesh, rules, batch_size=batch_size,
                      max_new_tokens=max_new, stop_ids=stops, pad_id=tokenizer.pad_id)

    def judge(prompt_batch, responses, lengths):
        replies = [reply_text(tokenizer, row[:n]) for row, n in zip(responses, lengths,
                                                                     strict=True)]
        gold = [train_prompts[int(i)].gold(r) for i, r in zip(prompt_batch['index'], replies,
                                                               strict=True)]
        if any(g is None for g in gold):
            return {}
        return {'reward': np.asarray(gold, np.float32), 'gold': np.asarray(gold)}

    trainer = PPOIteration(ppo_config, actor_graphdef=actor_graphdef,
                           critic_graphdef=critic_graphdef,
                           reference=ppo.Frozen(actor_graphdef, reference_params),
                           reward=ppo.Frozen(critic_graphdef, reward_params), sampler=sampler,
                           tx_actor=tx_actor, tx_critic=tx_critic, mesh=mesh, rules=rules,
                           reward_id=tokenizer.reward_id, verifiable=config.rl.reward == 'gold',
                           judge=judge)
    base_key = jax.random.key(config.seed)

    def step_fn(state, batch):
        key = jax.random.fold_in(base_key, int(state.step))
        if ppo_config.ptx_coef > 0:
            return trainer(state, batch['prompts'], key, batch['ptx'])
        return trainer(state, batch, key)

    evaluate = make_evaluate(config, trainer, tokenizer, eval_prompts, max_prompt, workdir)
    writer = MetricsWriter(workdir, resume_step=latest)
    if latest is None:
        (workdir / HELD_OUT).unlink(missing_ok=True)
    else:
        truncate_jsonl(workdir / HELD_OUT, latest)
    if latest is None:  # the SFT policy: step 0 of the curves
        writer.write(0, evaluate(state))
    meta = {'model': dataclasses.asdict(actor_config), 'critic_model':
            dataclasses.asdict(critic_config), 'tokenizer_sha256': tokenizer.sha256,
            'seed': config.seed, 'config': config.to_dict(), 'init_from': str(config.init_from),
            'reward_from': str(config.reward_from)}
    result = loop.train(
        state=state, step_fn=step_fn, batches=data_iterator, data_iterator=data_iterator,
        config=setup.loop, checkpointer=checkpointer, writer=writer, workdir=workdir,
        evaluate=evaluate, sample=None, checkpoint_meta=meta,
        tokens_per_step=batch_size * max_new, wall_time_offset=wall_offset)
    writer.close()
    checkpointer.close()
    if result.status == 'finished' and jax.process_index() == 0:
        path = write_report(workdir, config)
        log.info('report: %s', path)
    return result.status


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


HELD_OUT = 'held_out.jsonl'


def make_evaluate(config, trainer: PPOIteration, tokenizer, prompts: list[prompts_data.Prompt],
                  max_prompt: int, workdir: pathlib.Path):
    """`evaluate(state)`: on the held-out prompts, the gold score of `eval.samples` sampled
    replies per prompt (a prompt scores their mean) and of one greedy reply, each with its
    standard error over prompts; for the sampled replies the reward-model score and the KL to
    the reference (summed over each response). Every evaluation's per-prompt scores go to
    `<workdir>/held_out.jsonl`, so the gain over the SFT policy (step 0) is paired over prompts:
    the same prompts and the same random draws, far less noisy than two separate means."""
    chosen = prompts[:config.eval.prompts]
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
            metrics[f'gold/{mode}'] = float(gold.mean())
            metrics[f'gold/{mode}_stderr'] = float(gold.std(ddof=1) / math.sqrt(len(gold)))
            for family in sorted({p.task.family for p in chosen if p.task}):
                mine = np.asarray([p.task is not None and p.task.family == family
                                   for p in chosen])
                metrics[f'gold/{mode}/{family}'] = float(gold[mine].mean())
        metrics['val/kl'] = float(np.mean(kls))
        metrics['val/rm_score'] = float(np.mean(scores))
        metrics['val/rm_score_stderr'] = float(np.std(scores, ddof=1) / math.sqrt(len(scores)))
        if per_prompt and jax.process_index() == 0:
            step = int(state.step)
            earlier = [json.loads(line) for line in path.read_text().splitlines()] \
                if path.exists() else []
            baseline = next((r for r in earlier if r['step'] == 0), None)
            with open(path, 'a') as f:
                f.write(json.dumps({'step': step, **per_prompt}) + '\n')
            for mode, values in per_prompt.items():
                if baseline is not None and step > 0:
                    gain = np.asarray(values) - np.asarray(baseline[mode])
                    metrics[f'gold/{mode}_gain'] = float(gain.mean())
                    metrics[f'gold/{mode}_gain_stderr'] = float(
                        gain.std(ddof=1) / math.sqrt(len(gain)))
        return metrics

    return evaluate


def kl_coefs(records, config) -> str:
    """The β the iterations used, as logged: its start and end under the adaptive controller,
    else each value with its steps (a resumed run may have changed `rl.ppo.kl_coef`)."""
    logged = [(r['step'], r['kl_coef']) for r in records if 'kl_coef' in r]
    if not logged:
        return 'n/a'
    if config.rl.ppo.target_kl > 0:
        return (f'{logged[0][1]:.4g} → {logged[-1][1]:.4g} (adapted toward a KL of '
                f'{config.rl.ppo.target_kl:g} nats per response)')
    spans = []
    for step, value in logged:
        if spans and f'{value:.4g}' == spans[-1][0]:
            spans[-1][2] = step
        else:
            spans.append([f'{value:.4g}', step, step])
    if len(spans) == 1:
        return spans[0][0]
    return ', '.join(f'{v} (steps {a}–{b})' if a < b else f'{v} (step {a})'
                     for v, a, b in spans)


def write_report(workdir, config) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val/kl' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})

    def score(record, mode):
        if f'gold/{mode}' not in record:
            return 'n/a'
        return f'{record[f"gold/{mode}"]:.4f} ± {record[f"gold/{mode}_stderr"]:.4f}'

    def gain(record, mode):
        if f'gold/{mode}_gain' not in record:
            return 'n/a'
        mean, stderr = record[f'gold/{mode}_gain'], record[f'gold/{mode}_gain_stderr']
        return f'{mean:+.4f} ± {stderr:.4f} ({mean / max(stderr, 1e-12):.1f} standard errors)'

    plots = [
        report.plot(records, {'reward-model score (train rollouts)': 'rm_score',
                              'gold score (train rollouts)': 'gold'}, workdir / 'reward.png',
                    title='Rewards during PPO', ylabel='mean per response'),
        report.plot(records, {'KL to the SFT model (train rollouts)': 'kl'}, workdir / 'kl.png',
                    title='KL per response', ylabel='nats'),
        report.plot([{**r, 'step': r['val/kl']} for r in evals],
                    {'reward-model score': 'val/rm_score', 'gold score (sampled)':
                     'gold/sampled'}, workdir / 'reward_vs_kl.png',
                    title='Held-out reward against KL (over-optimisation)',
                    ylabel='mean per response', xlabel='KL to the SFT model (nats per response)'),
        report.plot(records, {'policy': 'policy_loss', 'value': 'value_loss'},
                    workdir / 'losses.png', title='PPO losses', ylabel='loss'),
    ]
    summary = [
        ('policy from', config.init_from), ('reward model from', config.reward_from),
        ('reward', 'reward model' if config.rl.reward == 'model' else 'gold scorer (verifiable)'),
        ('iterations × rollouts', f'{last.get("step", 0)} × {config.data.batch_size}'),
        ('KL coefficient β', kl_coefs(records, config)),
        (f'held-out gold score, sampled ({config.eval.samples} per prompt): SFT → PPO',
         f'{score(first, "sampled")} → {score(last, "sampled")}'),
        ('gain over the SFT policy, sampled (paired over prompts)', gain(last, 'sampled')),
        ('held-out gold score, greedy: SFT → PPO', f'{score(first, "greedy")} → '
                                                   f'{score(last, "greedy")}'),
        ('gain over the SFT policy, greedy (paired over prompts)', gain(last, 'greedy')),
        ('held-out reward-model score: SFT → PPO', f'{first.get("val/rm_score", math.nan):.4f}'
                                                   f' → {last.get("val/rm_score", math.nan):.4f}'),
        ('KL of the final policy to the SFT model (nats per response)',
         f'{last.get("val/kl", math.nan):.3f}'),
    ]
    rows = [(r['step'], r.get('val/kl'), r.get('val/rm_score'), r.get('gold/sampled'),
             gain(r, 'sampled') if r['step'] else '', r.get('gold/greedy'))
            for r in evals]
    families = sorted(k.split('/')[-1] for k in first if k.startswith('gold/sampled/'))
    family_rows = [(f, first[f'gold/sampled/{f}'], last.get(f'gold/sampled/{f}', math.nan))
                   for f in families]
    return report.write(workdir, 'PPO report', [
        ('Summary', report.table(['', ''], summary)),
        ('Held-out evaluations', report.table(
            ['step', 'KL', 'reward-model score', 'gold (sampled)', 'gain over SFT (paired)',
             'gold (greedy)'], rows)),
        ('Held-out gold score by task family (sampled)', report.table(
            ['family', 'SFT', 'PPO'], family_rows) if family_rows else 'no gold scorer'),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        ('Config', report.code_block(json.dumps(config.to_dict(), indent=1))),
    ])
