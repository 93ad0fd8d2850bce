"""The main job end to end: the quick pipeline's stages, comparison and report, re-running a
finished pipeline, and a pipeline killed with `kill -9` at twelve points across every stage."""

import json
import math
import os
import random
import subprocess
import time

import numpy as np
import pytest

from experiments import pipeline
from experiments.configs import pipeline as pipeline_config
from experiments.pipeline import LEDGER, STAGES
from gptstack import report
from gptstack.config import ConfigError
from gptstack.data import tasks
from gptstack.evals import comparison, gold
from gptstack.evals.comparison import MODELS
from gptstack.metrics import peak_memory_gib, reset_peak_memory
from gptstack.reports.pipeline import (
    COMPARISON,
    PER_PROMPT,
    algorithm,
    intervals,
    level_rows,
    model_names,
)
from gptstack.stats import mean_and_stderr, paired
from tests.runs import CONSOLE, ROOT, metrics, pipeline_command, run


def comparable(workdir):
    """What must not change when a run is interrupted: every stage's training metrics but the
    clocks, and the comparison but its wall time."""
    def clock(key):
        return ('time' in key or key.startswith(('tokens_per_sec', 'memory/'))
                or key == 'mfu')

    stages = {stage: [{k: v for k, v in r.items() if not clock(k)}
                      for r in metrics(workdir / stage)] for stage in STAGES[1:]}
    comparison = json.loads((workdir / COMPARISON).read_text())
    comparison.pop('seconds')
    comparison.pop('seconds_by_model')
    comparison.pop('peak_memory_gib')
    return stages, comparison


def test_intervals_of_two_standard_errors_and_their_overlap():
    sft = {'gold': 0.10, 'gold_stderr': 0.005}
    assert intervals(sft, {'gold': 0.125, 'gold_stderr': 0.0025}) == \
        '[0.0900, 0.1100] vs [0.1200, 0.1300] (PPO above SFT, not overlapping)'
    assert intervals(sft, {'gold': 0.115, 'gold_stderr': 0.0025}).endswith('(overlapping)')
    assert intervals(sft, {'gold': 0.07, 'gold_stderr': 0.005}).endswith(
        '(PPO below SFT, not overlapping)')
    assert intervals(sft, {'gold': 0.07, 'gold_stderr': 0.005}, name='GRPO').endswith(
        '(GRPO below SFT, not overlapping)')


def test_the_report_names_each_rl_run_by_its_algorithm():
    config = pipeline_config.get_config('quick')
    assert model_names(config)['ppo'] == 'PPO'
    config.rl.rl.algorithm = 'grpo'
    config.rl_gold.rl.algorithm = 'rloo'
    names = model_names(config)
    assert (names['ppo'], names['ppo_gold']) == ('GRPO', 'RLOO, gold reward (ceiling)')
    assert algorithm(config.rl_small_beta) == 'PPO'


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


def test_gold_by_group_averages_the_prompts_of_each_label():
    scores = np.asarray([1.0, 0.0, 0.5, 0.25, 0.75])
    # Levels sort as numbers, and a prompt that is not a task (None) is in no group.
    assert gold.by_group(scores, [3, 1, 3, None, 1]) == {1: 0.375, 3: 0.75}
    rng = np.random.default_rng(0)
    scores = rng.random(60)
    levels = [None if i % 7 == 0 else int(rng.integers(1, 4)) for i in range(60)]
    families = [None if level is None else str(rng.choice(tasks.FAMILIES[:3]))
                for level in levels]
    by_level = gold.by_level(scores, levels, 'sampled')
    assert list(by_level) == ['gold/sampled/level1', 'gold/sampled/level2',
                              'gold/sampled/level3']
    for level in (1, 2, 3):
        mine = np.asarray([x == level for x in levels])
        assert by_level[f'gold/sampled/level{level}'] == pytest.approx(scores[mine].mean())
    by_family = gold.by_family(scores, families, 'greedy')
    assert list(by_family) == [f'gold/greedy/{f}' for f in sorted(set(families) - {None})]
    for family in sorted(set(families) - {None}):
        mine = np.asarray([x == family for x in families])
        assert by_family[f'gold/greedy/{family}'] == pytest.approx(scores[mine].mean())
    assert gold.by_group(scores, [None] * 60) == {}


def test_levels_before_after_pair_two_records_and_skip_absent_levels():
    before = {'gold/greedy/level1': 0.1, 'gold/sampled/level1': 0.2, 'gold/sampled/level3': 0.0}
    after = {'gold/greedy/level1': 0.3, 'gold/sampled/level1': 0.4, 'gold/greedy/level3': 0.5}
    assert report.levels_before_after(before, after) == [
        ('level 1', 0.1, 0.3, 0.2, 0.4), ('level 3', 'n/a', 0.5, 0.0, 'n/a')]
    assert report.levels_before_after(before, after, ('sampled',)) == [
        ('level 1', 0.2, 0.4), ('level 3', 0.0, 'n/a')]
    assert report.levels_before_after({}, {}) == []


def test_comparison_by_level_against_numpy_and_through_json():
    held_out = tasks.generate('test', 40, seed=0)
    cells = np.asarray([f'{t.family}/{t.level}' for t in held_out])
    rng = np.random.default_rng(0)
    per_prompt = {m: rng.random(40) for m in MODELS}
    means, stderrs = comparison.by_level(held_out, cells, per_prompt)
    assert list(means) == list(stderrs) == ['1', '2', '3']
    for level in ('1', '2', '3'):
        mine = np.asarray([str(t.level) == level for t in held_out])
        for m in MODELS:
            assert means[level][m] == pytest.approx(per_prompt[m][mine].mean())
            assert stderrs[level][m] == pytest.approx(
                mean_and_stderr(per_prompt[m][mine], cells[mine])[1])
    # Three level-1 prompts of one family, and two level-2 prompts of two families: a mean
    # and no stratified error.
    pool = tasks.generate('test', 200, seed=0)
    few = [t for t in pool if t.level == 1 and t.family == 'sorting'][:3] + [
        next(t for t in pool if t.level == 2 and t.family == f)
        for f in ('arithmetic', 'counting')]
    few_cells = np.asarray([f'{t.family}/{t.level}' for t in few])
    means, stderrs = comparison.by_level(few, few_cells, {m: np.arange(5.0) for m in MODELS})
    assert means['2'] == {m: 3.5 for m in MODELS} and stderrs['2'] == {m: None for m in MODELS}
    result = {'levels': means, 'levels_stderr': stderrs}
    assert json.loads(json.dumps(result)) == result
    rows = level_rows(json.loads(json.dumps(result)))
    assert [row[0] for row in rows] == ['level 1', 'level 2']
    assert rows[1] == ('level 2', *['3.5000'] * len(MODELS))
    assert rows[0] == ('level 1', *['1.0000 ± 0.5774'] * len(MODELS))  # 0, 1, 2: sd 1


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
    ('--config.reward.data.completions=1', 'ConfigError: reward: data.completions=1: expected at '
                                           'least 2 (a comparison needs at least 2 completions)'),
])
def test_a_bad_stage_config_fails_before_the_first_stage(corpus, tmp_path, override, message):
    result = run(pipeline_command(corpus, tmp_path, override))
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / 'tokenizer').exists()


class RecordingDriver:
    """A stage driver that only records which stage directories it ran."""

    def __init__(self, ran: list):
        self.ran = ran

    def validate(self, config):
        pass

    def run(self, config, workdir):
        self.ran.append(workdir.name)
        return 'finished'


def test_changed_settings_of_a_finished_stage_stop_the_pipeline_until_rerun(
        tmp_path, monkeypatch):
    monkeypatch.setattr(comparison, 'compare', lambda config, workdir: {'per_prompt': []})
    monkeypatch.setattr(pipeline.pipeline_report, 'write', lambda *args: 'report.md')
    ran = []
    recipe = dict.fromkeys(('tokenizer', 'pretrain', 'sft', 'reward', 'dpo', 'rl'),
                           RecordingDriver(ran))

    def run_with(**overrides):
        config = pipeline_config.get_config('quick')
        for key, value in overrides.items():  # sft__optim__lr=... sets config.sft.optim.lr
            *path, field = key.split('__')
            target = config
            for name in path:
                target = target[name]
            target[field] = value
        ran.clear()
        pipeline.run(config, tmp_path, recipe)
        return list(ran)

    assert run_with() == list(STAGES)
    assert run_with() == []  # finished and unchanged: skipped
    with pytest.raises(ConfigError, match=r'sft\.optim\.lr: 0\.\d+ there, 0\.5 now: sft '
                                          r'finished with other settings\. Use a new --workdir, '
                                          r'or --config\.rerun_from=sft'):
        run_with(sft__optim__lr=0.5)
    assert ran == []  # refused before any stage ran
    assert run_with(sft__optim__lr=0.5, rerun_from='sft') == list(STAGES[2:])
    [replaced] = (tmp_path / 'replaced').iterdir()
    assert sorted(p.name for p in replaced.iterdir()) == sorted([*STAGES[2:], COMPARISON,
                                                                PER_PROMPT])
    assert (tmp_path / 'pretrain' / 'config.json').exists()
    # The same command again keeps what the rerun did.
    assert run_with(sft__optim__lr=0.5, rerun_from='sft') == []
    with pytest.raises(ConfigError, match=r'compare\.samples: 2 there, 3 now'):
        run_with(sft__optim__lr=0.5, compare__samples=3)
    with pytest.raises(ConfigError, match=r"rerun_from='ppo': expected one of \['tokenizer'"):
        run_with(rerun_from='ppo')


def test_the_console_has_no_tpu_probe_and_leaves_the_details_to_the_run_log(pipeline_workdir):
    # libtpu is installed (the test extra's jax[tpu]), and this machine has no TPU.
    console = (pipeline_workdir / CONSOLE).read_text()
    for text in ('libtpu', 'TPU initialization', "backend 'tpu'", 'Source Location Trace'):
        assert text not in console, text
    # Every stage in at most 60 lines: progress bars in a log draw once a minute (so not at all
    # in this two-minute run), and repeated warnings are counts.
    lines = console.replace('\r', '\n').splitlines()
    assert len(lines) <= 60, '\n'.join(lines)
    assert 'Warning' not in console
    # The tiny model's context cuts some task conversations: the console shows the first of
    # each reason and the count, the run's log every one.
    run_log = (pipeline_workdir / 'run.log').read_text()
    skipped = 'skipping malformed record'
    assert 0 < console.count(skipped) < run_log.count(skipped)
    assert 'malformed records {' in console  # the count by reason
    assert console.count('mesh: ') == 1 and run_log.count('mesh: ') > 1


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
    for name in ('rl', 'rl_small_beta', 'rl_gold', 'grpo'):
        assert configs[name]['init_from'] == str(pipeline_workdir / 'sft'), name
        assert configs[name]['reward_from'] == str(pipeline_workdir / 'reward'), name
    # DPO learns from the SFT model on the comparisons the reward stage sampled and ranked.
    assert configs['dpo']['init_from'] == str(pipeline_workdir / 'sft')
    assert (configs['dpo']['data']['train'], configs['dpo']['data']['validation']) == tuple(
        str(pipeline_workdir / 'reward' / 'comparisons' / f'{split}.jsonl')
        for split in ('train', 'validation'))
    # GRPO against the gold scorer differs from the gold-reward PPO run by its algorithm and
    # (evaluated once) its evaluations, and shares PPO's evaluation of the SFT policy.
    grpo = configs.pop('grpo')
    gold_rl = dict(configs['rl_gold']['rl'])
    assert (grpo['rl'].pop('algorithm'), gold_rl.pop('algorithm')) == ('grpo', 'ppo')
    assert grpo['rl'] == gold_rl and grpo['eval'] == configs['rl_gold']['eval']
    assert metrics(pipeline_workdir / 'grpo')[0] == metrics(pipeline_workdir / 'rl')[0]
    # The over-optimisation run differs from PPO only by β, the ceiling only by its reward.
    betas = {name: configs[name]['rl']['ppo'].pop('kl_coef') for name in configs if 'rl' in name}
    assert betas == {'rl': 0.2, 'rl_small_beta': 0.02, 'rl_gold': 0.2}
    assert [configs[name]['rl'].pop('reward') for name in betas] == ['model', 'model', 'gold']
    # The later two take the SFT policy's step-0 evaluation from `rl`: the same numbers.
    assert [configs[name]['eval'].pop('baseline_from') for name in betas] == [
        None, str(pipeline_workdir / 'rl'), str(pipeline_workdir / 'rl')]
    assert configs['rl'] == configs['rl_small_beta'] == configs['rl_gold']
    assert metrics(pipeline_workdir / 'rl')[0] == metrics(pipeline_workdir / 'rl_small_beta')[0] \
        == metrics(pipeline_workdir / 'rl_gold')[0]

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
    for model in ('best_of_n', 'dpo', 'ppo', 'ppo_gold', 'grpo'):
        assert comparison['models'][model]['gain']['over'] == 'sft', model
    assert [(c['model'], c['over']) for c in comparison['contrasts']] == [
        ('grpo', 'ppo'), ('grpo', 'ppo_gold'), ('dpo', 'best_of_n')]
    for c in comparison['contrasts']:
        mine = np.asarray([line['gold'][c['model']] for line in lines])
        theirs = np.asarray([line['gold'][c['over']] for line in lines])
        assert (c['mean'], c['stderr']) == pytest.approx(paired(mine, theirs, cells))
    # Each trained policy's KL to the SFT model, on its own samples of these prompts.
    assert comparison['models']['sft']['kl'] == 0.0
    for model in ('dpo', 'ppo', 'ppo_gold', 'grpo'):
        kl = np.asarray([line['kl'][model] for line in lines])
        assert (comparison['models'][model]['kl'], comparison['models'][model]['kl_stderr']) \
            == pytest.approx(mean_and_stderr(kl, cells)), model
    n = comparison['best_of']
    assert comparison['models']['best_of_n']['kl'] == pytest.approx(np.log(n) - (n - 1) / n)
    levels = sorted({line['level'] for line in lines})
    assert list(comparison['levels']) == [str(k) for k in levels]
    for level, scores in comparison['levels'].items():
        mine = [line for line in lines if str(line['level']) == level]
        assert set(scores) == set(MODELS) == set(comparison['levels_stderr'][level]), level
        for model in MODELS:
            mean = np.mean([line['gold'][model] for line in mine])
            assert scores[model] == pytest.approx(mean), (level, model)
    assert len(comparison['examples']) == 2
    assert set(comparison['examples'][0]) == {'prompt', 'answer', *MODELS}

    report = (pipeline_workdir / 'report.md').read_text()
    for heading in ('## The stages', '## Gold score on the same held-out prompts',
                    '## Gold score by task family', '## Gold score by task level',
                    '## Reward model', '## PPO', '## Over-optimisation',
                    '## The same prompts answered by each model'):
        assert heading in report, heading
    assert 'reward model: held-out pairwise accuracy' in report
    assert 'KL of the final PPO policy to the SFT model' in report
    assert 'SFT and PPO gold score, ± 2 standard errors' in report
    assert 'the same, standard errors not stratified' in report
    for level in comparison['levels']:
        assert f'| level {level} | ' in report, level
    assert 'PPO against the gold scorer over SFT: the ceiling' in report
    for run_label in ('best-of-N', 'PPO, β 0.2', 'PPO, β 0.02', 'PPO, β 0.2, gold reward'):
        assert f'| {run_label} | gold | ' in report, run_label
    for image in ('stages.png', 'gold.png', 'overoptimisation.png'):
        assert (pipeline_workdir / image).stat().st_size > 0
    # Every stage's cost in the stage table: where its time went, tokens/s and MFU.
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in report.splitlines()
            if line.startswith('| ') and ' | ' in line}
    assert rows['stage'][-3:] == ['of which (min)', 'tokens/s', 'MFU |']
    for stage in ('1 pretraining', '2 SFT', '3 reward model'):
        assert 'steps' in rows[stage][-3] and 0 < float(rows[stage][-1].strip(' |')) < 1, stage
    assert 'comparisons' in rows['3 reward model'][-3]  # sampling and labelling them
    for stage in ('4 RL (PPO)', '4 PPO at a small β', '4 PPO against the gold scorer',
                  '4 GRPO against the gold scorer'):
        assert 'update' in rows[stage][-3] and 0 < float(rows[stage][-1].strip(' |')) < 1, stage
    assert 'steps' in rows['3-4 DPO'][-3] and 0 < float(rows['3-4 DPO'][-1].strip(' |')) < 1
    # The gold table: each model's KL to SFT and the cost of the stage that made it.
    assert rows['model'][4:8] == ['KL to SFT', 'wall time (min)', 'tokens/s',
                                  'peak memory (GiB)']
    assert rows['DPO'][4].startswith(f'{comparison["models"]["dpo"]["kl"]:.3f} ± ')
    assert float(rows['GRPO, gold reward'][7]) > 0  # GiB
    assert rows['5 comparison'][-3].startswith('base (few-shot prompt) ')


# Where the quick pipeline is killed: a file or directory whose appearance marks a point inside a
# stage (a stage's directory appears when it starts; checkpoint N once step N is on disk), the
# stage it is in, and the longest wait after it before the kill.
KILL_POINTS = (
    ('tokenizer', 'tokenizer', 0.0),
    ('pretrain', 'pretrain/checkpoints/1', 0.3),
    ('sft', 'sft/checkpoints/1', 0.3),
    ('reward', 'reward/comparisons', 0.5),  # sampling and ranking the comparisons
    ('reward', 'reward/checkpoints/1', 0.3),
    ('reward', 'reward/checkpoints/2', 0.5),  # best-of-N after training
    ('dpo', 'dpo/checkpoints/1', 0.3),
    ('rl', 'rl/checkpoints/1', 0.3),
    ('rl_small_beta', 'rl_small_beta/checkpoints/1', 0.3),
    ('rl_gold', 'rl_gold/checkpoints/1', 0.3),
    ('grpo', 'grpo/checkpoints/1', 0.3),
    ('compare', None, 2.0),  # once every stage is in the ledger
)


def test_pipeline_killed_at_twelve_seeded_points_then_rerun_finishes_with_the_same_results(
        pipeline_workdir, corpus, tmp_path):
    """`kill -9` at each point of `KILL_POINTS` after a seeded random wait, each followed by the
    same command: every stage's metrics and the comparison equal the uninterrupted run's."""
    rng = random.Random(0)
    workdir = tmp_path / 'pipeline'
    command = pipeline_command(corpus, workdir)

    def ledger():
        path = workdir / LEDGER
        return json.loads(path.read_text()) if path.exists() else {}

    landed = []
    for stage, marker, longest_wait in KILL_POINTS:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not (workdir / marker).exists() if marker else not set(STAGES) <= set(ledger()):
            assert process.poll() is None, f'{stage}: {process.communicate()[1][-3000:]}'
            assert time.time() < deadline, stage
            time.sleep(0.01)
        time.sleep(rng.uniform(0, longest_wait))
        process.kill()
        process.communicate()
        assert not (workdir / COMPARISON).exists(), f'the pipeline finished before the {stage} kill'
        finished = ledger()
        landed.append(next(s for s in (*STAGES, 'compare') if s not in finished))
    # Every stage and the comparison were interrupted at least once.
    assert set(landed) == {*STAGES, 'compare'}, landed

    rerun = run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert comparable(workdir) == comparable(pipeline_workdir)

    # A finished pipeline re-run does no work and changes nothing.
    again = run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'stage rl finished earlier' in again.stderr
    assert comparable(workdir) == comparable(pipeline_workdir)


def test_the_peak_memory_counts_from_its_reset():
    if not os.access('/proc/self/clear_refs', os.W_OK):
        pytest.skip('this system does not let a process reset its peak resident set')
    before = peak_memory_gib()
    block = np.ones(2**28 // 8)  # 256 MiB, touched
    during = peak_memory_gib()
    assert during >= before + 0.2
    del block
    reset_peak_memory()
    assert peak_memory_gib() < during - 0.2
