"""The reward stage and the ranking tool as commands: smoke run on the embedded tasks, kill -9
and resume, bad data, the HH file, initialisation from SFT.

Run: `python -m pytest -q tests/test_run_reward.py` (starts from the shared runlocal SFT run).
"""

import json
import pathlib
import signal
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gptstack.data import preference
from gptstack.data.sources import SkipBudget
from tests.runs import (
    ROOT,
    losses,
    metrics,
    reward_command,
    run,
    start_and_wait_for_checkpoint,
)

HH = ROOT.parent / 'shared' / 'data' / 'hh_rlhf_harmless_base' / 'test.jsonl.gz'
def test_reward_smoke_run_makes_comparisons_and_reports(sft_workdir, reward_workdir):
    comparisons = [json.loads(line) for line in
                   (reward_workdir / 'comparisons' / 'train.jsonl').read_text().splitlines()]
    assert len(comparisons) == 128
    assert all(len(c['completions']) == len(c['ranking']) == len(c['gold']) == 4
               for c in comparisons)
    records = metrics(reward_workdir)
    assert records[0]['step'] == 0 and 'val_accuracy' in records[0]  # the untrained head
    last_eval = [r for r in records if 'val_accuracy' in r][-1]
    assert {'val_accuracy_stderr', 'gold_agreement', 'val_reward_better'} <= set(last_eval)
    assert 'best_of_4/gold' in records[-1]
    report = (reward_workdir / 'report.md').read_text()
    for text in ('held-out accuracy', 'Simulated labeler (Bradley-Terry noise 0.2',
                 'Best-of-N with the SFT policy', 'calibration.png', 'rewards.png',
                 'best_of_n_overoptimisation.png', 'least-squares fit, d = sqrt(KL)'):
        assert text in report, text
    # Running the finished command again resumes at the end and reuses the comparisons.
    mtime = (reward_workdir / 'comparisons' / 'train.jsonl').stat().st_mtime
    again = run(reward_command(reward_workdir, sft_workdir))
    assert again.returncode == 0 and 'resuming from' in again.stderr
    assert [r['step'] for r in metrics(reward_workdir) if 'loss' in r] == [1, 2]
    # ... nor measure best-of-N again (one record of it, as before).
    assert len([r for r in metrics(reward_workdir) if 'best_of_1/gold' in r]) == 1
    assert (reward_workdir / 'comparisons' / 'train.jsonl').stat().st_mtime == mtime


def test_reward_model_starts_from_the_sft_transformer(sft_workdir, reward_workdir):
    from experiments.reward import initial_state
    from gptstack import sharding, stage
    from gptstack.checkpoint import abstract_with_shardings
    from gptstack.config import MeshConfig, OptimConfig
    from gptstack.lineage import Workdir
    from gptstack.model import GPT, ScoreModel
    from gptstack.state import abstract_model

    lineage = Workdir(sft_workdir).lineage('init_from')
    model_config, checkpointer, step = lineage.model_config, lineage.checkpointer, lineage.step
    mesh = sharding.make_mesh(MeshConfig(fsdp=8))
    trainable = stage.Trainable.create(lambda rngs: ScoreModel(model_config, rngs=rngs),
                                       OptimConfig(), mesh, 'fsdp')
    state = initial_state(trainable, lineage, mesh, 'fsdp', 0)
    _, lm_abstract = abstract_model(lambda rngs: GPT(model_config, rngs=rngs))
    lm = checkpointer.restore_params(step, abstract_with_shardings(
        lm_abstract, sharding.param_shardings(lm_abstract, mesh, 'fsdp')))
    checkpointer.close()
    ours = jax.device_get(nnx.to_pure_dict(state.params))
    theirs = jax.device_get(nnx.to_pure_dict(lm))
    jax.tree.map(np.testing.assert_array_equal, ours['transformer'], theirs['transformer'])
    assert set(ours) == {'transformer', 'score_head'}
    assert state.params['transformer']['token_embed_vd'][...].sharding.spec == \
        trainable.shardings.params['transformer']['token_embed_vd'].spec


@pytest.mark.slow  # covered by the pipeline's kill test, which kills the reward stage in its
# sampling, its training and its best-of-N and compares its metrics step by step
def test_reward_kill_9_then_resume_continues_exactly(sft_workdir, tmp_path):
    steps = ('--config.train.total_steps=60', '--config.train.checkpoint_every=5',
             '--config.train.eval_every=0', '--config.best_of_n.prompts=0')
    reference = run(reward_command(tmp_path / 'reference', sft_workdir, *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / 'killed'
    process = start_and_wait_for_checkpoint(reward_command(workdir, sft_workdir, *steps),
                                            workdir, 10)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(losses(workdir)) < 60
    resumed = run(reward_command(workdir, sft_workdir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r['step'] for r in metrics(workdir) if 'loss' in r] == list(range(1, 61))
    assert losses(workdir) == losses(tmp_path / 'reference')


def test_bad_comparison_files_fail_before_training(sft_workdir, tmp_path):
    data = tmp_path / 'pairs.jsonl'
    data.write_text(json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}) + '\n' +
                    json.dumps({'prompt': 'p', 'chosen': 'a'}) + '\n')
    result = run(reward_command(tmp_path / 'a', sft_workdir, f'--config.data.train={data}',
                                '--config.data.validation='))
    assert result.returncode == 1
    assert f"{data}:2: expected {{prompt, chosen, rejected}}" in result.stderr
    assert not (tmp_path / 'a' / 'checkpoints').exists()
    result = run(reward_command(tmp_path / 'b', sft_workdir, f'--config.data.train={data}'))
    assert 'use embedded:tasks for both or for neither' in result.stderr
    result = run(reward_command(tmp_path / 'c', ''))
    assert 'init_from: name the SFT workdir to start the reward model from' in result.stderr
    # Comparisons whose completions all tie teach nothing: a clear error, not an empty stream.
    tied = tmp_path / 'tied.jsonl'
    record = preference.k_way_record([{'role': 'user', 'content': 'p'}], ['a', 'b'], [1, 1])
    tied.write_text((json.dumps(record) + '\n') * 5)
    result = run(reward_command(tmp_path / 'd', sft_workdir, f'--config.data.train={tied}',
                                '--config.data.validation='))
    assert result.returncode == 1
    assert (f'{tied}: no training comparison has a pair (of 4, 4 with all completions tied)'
            in result.stderr), result.stderr[-2000:]


@pytest.mark.skipif(not HH.exists(), reason='the shared datasets are not present')
def test_comparison_files_with_gold_scores_get_best_of_n(sft_workdir, reward_workdir, tmp_path):
    """Comparisons of the task suite read back from files (they carry gold scores) are measured
    by best-of-N as the labeler's own are."""
    files = reward_workdir / 'comparisons'
    result = run(reward_command(tmp_path, sft_workdir,
                                f'--config.data.train={files / "train.jsonl"}',
                                f'--config.data.validation={files / "validation.jsonl"}'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'best_of_n.json').exists()
    assert any('best_of_1/gold' in r for r in metrics(tmp_path))


def test_reward_on_hh_reads_every_record_and_reports_accuracy(sft_workdir, tmp_path):
    result = run(reward_command(tmp_path, sft_workdir, config='reward_hh.py:runlocal'))
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / 'report.md').read_text()
    assert '| train comparisons | 2000 prompts' in report
    assert '| held-out comparisons | 312 prompts' in report
    last_eval = [r for r in metrics(tmp_path) if 'val_accuracy' in r][-1]
    assert 0 < last_eval['val_accuracy_stderr'] < 0.1 and 'gold_agreement' not in last_eval
    assert not (tmp_path / 'best_of_n.json').exists()  # no gold scores, no best-of-N


def test_rank_tool_appends_k_way_records(sft_workdir, tmp_path):
    out = tmp_path / 'ranked.jsonl'
    result = run([sys.executable, '-m', 'experiments.rank', f'--workdir={sft_workdir}',
                  '--prompt=Say hi.', '--prompt=Name a colour.', f'--out={out}',
                  '--num_completions=2', '--max_new_tokens=4'], input='1 1\n2 1\ns\n')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'all replies have the same rank' in result.stdout
    assert 'appended 1 ranked prompts' in result.stdout and '(1 skipped)' in result.stdout
    (comparison,) = preference.read_comparisons(out, SkipBudget())
    assert comparison.prompt == [{'role': 'user', 'content': 'Say hi.'}]
    assert comparison.ranks == [2, 1] and len(comparison.completions) == 2
    assert pathlib.Path(out).read_text().count('\n') == 1


def test_reports_read_the_evaluation_of_the_kept_checkpoint(reward_workdir):
    """The reports' reward-model figures are those of the checkpoint later stages take (the
    checkpointer's step of the lowest held-out loss), not the last evaluation and not the
    untrained head's."""
    from gptstack.checkpoint import Checkpointer
    from gptstack.lineage import Workdir
    from gptstack.reports.reward import kept_evaluation

    records = [{'step': 0, 'val_loss': 0.50, 'val_accuracy': 0.42},
               {'step': 50, 'val_loss': 0.53, 'val_accuracy': 0.66},
               {'step': 100, 'loss': 0.4},
               {'step': 100, 'val_loss': 0.55, 'val_accuracy': 0.67}]
    assert kept_evaluation(records, 50)['val_accuracy'] == 0.66
    assert kept_evaluation(records, None) == {}
    # The pipeline's report on the checkpointer's choice.
    checkpointer = Checkpointer(reward_workdir / 'checkpoints', local=True)
    kept = checkpointer.best_step()
    checkpointer.close()
    assert kept is not None and Workdir(reward_workdir).best_step() == kept
    evaluation = kept_evaluation(metrics(reward_workdir), kept)
    row = (f'| reward model: held-out pairwise accuracy (the kept checkpoint) | '
           f'{evaluation["val_accuracy"]:.3f} ± '
           f'{evaluation["val_accuracy_stderr"]:.3f}')
    assert row in (reward_workdir.parent / 'report.md').read_text()
