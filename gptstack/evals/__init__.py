"""Evaluation apart from training: gold scores of a policy on the embedded tasks, the reward
model's ranking metrics, best-of-N, and the side-by-side comparison of the recipe's models."""
