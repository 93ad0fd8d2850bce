"""Assistant replies sampled for conversations rendered with the chat template: what SFT
evaluation, comparison making, best-of-N and RL rollouts all draw from the policy."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptstack.data.tokenizer import Tokenizer, parse_chat, render_prompt
from gptstack.sampling import Sampler, SamplingParams, sample_many


def reply_text(tokenizer: Tokenizer, tokens: np.ndarray) -> str:
    """The assistant's reply in generated `tokens` (stop tokens and padding dropped)."""
    return parse_chat(tokenizer, [tokenizer.role_ids['assistant'], *tokens])[0]['content']


def sample_reply_tokens(sampler: Sampler, params: nnx.State, tokenizer: Tokenizer,
                        conversations: Sequence[list[dict]], key: jax.Array,
                        sampling: SamplingParams, n: int = 1,
                        progress: str | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """`(prompts, replies)`: each conversation's rendered prompt `n` times over, and the tokens
    of the reply sampled for each (up to and including its stop token), by `sample_many`: reply
    `i` is drawn with `fold_in(key, i)`, so the result depends only on the key and the inputs,
    not on the sampler's batch size. With `progress`, a progress bar of that name counts the
    replies."""
    prompts = [render_prompt(tokenizer, c) for c in conversations for _ in range(n)]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    return prompts, sample_many(sampler, params, prompts, keys, sampling, progress)


def sample_replies(sampler: Sampler, params: nnx.State, tokenizer: Tokenizer,
                   conversations: Sequence[list[dict]], key: jax.Array,
                   sampling: SamplingParams, n: int = 1,
                   progress: str | None = None) -> list[list[str]]:
    """The text of `n` replies to each conversation (its turns so far), drawn as
    `sample_reply_tokens` draws them."""
    _, replies = sample_reply_tokens(sampler, params, tokenizer, conversations, key, sampling,
                                     n, progress)
    texts = [reply_text(tokenizer, reply) for reply in replies]
    return [texts[i:i + n] for i in range(0, len(texts), n)]
