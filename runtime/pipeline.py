"""Pipeline parallelism with torch.distributed.pipelining's schedules (1F1B, interleaved 1F1B).

Stages are our `Stage` modules; shapes are given up front (input_args/output_args) because the
library's shape inference runs the stage on meta tensors, which the MoE dispatcher's
data-dependent all-to-alls cannot do. The loss is already normalised by the global token count,
so the schedule must not scale gradients by the number of micro-batches (scale_grads=False).
"""

from __future__ import annotations

import inspect

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from perfmodel.specs import ModelSpec
from runtime.groups import Parallel
from runtime.model import Stage


def make_schedule(stages: list[tuple[int, Stage]], spec: ModelSpec, par: Parallel, micro_batch: int,
                  microbatches: int, loss_fn, device: torch.device, logits_dtype: torch.dtype):
    n_stages = par.size("pp") * len(stages)
    s_loc = spec.seq_len // par.token_shard[1]
    # requires_grad on the examples tells the stage that activations (and their grads) flow
    act = torch.empty(micro_batch, s_loc, spec.hidden, device=device, requires_grad=True)
    built = []
    for idx, mod in stages:
        inp = torch.zeros(micro_batch, s_loc, dtype=torch.long, device=device) if idx == 0 else act
        out = torch.empty(micro_batch, s_loc, spec.vocab, dtype=logits_dtype, device=device,
                          requires_grad=True) \
            if idx == n_stages - 1 else act
        built.append(PipelineStage(mod, idx, n_stages, device, input_args=(inp,), output_args=(out,),
                                   group=par.pg("pp")))
    cls = Schedule1F1B if len(built) == 1 else ScheduleInterleaved1F1B
    kwargs = {"loss_fn": loss_fn}
    if "scale_grads" in inspect.signature(cls.__init__).parameters:
        kwargs["scale_grads"] = False
    return cls(built[0] if len(built) == 1 else built, microbatches, **kwargs)


def run_step(schedule, stages: list[tuple[int, Stage]], n_stages: int, inputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """One iteration's forward+backward; returns this rank's summed loss share (0 off the last stage)."""
    idxs = [i for i, _ in stages]
    args = (inputs,) if 0 in idxs else ()
    losses: list[torch.Tensor] = []
    if n_stages - 1 in idxs:
        schedule.step(*args, target=targets, losses=losses)
    else:
        schedule.step(*args)
    return torch.stack([x.detach().float() for x in losses]).sum() if losses else torch.zeros((), device=inputs.device)
