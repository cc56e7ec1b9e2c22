"""What a model is used for: captioning (and recaptioning shards), zero-shot classification,
retrieval, and caption metrics."""
