"""The main job: the four stages of the recipe in one workdir, then one report.

    tokenizer -> pretrain -> sft -> reward (comparisons sampled from the SFT model and ranked by
    the simulated labeler) -> dpo (the SFT model trained on those comparisons directly) -> rl
    (PPO against the reward model) -> rl_small_beta (the same at a small KL coefficient and a
    larger step: over-optimisation) -> rl_gold (PPO against the gold scorer: the ceiling) ->
    grpo (critic-free GRPO against the gold scorer) -> compare

Each stage runs in `<workdir>/<stage>/` exactly as `experiments.run` would run it alone, with
its `init_from` / `reward_from` / comparison files / tokenizer path wired to the stages before it
(and the later RL runs to the first one's evaluation of the SFT policy, which they would
repeat). Every stage's
config is checked before the first one starts. `pipeline.json` records the stages that finished
and the settings each ran with: re-running the command skips them, and a stage that was
interrupted resumes from its own latest checkpoint. A finished stage whose settings have changed
is never skipped silently: the run stops naming the changed keys, and
`--config.rerun_from=<stage>` runs that stage and every one after it again (their earlier
results are moved to `<workdir>/replaced/`, never deleted).

The last step, `compare` (`gptstack.evals.comparison`), puts the base model (prompted
few-shot), the SFT model, best-of-N with the reward model, DPO, PPO, and PPO and GRPO against the
gold scorer in front of the same held-out task prompts, with each policy's KL to the SFT model
and what its stage cost, and `report.md` lays the whole run side by side, with the
over-optimisation curves of best-of-N and of PPO at both β.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax

from experiments import rl as rl_driver
from gptstack import sharding
from gptstack.config import ConfigError, check_bounds, flatten
from gptstack.data import tasks
from gptstack.evals import comparison
from gptstack.files import write_whole
from gptstack.metrics import peak_memory_gib, reset_peak_memory
from gptstack.reports import pipeline as pipeline_report
from gptstack.reports.pipeline import COMPARISON, PER_PROMPT

log = logging.getLogger(__name__)
LEDGER = 'pipeline.json'
# The pipeline's stages in order, each a key of its config naming its driver by `.stage`.
DRIVERS = {'tokenizer': 'tokenizer', 'pretrain': 'pretrain', 'sft': 'sft', 'reward': 'reward',
           'dpo': 'dpo', 'rl': 'rl', 'rl_small_beta': 'rl', 'rl_gold': 'rl', 'grpo': 'rl'}
STAGES = tuple(DRIVERS)


def wire(config, workdir: pathlib.Path) -> None:
    """Points every stage at the output of the one before it."""
    config.pretrain.tokenizer.path = str(workdir / 'tokenizer' / 'tokenizer.model')
    config.sft.init_from = str(workdir / 'pretrain')
    config.reward.init_from = str(workdir / 'sft')
    # DPO learns from the comparisons the reward model learns from: the ones its labeler
    # samples from the embedded tasks and writes, or the files it was given.
    config.dpo.init_from = str(workdir / 'sft')
    if config.reward.data.train != tasks.EMBEDDED_TASKS:
        config.dpo.data.train = config.reward.data.train
        config.dpo.data.validation = config.reward.data.validation
    else:
        comparisons = workdir / 'reward' / 'comparisons'
        config.dpo.data.train = str(comparisons / 'train.jsonl')
        config.dpo.data.validation = str(comparisons / 'validation.jsonl')
    for name in STAGES:
        if config[name].stage == 'rl':
            config[name].init_from = str(workdir / 'sft')
            config[name].reward_from = str(workdir / 'reward')
    # The later PPO runs start from the same SFT model as `rl`: where they would evaluate it
    # the same way, they take its step-0 evaluation instead of making it again.
    first = flatten(config.rl.to_dict())
    for name in STAGES:
        if (config[name].stage == 'rl' and name != 'rl' and not config[name].eval.baseline_from
                and not rl_driver.evaluation_differs(flatten(config[name].to_dict()), first)):
            config[name].eval.baseline_from = str(workdir / 'rl')


def validate(config, recipe: dict) -> None:
    """Every stage's config and the comparison's, before any stage starts."""
    for name in STAGES:
        if config[name].stage != DRIVERS[name]:
            raise ConfigError(f'{name}.stage={config[name].stage!r}: expected '
                              f'{DRIVERS[name]!r} (each step of the pipeline has its driver)')
        try:
            recipe[config[name].stage].validate(config[name])
        except ConfigError as error:
            raise ConfigError(f'{name}: {error}') from None
    check_bounds(config)  # the comparison's keys
    comparison.held_out_prompts(config)


def write_json(path: pathlib.Path, value) -> None:
    write_whole(path, json.dumps(value, indent=1) + '\n')


# --- settings of finished stages --------------------------------------------------------------
def settings(config) -> dict[str, dict]:
    """`{stage or 'compare': {dotted key: value}}` as the config gives them, before `wire`
    points the stages at each other (so a moved workdir compares equal)."""
    return {name: flatten(config[name].to_dict()) for name in (*STAGES, 'compare')}


def check_unchanged(name: str, before: dict, now: dict) -> None:
    """Refuses to reuse the results of `name` when the settings it ran with differ from the
    ones it would run with now."""
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = '; '.join(f'{name}.{k}: {before.get(k, "(absent)")!r} there, '
                          f'{now.get(k, "(absent)")!r} now' for k in changed[:4])
        more = f' (and {len(changed) - 4} more)' if len(changed) > 4 else ''
        raise ConfigError(f'{shown}{more}: {name} finished with other settings. Use a new '
                          f'--workdir, or --config.rerun_from={name} to run it and what follows '
                          'it again (their results are moved to <workdir>/replaced/)')


def set_aside(workdir: pathlib.Path, rerun_from: str, ledger: dict, given: dict) -> None:
    """Moves the results of `rerun_from` and every later step (stages, comparison, report)
    to `<workdir>/replaced/<time>/` and drops them from the ledger, if any of them finished
    with settings other than `given` (so the same command run again after the rerun, or after
    an interruption of it, keeps what it has done)."""
    names = [*STAGES, 'compare']
    later = names[names.index(rerun_from):]
    recorded = {name: ledger[name].get('settings') for name in later if name in ledger}
    if (workdir / COMPARISON).exists():
        recorded['compare'] = json.loads((workdir / COMPARISON).read_text()).get('settings')
    if all(settings == given[name] for name, settings in recorded.items()):
        log.info('rerun_from=%s: nothing from %s on finished with other settings; nothing to '
                 'rerun', rerun_from, rerun_from)
        return
    files = [n for n in later if n != 'compare'] + [COMPARISON, PER_PROMPT, 'report.md']
    target = workdir / 'replaced' / time.strftime('%Y%m%d-%H%M%S')
    for name in files:
        if (workdir / name).exists() and jax.process_index() == 0:
            target.mkdir(parents=True, exist_ok=True)
            (workdir / name).rename(target / name)
            log.info('moved %s to %s', workdir / name, target / name)
        ledger.pop(name, None)
    if jax.process_index() == 0:
        write_json(workdir / LEDGER, ledger)


def run(config, workdir: pathlib.Path, recipe: dict) -> str:
    """Runs `STAGES` in order, each by its driver in `recipe` ({stage: driver module}), then the
    comparison and the report."""
    given = settings(config)
    rerun_from = config.get('rerun_from', '')
    if rerun_from and rerun_from not in given:
        raise ConfigError(f'rerun_from={rerun_from!r}: expected one of {list(given)}')
    wire(config, workdir)
    validate(config, recipe)
    ledger = json.loads((workdir / LEDGER).read_text()) if (workdir / LEDGER).exists() else {}
    if rerun_from:
        set_aside(workdir, rerun_from, ledger, given)
        sharding.barrier('pipeline results set aside')  # before any process looks at them
    for name in STAGES:  # every check before any work
        if name in ledger and 'settings' in ledger[name]:
            check_unchanged(name, ledger[name]['settings'], given[name])
    if (workdir / COMPARISON).exists():
        check_unchanged('compare', json.loads((workdir / COMPARISON).read_text()).get(
            'settings', given['compare']), given['compare'])
    for name in STAGES:
        if name in ledger:
            log.info('stage %s finished earlier (%.1f min): skipped', name,
                     ledger[name]['seconds'] / 60)
            continue
        stage_dir = workdir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            write_json(stage_dir / 'config.json', config[name].to_dict())
        log.info('=== stage %s in %s', name, stage_dir)
        start = time.perf_counter()
        reset_peak_memory()
        status = recipe[config[name].stage].run(config[name], stage_dir)
        if status != 'finished':
            return status
        ledger[name] = {'seconds': time.perf_counter() - start, 'settings': given[name],
                        'peak_memory_gib': peak_memory_gib()}
        log.info('=== stage %s finished in %.1f min; report %s', name,
                 ledger[name]['seconds'] / 60, stage_dir / 'report.md')
        if jax.process_index() == 0:
            write_json(workdir / LEDGER, ledger)
    if (workdir / COMPARISON).exists():
        result = json.loads((workdir / COMPARISON).read_text())
    else:
        log.info('=== the comparison of the models on %d held-out prompts',
                 config.compare.prompts)
        start = time.perf_counter()
        reset_peak_memory()
        result = comparison.compare(config, workdir)
        result['seconds'] = time.perf_counter() - start
        result['peak_memory_gib'] = peak_memory_gib()
        result['settings'] = given['compare']
        per_prompt = result.pop('per_prompt')
        if jax.process_index() == 0:
            write_whole(workdir / PER_PROMPT, ''.join(json.dumps(r) + '\n' for r in per_prompt))
            write_json(workdir / COMPARISON, result)
    if jax.process_index() == 0:
        log.info('=== the comparison took %.1f min, the whole run %.1f; report %s',
                 result['seconds'] / 60,
                 (sum(entry['seconds'] for entry in ledger.values()) + result['seconds']) / 60,
                 pipeline_report.write(config, workdir, ledger, result))
    return 'finished'
