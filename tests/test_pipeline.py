"""The main job end to end: the quick pipeline's stages, comparison and report, re-running a
finished pipeline, and a pipeline killed with `kill -9` in the middle of a stage."""

import json
import math
import shutil

import numpy as np
import pytest

from experiments.configs import pipeline as pipeline_config
from experiments.pipeline import LEDGER
from gptstack.config import ConfigError
from gptstack.evals import comparison
from gptstack.evals.comparison import MODELS
from gptstack.reports.pipeline import COMPARISON, PER_PROMPT, intervals
from gptstack.stats import mean_and_stderr
from tests.runs import metrics, pipeline_command, run, start_and_wait_for_checkpoint

STAGES = ('tokenizer', 'pretrain', 'sft', 'reward', 'rl')


def comparable(workdir):
    """What must not change when a run is interrupted: every stage's training metrics but the
    clocks, and the comparison but its wall time."""
    def clock(key):
        return 'time' in key or key.startswith('tokens_per_sec') or key == 'mfu'

    stages = {stage: [{k: v for k, v in r.items() if not clock(k)}
                      for r in metrics(workdir / stage)] for stage in STAGES[1:]}
    comparison = json.loads((workdir / COMPARISON).read_text())
    comparison.pop('seconds')
    return stages, comparison


def test_intervals_of_two_standard_errors_and_their_overlap():
    sft = {'gold': 0.10, 'gold_stderr': 0.005}
    assert intervals(sft, {'gold': 0.125, 'gold_stderr': 0.0025}) == \
        '[0.0900, 0.1100] vs [0.1200, 0.1300] (PPO above SFT, not overlapping)'
    assert intervals(sft, {'gold': 0.115, 'gold_stderr': 0.0025}).endswith('(overlapping)')
    assert intervals(sft, {'gold': 0.07, 'gold_stderr': 0.005}).endswith(
        '(PPO below SFT, not overlapping)')


def test_stratified_standard_error_against_a_reference_loop():
    rng = np.random.default_rng(0)
    strata = np.repeat(['counting', 'sorting', 'string'], 40)
    values = rng.random(120) * np.repeat([1.0, 0.1, 0.0], 40)
    # Equal strata: sqrt(sum_h w_h^2 s_h^2 / n_h), stratum by stratum.
    variance = 0.0
    for stratum in ('counting', 'sorting', 'string'):
        mine = values[strata == stratum]
        variance += (len(mine) / len(values)) ** 2 * mine.var(ddof=1) / len(mine)
    mean, stderr = mean_and_stderr(values, strata)
    assert mean == pytest.approx(values.mean())
    assert stderr == pytest.approx(math.sqrt(variance))
    assert stderr < mean_and_stderr(values)[1]
    # One stratum is no stratification; values that differ only between strata have no error.
    assert mean_and_stderr(values, np.zeros(120))[1] == pytest.approx(mean_and_stderr(values)[1])
    assert mean_and_stderr(np.repeat([0.5, 0.1, 0.0], 40), strata)[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match='3 values in 3 strata: a stratified standard error '
                                         'needs more values than strata'):
        mean_and_stderr(values[::40], strata[::40])


def test_too_few_comparison_prompts_for_stratified_errors_fail_before_any_sampling(tmp_path):
    config = pipeline_config.get_config('quick')
    config.compare.prompts = 4
    # The workdir holds no models: the error must come before the first one is loaded.
    with pytest.raises(ConfigError, match=r'compare.prompts=4: the held-out prompts fall in 4 '
                                          'task families and levels, and stratified standard '
                                          'errors need more prompts than that'):
        comparison.compare(config, tmp_path)


@pytest.mark.parametrize('override, message', [
    ('--config.compare.prompts=4', 'ConfigError: compare.prompts=4: the held-out prompts fall in '
                                   '4 task families and levels'),
    ('--config.rl.rl.ppo.kl_estimator=k9', "kl_estimator='k9': expected k1 or k3"),
    ('--config.reward.data.completions=1', 'ConfigError: data.completions=1: a comparison needs '
                                           'at least 2 completions'),
])
def test_a_bad_stage_config_fails_before_the_first_stage(corpus, tmp_path, override, message):
    result = run(pipeline_command(corpus, tmp_path, override))
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / 'tokenizer').exists()


def test_pipeline_runs_every_stage_into_one_report(pipeline_workdir):
    ledger = json.loads((pipeline_workdir / LEDGER).read_text())
    assert list(ledger) == list(STAGES)
    for stage in STAGES:
        assert (pipeline_workdir / stage / 'report.md').exists(), stage
        assert (pipeline_workdir / stage / 'config.json').exists(), stage
    for stage in STAGES[1:]:
        assert any((pipeline_workdir / stage / 'checkpoints').iterdir()), stage
    # One tokenizer through the whole lineage, and each stage starts from the one before it.
    tokenizer = (pipeline_workdir / 'tokenizer' / 'tokenizer.model').read_bytes()
    for stage in STAGES[1:]:
        assert (pipeline_workdir / stage / 'tokenizer.model').read_bytes() == tokenizer, stage
    configs = {s: json.loads((pipeline_workdir / s / 'config.json').read_text())
               for s in STAGES}
    assert configs['pretrain']['tokenizer']['path'] == str(
        pipeline_workdir / 'tokenizer' / 'tokenizer.model')
    assert configs['sft']['init_from'] == str(pipeline_workdir / 'pretrain')
    assert configs['reward']['init_from'] == str(pipeline_workdir / 'sft')
    assert configs['rl']['init_from'] == str(pipeline_workdir / 'sft')
    assert configs['rl']['reward_from'] == str(pipeline_workdir / 'reward')

    comparison = json.loads((pipeline_workdir / COMPARISON).read_text())
    assert comparison['prompts'] == 32 and comparison['samples'] == 2
    lines = [json.loads(line) for line in (pipeline_workdir / PER_PROMPT).read_text().splitlines()]
    assert len(lines) == 32
    for model in MODELS:
        entry = comparison['models'][model]
        assert 0.0 <= entry['gold'] <= 1.0 and entry['gold_stderr'] >= 0.0, model
        scores = np.asarray([line['gold'][model] for line in lines])
        cells = np.asarray([f'{line["family"]}/{line["level"]}' for line in lines])
        assert (entry['gold'], entry['gold_stderr']) == pytest.approx(
            mean_and_stderr(scores, cells)), model
        assert entry['gold_stderr_unstratified'] == pytest.approx(mean_and_stderr(scores)[1])
    assert comparison['models']['ppo']['gain']['over'] == 'sft'
    assert len(comparison['examples']) == 2
    assert set(comparison['examples'][0]) == {'prompt', 'answer', *MODELS}

    report = (pipeline_workdir / 'report.md').read_text()
    for heading in ('## The stages', '## Gold score on the same held-out prompts',
                    '## Gold score by task family', '## Reward model', '## PPO',
                    '## The same prompts answered by each model'):
        assert heading in report, heading
    assert 'reward model: held-out pairwise accuracy' in report
    assert 'KL of the final PPO policy to the SFT model' in report
    assert 'SFT and PPO gold score, ± 2 standard errors' in report
    assert 'the same, standard errors not stratified' in report
    for image in ('stages.png', 'gold.png'):
        assert (pipeline_workdir / image).stat().st_size > 0


def test_pipeline_killed_mid_stage_then_rerun_finishes_with_the_same_results(
        pipeline_workdir, corpus, tmp_path):
    # The first three stages as the uninterrupted run left them; the rest starts again.
    workdir = tmp_path / 'pipeline'
    shutil.copytree(pipeline_workdir, workdir)
    for name in ('reward', 'rl'):
        shutil.rmtree(workdir / name)
    for name in (COMPARISON, 'report.md'):
        (workdir / name).unlink()
    ledger = json.loads((workdir / LEDGER).read_text())
    (workdir / LEDGER).write_text(json.dumps({k: ledger[k] for k in STAGES[:3]}))

    command = pipeline_command(corpus, workdir)
    process = start_and_wait_for_checkpoint(command, workdir / 'reward', 1)
    process.kill()
    process.wait()
    assert not (workdir / 'rl').exists()

    rerun = run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'stage sft finished earlier' in rerun.stderr
    assert comparable(workdir) == comparable(pipeline_workdir)

    # A finished pipeline re-run does no work and changes nothing.
    again = run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'stage rl finished earlier' in again.stderr
    assert comparable(workdir) == comparable(pipeline_workdir)
