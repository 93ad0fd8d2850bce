"""The in-context copying evaluation: rows, loss masks and metrics against NumPy references."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gptstack.evals import copying
from gptstack.steps.lm import lm_evaluator

from .runs import ROOT

POOL = np.array([5, 6, 7, 9, 11, 12], np.int32)


@pytest.mark.parametrize('seq_len', [16, 17])
def test_each_row_repeats_tokens_of_the_pool_and_each_mask_counts_one_copy(seq_len):
    first, second = copying.copy_batches(POOL, seq_len, 3, batches=2, seed=0, bos_id=1)
    assert len(first) == len(second) == 2
    n = seq_len // 2
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a['inputs'], b['inputs'])
        tokens = np.concatenate([a['inputs'], a['targets'][:, -1:]], axis=1)  # the T+1 row
        assert (tokens[:, 0] == 1).all()
        np.testing.assert_array_equal(tokens[:, 1:n + 1], tokens[:, n + 1:2 * n + 1])
        assert np.isin(tokens[:, 1:2 * n + 1], POOL).all()
        # The first mask counts the targets that are the first copy's tokens 2..n, the second
        # mask those of the second copy: the same tokens, one copy later.
        for batch, start in ((a, 1), (b, n + 1)):
            counted = np.flatnonzero(batch['loss_mask'][0])
            np.testing.assert_array_equal(counted, np.arange(start, start + n - 1))
        np.testing.assert_array_equal(
            a['targets'][a['loss_mask'] == 1], b['targets'][b['loss_mask'] == 1])
        np.testing.assert_array_equal(a['positions'][0, :2 * n], np.arange(2 * n))


def test_processes_get_disjoint_rows_of_the_same_global_batches():
    whole = copying.copy_batches(POOL, 16, 4, batches=1, seed=3, bos_id=1)[0][0]['inputs']
    shares = [copying.copy_batches(POOL, 16, 2, batches=1, seed=3, bos_id=1, process_index=p,
                                   process_count=2)[0][0]['inputs'] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(shares)[[0, 2, 1, 3]], whole)


def test_a_model_that_copies_gains_the_first_copy_s_whole_loss():
    """With an eval step that scores like an exact copier (uniform over V the first time, certain
    the second), the gain is ln V; the metrics weigh every counted token equally."""
    vocab = 8

    def copier_step(params, batch):
        mask = np.asarray(batch['loss_mask'], np.float64)
        n = (batch['inputs'].shape[1]) // 2
        seen_again = np.arange(batch['inputs'].shape[1]) > n
        nll = np.where(seen_again, 0.0, math.log(vocab))
        return {'loss_sum': float((nll * mask).sum()), 'count': float(mask.sum()),
                'bytes': float(mask.sum())}

    copy_sets = copying.copy_batches(POOL, 16, 2, batches=2, seed=0, bos_id=1)
    metrics = lm_evaluator(copier_step, {}, copy_sets)(type('S', (), {'params': None})())
    assert metrics['val/copy/first'] == pytest.approx(math.log(vocab))
    assert metrics['val/copy/second'] == 0
    assert metrics['val/copy_gain'] == pytest.approx(math.log(vocab))


def test_the_pool_is_the_validation_text_without_special_tokens(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / 'val.array_record'
    writer = ArrayRecordWriter(str(path), 'group_size:1')
    for record in ([1, 5, 6, 5], [1, 7, 2]):
        writer.write(np.asarray(record, np.int32).tobytes())
    writer.close()
    source = type('Source', (), {'val_path': str(path)})()
    np.testing.assert_array_equal(copying.token_pool([source], exclude=[1, 2]), [5, 6, 5, 7])


def test_a_workdir_s_model_is_measured_and_a_too_long_copy_refused(base_workdir):
    """`copying.measure` (what `experiments.copying` runs) on the quick pipeline's base model:
    the gain is the difference of its two losses, and two copies longer than the context are
    refused before any work."""
    import itertools

    from gptstack.config import ConfigError
    from gptstack.data import sources
    from gptstack.lineage import load_policy

    policy = load_policy(base_workdir)
    pool = copying.encoded_pool(policy.tokenizer,
                                list(itertools.islice(sources.python_prose_documents(), 5)))
    assert not np.isin(pool, list(policy.tokenizer.special_ids.values())).any()
    figures = copying.measure(policy, pool, rows=4, length=8, seed=0)
    assert figures['val/copy_gain'] == pytest.approx(
        figures['val/copy/first'] - figures['val/copy/second'])
    assert 0 < figures['val/copy/first'] < 2 * math.log(policy.config.vocab_size)
    too_long = policy.config.max_seq_len // 2 + 1
    with pytest.raises(ConfigError, match=f'--length={too_long}: two copies exceed'):
        copying.measure(policy, pool, rows=4, length=too_long, seed=0)


def test_the_command_prints_and_writes_each_model_s_figures(base_workdir, sft_workdir, tmp_path):
    out = tmp_path / 'copying.json'
    result = subprocess.run(
        [sys.executable, '-m', 'experiments.copying', f'--policy={base_workdir}',
         f'--policy={sft_workdir}', '--rows=4', '--length=8', f'--out={out}'],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures) == [str(base_workdir), str(sft_workdir)]
    for source, r in figures.items():
        assert f'{source}: seen once {r["val/copy/first"]:.3f}' in result.stdout
        assert r['val/copy_gain'] == pytest.approx(r['val/copy/first'] - r['val/copy/second'])
