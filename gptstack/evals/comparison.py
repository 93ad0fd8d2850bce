"""The recipe's models side by side on the same held-out task prompts: the base model (prompted
with solved examples, the way a base model can be coaxed into answering), the SFT model,
best-of-N with the reward model, the PPO policy, and PPO with the gold scorer as its reward (the
ceiling of a perfect reward model).

Each model draws `samples` replies per prompt at temperature 1 (a prompt's score is the mean over
them) and one greedy reply; best-of-N is the reward model's pick among N of the SFT samples,
scored exactly over all N-subsets of the pool (`best_of_n.expected_best_of_n`). Gains are paired
over prompts. Standard errors are stratified by the task generator's cells, family and level:
the prompts fix that mix, so the spread between cells is not noise in a comparison of models on
these prompts; the unstratified errors are kept alongside. The sampled scores are also given by
task family and by level (keys '1', '2', '3', as JSON keeps them).
"""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np

from gptstack import stats
from gptstack.chat import sample_replies
from gptstack.config import ConfigError
from gptstack.data import tasks
from gptstack.evals import gold
from gptstack.evals.best_of_n import expected_best_of_n
from gptstack.lineage import load_policy, load_reward_model
from gptstack.sampling import Sampler, SamplingParams

# The models of the comparison, in the order of the recipe, and the stage each comes from; the
# last, PPO with the gold scorer as its reward, is the ceiling a perfect reward model would give.
MODELS = ('base', 'sft', 'best_of_n', 'ppo', 'ppo_gold')
MODEL_NAMES = {'base': 'base (few-shot prompt)', 'sft': 'SFT', 'best_of_n': 'best-of-N (SFT + RM)',
               'ppo': 'PPO', 'ppo_gold': 'PPO, gold reward (ceiling)'}
SAMPLED_FROM = {'base': 'pretrain', 'sft': 'sft', 'ppo': 'rl', 'ppo_gold': 'rl_gold'}


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
    """`(sampled, greedy, seconds)`: the replies of the base, SFT and PPO models,
    `{model: [[reply]]}`, and the seconds each model took (loading and sampling)."""
    c = config.compare
    seconds = {}
    conversations = gold.conversations(held_out)
    key = jax.random.key(config.seed + 2)
    modes = (('sampled', SamplingParams(temperature=1.0), c.samples),
             ('greedy', SamplingParams(temperature=0.0), 1))
    replies = {'sampled': {}, 'greedy': {}}
    for model, stage in SAMPLED_FROM.items():
        start = time.perf_counter()
        policy = load_policy(workdir / stage)
        sampler = policy.sampler(c.batch_size, c.max_new_tokens, chat=model != 'base')
        for mode, sampling, n in modes:
            mode_key = jax.random.fold_in(key, MODELS.index(model) * 2 + (mode == 'greedy'))
            if model == 'base':
                replies[mode][model] = few_shot_replies(
                    sampler, policy.params, policy.tokenizer, held_out, c.few_shot, n, mode_key,
                    sampling, config.seed)
            else:
                replies[mode][model] = sample_replies(
                    sampler, policy.params, policy.tokenizer, conversations, mode_key, sampling,
                    n, progress=f'{model} {mode}')
        del policy
        seconds[model] = time.perf_counter() - start
    return replies['sampled'], replies['greedy'], seconds


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
    """Gold scores, diversity and example answers of the four models (see the module
    docstring); `per_prompt` holds every prompt's scores."""
    c = config.compare
    held_out, cells = held_out_prompts(config)
    replies, greedy_replies, seconds = sample_models(config, workdir, held_out)
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

    result = {'prompts': len(held_out), 'samples': c.samples, 'best_of': c.best_of,
              'models': {}, 'families': {}, 'levels': {}, 'levels_stderr': {},
              'examples': [], 'seconds_by_model': seconds}
    for model in MODELS:
        mean, stderr = stats.mean_and_stderr(per_prompt[model], cells)
        entry = {'gold': mean, 'gold_stderr': stderr,
                 'gold_stderr_unstratified': stats.mean_and_stderr(per_prompt[model])[1]}
        if model in greedy:
            entry['greedy'], entry['greedy_stderr'] = stats.mean_and_stderr(greedy[model], cells)
            entry.update(diversity(replies[model]))
        result['models'][model] = entry
    # Differences paired over prompts: the same prompts, so far less noisy than two means.
    for model, baseline in (('sft', 'base'), ('best_of_n', 'sft'), ('ppo', 'sft'),
                            ('ppo_gold', 'sft')):
        gain, gain_stderr = stats.paired(per_prompt[model], per_prompt[baseline], cells)
        result['models'][model]['gain'] = {'over': baseline, 'mean': gain, 'stderr': gain_stderr}
    for family in tasks.FAMILIES:
        mine = np.asarray([t.family == family for t in held_out])
        if mine.any():
            result['families'][family] = {m: float(per_prompt[m][mine].mean()) for m in MODELS}
    result['levels'], result['levels_stderr'] = by_level(held_out, cells, per_prompt)
    for i, task in enumerate(held_out[:c.examples]):
        best = int(np.argmax(rewards[i]))
        result['examples'].append({
            'prompt': task.prompt, 'answer': str(task.answer),
            'base': replies['base'][i][0], 'sft': replies['sft'][i][0],
            'best_of_n': replies['sft'][i][best], 'ppo': replies['ppo'][i][0],
            'ppo_gold': replies['ppo_gold'][i][0]})
    result['per_prompt'] = [
        {'family': t.family, 'level': t.level, 'prompt': t.prompt,
         'gold': {m: per_prompt[m][i] for m in MODELS},
         'greedy': {m: greedy[m][i] for m in greedy}}
        for i, t in enumerate(held_out)]
    return result
