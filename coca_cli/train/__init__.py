"""How a batch becomes a gradient step: the settings (config), the objective (loss), the update
(optim), the step and its epochs (loop), and what a run keeps (checkpoints), tells (progress) and
measures (validation), on one process or many (distributed)."""
