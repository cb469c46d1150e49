"""The Scaling part: data, sharded, tensor and pipeline parallelism on torch.distributed; memory and precision; scaling laws."""
