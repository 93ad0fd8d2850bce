"""Ahead-of-time compilation of the pretraining step for TPU slices, on this CPU machine."""

import sys

import pytest

from gptstack import aot
from gptstack.config import ConfigError
from tests.runs import run

pytest.importorskip('libtpu', reason='libtpu (pip install jax[tpu]) compiles for TPUs')


@pytest.mark.parametrize('name, chips, topology', [
    ('v5p-256', 128, '4x4x8'), ('v5p-8', 4, '2x2x1'), ('v4-128', 64, '4x4x4'),
    ('v5e-64', 64, '8x8'), ('v6e-256', 256, '16x16'), ('v5e-8', 8, '2x4'),
    ('v5p:4x4x8', 128, '4x4x8')])
def test_slice_names(name, chips, topology):
    slice_ = aot.parse_slice(name)
    assert (slice_.chips, slice_.topology) == (chips, topology)


@pytest.mark.parametrize('name, message', [
    ('v7-8', "topology 'v7-8': expected a slice like v5p-256"),
    ('v5p-6', "topology 'v5p-6': expected a power-of-two number of chips"),
    ('v5e:4x4x4', "topology 'v5e:4x4x4': v5e is a 2-D torus")])
def test_bad_slice_names(name, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
        aot.parse_slice(name)


def test_compile_only_reports_memory_and_speed_for_a_tpu_slice():
    result = run([sys.executable, '-m', 'experiments.run',
                  '--config=experiments/configs/pretrain.py:size=mini', '--compile_only',
                  '--topology=v5e-8'])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert 'v5e-8: 8 x TPU v5e (2x4), 8 devices; mesh data=1 x fsdp=8 x tensor=1' in out
    assert 'of 16.0 GiB HBM' in out and ': fits' in out
    assert 'tokens/s' in out
    # A batch far too large for the chip: reported, and the exit code says so.
    result = run([sys.executable, '-m', 'experiments.run',
                  '--config=experiments/configs/pretrain.py:size=mini', '--compile_only',
                  '--topology=v5e-8', '--config.data.batch_size=16384'])
    assert result.returncode == 1
    assert 'DOES NOT FIT' in result.stdout
