"""How a batch becomes a gradient step: CoCaLoss, the training loop, and torch.distributed."""
