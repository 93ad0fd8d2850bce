"""The PPO stage as a command: smoke run, kill -9 and resume, verifiable rewards, bad inputs.

Run: `python -m pytest -q tests/test_run_rl.py` (starts from the shared runlocal SFT and reward
runs).
"""

import collections
import json
import signal
import sys

import numpy as np
import pytest

from gptstack.data import tasks
from tests.runs import corpus_overrides, metrics, rl_command, run, start_and_wait_for_checkpoint

# What must repeat exactly after a resume (timings do not).
EXACT = ('policy_loss', 'value_loss', 'kl', 'rm_score', 'gold', 'entropy', 'clipfrac',
         'kl_coef', 'response_length')


def iterations(workdir):
    return {r['step']: tuple(r.get(k) for k in EXACT) for r in metrics(workdir)
            if 'policy_loss' in r}


def test_rl_smoke_run_reports_sft_and_ppo(sft_workdir, reward_workdir, tmp_path):
    result = run(rl_command(tmp_path, sft_workdir, reward_workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(tmp_path)
    assert records[0]['step'] == 0 and {'gold/sampled', 'val/kl', 'val/rm_score'} <= set(
        records[0])
    assert records[0]['val/kl'] == 0.0  # the SFT policy is the reference
    train = [r for r in records if 'policy_loss' in r]
    assert [r['step'] for r in train] == [1, 2]
    # Four replies to each of four prompts, each scored against its group's mean score.
    assert all(abs(r['score']) < 1e-5 and r['rm_score'] != 0 for r in train)
    for key in ('rm_score', 'gold', 'kl', 'entropy', 'clipfrac', 'approx_kl', 'value_loss',
                'explained_variance', 'response_length', 'time/generate', 'time/score',
                'time/update', 'tokens_per_sec/generate', 'mfu'):
        assert key in train[-1], key
    assert 0 < train[-1]['mfu'] < 1
    report = (tmp_path / 'report.md').read_text()
    # By task family and by level: those of the held-out prompts, whose means weighted by count
    # are the mean.
    config = json.loads((tmp_path / 'config.json').read_text())
    prompts = tasks.generate('test', config['data']['validation_prompts'],
                             config['seed'])[:config['eval']['prompts']]
    groups = ([t.family for t in prompts], [f'level{t.level}' for t in prompts])
    for record in (records[0], records[-1]):
        for mode in ('sampled', 'greedy'):
            assert {k for k in record if k.startswith(f'gold/{mode}/')} == {
                f'gold/{mode}/{g}' for labels in groups for g in labels}
            for labels in groups:
                weighted = sum(n * record[f'gold/{mode}/{g}']
                               for g, n in collections.Counter(labels).items())
                assert weighted / len(prompts) == pytest.approx(record[f'gold/{mode}'])
    for text in ('held-out gold score, sampled (2 per prompt): SFT → PPO', 'reward_vs_kl.png',
                 'KL of the final policy', 'Held-out gold score by task family',
                 'Held-out gold score by task level',
                 'gain over the SFT policy, sampled (paired over prompts)'):
        assert text in report, text
    assert '| level1 |' not in report  # the family table holds families only
    for level in {t.level for t in prompts}:
        assert f'| level {level} | ' in report, level
    # The per-prompt scores behind the paired gain: 16 prompts, each the mean of 2 samples.
    held_out = [json.loads(line) for line in (tmp_path / 'held_out.jsonl').read_text().splitlines()]
    assert [r['step'] for r in held_out] == [0, 2]
    assert all(len(r['sampled']) == len(r['greedy']) == 16 for r in held_out)
    final = records[-1]
    gain = np.asarray(held_out[1]['sampled']) - np.asarray(held_out[0]['sampled'])
    np.testing.assert_allclose(final['gold/sampled_gain'], gain.mean())
    np.testing.assert_allclose(final['gold/sampled'], np.mean(held_out[1]['sampled']))
    # The PPO policy samples like any stage's model.
    sample = run([sys.executable, '-m', 'experiments.sample', f'--workdir={tmp_path}',
                  '--chat', '--max_new_tokens=5'], input='What is 2 + 2?\n')
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith('assistant: ')


def ptx(corpus):
    """PPO-ptx on the small test corpus."""
    return ('--config.rl.ppo.ptx_coef=0.5',
            *corpus_overrides(corpus, 'rl.ptx.sources'))


def test_rl_with_ptx_kill_9_then_resume_continues_exactly(sft_workdir, reward_workdir, corpus,
                                                          tmp_path):
    steps = ('--config.train.total_steps=8', '--config.train.checkpoint_every=2',
             '--config.train.eval_every=0', '--config.train.log_every=1', *ptx(corpus))
    reference = run(rl_command(tmp_path / 'reference', sft_workdir, reward_workdir, *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(
        rl_command(workdir, sft_workdir, reward_workdir, *steps), workdir, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(iterations(workdir)) < 8
    resumed = run(rl_command(workdir, sft_workdir, reward_workdir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(iterations(workdir)) == list(range(1, 9))
    assert iterations(workdir) == iterations(tmp_path / 'reference')
    ptx_losses = {r['step']: r['ptx_loss'] for r in metrics(workdir) if 'ptx_loss' in r}
    assert sorted(ptx_losses) == list(range(1, 9))
    assert ptx_losses == {r['step']: r['ptx_loss'] for r in metrics(tmp_path / 'reference')
                          if 'ptx_loss' in r}


def test_grpo_on_gold_rewards_kill_9_then_resume_continues_exactly_without_a_critic(
        sft_workdir, reward_workdir, tmp_path):
    steps = ('--config.rl.algorithm=grpo', '--config.rl.reward=gold',
             '--config.train.total_steps=6', '--config.train.checkpoint_every=2',
             '--config.train.eval_every=0', '--config.train.log_every=1')
    reference = run(rl_command(tmp_path / 'reference', sft_workdir, reward_workdir, *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(
        rl_command(workdir, sft_workdir, reward_workdir, *steps), workdir, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(iterations(workdir)) < 6
    resumed = run(rl_command(workdir, sft_workdir, reward_workdir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(iterations(workdir)) == list(range(1, 7))
    assert iterations(workdir) == iterations(tmp_path / 'reference')
    train = [r for r in metrics(workdir) if 'policy_loss' in r]
    assert all('kl_loss' in r and 'value_loss' not in r for r in train)
    # No critic in the checkpoints: of what trains, the state holds the actor's arrays alone.
    for tree in (workdir / 'checkpoints').glob('*/state/_METADATA'):
        keys = json.loads(tree.read_text())['tree_metadata']
        assert any(key.startswith("('actor', 'params'") for key in keys)
        assert not [key for key in keys if key.startswith("('critic', ")], keys
    assert '# GRPO report' in (workdir / 'report.md').read_text()


def test_rl_verifiable_rewards_and_bad_inputs(sft_workdir, reward_workdir, tmp_path):
    result = run(rl_command(tmp_path / 'gold', sft_workdir, reward_workdir,
                            '--config.rl.reward=gold', '--config.rl.ppo.group_size=1'))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in metrics(tmp_path / 'gold') if 'policy_loss' in r]
    assert train
    # The reward is the gold score (averaged in float32 on the device, in float64 on the host).
    assert [r['score'] for r in train] == pytest.approx([r['gold'] for r in train], rel=1e-6)
    # GSM8K-style records, the reply's last number checked against the one after '####', and
    # a format reward for every reply that writes a number at all.
    problems = tmp_path / 'problems.jsonl'
    problems.write_text(''.join(
        json.dumps({'question': f'What is {a} + {a % 7}? Answer with the number only.',
                    'answer': f'{a} + {a % 7} = {a + a % 7}\n#### {a + a % 7}'}) + '\n'
        for a in range(10, 42)))
    result = run(rl_command(tmp_path / 'numbers', sft_workdir, reward_workdir,
                            '--config.rl.reward=gold', '--config.rl.ppo.group_size=1',
                            f'--config.data.train={problems}',
                            f'--config.data.validation={problems}',
                            '--config.data.prompt_field=question',
                            '--config.data.answer_format=gsm8k',
                            '--config.data.match=last_number', '--config.rl.format_reward=0.5'))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in metrics(tmp_path / 'numbers') if 'policy_loss' in r]
    assert train and any(r['formatted'] > 0 for r in train)
    assert [r['score'] for r in train] == pytest.approx(
        [r['gold'] + 0.5 * r['formatted'] for r in train], rel=1e-6)
    # A run that differs only in training takes the SFT policy's step-0 evaluation from it.
    result = run(rl_command(tmp_path / 'shared', sft_workdir, reward_workdir,
                            '--config.rl.ppo.kl_coef=0.5',
                            f'--config.eval.baseline_from={tmp_path / "gold"}'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step 0: the SFT policy's evaluation of {tmp_path / 'gold'}" in result.stderr
    assert metrics(tmp_path / 'shared')[0] == metrics(tmp_path / 'gold')[0]
    first_line = [(d / 'held_out.jsonl').read_text().splitlines()[0]
                  for d in (tmp_path / 'shared', tmp_path / 'gold')]
    assert first_line[0] == first_line[1]
    # One that would evaluate it otherwise is refused before anything is loaded.
    result = run(rl_command(tmp_path / 'other', sft_workdir, reward_workdir,
                            '--config.eval.samples=1',
                            f'--config.eval.baseline_from={tmp_path / "gold"}'))
    assert result.returncode == 1
    assert (f'eval.baseline_from={tmp_path / "gold"}: its step-0 evaluation ran with other '
            'settings (eval.samples); drop eval.baseline_from to evaluate the SFT policy '
            'here') in result.stderr
    assert not (tmp_path / 'other' / 'checkpoints').exists()
    result = run(rl_command(tmp_path / 'a', sft_workdir, sft_workdir))
    assert result.returncode == 1
    assert f"reward_from={sft_workdir} is a 'sft' run, not a reward model" in result.stderr
    assert 'Traceback' not in result.stderr  # one line, before anything is compiled
    assert not (tmp_path / 'a' / 'checkpoints').exists()
    result = run(rl_command(tmp_path / 'b', sft_workdir, ''))
    assert 'reward_from: name the reward-model workdir' in result.stderr
    result = run(rl_command(tmp_path / 'c', sft_workdir, reward_workdir,
                            '--config.rl.ppo.kl_estimator=k2'))
    assert "rl.ppo.kl_estimator='k2': expected k1 or k3" in result.stderr
    result = run(rl_command(tmp_path / 'e', sft_workdir, reward_workdir,
                            '--config.rl.ppo.group_size=3'))
    assert result.returncode == 1
    assert ('data.batch_size=16 rollouts is not divisible by rl.ppo.group_size=3 replies per '
            'prompt') in result.stderr
    result = run(rl_command(tmp_path / 'd', sft_workdir, reward_workdir,
                            '--config.eval.prompts=17'))
    assert result.returncode == 1
    assert ('eval.prompts=17 exceeds the 16 held-out prompts of data.validation=embedded:tasks '
            '(raise data.validation_prompts for the embedded suite)') in result.stderr


def test_rl_minibatches_not_dividing_the_rollouts_fail_before_loading_anything(
        sft_workdir, reward_workdir, tmp_path):
    result = run(rl_command(tmp_path, sft_workdir, reward_workdir,
                            '--config.rl.ppo.minibatches=3'))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if 'ConfigError' in line]
    assert len(errors) == 1 and errors[0].endswith(
        'ConfigError: data.batch_size=16 rollouts is not divisible by rl.ppo.minibatches=3')
    # Nothing was loaded or compiled: no tokenizer copied, no checkpoint directory.
    assert not (tmp_path / 'tokenizer.model').exists()
    assert not (tmp_path / 'checkpoints').exists()


def test_rl_resumed_with_another_kl_coef_uses_and_reports_it(sft_workdir, reward_workdir,
                                                             tmp_path):
    """With the KL controller off, β is read from the config, not from the checkpoint."""
    steps = ('--config.train.eval_every=0', '--config.train.checkpoint_every=1')
    first = run(rl_command(tmp_path, sft_workdir, reward_workdir, *steps))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(rl_command(tmp_path, sft_workdir, reward_workdir, *steps,
                             '--config.train.total_steps=3', '--config.rl.ppo.kl_coef=0.7'))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming from' in resumed.stderr
    used = {r['step']: r['kl_coef'] for r in metrics(tmp_path) if 'kl_coef' in r}
    assert used == {1: np.float32(0.2), 2: np.float32(0.2), 3: np.float32(0.7)}
    report = (tmp_path / 'report.md').read_text()
    assert '| KL coefficient β | 0.2 (steps 1–2), 0.7 (step 3) |' in report
