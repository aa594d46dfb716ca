"""Pipeline layouts: which transformer layers each (virtual) pipeline stage holds, and where it runs.

The one definition shared by the simulator (per-stage pricing), the memory model and the runtime
(the stages it builds). A plan's `pp_layout` gives the layers of every virtual stage in pipeline
order (pp*vpp entries), as a list of counts, as a Megatron-Core `--pipeline-model-parallel-layout`
string (`"Et*3|(tt|)*29,t|tL"`: E embedding, t a decoder layer, L the loss, `|` between stages,
`(...)*n` and `x*n` repeat), or as the two flags `account_for_embedding` / `account_for_loss`
(Megatron-Core's account_for_embedding/loss_in_pipeline_split: the embedding / the loss counts as
one layer's worth of work on the first / last stage when the default split is made).

Default split: the even split when pp*vpp divides the layers (and no flag asks otherwise); else
the balanced split: every stage gets floor(units / stages) layer units, and the remainder goes to
the interior stages first (the first stage carries the embedding, the last the output head and
the loss, so the remainder placed there would lengthen the slowest stage), spread evenly.

Placement of virtual stage v on a pipeline rank: `loop` (1F1B, interleaved: v % pp) or `v`
(zero-bubble ZB-V and DualPipeV: rank r holds stages r and 2*pp-1-r, so the first and the last
stage share rank 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from perfmodel.specs import PipelineLayoutSpec, PlanSpec, SpecError

V_SCHEDULES = ("zero-bubble", "dualpipev")


@dataclass(frozen=True)
class StageLayout:
    pp: int
    vpp: int
    style: str  # loop | v
    ranges: tuple[tuple[int, int], ...]  # [lo, hi) layers of each virtual stage, pipeline order

    @property
    def n_stages(self) -> int:
        return len(self.ranges)

    def rank_of(self, v: int) -> int:
        if self.style == "v":
            return v if v < self.pp else 2 * self.pp - 1 - v
        return v % self.pp

    @cached_property
    def _by_rank(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(v for v in range(self.n_stages) if self.rank_of(v) == r) for r in range(self.pp))

    def stages_of(self, rank: int) -> list[int]:
        """Virtual stages held by pipeline rank `rank`, in chunk order (chunk c = the c-th entry)."""
        return list(self._by_rank[rank])

    def layers_of(self, rank: int) -> list[int]:
        return [i for v in self._by_rank[rank] for i in range(*self.ranges[v])]

    @cached_property
    def max_layers_per_rank(self) -> int:
        return max(len(self.layers_of(r)) for r in range(self.pp))


def parse_megatron(text: str) -> PipelineLayoutSpec:
    """A Megatron-Core layout string -> layers per stage (E and L must open the first / close the last
    stage). Raises SpecError (a ValueError: inside PlanSpec pydantic names the field plan.pp_layout)."""
    s = "".join(text.split()).replace(",", "")
    rep = re.compile(r"\(([^()]*)\)\*(\d+)")
    while rep.search(s):
        s = rep.sub(lambda m: m.group(1) * int(m.group(2)), s)
    s = re.sub(r"([A-Za-z])\*(\d+)", lambda m: m.group(1) * int(m.group(2)), s)
    bad = sorted(set(s) - set("EtL|"))
    if bad:
        what = "an MTP layer (not modelled; drop it)" if bad == ["m"] else f"{''.join(bad)!r} (use E, t, L, |)"
        raise SpecError(f"{text!r} holds {what}")
    stages = s.split("|")
    for i, st in enumerate(stages):
        if "E" in st and (i != 0 or not st.startswith("E") or st.count("E") > 1):
            raise SpecError(f"{text!r}: E (the embedding) may only open the first stage")
        if "L" in st and (i != len(stages) - 1 or not st.endswith("L") or st.count("L") > 1):
            raise SpecError(f"{text!r}: L (the loss) may only close the last stage")
    return PipelineLayoutSpec(stages=[st.count("t") for st in stages])


def balanced_split(units: int, n: int) -> list[int]:
    """`units` layer units over n stages; the remainder on interior stages first, spread evenly."""
    base, rem = divmod(units, n)
    out = [base] * n
    interior = list(range(1, n - 1))
    order = [interior[(2 * k + 1) * len(interior) // (2 * rem) if rem <= len(interior) else k]
             for k in range(min(rem, len(interior)))]
    order = list(dict.fromkeys(order)) + [i for i in (interior + [0, n - 1]) if i not in order]
    for i in order[:rem]:
        out[i] += 1
    return out


def default_split(layers: int, n: int, emb: bool, loss: bool) -> list[int]:
    if not emb and not loss and layers % n == 0:
        return [layers // n] * n
    counts = balanced_split(layers + emb + loss, n)
    counts[0] -= emb
    counts[-1] -= loss
    if min(counts) < 0:
        raise SpecError(f"plan.pp_layout: {layers} layers cannot fill {n} pipeline stages with the embedding/loss "
                        "counted as layers; drop account_for_embedding/account_for_loss or use fewer stages")
    return counts


@lru_cache(maxsize=1024)
def _resolve(layers: int, pp: int, vpp: int, schedule: str, spec: PipelineLayoutSpec | None) -> StageLayout:
    n = pp * vpp
    spec = spec or PipelineLayoutSpec()
    if spec.stages is None:
        counts = default_split(layers, n, spec.account_for_embedding, spec.account_for_loss)
    else:
        counts = list(spec.stages)
        if len(counts) != n:
            raise SpecError(f"plan.pp_layout: {len(counts)} stages given, the plan has pp*vpp={n}; "
                            f"give one entry per virtual stage")
        total = sum(counts)
        if total < layers:
            raise SpecError(f"plan.pp_layout: covers {total} of model.layers={layers}: it misses "
                            f"{layers - total} layer(s); every layer must be on exactly one stage")
        if total > layers:
            raise SpecError(f"plan.pp_layout: covers {total} layers but model.layers={layers}: it repeats "
                            f"{total - layers} layer(s); every layer must be on exactly one stage")
    ranges, lo = [], 0
    for c in counts:
        ranges.append((lo, lo + c))
        lo += c
    return StageLayout(pp, vpp, "v" if schedule in V_SCHEDULES else "loop", tuple(ranges))


def resolve(layers: int, plan: PlanSpec) -> StageLayout:
    """The plan's stage layout over `layers` decoder layers (SpecError naming the field if impossible)."""
    vpp = plan.vpp if plan.pp > 1 else 1
    return _resolve(layers, plan.pp, vpp, plan.schedule, plan.pp_layout)
