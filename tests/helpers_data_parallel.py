"""Workers for tests/scaling/test_data_parallel.py: spawned processes import them from
here. One launch runs the chapter's three workers in the same process group."""

from dlabc.scaling.data_parallel import (
    collectives_worker,
    ring_check_worker,
    training_worker,
)


def collectives_and_training(rank, world_size, n_elements, X, y, batches, seed):
    return {
        "collectives": collectives_worker(rank, world_size, n_elements),
        "check": ring_check_worker(rank, world_size, 101),
        "training": training_worker(
            rank, world_size, X, y, batches, seed, 6, 0.5, 25.0
        ),
    }
