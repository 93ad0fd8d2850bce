"""Sample continuations from a trained stage's latest checkpoint.

    python -m experiments.sample --workdir=workdirs/pretrain --prompt='def parse(' \
        [--num_samples=4] [--max_new_tokens=N] [--temperature=0.8] [--top_k=50] [--top_p=0.95]

    python -m experiments.sample --workdir=workdirs/sft --chat [--system='Be brief.']

    python -m experiments.sample --workdir=hf:path/to/model --prompt="Once upon a time"

Loads the workdir's tokenizer, model config and parameters (not the optimizer state), or a
Hugging Face model directory's (`hf:DIR`, see docs/interop.md), and generates with the same
KV-cache sampler, dtypes and sharding as training. Each sample starts a new document
(`<|endoftext|>` + prompt) and stops at the next `<|endoftext|>`. `--chat` (for a finetuned
workdir) reads user turns from standard input, one per line, renders the whole
conversation with the chat template and prints the assistant's reply; an empty line or end of
input ends it.
"""

from __future__ import annotations

import pathlib
import sys

import jax
from absl import app, flags

from gptstack import environment
from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.data.tokenizer import parse_chat, render_prompt
from gptstack.lineage import load_policy
from gptstack.sampling import SamplingParams

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage workdir with checkpoints, or hf:DIR.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations to draw.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'Generation budget per sample '
                                '(default: half the model\'s context, at most 128).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 50, '0 disables.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, '1 disables.')
_SEED = flags.DEFINE_integer('seed', 0, 'Same seed, same samples.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_CHAT = flags.DEFINE_bool('chat', False, 'Converse with a finetuned model (SFT or later).')
_SYSTEM = flags.DEFINE_string('system', '', 'System turn for --chat.')
flags.mark_flag_as_required('workdir')


def chat(tokenizer, sampler, params, sampling) -> None:
    messages = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
    for turn, line in enumerate(sys.stdin):
        if not line.strip():
            break
        messages.append({'role': 'user', 'content': line.rstrip('\n')})
        out = sampler(params, [render_prompt(tokenizer, messages)],
                      jax.random.fold_in(jax.random.key(_SEED.value), turn), sampling)
        ids = out['tokens'][0, :out['lengths'][0]]
        reply = parse_chat(tokenizer, [tokenizer.role_ids['assistant'], *ids])[0]
        messages.append({'role': 'assistant', 'content': reply['content']})
        print(f'assistant: {reply["content"]}' + ('' if reply['complete'] else ' […]'),
              flush=True)


def main(argv) -> int:
    del argv
    environment.start_tool()
    workdir = pathlib.Path(_WORKDIR.value)
    try:
        policy = load_policy(_WORKDIR.value, _STEP.value)
    except (ConfigError, DataError) as error:  # not a workdir of a language model
        raise app.UsageError(str(error)) from None
    tokenizer, params = policy.tokenizer, policy.params
    stage = policy.meta.get('config', {}).get('stage')
    if _CHAT.value and stage in ('tokenizer', 'pretrain'):
        raise app.UsageError(f'--chat needs a finetuned workdir; {workdir} is a {stage} run '
                             '(a base model only continues text: use --prompt)')
    n = 1 if _CHAT.value else _NUM_SAMPLES.value
    max_new = _MAX_NEW.value or min(128, policy.config.max_seq_len // 2)
    try:
        sampler = policy.sampler(n, max_new, chat=_CHAT.value)
    except ConfigError as error:  # a budget that leaves no room for the prompt
        raise app.UsageError(f'--max_new_tokens: {error}') from None
    sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    if _CHAT.value:
        chat(tokenizer, sampler, params, sampling)
        return 0
    prompt = [tokenizer.eot_id, *tokenizer.encode(_PROMPT.value)]
    out = sampler(params, [prompt] * n, jax.random.key(_SEED.value), sampling)
    for i in range(n):
        text = tokenizer.decode(out['tokens'][i, :out['lengths'][i]])
        print(f'--- sample {i + 1} of {n} ---\n{_PROMPT.value}{text}')
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
