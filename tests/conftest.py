"""Shared test setup: 8 emulated CPU devices, meshes and tiny model configs.

Run the suite with `python -m pytest -q`.
"""

import os

# Must happen before jax creates its backends: every test sees 8 CPU devices.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax
import pytest

from gptstack import sharding
from gptstack.config import MeshConfig


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, 'XLA_FLAGS was set too late: jax was imported earlier'


@pytest.fixture(scope='session')
def mesh_1():
    return sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])


@pytest.fixture(scope='session')
def mesh_2x4():
    return sharding.make_mesh(MeshConfig(fsdp=2, tensor=4, rules='fsdp_tp'))


@pytest.fixture(scope='session')
def mesh_8():
    return sharding.make_mesh(MeshConfig(fsdp=8))


@pytest.fixture(scope='session')
def tokenizer():
    """A small BPE trained on a slice of the embedded corpus plus some non-ASCII text."""
    import itertools

    from gptstack.data import sources
    from gptstack.data.tokenizer import train_tokenizer

    docs = list(itertools.islice(sources.python_code_documents(), 40))
    docs.append('Grüße aus Köln — naïve café. 日本語のテキスト。 Emoji: 🙂🚀\n' * 20)
    return train_tokenizer(docs, vocab_size=640)
