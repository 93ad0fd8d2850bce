"""Per-device parameter and optimizer memory of the pretraining step under FSDP=1, 2, 4, 8.

    python -m benchmarks.memory [--preset mini] [--out memory.json]

Compiles (without running) the pretraining step of a model preset (default: the peer
benchmark's GPT-2 shape, batch 16×256, AdamW) on 1, 2, 4 and 8 emulated CPU devices, and reads
XLA's memory analysis of the compiled program: its per-device argument bytes are the train state
(parameters, AdamW moments, step) plus this device's share of the batch, which is subtracted.
FSDP shards every parameter and both moments over the devices, so the state bytes per device
should fall as 1/N (plus the few small leaves that do not split).
"""

from __future__ import annotations

import os

# Eight CPU devices, before jax is imported.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import argparse
import json

import jax

from gptstack import environment, sharding
from gptstack.aot import lower_pretrain_step
from gptstack.config import GPTConfig, MeshConfig, OptimConfig
from gptstack.model import GPT, count_params
from gptstack.state import abstract_model
from gptstack.steps.lm import BATCH_KEYS

BATCH, SEQ = 16, 256


def measure(config: GPTConfig, devices: int) -> dict:
    mesh = sharding.make_mesh(MeshConfig(fsdp=devices), devices=jax.devices()[:devices])
    optim = OptimConfig(lr=3e-4, total_steps=1000, warmup_steps=10)
    lowered, _ = lower_pretrain_step(config, optim, mesh, 'fsdp', BATCH, SEQ)
    memory = lowered.compile().memory_analysis()
    batch_bytes = len(BATCH_KEYS) * BATCH * SEQ * 4 // devices
    return {'devices': devices, 'argument_bytes': memory.argument_size_in_bytes,
            'batch_bytes': batch_bytes,
            'state_bytes': memory.argument_size_in_bytes - batch_bytes,
            'temp_bytes': memory.temp_size_in_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', default='mini')
    parser.add_argument('--out', default='memory.json')
    args = parser.parse_args()
    config = GPTConfig.preset(args.preset, max_seq_len=SEQ, scan_layers=False)
    _, params = abstract_model(lambda rngs: GPT(config, rngs=rngs))
    rows = [measure(config, n) for n in (1, 2, 4, 8)]
    unsharded = rows[0]['state_bytes']
    for row in rows:
        row['fraction_of_unsharded'] = row['state_bytes'] / unsharded
        row['times_devices'] = row['fraction_of_unsharded'] * row['devices']
    result = {'preset': args.preset, 'parameters': count_params(params),
              'batch': f'{BATCH}x{SEQ}', 'optimizer': 'AdamW (two float32 moments)',
              'fsdp': rows}
    print(f'{"FSDP":>4s} {"state MiB/device":>17s} {"of FSDP=1":>10s} {"x N":>6s} '
          f'{"temp MiB":>9s}')
    for row in rows:
        print(f'{row["devices"]:4d} {row["state_bytes"] / 2**20:17.2f} '
              f'{row["fraction_of_unsharded"]:10.4f} {row["times_devices"]:6.3f} '
              f'{row["temp_bytes"] / 2**20:9.1f}')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
