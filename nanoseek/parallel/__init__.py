"""Parallelism applied from outside the model: DDP / FSDP2 (parallelize.py), expert
parallelism (expert_parallel.py), distributed checkpoints that reshard (dcp.py)."""
from nanoseek.parallel.parallelize import (all_reduce_sum, destroy_distributed, full_state_dict,
                                           init_distributed, parallelize, world_size)

__all__ = ["parallelize", "init_distributed", "destroy_distributed", "all_reduce_sum", "world_size",
           "full_state_dict"]
