"""KV-cache generation: `python -m pytest -q tests/test_sampling.py`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptstack import model as gpt_model
from gptstack import sampling
from gptstack.config import ConfigError, GPTConfig
from gptstack.sampling import (
    CACHE_BLOCK,
    Sampler,
    SamplingParams,
    filter_logits,
    sample_many,
    sample_tokens,
)

STOP, PAD = 3, 1


def build(preset, mesh, **overrides):
    config = GPTConfig.preset(preset, **overrides)
    with nnx.use_eager_sharding(False):
        model = gpt_model.GPT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    if config.smeared_keys:  # uneven mixes, different in every head and layer
        smear = params['transformer']['blocks']['attn']['key_smear_k']
        smear.value = jax.random.normal(jax.random.key(1), smear.shape)
    return config, graphdef, params


def reference_greedy(graphdef, params, prompt, n_new, stop, width=128):
    """Greedy decoding by recomputing the full forward pass at every step (right-padded to a
    fixed width, which causality makes harmless, so it compiles once)."""
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    tokens = list(prompt)
    out = []
    for _ in range(n_new):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = forward(params, jnp.asarray(padded))[0, len(tokens) - 1]
        token = int(jnp.argmax(logits))
        out.append(token)
        tokens.append(token)
        if token == stop:
            break
    return out


# Prompt buckets of 32 (the prompt shares its cache block with the first new tokens) and 64 (the
# prompt fills whole blocks); 70 new tokens cross from one cache block to the next, 150 (with a
# longer context) into a third, after the first two were joined into one read-only array. Smeared
# keys carry the previous token's key from the prompt into decoding and across cache blocks.
@pytest.mark.parametrize('preset,n_new,longest,context,smeared', [
    ('toy', 12, 30, 128, False), ('toy-llama', 12, 30, 128, False), ('toy', 70, 30, 128, False),
    ('toy', 12, 40, 128, False), ('toy', 150, 30, 256, False), ('toy', 70, 30, 128, True),
    ('toy-llama', 12, 30, 128, True)])
def test_greedy_with_cache_equals_full_recompute(preset, n_new, longest, context, smeared,
                                                 mesh_1):
    config, graphdef, params = build(preset, mesh_1, max_seq_len=context, smeared_keys=smeared)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, size=n).tolist() for n in (5, 17, 1, longest)]
    sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=4, max_new_tokens=n_new,
                      stop_ids=[STOP], pad_id=PAD)
    bucket = sampler.prompt_bucket(longest)
    assert bucket == (32 if longest <= 32 else CACHE_BLOCK)
    if n_new == 70:
        assert bucket + n_new > CACHE_BLOCK  # decoding goes on in a second block
    if n_new == 150:
        assert bucket + n_new > 2 * CACHE_BLOCK  # and in a third
    out = sampler(params, prompts, jax.random.key(0), SamplingParams(temperature=0.0))
    for row, prompt in enumerate(prompts):
        expected = reference_greedy(graphdef, params, prompt, n_new, STOP, width=context)
        n = int(out['lengths'][row])
        assert out['tokens'][row, :n].tolist() == expected
        assert (out['tokens'][row, n:] == PAD).all() and (out['mask'][row, n:] == 0).all()


@pytest.mark.parametrize('policy,atol', [({}, 2e-5), ({'matmul_dtype': 'bfloat16'}, 2e-3),
                                         ({'smeared_keys': True}, 2e-5)])
def test_logprobs_equal_a_full_forward_pass(policy, atol, mesh_1):
    config, graphdef, params = build('toy-llama', mesh_1, **policy)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=2, max_new_tokens=10,
                      stop_ids=[STOP], pad_id=PAD)
    out = sampler(params, prompts, jax.random.key(1), SamplingParams(temperature=1.0))
    for row, prompt in enumerate(prompts):
        n = int(out['lengths'][row])
        sequence = prompt + out['tokens'][row, :n].tolist()
        logits = nnx.merge(graphdef, params)(jnp.asarray([sequence]))[0]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        expected = [float(log_probs[len(prompt) - 1 + i, t])
                    for i, t in enumerate(sequence[len(prompt):])]
        np.testing.assert_allclose(out['model_logprobs'][row, :n], expected, atol=atol)
        # Temperature 1 with no filtering samples from the model itself.
        np.testing.assert_allclose(out['logprobs'][row, :n], expected, atol=atol)


def test_sample_tokens_draws_each_token_with_its_probability():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(1, 300)).astype(np.float32)
    logits[0, 50:60] = -np.inf  # filtered out: never drawn
    log_probs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    # A vocabulary of 300 in chunks of 32: the last chunk is partial.
    draw = jax.jit(jax.vmap(lambda key: sample_tokens(key, log_probs, chunk=32)[0]))
    n = 100_000
    tokens = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
    counts = np.bincount(tokens, minlength=300)
    probs = np.exp(np.asarray(log_probs[0], np.float64))
    assert counts[50:60].sum() == 0 and tokens.max() < 300
    # Pearson's chi-square over the 290 possible tokens: mean 289, sd 24.
    chi2 = float(((counts - n * probs) ** 2 / np.where(probs > 0, n * probs, 1))[probs > 0].sum())
    assert chi2 < 289 + 5 * 24, chi2
    # A one-hot distribution always gives its token.
    one_hot = jnp.where(jnp.arange(300) == 123, 0.0, -jnp.inf)[None].repeat(4, axis=0)
    assert (np.asarray(sample_tokens(jax.random.key(1), one_hot, chunk=32)) == 123).all()


def test_same_key_same_samples_and_sharded_equals_single(mesh_1, mesh_8):
    config, graphdef, params = build('toy', mesh_1)
    prompts = [[5, 6, 7, 8]] * 8
    kwargs = dict(batch_size=8, max_new_tokens=8, stop_ids=[STOP], pad_id=PAD)
    single = Sampler(graphdef, config, mesh_1, 'fsdp', **kwargs)
    a = single(params, prompts, jax.random.key(7))
    b = single(params, prompts, jax.random.key(7))
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
    assert len({tuple(r) for r in a['tokens']}) > 1  # rows draw different samples
    sharded_params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh_8, jax.sharding.PartitionSpec()))
    c = Sampler(graphdef, config, mesh_8, 'fsdp', **kwargs)(sharded_params, prompts,
                                                            jax.random.key(7))
    np.testing.assert_array_equal(a['tokens'], c['tokens'])


def test_batch_is_rounded_to_the_batch_shards(mesh_1, mesh_8):
    config, graphdef, params = build('toy', mesh_1)
    sampler = Sampler(graphdef, config, mesh_8, 'fsdp', batch_size=3, max_new_tokens=4,
                      stop_ids=[STOP], pad_id=PAD)
    assert sampler.batch_size == 8
    out = sampler(params, [[5, 6, 7]] * 5, jax.random.key(0))
    assert out['tokens'].shape == (5, 4)


def reference_top_p_set(probs, p):
    order = np.argsort(-probs, kind='stable')
    kept, mass = [], 0.0
    for i in order:
        kept.append(int(i))
        mass += probs[i]
        if mass >= p:
            break
    return set(kept)


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(scale=2.0, size=(1, 50)).astype(np.float32)
        p = float(rng.uniform(0.1, 0.95))
        out = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 0, p))[0]
        probs = np.exp(logits[0] - logits[0].max())
        probs /= probs.sum()
        assert set(np.flatnonzero(np.isfinite(out))) == reference_top_p_set(probs, p)


def test_top_k_one_and_zero_temperature_are_greedy():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)), jnp.float32)
    for args in ((1.0, 1, 1.0), (0.0, 0, 1.0), (1e-4, 0, 1.0)):
        log_probs = np.asarray(filter_logits(logits, *args))
        np.testing.assert_array_equal(log_probs.argmax(-1), np.asarray(logits).argmax(-1))
        assert np.allclose(log_probs.max(-1), 0.0, atol=1e-5)
    top3 = np.asarray(filter_logits(logits, 1.0, 3, 1.0))
    assert (np.isfinite(top3).sum(-1) == 3).all()


def test_rows_stop_early_and_nothing_after_the_stop_is_scored(mesh_1):
    config, graphdef, params = build('toy', mesh_1)
    prompts = [[5, 6, 7], [100, 200], [42] * 9, [7]]
    kwargs = dict(batch_size=4, max_new_tokens=10, pad_id=PAD)
    free = Sampler(graphdef, config, mesh_1, 'fsdp', stop_ids=[], **kwargs)(
        params, prompts, jax.random.key(3))
    stop = int(free['tokens'][0, 2])  # the 3rd token row 0 generates becomes the stop token
    out = Sampler(graphdef, config, mesh_1, 'fsdp', stop_ids=[stop], **kwargs)(
        params, prompts, jax.random.key(3))
    for row in range(4):
        generated = free['tokens'][row].tolist()
        expected = generated.index(stop) + 1 if stop in generated else 10
        n = int(out['lengths'][row])
        assert n == expected
        assert out['tokens'][row, :n].tolist() == generated[:n]
        assert (out['mask'][row, :n] == 1).all() and (out['mask'][row, n:] == 0).all()
        assert (out['tokens'][row, n:] == PAD).all()
        assert (out['logprobs'][row, n:] == 0).all() and (out['model_logprobs'][row, n:] == 0).all()
    assert out['lengths'][0] == 3 and out['lengths'].max() == 10


def test_no_recompilation_within_a_prompt_bucket(mesh_1):
    config, graphdef, params = build('toy', mesh_1)
    sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=2, max_new_tokens=4,
                      stop_ids=[STOP], pad_id=PAD)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == '/jax/core/compile/backend_compile_duration' else None)
    rng = np.random.default_rng(0)
    sampler(params, [[5] * 33], jax.random.key(0))  # compiles the bucket-64 program once
    before = len(compiles)
    assert before > 0  # the listener does see compilations
    for i in range(20):
        lengths = rng.integers(33, 65, size=2)
        prompts = [rng.integers(10, 1000, size=n).tolist() for n in lengths]
        sampler(params, prompts[: 1 + i % 2], jax.random.key(i),
                SamplingParams(temperature=float(rng.uniform(0, 2)), top_k=int(i % 5),
                               top_p=float(rng.uniform(0.5, 1))))
    assert len(compiles) == before
    assert list(sampler._compiled) == [(64, 4)]  # (prompt bucket, new tokens)


def test_ids_past_the_tokenizer_in_a_padded_table_are_never_drawn(mesh_1):
    config, graphdef, params = build('toy', mesh_1)
    kwargs = dict(batch_size=4, max_new_tokens=20, stop_ids=[], pad_id=PAD)
    prompts = [[5, 6, 7], [100, 200], [42] * 9, [7]]
    out = Sampler(graphdef, config, mesh_1, 'fsdp', vocab_size=16, **kwargs)(
        params, prompts, jax.random.key(0), SamplingParams(temperature=3.0))
    assert out['tokens'].max() < 16 and len(np.unique(out['tokens'])) > 4
    message = f"the tokenizer must fit the model's {config.vocab_size} token rows"
    with pytest.raises(ConfigError, match=message):
        Sampler(graphdef, config, mesh_1, 'fsdp', vocab_size=config.vocab_size + 1, **kwargs)


def test_prompts_past_the_context_keep_their_end_and_are_counted_not_logged_each(
        mesh_1, caplog, monkeypatch):
    config, graphdef, params = build('toy', mesh_1)  # context 128
    sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=2, max_new_tokens=8,
                      stop_ids=[], pad_id=PAD)
    limit = config.max_seq_len - 8
    tail = list(range(10, 10 + limit))
    greedy = SamplingParams(temperature=0.0)
    reference = sampler(params, [tail], jax.random.key(0), greedy)
    monkeypatch.setattr(sampling, '_TRUNCATED', itertools.count(1))  # as in a new process
    with caplog.at_level('WARNING', logger='gptstack.sampling'):
        for _ in range(5):
            out = sampler(params, [[7] * 30 + tail, [8] * 3 + tail], jax.random.key(0), greedy)
            np.testing.assert_array_equal(out['tokens'][0], reference['tokens'][0])
    assert sampler.truncated_prompts == 10
    counts = [r.getMessage().split()[0] for r in caplog.records]
    assert counts == ['1', '4']
    assert caplog.records[-1].getMessage().startswith(
        f'4 prompts so far longer than the {limit} tokens that the context (128) leaves beside '
        f'8 new ones: each keeps its last {limit} tokens (this one had {limit + 3})')


def test_per_row_keys_and_settings_make_a_row_independent_of_its_batch_mates(mesh_1, mesh_8):
    """A row's reply depends only on its own prompt, key and setting: alone, or beside other
    rows with other keys and settings (greedy, nucleus, top-k), sharded or not."""
    config, graphdef, params = build('toy', mesh_1)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21], [30]]
    settings = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
                SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(top_k=5)]
    keys = jax.random.split(jax.random.key(7), 4)
    results = {}
    for name, mesh in (('single', mesh_1), ('sharded', mesh_8)):
        sampler = Sampler(graphdef, config, mesh, 'fsdp', batch_size=8, max_new_tokens=12,
                          stop_ids=[STOP], pad_id=PAD)
        placed = jax.device_put(params, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        together = sampler(placed, prompts, keys, settings)
        results[name] = together['tokens']
        for row in range(4):
            alone = sampler(placed, [prompts[row]], keys[row:row + 1], [settings[row]])
            np.testing.assert_array_equal(alone['tokens'][0], together['tokens'][row])
    np.testing.assert_array_equal(results['single'], results['sharded'])
    # The greedy row is the argmax path, whatever its key; per-row keys differ row to row.
    greedy = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=8, max_new_tokens=12,
                     stop_ids=[STOP], pad_id=PAD)(params, [prompts[1]], jax.random.key(0),
                                                  SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(greedy['tokens'][0], results['single'][1])


def test_replies_drawn_in_waves_are_one_calls_replies_whatever_the_batch(mesh_1, monkeypatch):
    """`sample_many` draws each reply as one call with the reply's key draws it, although the
    unfinished replies go on in later waves (budgets of 3, 6 and the 3 left of 12 here), and
    whatever the batch size; a call's `max_new_tokens` and `first_step` are what carry it."""
    config, graphdef, params = build('toy', mesh_1)
    monkeypatch.setattr(sampling, 'FIRST_WAVE', 2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 200, size=n).tolist() for n in rng.integers(1, 40, size=10)]
    keys = jax.random.split(jax.random.key(0), len(prompts))
    # 16 drawable ids, so that the stop token ends replies at many lengths.
    kwargs = dict(max_new_tokens=12, stop_ids=[STOP], pad_id=PAD, vocab_size=16)
    one = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=16, **kwargs)(
        params, prompts, keys)
    expected = [row[:n].tolist() for row, n in zip(one['tokens'], one['lengths'], strict=True)]
    assert len({len(reply) for reply in expected}) > 4 and max(map(len, expected)) > 6
    for batch_size in (3, 16):
        sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=batch_size, **kwargs)
        replies = sample_many(sampler, params, prompts, keys, SamplingParams())
        assert [r.tolist() for r in replies] == expected
        assert {n_new for _, n_new in sampler._compiled} == {3, 6}
    with pytest.raises(ValueError, match="max_new_tokens=13: expected 1 to the sampler's 12"):
        sampler(params, prompts[:1], keys[0], max_new_tokens=13)


def test_step_callback_sees_every_token_in_order_and_stops_rows(mesh_8):
    """The host callback receives each step's tokens in order; rows it stops end there (their
    last token kept), the others go on exactly as without it, and when it stops every row the
    decoding ends."""
    config, graphdef, params = build('toy', mesh_8)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
    kwargs = dict(batch_size=4, max_new_tokens=20, stop_ids=[STOP], pad_id=PAD)
    plain = Sampler(graphdef, config, mesh_8, 'fsdp', **kwargs)(
        params, prompts, jax.random.key(3), SamplingParams(temperature=1.0))
    seen = []

    def on_step(step, tokens, live):
        seen.append((int(step), np.array(tokens), np.array(live)))
        return np.arange(len(tokens)) == 1 if step >= 4 else np.zeros(len(tokens), bool)

    sampler = Sampler(graphdef, config, mesh_8, 'fsdp', on_step=on_step, **kwargs)
    out = sampler(params, prompts, jax.random.key(3), SamplingParams(temperature=1.0))
    assert [s for s, _, _ in seen] == list(range(len(seen)))
    for row in (0, 2):
        np.testing.assert_array_equal(out['tokens'][row], plain['tokens'][row])
    assert out['lengths'][1] == min(5, plain['lengths'][1])
    np.testing.assert_array_equal(out['tokens'][1, :5], plain['tokens'][1, :5])
    for step, tokens, live in seen:  # what the host saw is what was recorded
        for row in range(3):
            if live[row]:
                assert out['tokens'][row, step] == tokens[row]
    seen.clear()
    everything = Sampler(graphdef, config, mesh_8, 'fsdp',
                         on_step=lambda s, t, live: seen.append(int(s)) or np.ones(len(t), bool),
                         **kwargs)
    out = everything(params, prompts, jax.random.key(3), SamplingParams(temperature=1.0))
    assert seen == [0] and (out['lengths'] == 1).all()
