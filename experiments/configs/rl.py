"""Stage 4: RL against the reward model (PPO by default; GRPO and RLOO by `rl.algorithm`),
with a KL penalty to the SFT model.

COMMAND (after the default SFT and reward runs; embedded task suite, no downloads; 2-core CPU):
  python -m experiments.run --config=experiments/configs/rl.py --workdir=workdirs/rl \
      --config.init_from=workdirs/sft --config.reward_from=workdirs/reward

The actor starts as the SFT model and PPO's critic as the reward model; each iteration samples
`data.batch_size` replies, `rl.ppo.group_size` to each training task prompt.
`--config.rl.algorithm=grpo` (or `rloo`) builds no critic: each reply's advantage is its score
against the other replies to its prompt, with GRPO's KL as a loss term.
`--config.rl.reward=gold` replaces the reward model by the task gold scorer (verifiable rewards).
The report compares the held-out gold score of the SFT policy (step 0) and the PPO policy and
plots reward-model score and gold score against the KL to the SFT model.
Args: `runlocal` (a few iterations of a smoke test).
"""

import ml_collections

from experiments.configs import common
from gptstack.steps.ppo import PPOConfig


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.stage = 'rl'
    config.seed = 0
    # The SFT workdir (actor and frozen reference) and the reward-model workdir (frozen reward
    # model; the critic starts from it). They must share one tokenizer.
    config.init_from = ml_collections.config_dict.placeholder(str)
    config.reward_from = ml_collections.config_dict.placeholder(str)

    config.data = ml_collections.ConfigDict()
    # 'embedded:tasks' (train-split prompts for training, test-split prompts held out), or
    # comma-separated JSONL files/globs of {prompt} or {messages}, optionally with 'answer'.
    config.data.train = 'embedded:tasks'
    config.data.validation = 'embedded:tasks'
    # JSONL records: the prompt's field (when there are no 'messages') and the answer's; the
    # answer as written ('text') or a worked solution whose number follows '####' ('gsm8k');
    # and how a reply is checked against it: 'text' (exact match), 'last_number' (the last
    # number the reply writes) or 'marked_number' (the first after its last '####').
    config.data.prompt_field = 'prompt'
    config.data.answer_field = 'answer'
    config.data.answer_format = 'text'
    config.data.match = 'text'
    config.data.train_prompts = 20_000
    config.data.validation_prompts = 512
    # Rollouts (replies) per PPO iteration, and the response budget.
    config.data.batch_size = 64
    config.data.max_new_tokens = 48
    config.data.max_skips = 0

    config.rl = ml_collections.ConfigDict()
    # 'model': the reward model's score; 'gold': the task gold scorer or exact match with the
    # prompt's 'answer' (verifiable rewards).
    config.rl.reward = 'model'
    # With verifiable rewards of a number match (`data.match` last_number or marked_number),
    # added to a reply's reward when it states its final answer in the form the match reads,
    # right or wrong (a format reward, as DeepSeek-R1's); the logged gold score leaves it out.
    config.rl.format_reward = 0.0
    # 'ppo' (a critic and GAE), 'grpo' (group mean and standard deviation, KL in the loss) or
    # 'rloo' (leave-one-out baselines, KL in the reward): `gptstack.steps.ppo`.
    config.rl.algorithm = 'ppo'
    # PPO's recommended settings (`PPOConfig`): four replies to each of 16 prompts per
    # iteration, each scored against its group's mean (the reward model learned only
    # differences between replies to one prompt), and β = 0.2, which holds the policy near 1 nat
    # from the SFT model, where this small reward model still agrees with the gold scorer; at
    # β = 0.05 the policy drifts to 3-4 nats and over-optimises it.
    config.rl.ppo = ml_collections.ConfigDict(PPOConfig.tunables())
    # The critic is the reward model's transformer with a value head started at zero ('zero'),
    # or with the reward model's own score head ('reward'): see `experiments.rl.critic_start`.
    config.rl.critic_head = 'zero'

    # PPO-ptx (rl.ppo.ptx_coef > 0): the language-model loss on these pretraining rows joins
    # the actor's objective, `batch_size` rows per update.
    config.rl.ptx = ml_collections.ConfigDict()
    config.rl.ptx.sources = common.embedded_sources()
    config.rl.ptx.seq_len = 128
    config.rl.ptx.batch_size = 8
    config.rl.ptx.cache_dir = ml_collections.config_dict.placeholder(str)

    # Held-out evaluations every 10 iterations: five points on the reward-against-KL curve.
    config.train = common.train_config(40, eval_every=10, sample_every=0,
                                       checkpoint_every=10)
    # The actor's optimizer; the critic's below. At 1e-4 the actor drifts (0.5 nats of KL in 10
    # iterations) and loses gold score even with the gold scorer as its reward; at 2e-5-3e-5
    # it holds (docs/results.md).
    config.optim = common.optim_config(lr=3e-5, warmup_steps=5, weight_decay=0.0,
                                       end_lr_ratio=1.0)
    config.optim.total_steps = config.train.get_ref('total_steps')
    config.critic_optim = common.optim_config(lr=1e-4, warmup_steps=5, weight_decay=0.0,
                                              end_lr_ratio=1.0)
    config.critic_optim.total_steps = config.train.get_ref('total_steps')
    config.mesh = common.mesh_config()
    config.precision = common.PRECISION

    config.eval = ml_collections.ConfigDict()
    # Held-out prompts answered at every evaluation: `samples` sampled replies each (a prompt
    # scores their mean) and one greedy reply; at most the held-out prompts there are
    # (`data.validation_prompts` of the embedded suite). The pipeline's comparison measures the
    # final policy on more; 256 prompts keep five evaluations near two minutes on 2 cores.
    config.eval.prompts = 256
    config.eval.samples = 4
    # An RL workdir whose step-0 evaluation (the SFT policy, before any update) this run
    # reuses instead of making it again; every setting that shapes it must be equal
    # (`experiments.rl.evaluation_differs`). The main job's later PPO runs reuse the first's.
    config.eval.baseline_from = ml_collections.config_dict.placeholder(str)

    if arg.runlocal:
        config.data.train_prompts = 64
        config.data.validation_prompts = 16
        config.data.batch_size = 16
        config.data.max_new_tokens = 8
        config.train.total_steps = 2
        config.train.log_every = 1
        config.train.eval_every = 2
        config.train.checkpoint_every = 1
        config.optim.warmup_steps = 1
        config.critic_optim.warmup_steps = 1
        config.eval.prompts = 16
        config.eval.samples = 2
        config.rl.ptx.seq_len = 32
    return config
