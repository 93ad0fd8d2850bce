"""Model properties: causality, documents, heads: `python -m pytest -q tests/test_model.py`."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptstack import model as gpt_model
from gptstack import ops
from gptstack.config import GPTConfig

FAMILIES = ['toy', 'toy-llama']


def build(preset, cls=gpt_model.GPT, **overrides):
    with nnx.use_eager_sharding(False):
        return cls(GPTConfig.preset(preset, **overrides), rngs=nnx.Rngs(0))


# Both families, and the GPT layout with smeared keys (which read the token before each one).
@pytest.fixture(scope='module', params=[*FAMILIES, 'toy-smeared'])
def lm(request):
    if request.param == 'toy-smeared':
        model = build('toy', smeared_keys=True)  # uneven mixes, different in every layer
        smear = model.transformer.blocks.attn.key_smear_k
        smear.value = jax.random.normal(jax.random.key(1), smear.shape)
    else:
        model = build(request.param)
    graphdef, params = nnx.split(model)
    apply = jax.jit(lambda p, *rows: nnx.merge(graphdef, p)(*rows))
    return lambda tok, pos=None, seg=None, branch=None: np.asarray(
        apply(params, tok, pos, seg, branch))


def random_tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, size=shape).astype(np.int32)


def test_logits_shape_and_dtype():
    model = build('toy-llama')
    logits = model(random_tokens((2, 16)))
    assert logits.shape == (2, 16, 1024) and logits.dtype == jnp.float32


def test_changing_a_token_never_changes_earlier_logits(lm):
    tokens = random_tokens((2, 24))
    base = lm(tokens)
    for t in (0, 7, 23):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % 1024
        out = lm(changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_segments_do_not_attend_to_each_other(lm):
    # Row = document A (10 tokens) then document B (14 tokens), positions restarting at B.
    a, b = random_tokens((1, 10), seed=1), random_tokens((1, 14), seed=2)
    row = np.concatenate([a, b], axis=1)
    segment_ids = np.array([[1] * 10 + [2] * 14], np.int32)
    positions = np.array([list(range(10)) + list(range(14))], np.int32)
    packed = lm(row, positions, segment_ids)
    # Each document's logits equal those of the document run alone.
    np.testing.assert_allclose(packed[:, :10], lm(a), atol=1e-5)
    np.testing.assert_allclose(packed[:, 10:], lm(b), atol=1e-5)
    # And changing document A leaves document B's logits untouched.
    other = row.copy()
    other[:, :10] = random_tokens((1, 10), seed=3)
    np.testing.assert_array_equal(lm(other, positions, segment_ids)[:, 10:], packed[:, 10:])


def test_each_branch_sees_its_prefix_as_if_it_followed_it_alone(lm):
    """A row of two documents: a prompt with three continuations as branches, then a prompt with
    two, then padding. Every token's logits equal those of its prompt and continuation run as a
    row of their own, whatever the other branches and documents hold."""
    documents = [
        (random_tokens((7,), seed=5), [random_tokens((n,), seed=6 + n) for n in (4, 1, 6)]),
        (random_tokens((5,), seed=9), [random_tokens((n,), seed=10 + n) for n in (3, 2)])]
    tokens, positions, segments, branches, alone = [], [], [], [], []
    for segment, (prompt, continuations) in enumerate(documents, start=1):
        tokens.append(prompt), positions.append(np.arange(len(prompt)))
        segments.append([segment] * len(prompt)), branches.append([0] * len(prompt))
        for branch, continuation in enumerate(continuations, start=1):
            tokens.append(continuation)
            positions.append(len(prompt) + np.arange(len(continuation)))
            segments.append([segment] * len(continuation))
            branches.append([branch] * len(continuation))
            row = np.concatenate([prompt, continuation])[None]
            alone.append((lm(row)[0, :len(prompt)], lm(row)[0, len(prompt):]))
    pad = 3
    row = [np.concatenate([*x, np.full(pad, value)]).astype(np.int32)[None]
           for x, value in ((tokens, 0), (positions, 0), (segments, 0), (branches, 0))]
    branched = lm(*row)[0]
    start, i = 0, 0
    for prompt, continuations in documents:
        np.testing.assert_allclose(branched[start:start + len(prompt)], alone[i][0], atol=1e-5)
        start += len(prompt)
        for continuation in continuations:
            np.testing.assert_allclose(branched[start:start + len(continuation)], alone[i][1],
                                       atol=1e-5)
            start += len(continuation)
            i += 1
    # A change in one branch moves only that branch's logits.
    changed = row[0].copy()
    changed[0, 7 + 4] = (changed[0, 7 + 4] + 1) % 1024  # the second branch's only token
    moved = lm(changed, *row[1:])[0]
    np.testing.assert_array_equal(moved[:11], branched[:11])
    np.testing.assert_array_equal(moved[12:], branched[12:])
    assert not np.allclose(moved[11], branched[11])


def test_branch_predecessors():
    """The first token of a branch follows the last token of its prefix; every other token
    the one before it."""
    branches = np.array([[0, 0, 0, 1, 1, 2, 3, 3, 0, 0, 1, 2, 2, 0]], np.int32)
    expected = [[0, 0, 1, 2, 3, 2, 2, 6, 7, 8, 9, 9, 11, 12]]
    np.testing.assert_array_equal(gpt_model.branch_predecessors(jnp.asarray(branches)), expected)


def test_smeared_keys_equal_a_loop_over_positions():
    """Each head's key is w * its own + (1 - w) * the previous position's, w = sigmoid(smear);
    a document's first token (position 0) keeps its own key, and the first of a row that
    continues a document mixes in the key passed from before it (decoding from a cache)."""
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 3, 7, 4)).astype(np.float32)
    smear = rng.normal(size=3).astype(np.float32)
    # Two documents packed in a row; a row that continues a document from a cache.
    positions = np.array([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 0, 1, 2, 3]], np.int32)
    previous = rng.normal(size=(2, 3, 1, 4)).astype(np.float32)
    w = 1 / (1 + np.exp(-smear))
    for before in (None, previous):
        expected = np.empty_like(k)
        for b, h, t in np.ndindex(2, 3, 7):
            if positions[b, t] == 0 or (t == 0 and before is None):
                earlier = k[b, h, t]
            else:
                earlier = k[b, h, t - 1] if t > 0 else before[b, h, 0]
            expected[b, h, t] = w[h] * k[b, h, t] + (1 - w[h]) * earlier
        got = gpt_model.smear_keys(jnp.asarray(k), jnp.asarray(positions), jnp.asarray(smear),
                                   None if before is None else jnp.asarray(before))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_smeared_model_refuses_a_cache_without_the_previous_key():
    """Decoding mixes the last cached token's key into the new one's: a cache that does not
    carry it is an error, not a silent fall back to the new token's own key."""
    model = build('toy', smeared_keys=True)
    c = model.config
    blocks = model.transformer.unstacked_blocks()
    shape = (1, c.n_kv_head, 8, c.head_dim)
    cache = ops.KVCache([jnp.zeros(shape, c.matmul_dtype)], [jnp.zeros(shape, c.matmul_dtype)], 0)
    tokens, positions = random_tokens((1, 1)), jnp.array([[3]])
    with pytest.raises(ValueError, match="smeared keys: decoding needs the cache's previous_key, "
                                         "the last written token's key before smearing"):
        model.transformer.decode(tokens, positions, blocks, [cache] * c.n_layer,
                                 jnp.ones((1, 1, 8), bool))


def test_forward_needs_no_rng_and_is_deterministic(lm):
    tokens = random_tokens((1, 8))
    np.testing.assert_array_equal(lm(tokens), lm(tokens))


def test_score_model_shares_the_transformer_layout():
    lm_params = nnx.state(build('toy'), nnx.Param)
    score_model = build('toy', gpt_model.ScoreModel)
    score_params = nnx.state(score_model, nnx.Param)
    same = jax.tree.structure(lm_params['transformer']) == jax.tree.structure(
        score_params['transformer'])
    assert same
    scores = score_model(random_tokens((3, 12)))
    assert scores.shape == (3, 12) and scores.dtype == jnp.float32


def test_rope_preserves_norm_and_relative_positions():
    x = jax.random.normal(jax.random.key(0), (1, 2, 1, 8))  # [B, N, T, H]
    y3 = gpt_model.apply_rope(x, jnp.array([[3]]), 10_000.0)
    np.testing.assert_allclose(jnp.linalg.norm(y3, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    # <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = x[:, :1], x[:, 1:]

    def dot(m, n):
        qm = gpt_model.apply_rope(q, jnp.array([[m]]), 10_000.0)
        kn = gpt_model.apply_rope(k, jnp.array([[n]]), 10_000.0)
        return float(jnp.sum(qm * kn))

    np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-5)


def dot_generals(jaxpr):
    """Every `dot_general` in a jaxpr, nested ones (scan bodies) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general':
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from dot_generals(sub)


@pytest.mark.parametrize('preset', FAMILIES)
def test_mixed_policy_matmuls_take_bfloat16_and_accumulate_in_float32(preset):
    """Every matmul of the forward and the backward pass, attention's included."""
    with nnx.use_eager_sharding(False):
        model = gpt_model.GPT(GPTConfig.preset(preset, matmul_dtype='bfloat16'),
                              rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, tokens):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

    tokens = jnp.ones((2, 8), jnp.int32)
    for fn, count in ((loss, 1), (jax.grad(loss), 3)):  # the backward: two matmuls per matmul
        jaxpr = jax.make_jaxpr(fn)(params, tokens).jaxpr
        kinds = [(str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype),
                  str(e.params['preferred_element_type'])) for e in dot_generals(jaxpr)]
        # q, k, v, o, attention's two, MLP (2 or 3), LM head
        matmuls = 9 if preset == 'toy' else 10
        assert kinds == [('bfloat16', 'bfloat16', 'float32')] * (count * matmuls), kinds


@pytest.mark.parametrize('dtype, tolerance', [('float32', 1e-5), ('bfloat16', 2e-2)])
def test_attention_gradients_equal_autodiff_of_the_textbook_formula(dtype, tolerance):
    """The hand-written backward pass of self-attention against autodiff of a float32 formula
    with every query head given its own copy of its key/value head (GQA: 4 over 2), two
    documents per row."""
    b, n, k, t, h = 2, 4, 2, 12, 8
    q, keys, values, weight = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                               enumerate([(b, n, t, h), (b, k, t, h), (b, k, t, h), (b, n, t, h)]))
    mask_bts = gpt_model.attention_mask(jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [2] * 3]))

    def textbook(q, keys, values):
        keys, values = jnp.repeat(keys, n // k, axis=1), jnp.repeat(values, n // k, axis=1)
        scores = jnp.einsum('bnth,bnsh->bnts', q, keys) / np.sqrt(h)
        probs = jax.nn.softmax(jnp.where(mask_bts[:, None], scores, -1e30), axis=-1)
        return jnp.einsum('bnts,bnsh->bnth', probs, values)

    def ours(q, keys, values):
        return ops.dot_product_attention(q, [keys], [values], mask_bts, dtype)

    def grads(attention):
        return jax.grad(lambda *x: jnp.sum(attention(*x) * weight), argnums=(0, 1, 2))(
            q, keys, values)

    for expected, actual in zip(grads(textbook), grads(ours), strict=True):
        scale = float(jnp.abs(expected).max())
        assert float(jnp.abs(actual - expected).max()) < tolerance * scale
    np.testing.assert_allclose(ours(q, keys, values), textbook(q, keys, values),
                               atol=tolerance * float(jnp.abs(values).max()))


@pytest.mark.parametrize('preset,smeared', [*((f, False) for f in FAMILIES), ('toy', True)])
def test_unrolled_layers_equal_the_scan(preset, smeared):
    """`scan_layers=False` runs the same blocks on the same stacked parameters."""
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)

    def loss_and_grads(scan_layers):
        with nnx.use_eager_sharding(False):
            model = gpt_model.GPT(GPTConfig.preset(preset, scan_layers=scan_layers,
                                                   smeared_keys=smeared), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)))(params)

    (loss, grads), (unrolled_loss, unrolled_grads) = loss_and_grads(True), loss_and_grads(False)
    np.testing.assert_allclose(unrolled_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 unrolled_grads, grads)


@pytest.mark.parametrize('preset', FAMILIES)
@pytest.mark.parametrize('policy', [{}, {'matmul_dtype': 'bfloat16'}])
def test_library_attention_equals_our_kernel_on_packed_segments(preset, policy):
    """`attention='xla'` (`jax.nn.dot_product_attention`, the path cuDNN takes on GPUs) gives
    the loss and gradients of this repository's kernel, with grouped-query heads and two
    documents packed in a row (the mask is causal within each)."""
    tokens = random_tokens((2, 32))
    segments = np.repeat(np.array([[1, 2], [1, 1]], np.int32), 16, axis=1)
    positions = np.concatenate([np.arange(16), np.arange(16)])[None].repeat(2, 0)
    positions[1] = np.arange(32)

    def loss_and_grads(attention):
        config = GPTConfig.preset(preset, attention=attention, **policy)
        with nnx.use_eager_sharding(False):
            graphdef, params = nnx.split(gpt_model.GPT(config, rngs=nnx.Rngs(0)))
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(
            nnx.merge(graphdef, p)(tokens, positions, segments) ** 2)))(params)

    (loss, grads), (theirs, their_grads) = loss_and_grads('gptstack'), loss_and_grads('xla')
    tolerance = 2e-2 if policy else 1e-5
    np.testing.assert_allclose(theirs, loss, rtol=tolerance)
    # Against the largest gradient: some are zero but for rounding (a key bias, which shifts
    # every score of a query alike).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tolerance,
                                                         atol=tolerance * scale),
                 their_grads, grads)
