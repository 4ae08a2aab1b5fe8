"""Expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs).

    moe_tut.distributed.expert_parallel   the forward: partition, dispatch / compute / combine, checks
    moe_tut.distributed.bench             what each rank runs under `torchrun ... -m moe_tut.bench --expert-parallel`
    moe_tut.distributed.report            the launcher as a subprocess, its results, plots (for notebook 08)
"""

from .expert_parallel import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    ExpertParallelError,
    ExpertParallelMoE,
    agree,
    dispatch_counts,
    expert_range,
    init_distributed,
    partial_reference,
    random_expert_weights,
    shard_weights,
    token_slice,
)

__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "ExpertParallelError", "ExpertParallelMoE", "agree",
           "dispatch_counts", "expert_range", "init_distributed", "partial_reference", "random_expert_weights",
           "shard_weights", "token_slice"]
