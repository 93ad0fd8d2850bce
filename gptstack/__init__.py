"""gptstack: the whole GPT recipe (tokenizer, pretraining, SFT, reward model, PPO) in JAX."""

__version__ = '0.1.0'
