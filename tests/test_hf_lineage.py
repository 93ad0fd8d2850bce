"""Hugging Face models as a lineage: a `tokenizer.json` behind the `Tokenizer` interface encodes
as the `tokenizers` library does and never turns text into a special token; `init_from=hf:DIR`
starts a stage with transformers' logits and the missing special tokens added; SFT from such a
directory, exported with `experiments.export`, loads back in transformers with our logits and
our chat template; a reward model exports as a sequence classifier with our scores; a tokenizer
larger than the embedding is refused in one line."""

import dataclasses
import json
import random
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gptstack import lineage as lineages
from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.data.tokenizer import SPECIAL_TOKENS, Tokenizer, render_prompt
from gptstack.model import GPT, ScoreModel
from gptstack.state import abstract_model

from .runs import ROOT, sft_command
from .test_hf import float32_graphdef

tokenizers = pytest.importorskip('tokenizers')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

POSITIONS = 128


def _training_text() -> list[str]:
    from gptstack.data import sources
    docs = [d for _, d in zip(range(6), sources.python_code_documents(), strict=False)]
    return docs + [d for _, d in zip(range(30), sources.python_prose_documents(), strict=False)]


def _byte_level(vocab: int) -> tokenizers.Tokenizer:
    """GPT-2's kind: byte-level BPE with `<|endoftext|>` as its one special token (id 0)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=['<|endoftext|>'], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _metaspace(vocab: int) -> tokenizers.Tokenizer:
    """LLaMA's kind: BPE over `▁`-marked words with byte fallback and `<unk>`, `<s>`, `</s>`."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
    tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=['<unk>', '<s>', '</s>'], show_progress=False))
    return tok


PIECES = [
    'héllo wörld', 'naïve café', '日本語のテキスト', 'emoji 😀👍🏽 end', 'Ελληνικά κείμενα',
    'עברית', 'a \u2581 literal mark', 'tab\tand\r\ncrlf', '   ', '\n\n', '\t\t ', ' \u00a0 ',
    'def f(x):\n    return x ** 2', 'for (int i = 0; i < n; ++i) { s += a[i]; }',
    '{"a": [1, 2.5e-3, null]}', '    indented\n        more', '12345 + 67890 = 80235',
    '<|endoftext |>', '<|endoftext|', '|endoftext|>', '<|user |>', '< |assistant|>',
    '<|End_of_turn|>', '<|reward|', '<|pad||>', '<| system|>', '<s >', '</ s>', '<unk',
    'The quick brown fox.', 'MiXeD CaSe', '\x00 nul', 'trailing space ',
]


def varied_strings(n: int = 200, seed: int = 0) -> list[str]:
    """`n` strings of one to four pieces joined by spaces, newlines or nothing: unicode,
    whitespace runs, code and near misses of special tokens (never an exact spelling)."""
    rng = random.Random(seed)
    out = [rng.choice(['', ' ', '\n', '  ']).join(rng.choices(PIECES, k=rng.randint(1, 4)))
           for _ in range(n)]
    assert not any(token in s for s in out for token in (*SPECIAL_TOKENS, '<s>', '</s>', '<unk>'))
    return out


@pytest.fixture(scope='module', params=['byte_level', 'metaspace'])
def tokenizer_file(request, tmp_path_factory):
    tok = {'byte_level': _byte_level, 'metaspace': _metaspace}[request.param](400)
    path = tmp_path_factory.mktemp(request.param) / 'tokenizer.json'
    tok.save(str(path))
    return path


def test_encodes_200_strings_exactly_as_tokenizers_does(tokenizer_file):
    ours = Tokenizer.load(tokenizer_file)
    theirs = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    strings = varied_strings()
    expected = [e.ids for e in theirs.encode_batch(strings, add_special_tokens=False)]
    assert ours.encode_batch(strings) == expected
    assert [ours.decode(ids) for ids in expected] == theirs.decode_batch(
        expected, skip_special_tokens=False)


def test_text_that_spells_a_special_token_stays_text(tokenizer_file):
    ours = Tokenizer.load(tokenizer_file)
    special = set(ours.special_ids.values())
    theirs = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    theirs.encode_special_tokens = True
    for token in SPECIAL_TOKENS:
        text = f'say {token} now'
        ids = ours.encode(text)
        assert not special & set(ids), token
        assert ids == theirs.encode(text, add_special_tokens=False).ids


def test_reserved_tokens_keep_their_ids_or_are_added_after_the_vocabulary(tmp_path):
    raw = _byte_level(300)
    raw.save(str(tmp_path / 'tokenizer.json'))
    tok = Tokenizer.load(tmp_path / 'tokenizer.json')
    base = raw.get_vocab_size(with_added_tokens=True)
    assert tok.eot_id == raw.token_to_id('<|endoftext|>') == 0
    assert tok.added_ids == list(range(base, base + len(SPECIAL_TOKENS) - 1))
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS[1:]] == tok.added_ids
    assert (tok.base_vocab_size, tok.vocab_size) == (base, base + len(SPECIAL_TOKENS) - 1)
    # The workdir's copy has them all: nothing more to add, and the same identity.
    tok.save(tmp_path / 'copy.json')
    again = Tokenizer.load(tmp_path / 'copy.json')
    assert (again.sha256, again.added_ids, again.special_ids) == (tok.sha256, [],
                                                                   tok.special_ids)
    table = tok.token_bytes()
    text = 'héllo wörld 😀 def f(x): return x'
    assert table[tok.encode(text)].sum() == len(text.encode())
    assert table[tok.added_ids].sum() == table[tok.eot_id] == 0


def _hf_directory(directory, kind: str) -> tuple:
    """A tiny random transformers model of `kind` saved with a byte-level tokenizer: `llama`
    has 16 rows of padding beyond the tokenizer (GQA, untied head), `gpt2` exactly its
    tokenizer's rows (tied), so the added special tokens fall inside and beyond the embedding."""
    raw = _byte_level(400)
    raw.save(str(directory / 'tokenizer.json'))
    vocab = raw.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    if kind == 'llama':
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab + 16, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
            tie_word_embeddings=False))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4))
    model.save_pretrained(directory)
    return model.eval(), vocab


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def hf_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f'hf_{request.param}')
    model, vocab = _hf_directory(directory, request.param)
    return directory, model, vocab


def _our_logits(graphdef, params, tokens):
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def _their_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_init_from_hf_starts_with_transformers_logits_and_mean_rows(hf_model, mesh_8, tmp_path):
    directory, model, vocab = hf_model
    config = {'init_from': f'hf:{directory}'}
    lineage = lineages.start_from(config, 'init_from', ('sft',), 'the model', tmp_path)
    assert (tmp_path / 'tokenizer.json').exists() and lineage.step == 0
    tok = lineage.tokenizer
    assert lineage.model_config.vocab_size == max(model.config.vocab_size, tok.vocab_size)
    graphdef, params = lineage.restore_params(GPT, mesh_8, 'fsdp')
    tokens = np.random.default_rng(0).integers(0, vocab, (2, 40))
    ours = _our_logits(graphdef, params, tokens)
    np.testing.assert_allclose(ours[..., :vocab], _their_logits(model, tokens)[..., :vocab],
                               atol=1e-4)
    embed = np.asarray(params['transformer']['token_embed_vd'][...])
    np.testing.assert_allclose(embed[tok.added_ids],
                               np.broadcast_to(embed[:vocab].mean(0), (6, embed.shape[1])),
                               atol=1e-6)
    # The reward stage starts its backbone from the same transformer.
    backbone = lineage.restore_transformer(None, mesh_8, 'fsdp')
    jax.tree.map(np.testing.assert_array_equal, backbone['transformer'],
                 nnx.to_pure_dict(params['transformer']))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    _hf_directory(tmp_path, 'gpt2')
    _byte_level(420).save(str(tmp_path / 'tokenizer.json'))
    n = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json')).get_vocab_size(True)
    rows = json.loads((tmp_path / 'config.json').read_text())['vocab_size']
    message = (f'{tmp_path / "tokenizer.json"}: {n} tokens, but config.json gives the '
               f'embedding vocab_size={rows} rows')
    with pytest.raises(DataError) as error:
        lineages.HFLineage.open(tmp_path)
    assert str(error.value) == message
    result = subprocess.run(sft_command(tmp_path / 'sft', f'hf:{tmp_path}'), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]


def test_a_hugging_face_directory_named_as_a_workdir_gets_the_hint(hf_model):
    directory = hf_model[0]
    with pytest.raises(ConfigError, match=rf'^init_from={directory}: no checkpoint in '
                       rf'{directory}/checkpoints \(a Hugging Face model directory is named '
                       rf'hf:{directory}\)$'):
        lineages.start_from({'init_from': str(directory)}, 'init_from', ('sft',), 'the model')


def test_a_reward_model_does_not_come_from_a_hugging_face_directory(hf_model):
    directory = hf_model[0]
    with pytest.raises(ConfigError, match=r'^reward_from=hf:\S+: a Hugging Face '
                       'directory holds a language model, not a reward model$'):
        lineages.start_from({'reward_from': f'hf:{directory}'}, 'reward_from', ('reward',),
                            'the reward model')


def test_sft_from_hf_exports_and_loads_back_in_transformers(tmp_path_factory):
    """SFT of a LLaMA-layout directory (`init_from=hf:DIR`), a few steps, then
    `experiments.export`: transformers reads the weights with our logits and the tokenizer
    with our chat template; the chat CLI samples from the directory itself."""
    directory = tmp_path_factory.mktemp('smol')
    _hf_directory(directory, 'llama')
    workdir, out = directory.parent / 'sft_from_hf', directory.parent / 'exported'
    sft = subprocess.run(sft_command(workdir, f'hf:{directory}', '--config.train.total_steps=3'),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    export = subprocess.run([sys.executable, '-m', 'experiments.export', f'--workdir={workdir}',
                             f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    policy = lineages.load_policy(workdir)
    tokens = np.random.default_rng(1).integers(0, policy.tokenizer.vocab_size, (2, 48))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_their_logits(model, tokens),
                               _our_logits(float32_graphdef(policy.config), policy.params,
                                           tokens), atol=1e-4)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': 'What is 2 + 3? <|user|>'}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        '<|endoftext|><|system|>Be brief.<|end_of_turn|><|user|>What is 2 + 3? <|user|>' \
        '<|end_of_turn|><|assistant|>'
    assert theirs.encode('héllo <|x|> def f():', add_special_tokens=False) == \
        policy.tokenizer.encode('héllo <|x|> def f():')
    ids = render_prompt(policy.tokenizer, messages[:1])
    assert theirs.apply_chat_template(messages[:1], add_generation_prompt=True)['input_ids'] == ids
    chat = subprocess.run([sys.executable, '-m', 'experiments.sample', f'--workdir=hf:{directory}',
                           '--prompt=def f(', '--max_new_tokens=4', '--temperature=0'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and '--- sample 1 of 1 ---' in chat.stdout, chat.stderr[-2000:]


def test_a_reward_model_exports_as_a_sequence_classifier(unsmeared_workdir, tmp_path):
    reward_workdir = unsmeared_workdir / 'reward'
    export = subprocess.run([sys.executable, '-m', 'experiments.export',
                             f'--workdir={reward_workdir}', f'--out={tmp_path}'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    model = lineages.load_reward_model(reward_workdir)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok = model.tokenizer
    rows = [render_prompt(tok, [{'role': 'user', 'content': 'hi'}]) + tok.encode('hello') +
            [tok.end_of_turn_id, tok.reward_id]]
    config = dataclasses.replace(model.config, dtype='float32', matmul_dtype='float32')
    graphdef = abstract_model(lambda rngs: ScoreModel(config, rngs=rngs))[0]
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(
        model.params, np.asarray(rows)))[:, -1]
    bias = float(np.asarray(model.params['score_head']['bias'][...]))
    with torch.no_grad():
        scores = theirs(torch.as_tensor(rows)).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, ours - bias, atol=1e-4)


def _missing_shard(directory):
    index = json.loads((directory / 'model.safetensors.index.json').read_text())
    (directory / sorted(set(index['weight_map'].values()))[1]).unlink()


def _truncated_shard(directory):
    index = json.loads((directory / 'model.safetensors.index.json').read_text())
    victim = directory / sorted(set(index['weight_map'].values()))[1]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])


def _edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / 'config.json').read_text())
        (directory / 'config.json').write_text(json.dumps({**config, **changes}))
    return edit


@pytest.mark.parametrize('damage, error, message', [
    (_missing_shard, DataError, r'model-00002-of-\d+\.safetensors: missing; '
     r'model\.safetensors\.index\.json names it for \d+ tensors$'),
    (_truncated_shard, DataError, r'model-00002-of-\d+\.safetensors: not a readable '
     r'safetensors file, truncated or corrupt \('),
    (_edit_config(intermediate_size=128), DataError, r'tensor model\.layers\.0\.mlp\.'
     r'gate_proj\.weight has shape \[112, 64\], config\.json implies \[128, 64\]$'),
    (_edit_config(architectures=['MistralForCausalLM']), ConfigError,
     r"config\.json: architectures=\['MistralForCausalLM'\] is not supported"),
])
def test_a_bad_directory_exits_1_when_the_stage_opens_it(tmp_path, damage, error, message):
    """What `load_hf` refuses (tests/test_hf.py has each exact message), refused by the lineage
    before the stage reads a tensor or compiles anything, and by the command in one line."""
    model, _ = _hf_directory(tmp_path, 'llama')
    (tmp_path / 'model.safetensors').unlink()
    model.save_pretrained(tmp_path, max_shard_size='60KB')
    lineages.HFLineage.open(tmp_path)  # intact
    damage(tmp_path)
    with pytest.raises(error, match=message):
        lineages.start_from({'init_from': f'hf:{tmp_path}'}, 'init_from', ('sft',), 'the model')
    result = subprocess.run(sft_command(tmp_path / 'sft', f'hf:{tmp_path}'), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(message, last) and 'Traceback' not in result.stderr, last


@pytest.fixture(scope='module')
def llama_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp('hf_stages')
    _hf_directory(directory, 'llama')
    return directory


def test_dpo_starts_from_a_hugging_face_directory(llama_directory, reward_workdir, tmp_path):
    """Policy and frozen reference from `hf:DIR`: at step 0 they are one model, so every
    held-out pair's implicit reward is 0 and the loss is ln 2."""
    from .test_run_dpo import dpo_command
    result = subprocess.run(dpo_command(tmp_path, f'hf:{llama_directory}',
                                        reward_workdir / 'comparisons',
                                        '--config.train.total_steps=2'),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])
    assert first['step'] == 0 and first['val_loss'] == pytest.approx(np.log(2), abs=1e-6)
    assert (tmp_path / 'tokenizer.json').exists()


@pytest.mark.slow  # two stages; the lineage they share is the one the tests above cover
def test_reward_and_rl_start_from_a_hugging_face_directory(llama_directory, tmp_path):
    from .runs import reward_command, rl_command
    reward = subprocess.run(reward_command(tmp_path / 'reward', f'hf:{llama_directory}'),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reward.returncode == 0, reward.stderr[-3000:]
    rl = subprocess.run(rl_command(tmp_path / 'rl', f'hf:{llama_directory}', tmp_path / 'reward'),
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rl.returncode == 0, rl.stderr[-3000:]
    policy = lineages.load_policy(tmp_path / 'rl')
    assert policy.tokenizer.sha256 == Tokenizer.load(tmp_path / 'reward' / 'tokenizer.json').sha256
