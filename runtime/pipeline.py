"""Pipeline parallelism with torch.distributed.pipelining's schedules.

plan.schedule -> 1f1b: Schedule1F1B (one stage per rank), interleaved: ScheduleInterleaved1F1B
(vpp stages per rank, loop placement), zero-bubble: ScheduleZBVZeroBubble and dualpipev:
ScheduleDualPipeV (V placement, exactly two stages per rank: rank r holds stages r and 2*pp-1-r,
so the embedding and the loss share rank 0; both split each backward into input (I) and weight
(W) gradients). Which layers each virtual stage holds, and where it runs, is
`perfmodel.specs.pplayout.resolve` (runtime.model.build_stages); make_schedule checks that the library
places the stages as that layout does.

Stages are our `Stage` modules; shapes are given up front (input_args/output_args) because the
library's shape inference runs the stage on meta tensors, which the MoE dispatcher's
data-dependent all-to-alls cannot do. The loss is already normalised by the global token count,
so the schedule must not scale gradients by the number of micro-batches (scale_grads=False).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining import PipelineStage

from perfmodel.specs import ModelSpec, SpecError
from perfmodel.specs.pplayout import StageLayout
from runtime.groups import Parallel
from runtime.model import Stage

SCHEDULE_CLASSES = {"1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
                    "zero-bubble": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def schedule_class(schedule: str):
    """The torch.distributed.pipelining class running `plan.schedule` (SpecError if this torch lacks it)."""
    name = SCHEDULE_CLASSES[schedule]
    cls = getattr(pipelining, name, None)
    if cls is None:  # older releases kept some schedules out of the package's namespace
        cls = getattr(pipelining.schedules, name, None)
    if cls is None:
        raise SpecError(f"plan.schedule: {schedule} needs torch.distributed.pipelining.{name}, which torch "
                        f"{torch.__version__} does not have; use another schedule or a newer torch")
    return cls


def make_schedule(stages: list[tuple[int, Stage]], spec: ModelSpec, par: Parallel, micro_batch: int,
                  microbatches: int, loss_fn, device: torch.device, logits_dtype: torch.dtype,
                  schedule: str = "1f1b", layout: StageLayout | None = None):
    n_stages = layout.n_stages if layout is not None else par.size("pp") * len(stages)
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
    cls = schedule_class(schedule)
    single = schedule == "1f1b"
    if single != (len(built) == 1):
        raise SpecError(f"plan.schedule: {schedule} with {len(built)} stages per pipeline rank "
                        f"({'1f1b runs one' if single else 'it needs several'})")
    kwargs = {"loss_fn": loss_fn}
    if "scale_grads" in inspect.signature(cls.__init__).parameters:
        kwargs["scale_grads"] = False
    sched = cls(built[0] if single else built, microbatches, **kwargs)
    if layout is not None:
        _check_placement(sched, built, layout)
    return sched


def _check_placement(sched, built: list[PipelineStage], layout: StageLayout) -> None:
    """The library's stage -> pp rank map (set by the schedule on every stage) must be the layout's."""
    want = {v: layout.rank_of(v) for v in range(layout.n_stages)}
    for st in built:
        got = dict(getattr(st, "stage_index_to_group_rank", None) or want)
        if got != want or layout.rank_of(st.stage_index) != st.group_rank:
            raise RuntimeError(f"pipeline placement mismatch: torch places stages as {got} and this rank "
                               f"({st.group_rank}) holds stage {st.stage_index}; perfmodel.specs.pplayout "
                               f"({layout.style}) places them as {want}")


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
