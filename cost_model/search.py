"""The plan search: every legal plan of a model on a cluster, costed and ranked.

Degrees come from the divisors of the world size (tp inside a node, cp over powers of two that
split the sequence, pp up to the layer count, ep over the experts), then the microbatch size,
schedule/vpp, sequence parallelism, recomputation and ZeRO. Families (tp, pp, cp, ep, etp, dp)
are pruned first by a memory lower bound (weights, grads and optimizer state at the most
sharded setting): a family whose model state alone overflows the device is never expanded.
Block costs are lambdified sympy expressions (layer_costs.py), so each candidate is a handful
of float operations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from core.plan import Plan, PlanError, parse_stage_layers, uneven_layouts
from cost_model.hardware import Cluster, GiB, get_hardware
from cost_model.shapes import TransformerShape
from cost_model.step_time import Estimate, PlanRejected, check_plan, estimate

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "interleaved-1f1b", "gpipe")
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
VPP = (2, 3, 4, 6, 8)
FIXABLE = {"tp", "pp", "cp", "dp", "ep", "etp", "sp", "async_tp", "microbatches", "schedule",
           "vpp", "cp_algo", "zero", "recompute", "order", "mbs", "stage_layers"}


@dataclass(frozen=True)
class Family:
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int

    def __str__(self) -> str:
        s = f"tp={self.tp},pp={self.pp},cp={self.cp},dp={self.dp}"
        return s + (f",ep={self.ep},etp={self.etp}" if self.ep > 1 or self.etp > 1 else "")


@dataclass
class Rejection:
    family: Family
    reason: str
    best: Estimate | None = None
    oom_by_gib: float = 0.0


@dataclass
class SearchResult:
    shape: TransformerShape
    cluster: Cluster
    global_batch: int
    seq: int
    plans: list[Estimate]
    """Feasible plans, fastest first (the top K)."""
    rejected: list[Rejection] = field(default_factory=list)
    search_time_s: float = 0.0
    evaluated: int = 0
    fixed: dict = field(default_factory=dict)

    @property
    def chosen(self) -> Estimate:
        return self.plans[0]

    def to_json(self) -> dict:
        """`partitioner plan --json` (DESIGN.md schema, plus a few extra keys)."""
        return {"search_time_s": self.search_time_s, "chosen": 0,
                "plans": [e.to_json() for e in self.plans],
                "cluster": str(self.cluster), "world_size": self.cluster.num_gpus,
                "global_batch": self.global_batch, "seq": self.seq,
                "evaluated": self.evaluated,
                "rejected": [{"family": str(r.family), "reason": r.reason}
                             for r in self.rejected]}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_fix(text: str | dict | None) -> dict:
    """`tp=8,pp=8,mb=16,sp=on` -> {field: value} (core.plan's rules are checked by
    `_validate_fix`, on dicts too)."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        key = "microbatches" if key == "mb" else key
        if not sep or key not in FIXABLE:
            raise ValueError(f"--fix item {item!r}: expected key=value with key one of "
                             f"{', '.join(sorted(FIXABLE | {'mb'}))}")
        if key in ("sp", "async_tp"):
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError(f"--fix {key}={value!r}: use on or off")
            out[key] = value.lower() in ("on", "true", "1")
        elif key in ("schedule", "cp_algo", "recompute", "order"):
            out[key] = value
        elif key == "stage_layers":
            out[key] = parse_stage_layers(value)
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"--fix {key}={value!r} must be an integer") from None
    return out


def _validate_fix(fixed: dict) -> Plan:
    """The plan of the fixed fields (the rest at their defaults), so that a fix breaking one of
    the Plan's own rules (sp needs tp>1, vpp needs interleaving, ...) is refused up front."""
    fields = {k: v for k, v in fixed.items() if k != "mbs"}
    if fields.get("async_tp") and "sp" not in fields:
        fields["sp"] = True  # async TP decomposes sp's collectives: it implies sp
    if fields.get("schedule") == "interleaved-1f1b" and "microbatches" not in fields:
        fields["microbatches"] = fields.get("pp", 1)
    try:
        return Plan(**fields)
    except PlanError as exc:
        raise ValueError(f"--fix violates a plan rule: {exc}") from None


def _static_bytes(shape: TransformerShape, fam: Family, zero: bool) -> float:
    """Lower bound on one rank's model state (rank 0: fewest layers is not assumed)."""
    L = shape.layers
    per_rank_layers = L / fam.pp
    dense_frac = shape.dense_block_count / L
    params = per_rank_layers * (dense_frac * shape.dense_block_params() / fam.tp + (1 - dense_frac) * (
        shape.moe_block_params() / fam.tp + shape.expert_params() / (fam.ep * fam.etp)))
    shards = fam.dp * fam.cp if zero else 1
    return params * (2 + 4 + 12 / shards)


def search(shape: TransformerShape, cluster: Cluster, global_batch: int, seq: int | None = None,
           fixed: dict | str | None = None, top_k: int = 5) -> SearchResult:
    """All legal plans for `shape` on `cluster`, best first. Raises ValueError when nothing
    fits (naming the smallest overflow) or when `fixed` breaks a rule (naming the rule)."""
    start = time.perf_counter()
    seq = seq or shape.seq
    if seq != shape.seq:
        shape = shape.with_seq(seq)
    fixed = parse_fix(fixed)
    fixed_plan = _validate_fix(fixed)
    hw, world = cluster.hardware, cluster.num_gpus
    if global_batch < 1:
        raise ValueError(f"global batch {global_batch} must be >= 1")

    def choices(name, default):
        return [fixed[name]] if name in fixed else default

    tps = choices("tp", [d for d in _divisors(world) if d <= cluster.gpus_per_node
                         and shape.heads % d == 0])
    cps = choices("cp", [c for c in (1, 2, 4, 8, 16) if world % c == 0 and seq % (2 * c) == 0
                         and seq // c >= 1024] or [1])
    eps = [1]
    if shape.experts:
        eps = [d for d in _divisors(shape.experts) if d <= world]
    eps = choices("ep", eps)

    families: list[Family] = []
    for tp in tps:
        for cp in cps:
            if world % (tp * cp):
                continue
            for pp in choices("pp", [d for d in _divisors(world // (tp * cp))
                                     if d <= shape.layers]):
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if "dp" in fixed and fixed["dp"] != dp:
                    continue
                for ep in eps:
                    for etp in choices("etp", sorted({1, tp}) if shape.experts else [1]):
                        if (tp * cp * dp) % (ep * etp):
                            continue
                        families.append(Family(tp, pp, cp, ep, etp, dp))

    def expert_tp(fam: Family) -> int | None:
        """The Plan's etp: unset where it follows tp (Megatron's default; a model without
        experts has nothing else)."""
        return None if fam.etp == fam.tp or not shape.experts else fam.etp

    # with flash attention selective recomputation has nothing left to recompute: same plan
    recomputes = list(RECOMPUTE) if shape.attention == "unfused" else ["none", "full"]
    if not families and fixed:
        try:
            check_plan(shape, fixed_plan, world, global_batch, seq)
        except PlanRejected as exc:
            raise ValueError(f"--fix {_fix_str(fixed)} cannot be used for this model on "
                             f"{cluster}: {exc}") from None
        raise ValueError(f"--fix {_fix_str(fixed)}: no tp/pp/cp/dp/ep combination with these "
                         f"values divides {world} GPUs")
    best: list[Estimate] = []
    rejected: list[Rejection] = []
    first_rule: str | None = None
    evaluated = 0
    limit = hw.memory_bytes
    overlap = bool(fixed.get("async_tp", False))  # async TP needs sp: only sp=on is tried
    family_best: dict[Family, Estimate] = {}
    family_oom: dict[Family, float] = {}
    for fam in families:
        # the model state alone, with the allocator's margin over it and the reserve: a lower
        # bound on every plan of the family
        need = (_static_bytes(shape, fam, zero=fam.dp * fam.cp > 1) * (1 + hw.allocator_margin)
                + hw.reserved_bytes)
        if need > limit:
            family_oom[fam] = (need - limit) / GiB
            continue
        if fam.dp == 0 or global_batch % fam.dp:
            first_rule = first_rule or (f"global batch {global_batch} is not divisible by "
                                        f"dp={fam.dp}")
            continue
        per_dp = global_batch // fam.dp
        mbss = [fixed["mbs"]] if "mbs" in fixed else [
            x for x in MICRO_BATCH_SIZES if per_dp % x == 0]
        if "microbatches" in fixed:
            mbss = [per_dp // fixed["microbatches"]] if per_dp % fixed["microbatches"] == 0 \
                and per_dp >= fixed["microbatches"] else []
        for mbs in mbss:
            m = per_dp // mbs
            scheds = ["1f1b"] if fam.pp == 1 else ["1f1b", "interleaved-1f1b"]
            if "schedule" in fixed:
                scheds = [fixed["schedule"]]
            for sched in scheds:
                for vpp, layout in _virtual_stages(shape.layers, fam.pp, m, sched, fixed):
                    for sp_ in choices("sp", [True] if overlap else
                                       [True, False] if fam.tp > 1 else [False]):
                        for rc in choices("recompute", recomputes):
                            for zero in choices("zero", [0, 1] if fam.dp * fam.cp > 1 else [0]):
                                try:
                                    plan = Plan(tp=fam.tp, pp=fam.pp, cp=fam.cp, dp=fam.dp,
                                                ep=fam.ep, etp=expert_tp(fam), sp=sp_,
                                                async_tp=overlap,
                                                microbatches=m, schedule=sched, vpp=vpp,
                                                stage_layers=layout, zero=zero, recompute=rc,
                                                cp_algo=fixed.get("cp_algo", "ring"),
                                                order=fixed.get("order", "tp-cp-ep-dp-pp"))
                                    est = estimate(shape, plan, cluster, global_batch, seq)
                                except PlanError as exc:  # PlanRejected too
                                    first_rule = first_rule or str(exc)
                                    continue
                                evaluated += 1
                                if not est.fits:
                                    prev = family_oom.get(fam)
                                    if fam not in family_best and (prev is None
                                                                   or est.oom_by_gib < prev):
                                        family_oom[fam] = est.oom_by_gib
                                    continue
                                cur = family_best.get(fam)
                                if cur is None or est.step_time_s < cur.step_time_s:
                                    family_best[fam] = est
                                best.append(est)
    if not best:
        if fixed and first_rule and not family_oom:
            raise ValueError(f"--fix {_fix_str(fixed)} cannot be used for this model on "
                             f"{cluster}: {first_rule}")
        if family_oom:
            least = min(family_oom.values())
            fam = min(family_oom, key=family_oom.get)
            raise ValueError(
                f"{cluster} cannot hold this model ({shape.num_parameters() / 1e9:.1f}B "
                f"parameters): the best plan ({fam}) needs {least:.1f} GiB more than the "
                f"{limit / GiB:.0f} GiB per GPU; use more or larger GPUs")
        raise ValueError(f"no legal plan for this model on {cluster} with global batch "
                         f"{global_batch}: {first_rule or 'no degrees divide the world size'}")
    best.sort(key=lambda e: e.step_time_s)
    chosen = best[0]
    top = best[:max(1, top_k)]
    for fam in families:
        if fam in family_best:
            est = family_best[fam]
            if est is chosen:
                continue
            slower = est.step_time_s / chosen.step_time_s - 1
            rejected.append(Rejection(fam, (
                f"{slower:+.0%} step time: bubble {est.bubble_fraction:.0%}, "
                f"comm {est.comm_fraction:.0%}, {est.memory_gib:.0f} GiB"), est))
        elif fam in family_oom:
            rejected.append(Rejection(fam, f"out of memory by {family_oom[fam]:.1f} GiB",
                                      None, family_oom[fam]))
    rejected.sort(key=lambda r: (r.best is None, r.best.step_time_s if r.best else r.oom_by_gib))
    return SearchResult(shape=shape, cluster=cluster, global_batch=global_batch, seq=seq,
                        plans=top, rejected=rejected,
                        search_time_s=time.perf_counter() - start, evaluated=evaluated,
                        fixed=fixed)


def _virtual_stages(layers: int, pp: int, m: int, schedule: str,
                    fixed: dict) -> list[tuple[int, tuple[int, ...] | None]]:
    """(vpp, stage_layers) to try: the layers split evenly where pp*vpp divides them, else
    Megatron's uneven layouts (core.plan.uneven_layouts: fewer layers on the first and last
    virtual stage, which also carry the embedding and the head; the most balanced one and the
    one with the fewest edge layers), so interleaving is tried on any layer count. A fixed
    stage_layers is taken as given; a fixed vpp that no layout fits keeps the cost model's own
    split."""
    if "stage_layers" in fixed:
        return [(fixed.get("vpp", 1), fixed["stage_layers"])]
    if schedule == "interleaved-1f1b":
        vpps = [v for v in VPP if pp * v <= layers and m % pp == 0]
    elif schedule == "zb-v":  # asked for with --fix: two stages per rank in a V
        vpps = [2] if 2 * pp <= layers else []
    else:
        vpps = [1]
    out: list[tuple[int, tuple[int, ...] | None]] = []
    for v in ([fixed["vpp"]] if "vpp" in fixed else vpps):
        if v == 1 or layers % (pp * v) == 0:
            out.append((v, None))
            continue
        uneven = uneven_layouts(layers, pp * v)
        out.extend((v, layout) for layout in dict.fromkeys(uneven[:1] + uneven[-1:]))
        if not uneven and "vpp" in fixed:
            out.append((v, None))
    return out


def _fix_str(fixed: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in fixed.items())


def default_global_batch(world_size: int) -> int:
    """One sequence per GPU, at least 8: a sane default when the user gives none."""
    return max(8, world_size)


def auto_plan(shape: TransformerShape, world_size: int, hardware: str, global_batch: int,
              seq: int, fixed: dict | str | None = None) -> dict:
    """The fastest plan that fits, as a dict of Plan fields (for `parallelize(model, "auto")`);
    `fixed` pins degrees as `--fix` does (the runtime pins those it does not run yet)."""
    hw = get_hardware(hardware)
    # ranks on a host whose cores they share are processes of this one machine (runtime.spawn),
    # however few cores it has; GPUs come gpus_per_node to a node
    per_node = world_size if hw.cores is not None else min(hw.gpus_per_node, world_size)
    cluster = Cluster(hardware=dataclasses.replace(hw, gpus_per_node=per_node),
                      num_gpus=world_size, gpus_per_node=per_node)
    result = search(shape, cluster, global_batch, seq, fixed=fixed, top_k=1)
    plan = result.chosen.plan.to_dict()
    log.info("auto plan for %s on %s: %s (%.3f s/step predicted)", shape, cluster,
             result.chosen.plan, result.chosen.step_time_s)
    return plan
