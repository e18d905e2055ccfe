"""Under pytest-xdist (`make test` runs two workers), each worker and what it starts computes on one thread: two
workers on two cores with torch's default of a thread per core would fight over them, and torch's threads wait
for each other by spinning."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses the tests start

    import torch

    torch.set_num_threads(1)
