"""Every stage config loads and builds: `python -m pytest -q tests/test_configs.py`."""

import importlib
import pathlib

import pytest

from experiments.configs import common
from gptstack.config import GPTConfig, MeshConfig, OptimConfig
from gptstack.data.sources import specs_from_config
from gptstack.loop import LoopConfig
from gptstack.steps.dpo import DPOLoss
from gptstack.steps.ppo import PPOConfig

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'experiments' /
                                  'configs').glob('*.py') if p.stem not in ('__init__', 'common'))


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_config_builds_typed_configs(name, arg):
    module = importlib.import_module(f'experiments.configs.{name}')
    if arg and 'runlocal' not in module.__doc__:
        pytest.skip('no runlocal variant')
    config = module.get_config(arg)
    assert module.__doc__.lstrip().split('\n')[0], 'every config opens with a docstring'
    assert 'COMMAND' in module.__doc__
    if config.stage == 'pipeline':
        for stage in ('tokenizer', 'pretrain', 'sft', 'reward', 'rl'):
            assert config[stage].stage == stage
            check_stage(config[stage])
    else:
        check_stage(config)


def check_stage(config):
    if 'sources' in config.data:
        specs = specs_from_config(config.data.sources)
        assert abs(sum(s.weight for s in specs) - 1) < 1e-6 or len(specs) == 1
    if 'model' in config:
        model = GPTConfig.from_dict(config.model, vocab_size=config.tokenizer.vocab_size)
        assert model.max_seq_len == config.data.seq_len
    if 'train' in config:  # every training stage
        MeshConfig.from_dict(config.mesh)
        OptimConfig.from_dict(config.optim)
        LoopConfig.from_dict(config.train)
    if 'rl' in config:
        PPOConfig.from_config(config.rl)
        OptimConfig.from_dict(config.critic_optim)
    if config.stage == 'dpo':
        DPOLoss(**config.loss)


def test_overrides_follow_references():
    from experiments.configs import pretrain
    config = pretrain.get_config()
    config.train.total_steps = 1234
    config.data.seq_len = 128
    assert config.optim.total_steps == 1234 and config.model.max_seq_len == 128


def test_pipeline_overrides_reach_its_stages():
    from experiments.configs import pipeline
    config = pipeline.get_config()
    config.seed = 7
    config.pretrain.tokenizer.vocab_size = 2048
    config.pretrain.data.sources.code.paths = 'corpus/*.txt'
    assert all(config[s].seed == 7 for s in ('tokenizer', 'pretrain', 'sft', 'reward', 'rl'))
    # The tokenizer stage trains what pretraining will use, on the same mixture.
    assert config.tokenizer.tokenizer.vocab_size == 2048
    assert config.tokenizer.data.sources.code.paths == 'corpus/*.txt'
    with pytest.raises(ValueError, match='choose one of quick and large'):
        pipeline.get_config('quick,large')


def test_parse_arg():
    arg = common.parse_arg('size=mini,runlocal', size='', runlocal=False, steps=10)
    assert arg.size == 'mini' and arg.runlocal is True and arg.steps == 10
    with pytest.raises(ValueError, match="config argument 'sise'"):
        common.parse_arg('sise=mini', size='')


def test_unset_fields_are_placeholders_of_their_annotated_type():
    from experiments.configs import pretrain
    config = pretrain.get_config()
    assert config.model.vocab_size is None
    config.model.vocab_size = 4608  # what --config.model.vocab_size=4608 does
    config.mesh.fsdp = 2
    assert config.model.vocab_size == 4608
    for key, value in (('model.vocab_size', '4608'), ('mesh.fsdp', 2.5)):
        with pytest.raises(TypeError):
            section, field = key.split('.')
            config[section][field] = value


def test_data_keys_below_their_least_value_fail_in_set_up_naming_the_key():
    from experiments.configs import rl
    from gptstack import stage
    from gptstack.config import ConfigError
    config = rl.get_config('runlocal')
    config.data.max_new_tokens = 0
    with pytest.raises(ConfigError, match=r'^data\.max_new_tokens=0: expected at least 1 '
                                          r'\(a reply needs a token\)$'):
        stage.setup(config)
