"""The LightningModule and what trains it: metrics, optimizers, builders from configs, checkpoints,
the torch inference path, callbacks, resuming and distributed runs."""
