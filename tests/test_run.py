"""The whole command: smoke run, kill -9 and resume, SIGTERM, config errors.

Run: `python -m pytest -q tests/test_run.py`. Each test starts `python -m experiments.run` as a
separate process on a small corpus written to a temporary directory.
"""

import collections
import json
import os
import shutil
import signal
import sys

import pytest

from gptstack import environment
from gptstack.data import tasks
from gptstack.data.tokenizer import train_tokenizer
from tests.runs import (
    LONG,
    LONG_STEPS,
    ROOT,
    SFT,
    command,
    losses,
    metrics,
    run,
    sft_command,
    start_and_wait_for_checkpoint,
)


def test_two_step_smoke_run(corpus, tmp_path):
    result = run(command(corpus, tmp_path / 'run'))
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / 'run'
    for name in ('config.json', 'tokenizer.model', 'report.md', 'loss.png', 'samples.jsonl'):
        assert (workdir / name).exists(), name
    assert sorted(losses(workdir)) == [1, 2]
    assert (workdir / 'checkpoints' / '2').is_dir()
    # The runner starts over with its malloc settings unless the caller chose some.
    if 'GLIBC_TUNABLES' not in os.environ:
        assert (f'process environment: GLIBC_TUNABLES={environment.ONE_ARENA} (set by '
                'experiments.run)') in result.stderr
    assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
    assert 'final validation loss' in (workdir / 'report.md').read_text()
    # The copying evaluation runs beside the validation sets (gptstack.evals.copying).
    last_eval = [r for r in metrics(workdir) if 'val_loss' in r][-1]
    assert last_eval['val/copy_gain'] == pytest.approx(
        last_eval['val/copy/first'] - last_eval['val/copy/second'])
    assert 'copy gain' in (workdir / 'report.md').read_text()
    assert (workdir / 'copying.png').exists()
    # Running the finished command again resumes at the end and does no more steps.
    again = run(command(corpus, tmp_path / 'run'))
    assert again.returncode == 0 and 'resuming from' in again.stderr
    assert sorted(losses(workdir)) == [1, 2]


@pytest.mark.slow  # covered by the pipeline's kill test, which kills pretraining (and every
# other stage) and compares every step's metrics with an uninterrupted run's
def test_kill_9_then_resume_continues_exactly(corpus, tmp_path):
    reference = run(command(corpus, tmp_path / 'reference', *LONG))
    assert reference.returncode == 0, reference.stderr[-3000:]

    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(command(corpus, workdir, *LONG), workdir, 20)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    before = losses(workdir)
    assert max(before) < LONG_STEPS  # it really died mid-way

    resumed = run(command(corpus, workdir, *LONG))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming from' in resumed.stderr
    after = losses(workdir)
    # One record per step, and every loss equal to the uninterrupted run's, bit for bit.
    assert [r['step'] for r in metrics(workdir) if 'loss' in r] == list(range(1, LONG_STEPS + 1))
    assert after == losses(tmp_path / 'reference')


def test_sigterm_saves_the_current_step_and_exits_0(corpus, tmp_path):
    workdir = tmp_path / 'preempted'
    process = start_and_wait_for_checkpoint(command(corpus, workdir, *LONG), workdir, 10)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert 'Re-run the same command to resume' in stderr
    last_logged = max(losses(workdir))
    checkpoints = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                         if p.name.isdigit())
    assert checkpoints[-1] == last_logged < LONG_STEPS
    assert not (workdir / 'report.md').exists()  # the stage is not finished


@pytest.mark.parametrize('override, message', [
    ('--config.optim.lrr=1', "'lrr'"),
    ('--config.mesh.data=3', 'mesh: the fixed axes (data=3, tensor=1) multiply to 3, which '
                             'does not divide the 8 available devices'),
    ('--config.model.n_head=3', 'GPTConfig.n_head=3 must divide d_model=32'),
    ('--config.data.sources.code.weight=-1', "data source 'code': weight=-1.0 must be > 0"),
    ('--config.train.on_nonfinite=ignore',
     "ConfigError: train.on_nonfinite='ignore': expected stop or skip"),
    ('--config.train.log_every=-1',
     'ConfigError: train.log_every=-1: expected an integer >= 0 (0 disables)'),
    ('--config.precision=fp8', "ConfigError: precision='fp8': expected auto or one of "
                               "['bfloat16', 'float32', 'mixed']"),
    ('--config.tokenizer.path=/nowhere/tokenizer.model',
     'ConfigError: tokenizer.path=/nowhere/tokenizer.model: no such file (give a '
     'tokenizer.model or a Hugging Face tokenizer.json, or leave the key unset to train one)'),
    ('--config.data.batch_size=0',
     'ConfigError: data.batch_size=0: expected at least 1 (rows or groups per step)'),
    ('--config.data.seq_len=1', 'ConfigError: data.seq_len=1: expected at least 2'),
    ('--config.data.eval_batches=0', 'ConfigError: data.eval_batches=0: expected at least 1'),
    ('--config.model.vocab_size=300',
     "ConfigError: model.vocab_size=300 is smaller than the tokenizer's 512 tokens"),
    ('--config.tokenizer.vocab_size=100',
     'ConfigError: tokenizer vocab_size=100: this corpus allows at least'),
])
def test_bad_config_fails_before_any_work(corpus, tmp_path, override, message):
    workdir = tmp_path / 'bad'
    result = run(command(corpus, workdir, override))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not (workdir / 'cache').exists() and not (workdir / 'checkpoints').exists()
    if 'ConfigError' in message:  # a user's mistake: exit 1 with one line, no traceback
        assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]


def test_resume_refuses_a_different_model(corpus, tmp_path):
    workdir = tmp_path / 'run'
    assert run(command(corpus, workdir)).returncode == 0
    result = run(command(corpus, workdir, '--config.model.d_model=64'))
    assert result.returncode == 1
    assert ('has a different model config: d_ff=128 there vs 256 here, d_model=32 there vs 64 '
            'here') in result.stderr


def test_environment_has_eight_devices():
    # The subprocesses inherit XLA_FLAGS from conftest: they see the same 8 devices.
    assert '--xla_force_host_platform_device_count=8' in os.environ['XLA_FLAGS']


SHAKESPEARE = ROOT.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason='the shared datasets are not present')
def test_shakespeare_config_runs_on_the_shared_file(tmp_path):
    result = run([sys.executable, '-m', 'experiments.run',
                  '--config=experiments/configs/pretrain_shakespeare.py:runlocal',
                  f'--workdir={tmp_path}',
                  f'--config.data.sources.shakespeare.paths={SHAKESPEARE}'])
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / 'report.md').read_text()
    assert '| shakespeare | 1 | 1 |' in report and 'document tails' in report


def test_tokenizer_stage_then_pretraining_with_its_model(corpus, tmp_path):
    result = run(command(corpus, tmp_path / 'tok', '--config.tokenizer.vocab_size=600',
                         config='tokenizer.py'))
    assert result.returncode == 0, result.stderr[-3000:]
    model = tmp_path / 'tok' / 'tokenizer.model'
    assert 'bytes per token' in (tmp_path / 'tok' / 'report.md').read_text()
    result = run(command(corpus, tmp_path / 'pre', f'--config.tokenizer.path={model}'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'pre' / 'tokenizer.model').read_bytes() == model.read_bytes()


def test_sample_command_continues_a_prompt(corpus, tmp_path):
    assert run(command(corpus, tmp_path)).returncode == 0
    result = run([sys.executable, '-m', 'experiments.sample', f'--workdir={tmp_path}',
                  '--prompt=def f(x):', '--num_samples=3', '--max_new_tokens=5',
                  '--temperature=0'])
    assert result.returncode == 0, result.stderr[-3000:]
    samples = result.stdout.split('--- sample ')[1:]
    assert len(samples) == 3 and all('def f(x):' in s for s in samples)
    assert samples[0].split('\n', 1)[1] == samples[1].split('\n', 1)[1]  # greedy: identical


# --- supervised finetuning ------------------------------------------------------------------
def test_sft_smoke_run_reports_base_and_sft_gold_scores(base_workdir, sft_workdir):
    records = metrics(sft_workdir)
    assert records[0]['step'] == 0 and 'gold/greedy' in records[0]  # the base model
    assert 'gold/sampled_stderr' in records[-1]
    assert (sft_workdir / 'tokenizer.model').read_bytes() == (
        base_workdir / 'tokenizer.model').read_bytes()
    report = (sft_workdir / 'report.md').read_text()
    assert 'Gold score on held-out prompts' in report
    # By level: the levels of the held-out tasks, whose means weighted by count are the mean.
    config = json.loads((sft_workdir / 'config.json').read_text())
    held_out = tasks.generate('validation', config['data']['validation_tasks'],
                              config['seed'])[:config['eval']['gold_prompts']]
    count = collections.Counter(t.level for t in held_out)
    for record in (records[0], records[-1]):
        assert {k for k in record if '/level' in k} == {
            f'gold/{mode}/level{level}' for mode in ('greedy', 'sampled') for level in count}
        for mode in ('greedy', 'sampled'):
            weighted = sum(n * record[f'gold/{mode}/level{level}'] for level, n in count.items())
            assert weighted / len(held_out) == pytest.approx(record[f'gold/{mode}'])
    assert '## Gold score by task level' in report
    for level in count:
        assert f'| level {level} | ' in report, level
    # The default reply budget fits the model's context; one that leaves no room is one line.
    chat = run([sys.executable, '-m', 'experiments.sample', f'--workdir={sft_workdir}', '--chat',
                '--temperature=0'], input='What is 2 + 2?\nAnd 3 + 3?\n')
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert [line.split(':')[0] for line in chat.stdout.splitlines()] == ['assistant'] * 2
    too_long = run([sys.executable, '-m', 'experiments.sample', f'--workdir={sft_workdir}',
                    '--chat', '--max_new_tokens=1000'], input='hi\n')
    assert too_long.returncode == 1 and 'Traceback' not in too_long.stderr
    assert '--max_new_tokens: max_new_tokens=1000 leaves no room for a prompt' in too_long.stderr
    base_chat = run([sys.executable, '-m', 'experiments.sample', f'--workdir={base_workdir}',
                     '--chat'], input='hi\n')
    assert base_chat.returncode != 0 and '--chat needs a finetuned workdir' in base_chat.stderr


@pytest.mark.slow  # covered by the pipeline's kill test, which kills SFT (and every other stage),
# and the SFT iterator's resume test
def test_sft_kill_9_then_resume_continues_exactly(base_workdir, tmp_path):
    reference = run(sft_command(tmp_path / 'reference', base_workdir, *LONG))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(sft_command(workdir, base_workdir, *LONG), workdir,
                                            20)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(losses(workdir)) < LONG_STEPS
    resumed = run(sft_command(workdir, base_workdir, *LONG))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r['step'] for r in metrics(workdir) if 'loss' in r] == list(range(1, LONG_STEPS + 1))
    assert losses(workdir) == losses(tmp_path / 'reference')


def test_sft_refuses_a_bad_base(base_workdir, tmp_path):
    result = run(sft_command(tmp_path / 'a', ''))
    assert 'init_from: name the pretraining workdir to finetune' in result.stderr
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'tokenizer.model').write_bytes((base_workdir / 'tokenizer.model').read_bytes())
    result = run(sft_command(tmp_path / 'b', empty))
    assert f'init_from={empty}: no checkpoint in {empty / "checkpoints"}' in result.stderr
    # A base whose tokenizer.model is not the one its checkpoint was trained with.
    mixed = tmp_path / 'mixed'
    shutil.copytree(base_workdir, mixed)
    other = train_tokenizer([f'completely different text {i}, with words.' for i in range(500)],
                            vocab_size=300)
    other.save(mixed / 'tokenizer.model')
    result = run(sft_command(tmp_path / 'c', mixed))
    assert result.returncode == 1
    assert 'was trained with tokenizer' in result.stderr and other.sha256 in result.stderr
    result = run(sft_command(tmp_path / 'd', base_workdir, '--config.data.train_tasks=0',
                             '--config.data.copy_drills=0'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert ('DataError: SFT has no training conversation to use (0 read; '
            'data.train=embedded:tasks') in result.stderr
    # Copy drills belong to the embedded task suite, not to a user's conversations.
    result = run(sft_command(tmp_path / 'e', base_workdir, '--config.data.train=x.jsonl'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert ("ConfigError: data.copy_drills=50: copy drills join the embedded task suite, not "
            "data.train='x.jsonl' (set data.copy_drills=0)") in result.stderr


def test_sft_refuses_a_reward_model_as_its_start(reward_workdir, tmp_path):
    result = run(sft_command(tmp_path, reward_workdir))
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert (f"ConfigError: init_from={reward_workdir} is a 'reward' run, not a base model, an "
            'SFT model, an RL policy or a DPO policy') in result.stderr


DOLLY = ROOT.parent / 'shared' / 'data' / 'dolly15k_open_qa' / 'open_qa.prompt_response.jsonl'


@pytest.mark.skipif(not DOLLY.exists(), reason='the shared datasets are not present')
def test_sft_on_dolly_holds_out_validation_records(base_workdir, tmp_path):
    result = run([sys.executable, '-m', 'experiments.run',
                  '--config=experiments/configs/sft_dolly.py:runlocal', f'--workdir={tmp_path}',
                  f'--config.init_from={base_workdir}', f'--config.data.train={DOLLY}', *SFT])
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / 'report.md').read_text()
    assert '| validation conversations | ' in report
    assert 'gold/greedy' not in metrics(tmp_path)[-1]  # no gold scorer for open questions
