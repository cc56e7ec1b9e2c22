"""The CoCa model: config, layers, the vision and text towers, the multimodal decoder, and
generation. Plain PyTorch; nothing here reads files or knows about the command line."""
