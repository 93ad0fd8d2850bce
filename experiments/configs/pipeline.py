"""The main job: tokenizer -> pretraining -> SFT -> reward model -> DPO and PPO (and GRPO), then
one report.

COMMAND (the default: embedded data, no downloads; 2-core CPU):
  python -m experiments.run --config=experiments/configs/pipeline.py --workdir=workdirs/pipeline

Each stage runs in `<workdir>/<stage>/` with the settings of its own config file
(`experiments/configs/<stage>.py`), wired to the stage before it; `<workdir>/report.md` compares
the base model (prompted few-shot), the SFT model, best-of-N with the reward model, DPO on the
reward stage's comparisons, PPO, and PPO and GRPO against the gold scorer on the same held-out
task prompts. Re-running the command resumes: finished stages are
skipped and an interrupted one continues from its checkpoint.

Override any stage's field through its name: --config.pretrain.train.total_steps=3000,
--config.rl.optim.lr=2e-5, --config.compare.prompts=1024.

Args (after a colon):
  quick   tiny models and a few steps per stage: the whole recipe in a couple of minutes (a
          smoke test of every stage and the report; the numbers mean nothing);
  large   a 124M-parameter GPT-2 and longer stages: for a real accelerator.
"""

import copy

import ml_collections

from experiments.configs import common, dpo, pretrain, reward, rl, sft, tokenizer


def get_config(arg=None):
    arg = common.parse_arg(arg, quick=False, large=False)
    if arg.quick and arg.large:
        raise ValueError('pipeline config: choose one of quick and large')
    config = ml_collections.ConfigDict()
    config.stage = 'pipeline'
    config.seed = 0
    # A stage name (or 'compare'): run it and every later step again, after their settings
    # changed; their earlier results are moved to <workdir>/replaced/.
    config.rerun_from = ''
    local = 'runlocal' if arg.quick else ''
    config.pretrain = pretrain.get_config('size=gpt2-124m' if arg.large else local)
    config.sft = sft.get_config(local)
    config.reward = reward.get_config(local)
    config.rl = rl.get_config(local)
    # DPO from the SFT model on the comparisons the reward stage sampled and ranked: no reward
    # model and no sampling in its loop. It evaluates on the held-out comparisons at the end;
    # its gold score is the comparison's, beside the other models'.
    config.dpo = dpo.get_config(local)
    config.dpo.train.eval_every = config.dpo.train.get_ref('total_steps')
    config.dpo.eval.gold_prompts = 0
    if not arg.quick:
        config.dpo.train.total_steps = 150  # 300 gained no more (docs/results.md)
    # The tokenizer is trained on the pretraining mixture with the pretraining stage's settings.
    config.tokenizer = tokenizer.get_config()
    for field in ('vocab_size', 'max_lines'):
        config.tokenizer.tokenizer[field] = config.pretrain.tokenizer.get_ref(field)
    config.tokenizer.data.sources = config.pretrain.data.sources

    # The held-out comparison of base, SFT, best-of-N and PPO.
    config.compare = ml_collections.ConfigDict()
    # Held-out task prompts (a few minutes on 2 cores); their standard errors: docs/results.md.
    config.compare.prompts = 1024
    # Replies per prompt at temperature 1 (a prompt's score is their mean; best-of-N picks
    # among them).
    config.compare.samples = 4
    # The base model's: its few-shot prompts make it the slowest to sample, and one reply per
    # prompt measures it well enough to set it beside SFT (docs/results.md).
    config.compare.base_samples = 1
    config.compare.best_of = 4
    # Solved examples of the same task family in the base model's prompt.
    config.compare.few_shot = 3
    config.compare.max_new_tokens = config.rl.data.get_ref('max_new_tokens')
    config.compare.batch_size = 64
    # Prompts shown with every model's answer in the report.
    config.compare.examples = 6

    if arg.quick:
        # Room for task conversations in the tiny model, and enough held-out prompts that some
        # of its replies differ in gold score.
        config.pretrain.data.seq_len = 96
        config.sft.data.seq_len = 96
        config.reward.data.validation_prompts = 48
        # More held-out prompts than the suite's 18 family-and-level cells.
        config.compare.prompts = 32
        config.compare.samples = 2
        config.compare.best_of = 2
        config.compare.few_shot = 1
        config.compare.batch_size = 16
        config.compare.examples = 2
    if arg.large:
        config.pretrain.data.seq_len = 1024
        config.pretrain.data.batch_size = 256
        config.pretrain.train.total_steps = 20_000
        config.pretrain.optim.lr = 6e-4
        config.pretrain.optim.warmup_steps = 1000
        config.pretrain.tokenizer.vocab_size = 32_768
        config.sft.data.seq_len = 512
        config.sft.data.batch_size = 64
        config.sft.train.total_steps = 2000
        config.reward.data.train_prompts = 20_000
        config.reward.data.batch_size = 64  # rows of 256 tokens: about 190 groups a step
        config.reward.train.total_steps = 1000
        config.rl.data.batch_size = 256
        config.rl.train.total_steps = 500
        config.dpo.data.batch_size = 64
        config.dpo.train.total_steps = 1000
        config.compare.batch_size = 256

    # Three more RL runs like `rl`, each its own stage (override them by their own names), each
    # half as long, all taking the SFT policy's step-0 evaluation from `rl`:
    # - at a small KL coefficient and the actor's learning rate of 1e-4, where in 20 iterations
    #   the policy travels far enough from the SFT model for the reward model's score to keep
    #   rising after the gold score has peaked (over-optimisation), evaluated twice as often;
    # - with the gold scorer as the reward at the same β: what a perfect reward model gives;
    # - GRPO (no critic, group baselines, the KL a term of its loss) against the gold scorer.
    config.rl_small_beta = copy.deepcopy(config.rl)
    config.rl_small_beta.rl.ppo.kl_coef = 0.02
    config.rl_gold = copy.deepcopy(config.rl)
    config.rl_gold.rl.reward = 'gold'
    config.grpo = copy.deepcopy(config.rl_gold)
    config.grpo.rl.algorithm = 'grpo'
    if not arg.quick:
        config.rl_small_beta.optim.lr = 1e-4
        for name in ('rl_small_beta', 'rl_gold', 'grpo'):
            config[name].train.total_steps = config.rl.train.total_steps // 2
            config[name].train.checkpoint_every = config.rl.train.eval_every // 2
        config.rl_small_beta.train.eval_every = config.rl.train.eval_every // 2
        # The gold-reward runs are lines of the comparison: evaluated once, at their end.
        config.grpo.train.eval_every = config.grpo.train.get_ref('total_steps')
    for stage in ('tokenizer', 'pretrain', 'sft', 'reward', 'dpo', 'rl', 'rl_small_beta',
                  'rl_gold', 'grpo'):
        config[stage].seed = config.get_ref('seed')
    return config
