"""The DPO stage as a command: learning from the reward stage's comparisons, its report, the
reference cache, kill -9 and resume, and bad inputs.

Run: `python -m pytest -q tests/test_run_dpo.py` (starts from the shared quick-pipeline SFT and
reward runs).
"""

import json
import math
import signal
import sys

import pytest

from tests.runs import metrics, run, start_and_wait_for_checkpoint

# What must repeat exactly after a resume (timings do not).
EXACT = ('loss', 'accuracy', 'margin', 'chosen_logp', 'rejected_logp', 'grad_norm')


def dpo_command(workdir, init_from, comparisons, *overrides):
    return [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/dpo.py:runlocal',
            f'--workdir={workdir}', f'--config.init_from={init_from}',
            f'--config.data.train={comparisons}/train.jsonl',
            f'--config.data.validation={comparisons}/validation.jsonl', *overrides]


def steps(workdir):
    return {r['step']: tuple(r[k] for k in EXACT) for r in metrics(workdir) if 'margin' in r}


def test_dpo_learns_the_comparisons_and_resumes_exactly_after_kill_9(sft_workdir,
                                                                     reward_workdir, tmp_path):
    comparisons = reward_workdir / 'comparisons'
    settings = ('--config.train.total_steps=6', '--config.train.checkpoint_every=2',
                '--config.train.eval_every=6', '--config.optim.lr=1e-3',
                '--config.loss.nll_coef=0')
    reference = run(dpo_command(tmp_path / 'reference', sft_workdir, comparisons, *settings))
    assert reference.returncode == 0, reference.stderr[-3000:]
    records = metrics(tmp_path / 'reference')
    first, last = records[0], [r for r in records if 'val_loss' in r][-1]
    # At step 0 the policy is the reference: every implicit reward is 0, the loss ln 2.
    assert first['step'] == 0 and first['val_loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert first['val_margin'] == 0.0 and first['val_accuracy'] == 0.5  # every pair tied
    assert first['val_chosen_logp'] < 0
    assert {'gold/sampled', 'gold/greedy', 'gold/greedy/level1'} <= set(first)
    assert first['val/kl'] == 0.0 and first['val/kl_stderr'] == 0.0  # the reference's own replies
    assert last['step'] == 6 and last['val_loss'] < first['val_loss']
    assert last['val_margin'] > 0  # the preferred completions gained on the others
    # The policy moved off the reference: its replies are scored by both (8 prompts: the estimate
    # is noisy, but no longer exactly 0).
    assert last['val/kl'] != 0.0 and last['val/kl_stderr'] > 0
    train = [r for r in records if 'margin' in r]
    assert sorted(r['step'] for r in train) == list(range(1, 7))
    report = (tmp_path / 'reference' / 'report.md').read_text()
    for text in ('# DPO report', 'held-out implicit-reward accuracy: SFT → DPO',
                 'held-out gold score, sampled: SFT → DPO', 'Gold score by task level',
                 'KL to the reference on held-out prompts',
                 'accuracy.png', 'log_probs.png'):
        assert text in report, text

    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(
        dpo_command(workdir, sft_workdir, comparisons, *settings), workdir, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(steps(workdir)) < 6
    cache = (workdir / 'reference_logps.npz').stat().st_mtime_ns
    resumed = run(dpo_command(workdir, sft_workdir, comparisons, *settings))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps(workdir) == steps(tmp_path / 'reference')
    # The reference's log-probabilities were read back, not computed again.
    assert (workdir / 'reference_logps.npz').stat().st_mtime_ns == cache
    assert 'cached in' not in resumed.stderr


def test_dpo_bad_inputs_fail_in_one_line_before_anything_compiles(sft_workdir, reward_workdir,
                                                                  tmp_path):
    comparisons = reward_workdir / 'comparisons'
    cases = [
        ((f'--config.init_from={sft_workdir}',),
         'ConfigError: data.train: the comparison files to learn from'),
        (dpo_command(tmp_path, reward_workdir, comparisons)[5:],
         f"ConfigError: init_from={reward_workdir} is a 'reward' run, not an SFT model, an RL "
         'policy or a DPO policy'),
        (dpo_command(tmp_path, sft_workdir, comparisons, '--config.loss.kind=kto')[5:],
         "ConfigError: loss.kind='kto': expected sigmoid or ipo"),
        (dpo_command(tmp_path, sft_workdir, comparisons, '--config.loss.kind=ipo',
                     '--config.loss.label_smoothing=0.1')[5:],
         'ConfigError: loss.label_smoothing=0.1: expected 0 with loss.kind=ipo'),
    ]
    for overrides, message in cases:
        result = run([sys.executable, '-m', 'experiments.run',
                      '--config=experiments/configs/dpo.py:runlocal', f'--workdir={tmp_path}',
                      *overrides])
        assert result.returncode == 1, result.stderr[-2000:]
        assert message in result.stderr and 'Traceback' not in result.stderr, (
            message, result.stderr[-2000:])
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['stage'] == 'dpo'
