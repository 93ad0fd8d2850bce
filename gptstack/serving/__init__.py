"""Serving a trained model: the engine that batches requests onto the compiled sampler and
scorer (`engine`), and OpenAI's HTTP API over it (`api`, which needs the `serve` extra)."""
