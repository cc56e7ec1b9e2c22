"""The CoCa model, read top-down: config -> layers -> vision (the image encoder) -> text (the
text encoder and the multimodal decoder) -> coca (the three joined); generation captions with
it (decoding, beam_search); packed and hf_text are optional (fast CPU decoding, Hugging Face
text towers). Plain PyTorch; nothing here reads files or knows about the command line."""
