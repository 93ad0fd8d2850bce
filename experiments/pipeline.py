"""The main job: the four stages of the recipe in one workdir, then one report.

    tokenizer -> pretrain -> sft -> reward (comparisons sampled from the SFT model and ranked by
    the simulated labeler) -> rl (PPO against the reward model) -> rl_small_beta (the same at a
    small KL coefficient: over-optimisation) -> rl_gold (PPO against the gold scorer: the
    ceiling) -> compare

Each stage runs in `<workdir>/<stage>/` exactly as `experiments.run` would run it alone, with
its `init_from` / `reward_from` / tokenizer path wired to the stage before it. Every stage's
config is checked before the first one starts. `pipeline.json` records the stages that finished:
re-running the command skips them, and a stage that was interrupted resumes from its own latest
checkpoint. The last step, `compare` (`gptstack.evals.comparison`), puts the base model
(prompted few-shot), the SFT model, best-of-N with the reward model, the PPO policy and the
gold-reward PPO policy in front of the same held-out task prompts, and `report.md` lays the whole
run side by side, with the over-optimisation curves of best-of-N and of PPO at both β.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax

from gptstack.evals import comparison
from gptstack.files import write_whole
from gptstack.reports import pipeline as pipeline_report
from gptstack.reports.pipeline import COMPARISON, PER_PROMPT

log = logging.getLogger(__name__)
LEDGER = 'pipeline.json'
# The pipeline's stages in order, each a key of its config naming the driver by `.stage`.
STAGES = ('tokenizer', 'pretrain', 'sft', 'reward', 'rl', 'rl_small_beta', 'rl_gold')


def wire(config, workdir: pathlib.Path) -> None:
    """Points every stage at the output of the one before it."""
    config.pretrain.tokenizer.path = str(workdir / 'tokenizer' / 'tokenizer.model')
    config.sft.init_from = str(workdir / 'pretrain')
    config.reward.init_from = str(workdir / 'sft')
    for name in STAGES:
        if config[name].stage == 'rl':
            config[name].init_from = str(workdir / 'sft')
            config[name].reward_from = str(workdir / 'reward')


def validate(config, recipe: dict) -> None:
    """Every stage's config and the comparison's, before any stage starts."""
    for name in STAGES:
        recipe[config[name].stage].validate(config[name])
    comparison.held_out_prompts(config)


def write_json(path: pathlib.Path, value) -> None:
    write_whole(path, json.dumps(value, indent=1) + '\n')


def run(config, workdir: pathlib.Path, recipe: dict) -> str:
    """Runs `STAGES` in order, each by its driver in `recipe` ({stage: driver module}), then the
    comparison and the report."""
    wire(config, workdir)
    validate(config, recipe)
    ledger = json.loads((workdir / LEDGER).read_text()) if (workdir / LEDGER).exists() else {}
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
        status = recipe[config[name].stage].run(config[name], stage_dir)
        if status != 'finished':
            return status
        ledger[name] = {'seconds': time.perf_counter() - start}
        if jax.process_index() == 0:
            write_json(workdir / LEDGER, ledger)
    if (workdir / COMPARISON).exists():
        result = json.loads((workdir / COMPARISON).read_text())
    else:
        start = time.perf_counter()
        result = comparison.compare(config, workdir)
        result['seconds'] = time.perf_counter() - start
        per_prompt = result.pop('per_prompt')
        if jax.process_index() == 0:
            write_whole(workdir / PER_PROMPT, ''.join(json.dumps(r) + '\n' for r in per_prompt))
            write_json(workdir / COMPARISON, result)
    if jax.process_index() == 0:
        log.info('report: %s', pipeline_report.write(config, workdir, ledger, result))
    return 'finished'
