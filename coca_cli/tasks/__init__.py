"""What a model is used for: captioning (and recaptioning shards), embeddings for zero-shot
classification and retrieval, and caption metrics."""
