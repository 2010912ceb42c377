"""The train step (``step.train_model``): the training loop, its losses, batches, checkpoints and
data-parallel processes; one module per method in ``methods/``."""
