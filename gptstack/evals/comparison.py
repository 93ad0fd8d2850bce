"""The recipe's models side by side on the same held-out task prompts: the base model (prompted
with solved examples, the way a base model can be coaxed into answering), the SFT model,
best-of-N with the reward model, DPO on the reward model's comparisons, PPO, and PPO and GRPO
with the gold scorer as their reward (what a perfect reward model would give).

Each model draws `samples` replies per prompt at temperature 1 (a prompt's score is the mean over
them) and one greedy reply; best-of-N is the reward model's pick among N of the SFT samples,
scored exactly over all N-subsets of the pool (`best_of_n.expected_best_of_n`). Gains are paired
over prompts. Standard errors are stratified by the task generator's cells, family and level:
the prompts fix that mix, so the spread between cells is not noise in a comparison of models on
these prompts; the unstratified errors are kept alongside. The sampled scores are also given by
task family and by level (keys '1', '2', '3', as JSON keeps them).

The base model draws `base_samples` replies per prompt (its few-shot prompts are long, and its
score only shows what a prompt coaxes out of it). Each trained policy's KL to the SFT model is
measured on its own replies, the first sample of each prompt: the mean of
`log π(reply) - log π_SFT(reply)`, summed over the reply's tokens. Best-of-N's is the analytic
`log N - (N - 1) / N` (Stiennon et al., 2020).
"""

from __future__ import annotations

import math
import pathlib
import time

import jax
import numpy as np

from gptstack import stats
from gptstack.chat import reply_text, sample_reply_tokens
from gptstack.config import ConfigError
from gptstack.data import tasks
from gptstack.evals import gold
from gptstack.evals.best_of_n import expected_best_of_n
from gptstack.lineage import load_policy, load_reward_model
from gptstack.rollout import reply_log_probs
from gptstack.sampling import Sampler, SamplingParams

# The models of the comparison, in the order of the recipe, and the stage each comes from; the
# gold-reward runs are the ceiling a perfect reward model would give.
MODELS = ('base', 'sft', 'best_of_n', 'dpo', 'ppo', 'ppo_gold', 'grpo')
MODEL_NAMES = {'base': 'base (few-shot prompt)', 'sft': 'SFT', 'best_of_n': 'best-of-N (SFT + RM)',
               'dpo': 'DPO', 'ppo': 'PPO', 'ppo_gold': 'PPO, gold reward (ceiling)',
               'grpo': 'GRPO, gold reward'}
SAMPLED_FROM = {'base': 'pretrain', 'sft': 'sft', 'dpo': 'dpo', 'ppo': 'rl', 'ppo_gold': 'rl_gold',
                'grpo': 'grpo'}
# Each sampled model's draws come from its own index, fixed when it joined the comparison, so a
# model added later leaves the others' replies as they were.
DRAWS = {'base': 0, 'sft': 1, 'ppo': 3, 'ppo_gold': 4, 'dpo': 5, 'grpo': 6}
# Gains paired over prompts: each model against the one it improves on, and the contrasts the
# recipe asks about (a critic-free RL run on a verifiable reward against PPO on the learned one).
GAINS = (('sft', 'base'), ('best_of_n', 'sft'), ('dpo', 'sft'), ('ppo', 'sft'),
         ('ppo_gold', 'sft'), ('grpo', 'sft'))
CONTRASTS = (('grpo', 'ppo'), ('grpo', 'ppo_gold'), ('dpo', 'best_of_n'))


def held_out_prompts(config) -> tuple[list[tasks.Task], np.ndarray]:
    """The test-split tasks of the comparison and each one's cell (family/level); refuses too
    few prompts for stratified standard errors (cheap: call it before any training)."""
    held_out = tasks.generate('test', config.compare.prompts, config.seed)
    cells = np.asarray([f'{t.family}/{t.level}' for t in held_out])
    if len(held_out) <= len(set(cells)):
        raise ConfigError(f'compare.prompts={config.compare.prompts}: the held-out prompts fall '
                          f'in {len(set(cells))} task families and levels, and stratified '
                          'standard errors need more prompts than that')
    return held_out, cells


def few_shot_prompt(task: tasks.Task, shots: list[tasks.Task]) -> str:
    """A plain-text prompt that coaxes a base model into answering: solved examples of the same
    family, then the question."""
    solved = ''.join(f'Question: {s.prompt}\nAnswer: {s.answer}\n\n' for s in shots)
    return f'{solved}Question: {task.prompt}\nAnswer:'


def few_shot_replies(sampler: Sampler, params, tok, held_out: list[tasks.Task], n_shots: int,
                     n: int, key: jax.Array, sampling: SamplingParams,
                     seed: int) -> list[list[str]]:
    """`n` base-model answers to each task: the continuation of its few-shot prompt up to the
    first newline. Shots come from the train split; the longest prompt that fits the context
    (with room for the answer) keeps as many shots as it can."""
    pool = tasks.generate('train', 50 * len(tasks.FAMILIES), seed)
    by_family = {f: [t for t in pool if t.family == f] for f in tasks.FAMILIES}
    room = sampler.config.max_seq_len - sampler.max_new_tokens
    prompts = []
    for task in held_out:
        for k in range(n_shots, -1, -1):
            ids = [tok.eot_id, *tok.encode(few_shot_prompt(task, by_family[task.family][:k]))]
            if len(ids) <= room:
                break
        prompts += [ids] * n
    texts = []
    for i, start in enumerate(range(0, len(prompts), sampler.batch_size)):
        chunk = prompts[start:start + sampler.batch_size]
        out = sampler(params, chunk, jax.random.fold_in(key, i), sampling)
        texts += [tok.decode(row[:length]).split('\n')[0].strip()
                  for row, length in zip(out['tokens'], out['lengths'], strict=True)]
    return [texts[i:i + n] for i in range(0, len(texts), n)]


def diversity(replies: list[list[str]]) -> dict:
    """How different a model's samples for one prompt are: the fraction of distinct replies and
    of distinct word bigrams among all bigrams, averaged over prompts."""
    distinct, bigram = [], []
    for group in replies:
        distinct.append(len(set(group)) / len(group))
        grams = [tuple(w[i:i + 2]) for w in (r.split() for r in group) for i in range(len(w) - 1)]
        if grams:
            bigram.append(len(set(grams)) / len(grams))
    return {'distinct_replies': float(np.mean(distinct)),
            'distinct_bigrams': float(np.mean(bigram)) if bigram else 0.0}


def sample_models(config, workdir: pathlib.Path, held_out: list[tasks.Task]):
    """`(sampled, greedy, kl, seconds)`: the replies of the base model and of every trained
    policy, `{model: [[reply]]}`; each trained policy's KL to the SFT model on each prompt's
    first sample, `{model: [prompts]}`; and the seconds each model took (loading, sampling and
    its KL)."""
    c = config.compare
    seconds, kl = {}, {}
    conversations = gold.conversations(held_out)
    key = jax.random.key(config.seed + 2)
    replies = {'sampled': {}, 'greedy': {}}
    reference = None  # the SFT policy, kept for the others' KL
    for model, stage in SAMPLED_FROM.items():
        start = time.perf_counter()
        policy = load_policy(workdir / stage)
        sampler = policy.sampler(c.batch_size, c.max_new_tokens, chat=model != 'base')
        modes = (('sampled', SamplingParams(temperature=1.0),
                  c.base_samples if model == 'base' else c.samples),
                 ('greedy', SamplingParams(temperature=0.0), 1))
        for mode, sampling, n in modes:
            mode_key = jax.random.fold_in(key, DRAWS[model] * 2 + (mode == 'greedy'))
            if model == 'base':
                replies[mode][model] = few_shot_replies(
                    sampler, policy.params, policy.tokenizer, held_out, c.few_shot, n, mode_key,
                    sampling, config.seed)
                continue
            prompts, tokens = sample_reply_tokens(
                sampler, policy.params, policy.tokenizer, conversations, mode_key, sampling, n,
                progress=f'{model} {mode}')
            texts = [reply_text(policy.tokenizer, reply) for reply in tokens]
            replies[mode][model] = [texts[i:i + n] for i in range(0, len(texts), n)]
            if mode == 'sampled' and model == 'sft':
                kl[model] = np.zeros(len(held_out))
            elif mode == 'sampled':  # on each prompt's first sample
                prompts, tokens = prompts[::n], tokens[::n]
                kl[model] = (reply_log_probs(policy.graphdef, policy.params, sampler, prompts,
                                             tokens)
                             - reply_log_probs(reference.graphdef, reference.params, sampler,
                                               prompts, tokens))
        if model == 'sft':
            reference = policy
        del policy
        seconds[model] = time.perf_counter() - start
    return replies['sampled'], replies['greedy'], kl, seconds


def by_level(held_out: list[tasks.Task], cells: np.ndarray,
             per_prompt: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """`({level: {model: mean}}, {level: {model: standard error}})` of the sampled scores for
    each level among the prompts, levels as strings; the errors are stratified by family within
    the level, None where the level holds no more prompts than families."""
    means, stderrs = {}, {}
    levels = np.asarray([t.level for t in held_out])
    for level in tasks.LEVELS:
        mine = levels == level
        if not mine.any():
            continue
        enough = mine.sum() > len(set(cells[mine]))
        means[str(level)] = {m: float(per_prompt[m][mine].mean()) for m in MODELS}
        stderrs[str(level)] = {
            m: stats.mean_and_stderr(per_prompt[m][mine], cells[mine])[1] if enough else None
            for m in MODELS}
    return means, stderrs


def compare(config, workdir: pathlib.Path) -> dict:
    """Gold scores, KL to the SFT model, diversity and example answers of the models (see the
    module docstring); `per_prompt` holds every prompt's scores and KL."""
    c = config.compare
    held_out, cells = held_out_prompts(config)
    replies, greedy_replies, kl, seconds = sample_models(config, workdir, held_out)
    # The reward model scores the SFT pool; its pick among N is best-of-N.
    start = time.perf_counter()
    scorer = load_reward_model(workdir / 'reward').scorer(c.batch_size)
    flat = scorer([m for m in gold.conversations(held_out) for _ in range(c.samples)],
                  [[{'role': 'assistant', 'content': r}] for rs in replies['sft'] for r in rs])
    seconds['best_of_n'] = time.perf_counter() - start
    rewards = flat.reshape(len(held_out), c.samples)
    scores = {m: gold.score(held_out, replies[m]) for m in replies}
    per_prompt = {m: g.mean(axis=1) for m, g in scores.items()}
    per_prompt['best_of_n'] = expected_best_of_n(rewards, scores['sft'], c.best_of)
    greedy = {m: gold.score(held_out, greedy_replies[m])[:, 0] for m in greedy_replies}

    result = {'prompts': len(held_out), 'samples': c.samples, 'base_samples': c.base_samples,
              'best_of': c.best_of,
              'models': {}, 'contrasts': [], 'families': {}, 'levels': {},
              'levels_stderr': {}, 'examples': [], 'seconds_by_model': seconds}
    for model in MODELS:
        mean, stderr = stats.mean_and_stderr(per_prompt[model], cells)
        entry = {'gold': mean, 'gold_stderr': stderr,
                 'gold_stderr_unstratified': stats.mean_and_stderr(per_prompt[model])[1]}
        if model in greedy:
            entry['greedy'], entry['greedy_stderr'] = stats.mean_and_stderr(greedy[model], cells)
            if len(replies[model][0]) > 1:
                entry.update(diversity(replies[model]))
        if model in kl:
            entry['kl'], entry['kl_stderr'] = stats.mean_and_stderr(kl[model], cells)
        elif model == 'best_of_n':
            entry['kl'] = math.log(c.best_of) - (c.best_of - 1) / c.best_of
        result['models'][model] = entry
    # Differences paired over prompts: the same prompts, so far less noisy than two means.
    for model, baseline in GAINS:
        gain, gain_stderr = stats.paired(per_prompt[model], per_prompt[baseline], cells)
        result['models'][model]['gain'] = {'over': baseline, 'mean': gain, 'stderr': gain_stderr}
    for model, baseline in CONTRASTS:
        gain, gain_stderr = stats.paired(per_prompt[model], per_prompt[baseline], cells)
        result['contrasts'].append({'model': model, 'over': baseline, 'mean': gain,
                                    'stderr': gain_stderr})
    for family in tasks.FAMILIES:
        mine = np.asarray([t.family == family for t in held_out])
        if mine.any():
            result['families'][family] = {m: float(per_prompt[m][mine].mean()) for m in MODELS}
    result['levels'], result['levels_stderr'] = by_level(held_out, cells, per_prompt)
    for i, task in enumerate(held_out[:c.examples]):
        best = int(np.argmax(rewards[i]))
        result['examples'].append({
            'prompt': task.prompt, 'answer': str(task.answer),
            **{m: replies[m][i][0] for m in replies}, 'best_of_n': replies['sft'][i][best]})
    result['per_prompt'] = [
        {'family': t.family, 'level': t.level, 'prompt': t.prompt,
         'gold': {m: per_prompt[m][i] for m in MODELS},
         'greedy': {m: greedy[m][i] for m in greedy},
         'kl': {m: float(kl[m][i]) for m in kl}}
        for i, t in enumerate(held_out)]
    return result
