"""Write a stage's model as a Hugging Face model directory.

    python -m experiments.export --workdir=workdirs/sft --out=exported/sft [--step=N]

A language model (pretraining, SFT, DPO or RL workdir; RL exports its policy) becomes
`config.json` + `model.safetensors` (`GPT2LMHeadModel`, `LlamaForCausalLM` or
`Qwen2ForCausalLM`, as `gptstack.hf.save_hf` maps it), `generation_config.json` (it stops at
the end of the assistant's turn or of the text) and the tokenizer with the chat template
(`gptstack.data.hf_tokenizer.write_tokenizer_files`). A reward-model workdir becomes the
architecture's `...ForSequenceClassification` with one label; the score head's bias is the
extra tensor `score.bias`. `docs/interop.md` has the whole mapping.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

from gptstack import environment, hf
from gptstack.config import ConfigError
from gptstack.data.hf_tokenizer import write_tokenizer_files
from gptstack.data.sources import DataError
from gptstack.lineage import Workdir, load_policy, load_reward_model

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage workdir with checkpoints.')
_OUT = flags.DEFINE_string('out', None, 'The directory to write (created; files replaced).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest; a reward '
                             'model\'s default is its best by held-out loss).')
flags.mark_flags_as_required(['workdir', 'out'])


def export(workdir: str, out: pathlib.Path, step: int | None = None) -> pathlib.Path:
    """Writes the model of `workdir` into `out`; returns `out`."""
    stage = Workdir(workdir).latest_meta().get('config', {}).get('stage')
    if stage == 'reward':
        model = load_reward_model(workdir, step)
    else:
        model = load_policy(workdir, step)
    tok = model.tokenizer
    ids = dict(bos_token_id=tok.eot_id, eos_token_id=[tok.end_of_turn_id, tok.eot_id],
               pad_token_id=tok.pad_id)
    hf.save_hf(out, model.config, model.params, **ids)
    files = write_tokenizer_files(out, tok, model.config.max_seq_len)
    (out / 'generation_config.json').write_text(json.dumps(ids, indent=2) + '\n')
    logging.info('wrote the %s of %s (step %s) to %s: config.json, model.safetensors, '
                 'generation_config.json, %s', 'reward model' if stage == 'reward' else 'model',
                 workdir, step if step is not None else 'latest', out, ', '.join(files))
    return out


def main(argv) -> int:
    del argv
    environment.start_tool()
    try:
        export(_WORKDIR.value, pathlib.Path(_OUT.value), _STEP.value)
    except (ConfigError, DataError) as error:
        logging.error('%s', error)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
