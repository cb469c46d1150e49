"""The Scaling part: parallel training on torch.distributed, memory and precision,
scaling laws."""
