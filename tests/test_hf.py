"""Hugging Face checkpoints: tiny random GPT-2, LLaMA (grouped-query attention, untied head) and
Qwen2 (q/k/v biases) models built and saved by transformers load here with the same logits and
the same greedy continuations, go back out unchanged, load sharded, and bad directories are
refused in one line naming the file or field."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from gptstack import hf
from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.sampling import Sampler, SamplingParams

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, POSITIONS = 96, 64


def _hf_model(kind: str):
    """A tiny transformers model of `kind` whose every parameter is random (norm scales near
    1, biases non-zero), so that no part of the mapping can hide behind an initial zero."""
    torch.manual_seed(0)
    if kind == 'gpt2':
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=64,
                                         n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == 'llama':
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
            tie_word_embeddings=False, rope_theta=500.0)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
            tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = 'ln_' in name or 'norm' in name
            p.copy_((1.0 if is_norm and name.endswith('weight') else 0.0)
                    + 0.15 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope='module', params=['gpt2', 'llama', 'qwen2'])
def saved(request, tmp_path_factory):
    """`(kind, directory, transformers model)`: the model saved by `save_pretrained`."""
    model = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory, model


def _their_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(graphdef, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def _tokens(rows: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, length), dtype=np.int32)


def test_logits_equal_transformers(saved, mesh_1):
    kind, directory, model = saved
    config, graphdef, params = hf.load_hf(directory, mesh_1, 'fsdp')
    assert (config.family, config.qkv_bias, config.tie_embeddings) == {
        'gpt2': ('gpt', True, True), 'llama': ('llama', False, False),
        'qwen2': ('llama', True, True)}[kind]
    tokens = _tokens(3, 40)
    ours, theirs = _our_logits(graphdef, params, tokens), _their_logits(model, tokens)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert np.abs(theirs).max() > 1.0  # logits large enough that a wrong mapping shows


def test_greedy_continuations_equal_transformers_generate(saved, mesh_1):
    kind, directory, model = saved
    config, graphdef, params = hf.load_hf(directory, mesh_1, 'fsdp')
    prompts = [list(row) for row in _tokens(2, 7, seed=2)]
    stop = VOCAB - 1
    sampler = Sampler(graphdef, config, mesh_1, 'fsdp', batch_size=2, max_new_tokens=32,
                      stop_ids=[stop], pad_id=0)
    out = sampler(params, prompts, jax.random.key(0), SamplingParams(temperature=0.0))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            generated = model.generate(torch.as_tensor([prompt]), do_sample=False,
                                       max_new_tokens=32, eos_token_id=stop, pad_token_id=0)
        theirs = generated[0, len(prompt):].tolist()
        ours = out['tokens'][row, :out['lengths'][row]].tolist()
        assert ours == theirs, (kind, row)


def test_save_of_a_loaded_model_loads_back_in_transformers_with_identical_logits(
        saved, mesh_1, tmp_path):
    _, directory, model = saved
    config, _, params = hf.load_hf(directory, mesh_1, 'fsdp')
    hf.save_hf(tmp_path, config, params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(2, 33)
    np.testing.assert_array_equal(_their_logits(again, tokens), _their_logits(model, tokens))


def test_a_model_trained_here_exports_with_its_logits(unsmeared_workdir, sft_workdir, tmp_path):
    """An SFT model trained here (GPT-2 layout, our tokenizer's vocabulary) in transformers; the
    quick pipeline's, whose keys are smeared, is refused by name."""
    from gptstack.lineage import load_policy

    smeared = load_policy(sft_workdir)
    with pytest.raises(ConfigError) as error:
        hf.save_hf(tmp_path / 'smeared', smeared.config, smeared.params)
    assert str(error.value) == ('GPTConfig.smeared_keys=True: no Hugging Face architecture '
                                'smears its keys')
    policy = load_policy(unsmeared_workdir / 'sft')
    hf.save_hf(tmp_path / 'model', policy.config, policy.params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'model').eval()
    tokens = np.random.default_rng(3).integers(0, policy.config.vocab_size, (2, 48),
                                               dtype=np.int32)
    ours = _our_logits(float32_graphdef(policy.config), policy.params, tokens)
    np.testing.assert_allclose(_their_logits(model, tokens), ours, atol=1e-4, rtol=0)


def float32_graphdef(config):
    """The graphdef of `config`'s GPT computing in float32, as transformers does (a run's own
    precision may be `mixed`)."""
    import dataclasses

    from gptstack.model import GPT
    from gptstack.state import abstract_model
    config = dataclasses.replace(config, dtype='float32', matmul_dtype='float32')
    return abstract_model(lambda rngs: GPT(config, rngs=rngs))[0]


def test_each_device_receives_only_its_shard(saved, mesh_8):
    _, directory, _ = saved
    _, _, params = hf.load_hf(directory, mesh_8, 'fsdp')
    leaves = jax.tree.leaves(params)
    whole = sum(x.nbytes for x in leaves)
    per_device = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    assert max(per_device.values()) <= 1.1 * whole / 8, (max(per_device.values()), whole)


def test_reduced_precision_loads_as_asked(saved, mesh_1):
    _, directory, _ = saved
    _, _, params = hf.load_hf(directory, mesh_1, 'fsdp', param_dtype='bfloat16')
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}


# --- bad directories: one line naming the file or field ----------------------------------------
@pytest.fixture()
def llama_dir(tmp_path):
    model = _hf_model('llama')
    model.save_pretrained(tmp_path / 'model')
    return tmp_path / 'model'


def _edit_config(directory, **changes):
    path = directory / 'config.json'
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_an_unsupported_architecture_or_field_is_refused_by_name(llama_dir, mesh_1):
    where = llama_dir / 'config.json'
    for changes, message in (
            ({'architectures': ['MixtralForCausalLM']},
             f"{where}: architectures=['MixtralForCausalLM'] is not supported (expected one of "
             "['GPT2LMHeadModel', 'LlamaForCausalLM', 'Qwen2ForCausalLM'])"),
            ({'rope_parameters': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 500.0}},
             f'{where}: rope type \'linear\' is not supported (expected unscaled RoPE, '
             'rope_type "default")'),
            ({'hidden_act': 'gelu'},
             f"{where}: hidden_act='gelu' is not supported (expected \"silu\" (SwiGLU))"),
            ({'head_dim': 32},
             f'{where}: head_dim=32 is not supported (expected null or hidden_size / '
             'num_attention_heads = 16)')):
        original = where.read_text()
        _edit_config(llama_dir, **changes)
        with pytest.raises(ConfigError) as error:
            hf.load_hf(llama_dir, mesh_1, 'fsdp')
        assert str(error.value) == message
        where.write_text(original)


def test_a_tensor_of_the_wrong_shape_is_named_with_its_file(llama_dir, mesh_1):
    _edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(DataError) as error:
        hf.load_hf(llama_dir, mesh_1, 'fsdp')
    assert str(error.value) == (
        f'{llama_dir / "model.safetensors"}: tensor model.layers.0.mlp.gate_proj.weight has '
        'shape [112, 64], config.json implies [128, 64]')


def test_a_missing_shard_and_a_truncated_file_are_named(tmp_path, mesh_1):
    model = _hf_model('llama')
    model.save_pretrained(tmp_path / 'sharded', max_shard_size='60KB')
    index = json.loads((tmp_path / 'sharded' / 'model.safetensors.index.json').read_text())
    files = sorted(set(index['weight_map'].values()))
    assert len(files) > 2
    victim = tmp_path / 'sharded' / files[1]
    size = victim.stat().st_size
    count = sum(f == files[1] for f in index['weight_map'].values())

    victim.write_bytes(victim.read_bytes()[:size // 2])
    with pytest.raises(DataError) as error:
        hf.load_hf(tmp_path / 'sharded', mesh_1, 'fsdp')
    assert str(error.value).startswith(f'{victim}: not a readable safetensors file, truncated '
                                       'or corrupt (')

    victim.unlink()
    with pytest.raises(DataError) as error:
        hf.load_hf(tmp_path / 'sharded', mesh_1, 'fsdp')
    assert str(error.value) == (f'{victim}: missing; model.safetensors.index.json names it '
                                f'for {count} tensors')
