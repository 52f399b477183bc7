"""Parallel training on torch.distributed, applied to a built single-device model (model/ has no collectives).

- `ep`: expert parallelism (all-to-all dispatch/combine, FP8 dispatch, node-limited routing, traffic stats)
- `overlap`: two-half comm/compute overlap for EP and its measurement
- `pipeline`: pipeline stages cut from the model, 1F1B and DualPipeV schedules, MTP on the last stage
- `dp`: data-parallel gradient averaging composed with EP/PP, global-norm clipping, routing-count reduction
- `launch`: `init_distributed()` and `ParallelPlan`, the API the training loop calls
- `bench`: `run_comm_bench()`, the figures of `nanoseek bench comm`
- `schedule_sim`: discrete-event simulation of pipeline schedules (bubbles, activations)

See docs/parallel.md.
"""

from .launch import ParallelPlan, init_distributed

__all__ = ["ParallelPlan", "init_distributed"]
