"""EleutherAI's lm-evaluation-harness against the server, through its real CLI:
`python -m pytest -q tests/test_lm_eval.py`.

Two tasks defined in `tests/lm_eval_tasks/` run over local JSONL data (offline) with
`--model local-completions`, which finds our tokenizer endpoints and needs no tokenizer of its
own: a `generate_until` task on the embedded tasks' held-out prompts, and a log-likelihood
multiple-choice task. Their per-sample answers and scores must equal the library's own, computed
here in-process on the same prompts.
"""

import json
import os
import random
import shutil
import subprocess

import jax
import numpy as np
import pytest

from gptstack.data import tasks
from gptstack.lineage import load_policy
from gptstack.sampling import SamplingParams
from gptstack.serving.engine import make_scorer
from tests.runs import ROOT, SERVE_MAX_NEW

pytest.importorskip('lm_eval')
LM_EVAL = shutil.which('lm-eval') or shutil.which('lm_eval')
TASKS = ROOT / 'tests' / 'lm_eval_tasks'
CONTEXT = 96  # the quick SFT model's
MAX_GEN = SERVE_MAX_NEW  # gptstack_answers.yaml's max_gen_toks


def write_data(directory, tokenizer) -> tuple[list[dict], list[dict]]:
    """24 held-out prompts with exact answers, and the same as three-way choices; prompts
    short enough that nothing is cut to fit the quick model's context."""
    held_out = [t for t in tasks.generate('test', 400, 0) if t.check['kind'] == 'exact'
                and len(tokenizer.encode(context(vars(t)))) <= 48][:24]
    assert len(held_out) == 24
    answers = [{'prompt': t.prompt, 'answer': t.answer} for t in held_out]
    rng, pool = random.Random(0), sorted({t.answer for t in held_out})
    choices = []
    for t in held_out:
        options = rng.sample([a for a in pool if a != t.answer], 2)
        label = rng.randrange(3)
        choices.append({'prompt': t.prompt, 'label': label,
                        'choices': [*options[:label], t.answer, *options[label:]]})
    for name, rows in (('gptstack_answers', answers), ('gptstack_choices', choices)):
        with open(directory / f'{name}.jsonl', 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
    return answers, choices


def context(doc) -> str:
    return f'Question: {doc["prompt"]}\nAnswer:'  # both tasks' doc_to_text


def library_answers(policy, docs) -> list[str]:
    """Greedy continuations by the library's sampler, cut as the server cuts them: at the
    task's token budget and before the first newline (its `until`)."""
    tok = policy.tokenizer
    sampler = policy.sampler(8, SERVE_MAX_NEW)  # the server's stop tokens
    special = set(tok.special_ids.values())
    texts = []
    for start in range(0, len(docs), 8):
        prompts = [[tok.eot_id, *tok.encode(context(d))] for d in docs[start:start + 8]]
        out = sampler(policy.params, prompts, jax.random.key(0), SamplingParams(temperature=0))
        for row, n in zip(out['tokens'], out['lengths'], strict=True):
            ids = [int(i) for i in row[:min(n, MAX_GEN)]]
            text = tok.decode([i for i in ids if i not in special])
            texts.append(text.split('\n')[0])
    return texts


def library_loglikelihoods(policy, docs) -> list[list[float]]:
    """Each choice's log-likelihood after the context, split into tokens as lm-eval splits a
    pair (the context's tokens, then the rest of the whole string's), from the library's
    scoring pass on the server's batch and shapes (under bfloat16 matmuls another batch shape
    rounds differently, by up to 1e-3 over a reply)."""
    tok = policy.tokenizer
    score = make_scorer(policy, 8)
    rows = []
    for doc in docs:
        ctx = tok.encode(context(doc))
        rows += [(len(ctx), tok.encode(context(doc) + ' ' + c)) for c in doc['choices']]
    lls = []
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        width = next(b for b in (16, 32, 64, CONTEXT) if b >= 1 + max(len(w) for _, w in chunk))
        tokens = np.full((8, width), tok.pad_id, np.int32)
        for i, (_, whole) in enumerate(chunk):
            tokens[i, :1 + len(whole)] = [tok.eot_id, *whole]
        token_logp = score(tokens, np.zeros(8, np.int32))[0]
        lls += [sum(float(v) for v in token_logp[i, n:len(whole)])
                for i, (n, whole) in enumerate(chunk)]
    return [lls[i:i + 3] for i in range(0, len(lls), 3)]


@pytest.mark.skipif(LM_EVAL is None, reason='needs the lm-eval command')
def test_lm_eval_runs_against_the_server_and_agrees_with_the_library(sft_server, sft_workdir,
                                                                      tmp_path):
    policy = load_policy(sft_workdir)
    answers, choices = write_data(tmp_path, policy.tokenizer)
    model_args = (f'model=sft,base_url={sft_server}/v1/completions,num_concurrent=4,'
                  f'max_retries=1,max_length={CONTEXT}')
    result = subprocess.run(
        [LM_EVAL, 'run', '--model', 'local-completions', '--model_args', model_args,
         '--tasks', 'gptstack_answers,gptstack_choices', '--include_path', str(TASKS),
         '--log_samples', '--output_path', str(tmp_path / 'out')],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
             'HF_HOME': str(tmp_path / 'hf')})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert 'Auto-detected remote tokenizer support' in log  # no Hugging Face tokenizer used
    samples = {}
    for path in (tmp_path / 'out').rglob('samples_*.jsonl'):
        task = path.name.split('_2')[0].removeprefix('samples_')
        samples[task] = sorted((json.loads(line) for line in path.open()),
                               key=lambda s: s['doc_id'])
    results = json.loads(next((tmp_path / 'out').rglob('results_*.json')).read_text())['results']

    # generate_until: the same continuations, cut at the newline, and so the same score.
    expected = library_answers(policy, answers)
    got = [s['resps'][0][0] for s in samples['gptstack_answers']]
    assert got == expected
    exact = np.mean([text.removeprefix(' ') == d['answer']
                     for text, d in zip(expected, answers, strict=True)])
    assert results['gptstack_answers']['exact_match,strip'] == pytest.approx(exact)
    # multiple choice: each choice's log-likelihood, and so the accuracy.
    expected = library_loglikelihoods(policy, choices)
    got = [[float(r[0][0]) for r in s['resps']] for s in samples['gptstack_choices']]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    accuracy = np.mean([int(np.argmax(lls)) == d['label']
                        for lls, d in zip(expected, choices, strict=True)])
    assert results['gptstack_choices']['acc,none'] == pytest.approx(accuracy)
