"""Input pipelines: tokenizer, corpus readers, and per-stage datasets."""
