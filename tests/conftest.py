"""Shared test setup: 8 emulated CPU devices, meshes and tiny model configs.

Run the suite with `python -m pytest -q`.
"""

import atexit
import fcntl
import os
import shutil
import tempfile

# Must happen before jax creates its backends: every test sees 8 CPU devices.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import filelock
import jax
import pytest

from gptstack import environment, sharding
from gptstack.config import MeshConfig

# The stage subprocesses the tests start share a compilation cache for this session, so a later
# run of the same config loads its compiled programs instead of compiling them again (all of
# them: at the tests' tiny sizes most compile in under the default threshold of a second). Set after
# `import jax`: this process has read its configuration already and keeps compiling in memory,
# where the tests that count compilations look.
# Under `pytest -n 2` the workers inherit the controlling process's cache, so a program one
# worker's subprocess compiled is loaded by the other's; the controlling process removes it.
if 'PYTEST_XDIST_WORKER' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='gptstack-test-xla-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
# Every process writing there keeps the access times that a capped cache evicts by (the cap of
# `experiments.run`): a process without a cap would leave entries that a capped one cannot read.
os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(environment.COMPILATION_CACHE_BYTES)


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, 'XLA_FLAGS was set too late: jax was imported earlier'


@pytest.fixture(autouse=True)
def _alone_if_marked(request, tmp_path_factory):
    """Under `pytest -n N`, a test marked `alone` runs while no other worker runs one: every
    test holds a shared lock on one file of the session, an `alone` test an exclusive one.
    (A killed process's survivor must speak before the runtime's heartbeat aborts it, which
    a busy machine can delay.)"""
    if 'PYTEST_XDIST_WORKER' not in os.environ:
        yield
        return
    exclusive = request.node.get_closest_marker('alone') is not None
    with open(tmp_path_factory.getbasetemp().parent / 'alone.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


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


# --- workdirs of whole stages, shared by the tests that start from them ------------------------
def built_once(tmp_path_factory, name, build):
    """`build(directory)` into a directory of this test session, once for all its processes:
    under `pytest -n N` the first worker to ask builds it while the others wait on a lock."""
    shared = tmp_path_factory.getbasetemp()
    if 'PYTEST_XDIST_WORKER' in os.environ:
        shared = shared.parent  # the workers' base directories share this one
    directory, done = shared / name, shared / f'{name}.done'
    with filelock.FileLock(shared / f'{name}.lock'):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build that failed before
            directory.mkdir()
            # Session fixtures are built before a test's own fixtures take the `alone` lock:
            # a build shares it as a test does, so an `alone` test never runs beside one.
            with open(shared / 'alone.lock', 'a') as alone:
                if 'PYTEST_XDIST_WORKER' in os.environ:
                    fcntl.flock(alone, fcntl.LOCK_SH)
                build(directory)
            done.touch()
    return directory


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
    """A few standard-library files as code and a JSONL of docstrings as prose."""
    from tests.runs import write_corpus

    return built_once(tmp_path_factory, 'corpus', write_corpus)


@pytest.fixture(scope='session')
def pipeline_workdir(corpus, tmp_path_factory):
    """The quick pipeline on `corpus`: every stage's workdir, the comparison and the report."""
    from tests.runs import CONSOLE, pipeline_command, run

    def build(workdir):
        result = run(pipeline_command(corpus, workdir))
        assert result.returncode == 0, result.stderr[-3000:]
        (workdir / CONSOLE).write_text(result.stdout + result.stderr)  # what a user would see

    return built_once(tmp_path_factory, 'pipeline', build)


@pytest.fixture(scope='session')
def unsmeared_workdir(corpus, tmp_path_factory):
    """Runlocal pretraining, SFT and reward runs (`pretrain/`, `sft/`, `reward/`) of a model
    without the default's smeared keys, which no Hugging Face architecture has: what the export
    tests write out."""
    from tests.runs import command, reward_command, run, sft_command

    def build(workdir):
        for args in (command(corpus, workdir / 'pretrain', '--config.data.seq_len=96',
                             '--config.model.smeared_keys=False'),
                     sft_command(workdir / 'sft', workdir / 'pretrain'),
                     reward_command(workdir / 'reward', workdir / 'sft')):
            result = run(args)
            assert result.returncode == 0, result.stderr[-3000:]

    return built_once(tmp_path_factory, 'unsmeared', build)


@pytest.fixture(scope='session')
def base_workdir(pipeline_workdir):
    """A runlocal pretraining run with room for task conversations (96 tokens)."""
    return pipeline_workdir / 'pretrain'


@pytest.fixture(scope='session')
def sft_workdir(pipeline_workdir):
    """A runlocal SFT run from `base_workdir`."""
    return pipeline_workdir / 'sft'


@pytest.fixture(scope='session')
def reward_workdir(pipeline_workdir):
    """A runlocal reward-model run from `sft_workdir`."""
    return pipeline_workdir / 'reward'


@pytest.fixture(scope='session')
def sft_server(sft_workdir):
    """The base URL of a server on the SFT model (`python -m experiments.serve`), shared by the
    serving tests; it must exit 0 on SIGTERM at the end of the session."""
    from tests.runs import SERVE_MAX_NEW, serving

    with serving(sft_workdir, '--max_batch=8', f'--max_new_tokens={SERVE_MAX_NEW}',
                 '--max_queue=64', '--name=sft') as (base_url, _):
        yield base_url
