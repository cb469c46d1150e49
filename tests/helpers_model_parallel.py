"""Workers for tests/scaling/test_model_parallel.py: spawned processes import them from
here."""

from dlabc.scaling.model_parallel import pipeline_worker, tensor_parallel_worker


def both_workers(rank, world_size):
    """The chapter's two workers in one launch, at the tests' small sizes."""
    return {
        "tensor": tensor_parallel_worker(rank, world_size),
        "pipeline": pipeline_worker(
            rank, world_size, 16, 4, 1, (1, 2, 4), 1, check_micro=4
        ),
    }
