"""Entry points and configs: `python -m experiments.run --config=experiments/configs/<stage>.py`."""
