"""The parallel plan: which degrees, which schedule, which overrides.

A `Plan` is a frozen, validated value, and this module is its only validation (the cost model's
search builds Plans too). It knows nothing about models or process groups; checks that need the
model (heads divisible by tp, experts by ep) run in the passes, and checks that need the world
size run in `Plan.resolve(world_size)`. Fields whose strategy has not landed yet parse and
validate here and are refused by `Plan.pending()` at `parallelize` time, so plan strings written
for the next release already mean one thing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Literal, get_args

from core.divisibility import divisors, nearest_multiples, proper_divisors, words

Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"]
CpAlgo = Literal["ring", "a2a", "hybrid", "allgather"]
Dtype = Literal["bf16", "fp16", "fp32"]
Recompute = Literal["none", "selective", "full"]
RuleKind = Literal["colwise", "rowwise", "vocab", "replicate", "moe", "pp_split"]

MESH_DIMS = ("tp", "cp", "ep", "dp", "pp")
"""Names of the dense mesh dimensions that `order` permutes (ep is laid over cp*dp*tp ranks)."""

_INT_FIELDS = ("tp", "pp", "cp", "dp", "ep", "etp", "microbatches", "vpp", "zero", "cp_a2a",
               "seed")
_OPTIONAL_INT_FIELDS = ("dp", "etp", "cp_a2a")
_BOOL_FIELDS = ("sp", "cp_pad", "async_tp", "compile")
_BOOL_WORDS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


class PlanError(ValueError):
    """A plan that cannot be run, with every broken rule and its fix."""


@dataclass(frozen=True)
class Rule:
    """Module paths matching `pattern` (fnmatch glob) are handled as `kind`."""

    pattern: str
    kind: RuleKind

    def matches(self, module_path: str) -> bool:
        return fnmatch.fnmatchcase(module_path, self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}:{self.kind}"


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    """Tensor-parallel degree (Megatron column/row-parallel linears)."""
    pp: int = 1
    """Pipeline stages (ranks); each rank may hold `vpp` virtual stages."""
    cp: int = 1
    """Context-parallel degree: the sequence split across ranks for attention."""
    dp: int | None = None
    """Data-parallel degree; None means world_size / (tp * pp * cp), which must divide."""
    ep: int = 1
    """Expert-parallel degree (experts split over ranks of the tp*cp*dp group)."""
    etp: int | None = None
    """Tensor-parallel degree inside each expert; None means tp (Megatron's default)."""
    sp: bool = False
    """Sequence parallelism: activations between TP regions stay split along the sequence."""
    async_tp: bool = False
    """Decompose sp's all-gather before the column-parallel linears and its reduce-scatter
    after the row-parallel ones into tp ring steps overlapped with per-chunk matmuls, forward
    and backward (async TP, passes/async_tp.py); needs sp=on."""
    microbatches: int = 1
    """Microbatches per step (per data-parallel rank)."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule (core.schedules): gpipe, 1f1b, interleaved-1f1b, or the zero-bubble
    zb-h1 and zb-v (backward split into input- and weight-gradient steps; zb-v places two
    stages per rank in a V)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B; 2 for zb-v, as Megatron and torch
    name ZB-V's two chunks per rank)."""
    cp_algo: CpAlgo = "ring"
    """Context-parallel attention: ring (send/recv of k/v blocks), a2a (Ulysses all-to-all),
    hybrid (a2a inside sub-groups of `cp_a2a` ranks, ring across them) or allgather (k and v
    all-gathered before attention, exposed: Llama 3's, Megatron's cp_comm_type=all_gather)."""
    cp_a2a: int | None = None
    """Size of the all-to-all sub-group of hybrid CP (Megatron's hierarchical CP sizes)."""
    cp_pad: bool = True
    """Pad a sequence the CP layout cannot split where that is exact; off refuses instead."""
    capacity_factor: float | None = None
    """Expert capacity as a multiple of the even share of tokens; None is dropless."""
    stage_layers: tuple[int, ...] | None = None
    """Transformer layers per virtual stage in stage order (pp*vpp counts summing to the
    model's layers; stage s runs on rank s % pp, or where zb-v's V puts it), as the `|`-stages
    of Megatron's `--pipeline-model-parallel-layout`: `stage_layers=3/4*30/3` (`n*k` repeats n
    k times). The embedding goes with the first stage and the head and loss with the last, so
    only those two may hold 0 layers (a stage of the embedding alone, or of the head and loss
    alone: Megatron's `E|...|L` layouts). As with Megatron's layout string, any counts are
    taken, with vpp too; Megatron's `--decoder-first/last-pipeline-num-layers` layouts (the
    first and last stage fewer, the middle stages equal: `uneven_layouts`) are the ones the
    search tries when pp*vpp does not divide the layers. None lets the cost model cut."""
    zero: int = 0
    """1 shards optimizer state over dp (Megatron's distributed optimizer / ZeRO-1)."""
    recompute: Recompute = "none"
    """Activation recomputation: none, selective (attention core) or full (each block)."""
    order: str = "tp-cp-ep-dp-pp"
    """Rank layout, fastest-varying first, as in Megatron-Core's RankGenerator."""
    rules: tuple[Rule, ...] = field(default=())
    """Overrides by module path, first match wins: `rules=glob:kind;glob:kind` in the string."""
    param_dtype: Dtype | None = None
    """Compute dtype of the parameter copies (mixed precision); None keeps the model's."""
    reduce_dtype: Dtype = "fp32"
    """Dtype gradients are reduced in under mixed precision."""
    loss_scale: Literal["dynamic"] | None = None
    """Dynamic loss scaling, for param_dtype=fp16."""
    seed: int = 0
    """Seed of the dropout generator (masks keyed by seed, node, microbatch and step)."""
    compile: bool = False
    """Compile each rank's graphs with inductor."""

    def __post_init__(self) -> None:
        if isinstance(self.rules, str):
            object.__setattr__(self, "rules", _parse_rules(self.rules))
        elif not isinstance(self.rules, tuple):
            object.__setattr__(self, "rules", tuple(self.rules))
        if isinstance(self.stage_layers, str):
            object.__setattr__(self, "stage_layers", parse_stage_layers(self.stage_layers))
        elif self.stage_layers is not None and not isinstance(self.stage_layers, tuple):
            object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
        problems = self._problems()
        if problems:
            raise PlanError(f"invalid plan {self}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        problems = self._type_problems()
        if problems:  # the rules below assume well-typed fields
            return problems
        if self.sp and self.tp == 1:
            problems.append("sp=on needs tp>1 (sequence parallelism splits the TP region's "
                            "activations); set tp>1 or sp=off")
        if self.async_tp and self.tp == 1:
            problems.append("async_tp=on needs tp>1 (it overlaps TP's collectives); set tp>1 "
                            "or async_tp=off")
        elif self.async_tp and not self.sp:
            problems.append(f"async_tp=on needs sp=on (it decomposes sp's all-gather before the "
                            f"column-parallel linears and reduce-scatter after the row-parallel "
                            f"ones into tp={self.tp} ring steps; without sp TP's all-reduces "
                            f"have no matmul to split them over); set sp=on or async_tp=off")
        problems += self._pipeline_problems() + self._context_problems()
        if self.reduce_dtype != "fp32" and self.param_dtype in (None, "fp32"):
            problems.append(f"reduce_dtype={self.reduce_dtype} is the dtype of gradient "
                            f"reduction under mixed precision, which needs param_dtype=bf16 or "
                            f"fp16 (got param_dtype={self.param_dtype}); drop reduce_dtype or "
                            f"set param_dtype")
        if self.loss_scale is not None and self.param_dtype != "fp16":
            problems.append(f"loss_scale={self.loss_scale} is for param_dtype=fp16 (got "
                            f"param_dtype={self.param_dtype}); drop loss_scale or compute in fp16")
        order = self.order.split("-")
        if sorted(order) != sorted(MESH_DIMS):
            problems.append(f"order={self.order!r} must be a permutation of "
                            f"{'-'.join(MESH_DIMS)}")
        if self.dp is not None:
            problems.extend(self._expert_problems(self.dp))
        return problems

    def _type_problems(self) -> list[str]:
        problems = []
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INT_FIELDS:
                continue
            low = 0 if name in ("zero", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a non-negative" if low == 0 else "a positive"
                problems.append(f"{name}={value!r} must be {kind} integer")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be a bool (on/off)")
        for name, choices in (("schedule", Schedule), ("cp_algo", CpAlgo),
                              ("recompute", Recompute), ("reduce_dtype", Dtype)):
            if getattr(self, name) not in get_args(choices):
                problems.append(
                    f"{name}={getattr(self, name)!r} is unknown; choose one of {get_args(choices)}")
        if self.param_dtype is not None and self.param_dtype not in get_args(Dtype):
            problems.append(f"param_dtype={self.param_dtype!r} is unknown; choose one of "
                            f"{get_args(Dtype)} or leave it unset (the model's dtype)")
        if self.loss_scale not in (None, "dynamic"):
            problems.append(f"loss_scale={self.loss_scale!r} is unknown; the only scaling is "
                            f"'dynamic'")
        if self.zero not in (0, 1):
            problems.append(f"zero={self.zero!r} must be 0 or 1 (ZeRO-1 shards optimizer state)")
        factor = self.capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not factor > 0):
            problems.append(f"capacity_factor={factor!r} must be a positive number (or unset "
                            f"for dropless experts)")
        elif factor is not None and self.ep == 1:
            problems.append(f"capacity_factor={factor} drops tokens in the expert dispatch, "
                            f"which runs under expert parallelism: set ep>1, or leave "
                            f"capacity_factor unset (dropless)")
        if self.stage_layers is not None and not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for n in self.stage_layers):
            problems.append(f"stage_layers={self.stage_layers!r} must be non-negative layer "
                            f"counts, one per stage (stage_layers=7/8/8/7)")
        return problems

    def _pipeline_problems(self) -> list[str]:
        problems = []
        if self.vpp > 1 and self.schedule not in ("interleaved-1f1b", "zb-v"):
            problems.append(f"vpp={self.vpp} needs schedule=interleaved-1f1b, or zb-v with "
                            f"vpp=2 (got schedule={self.schedule})")
        if self.schedule == "zb-v" and self.vpp != 2:
            problems.append(f"schedule=zb-v places two stages per rank in a V: set vpp=2 "
                            f"(got vpp={self.vpp})")
        if self.schedule == "interleaved-1f1b" and self.microbatches % self.pp:
            problems.append(f"interleaved-1f1b needs microbatches % pp == 0 "
                            f"(microbatches={self.microbatches}, pp={self.pp}); "
                            f"use mb={self.pp * max(1, round(self.microbatches / self.pp))}")
        if self.stage_layers is not None:
            if len(self.stage_layers) != self.stages:
                problems.append(
                    f"stage_layers has {len(self.stage_layers)} counts but the plan has "
                    f"pp*vpp={self.pp}*{self.vpp}={self.stages} stages; give one count per stage")
            elif not sum(self.stage_layers):
                problems.append("stage_layers puts no layer on any stage")
            else:
                empty = [i for i, n in enumerate(self.stage_layers[1:-1], 1) if n == 0]
                if empty:
                    problems.append(
                        f"stage_layers={_text(self.stage_layers)} leaves middle stage(s) "
                        f"{words(empty)} without a layer; only the first stage (the embedding "
                        f"alone) and the last (the head and loss alone) may hold 0 layers")
        return problems

    def _context_problems(self) -> list[str]:
        if self.cp_algo != "hybrid":
            if self.cp_a2a is not None:
                return [f"cp_a2a={self.cp_a2a} sizes hybrid CP's all-to-all sub-group; set "
                        f"cp_algo=hybrid or drop cp_a2a"]
            return []
        if not proper_divisors(self.cp):  # cp=1, 2 or prime: no sub-group to make
            return [f"cp_algo=hybrid needs a cp with a divisor strictly between 1 and cp (cp=4, "
                    f"6, 8, ...) for its all-to-all sub-groups; cp={self.cp} has none: use "
                    f"cp_algo=ring or cp_algo=a2a"]
        if self.cp_a2a is None:
            return ["cp_algo=hybrid needs cp_a2a, the all-to-all sub-group size (one of "
                    f"{words(proper_divisors(self.cp))} for cp={self.cp})"]
        if not 1 < self.cp_a2a < self.cp or self.cp % self.cp_a2a:
            valid = words(proper_divisors(self.cp)) or "none for this cp"
            return [f"cp_a2a={self.cp_a2a} must divide cp={self.cp} and lie strictly between "
                    f"1 and cp (valid: {valid})"]
        return []

    def _expert_problems(self, dp: int) -> list[str]:
        dense = self.tp * self.cp * dp
        if dense % (self.expert_tp * self.ep):
            fits = [e for e in divisors(dense) if dense % (self.expert_tp * e) == 0]
            fix = (f"ep values that fit with etp={self.expert_tp}: {words(fits)}" if fits else
                   f"etp={self.expert_tp} itself does not divide it: set etp to one of "
                   f"{words(divisors(dense))}")
            return [f"etp*ep={self.expert_tp}*{self.ep}={self.expert_tp * self.ep} must divide "
                    f"tp*cp*dp={self.tp}*{self.cp}*{dp}={dense} (experts are laid over the "
                    f"dense ranks of one pipeline stage); {fix}"]
        return []

    @property
    def expert_tp(self) -> int:
        """Tensor-parallel degree inside each expert (etp, defaulting to tp)."""
        return self.tp if self.etp is None else self.etp

    # --- degrees over a world -------------------------------------------------------------
    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def resolve(self, world_size: int) -> "Plan":
        """This plan with dp filled in for `world_size` ranks; raises PlanError if it can't be."""
        if world_size < 1:
            raise PlanError(f"world_size={world_size} must be >= 1")
        if self.dp is None:
            if world_size % self.model_parallel:
                below, above = nearest_multiples(world_size, self.model_parallel)
                raise PlanError(
                    f"world size {world_size} is not divisible by tp*pp*cp="
                    f"{self.tp}*{self.pp}*{self.cp}={self.model_parallel}; launch a multiple of "
                    f"{self.model_parallel} ranks ({below} or {above}) or choose degrees whose "
                    f"product divides {world_size} ({words(divisors(world_size))})")
            return dataclasses.replace(self, dp=world_size // self.model_parallel)
        if self.world_size != world_size:
            raise PlanError(
                f"tp*pp*cp*dp={self.tp}*{self.pp}*{self.cp}*{self.dp}={self.world_size} != "
                f"world size {world_size}; set dp={world_size // self.model_parallel} "
                f"or omit dp" if world_size % self.model_parallel == 0 else
                f"tp*pp*cp*dp={self.tp}*{self.pp}*{self.cp}*{self.dp}={self.world_size} != "
                f"world size {world_size}; no dp fits: change tp, pp or cp")
        return self

    @property
    def world_size(self) -> int:
        if self.dp is None:
            raise PlanError("dp is not resolved yet: call plan.resolve(world_size)")
        return self.model_parallel * self.dp

    def degree(self, dim: str) -> int:
        """Size of a dense mesh dimension ('tp', 'cp', 'ep', 'dp', 'pp'); ep is 1 on the dense
        mesh because expert ranks are carved out of tp*cp*dp (see runtime/mesh.py)."""
        if dim == "ep":
            return 1
        if dim == "etp":
            return self.expert_tp
        value = getattr(self, dim)
        if value is None:
            raise PlanError("dp is not resolved yet: call plan.resolve(world_size)")
        return value

    @property
    def stages(self) -> int:
        return self.pp * self.vpp

    def pending(self) -> list[str]:
        """What this plan asks for that has not landed yet: one message per field, each saying
        how to run without it. `parallelize` refuses a plan with any (before any collective)."""
        defaults = Plan()
        asks = []
        for name, (landed, what, unset) in _PENDING.items():
            value = getattr(self, name)
            if landed(self) or value == getattr(defaults, name):
                continue
            asks.append(f"{what} is not available yet (the plan asks {name}={_text(value)}); "
                        f"{unset}")
        return asks

    def refuse_pending(self) -> None:
        """Raise NotLanded naming every field of `pending()`; called before any collective."""
        asks = self.pending()
        if asks:
            raise NotLanded(f"plan {self}: " + "; ".join(asks))

    def rule_for(self, module_path: str) -> RuleKind | None:
        for rule in self.rules:
            if rule.matches(module_path):
                return rule.kind
        return None

    # --- text form ------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Plan":
        """`tp=2,pp=2,sp=on,mb=8,schedule=1f1b,rules=blocks.*.mlp:replicate;lm_head:vocab`."""
        fields: dict[str, object] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            key = "microbatches" if key == "mb" else key
            if not sep:
                raise PlanError(f"plan item {item!r} in {text!r} is not key=value")
            if key not in known:
                raise PlanError(f"unknown plan key {key!r} in {text!r}; known: "
                                f"{', '.join(sorted(known | {'mb'}))}")
            if key in fields:
                raise PlanError(f"plan key {key!r} given twice in {text!r}")
            fields[key] = _parse_value(key, value, text)
        return cls(**fields)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["rules"] = ";".join(str(rule) for rule in self.rules)
        if self.stage_layers is not None:
            out["stage_layers"] = list(self.stage_layers)
        return out

    def __str__(self) -> str:
        defaults = Plan()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name) and f.name not in ("tp", "pp"):
                continue
            parts.append(f"{f.name}={_text(value)}")
        return ",".join(parts)


# Fields whose strategy has not landed: (landed for this plan?, what it is, how to go without).
_PENDING = {
    "cp_algo": (lambda plan: plan.cp_algo in ("ring", "a2a"),
                "hybrid and all-gather context parallelism (cp_algo=hybrid, cp_algo=allgather: "
                "the cost model's, for planning)", "use cp_algo=ring or cp_algo=a2a"),
    "etp": (lambda plan: plan.etp in (1, plan.tp),
            "expert tensor parallelism other than 1 or tp (1 < etp != tp)",
            "set etp=1 (each expert whole on one rank) or leave it unset (etp = tp)"),
    "async_tp": (lambda plan: not plan.compile and not plan.schedule.startswith("zb"),
                 "async tensor parallelism with compile=on or a zero-bubble schedule (its ring "
                 "runs eagerly and computes input and weight gradients in one backward step)",
                 "set async_tp=off, or compile=off and a schedule other than zb-h1/zb-v"),
    "param_dtype": (lambda plan: not plan.compile or plan.param_dtype == "fp32",
                    "mixed precision with compiled ranks (param_dtype with compile=on)",
                    "set compile=off, or leave param_dtype unset"),
}


class NotLanded(PlanError, NotImplementedError):
    """A valid plan asking for a strategy this version does not have yet."""


def _text(value) -> str:
    """A field's value as the plan string writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and value and isinstance(value[0], Rule):
        return ";".join(str(rule) for rule in value)
    if isinstance(value, tuple):
        return layout_text(value)
    return str(value)


def _parse_value(key: str, value: str, text: str):
    if key in _INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise PlanError(f"{key}={value!r} in {text!r} must be an integer") from None
    if key in _BOOL_FIELDS:
        if value.lower() not in _BOOL_WORDS:
            raise PlanError(f"{key}={value!r} in {text!r} must be on or off")
        return _BOOL_WORDS[value.lower()]
    if key == "capacity_factor":
        try:
            return float(value)
        except ValueError:
            raise PlanError(f"capacity_factor={value!r} in {text!r} must be a number") from None
    if key == "stage_layers":
        return parse_stage_layers(value)
    if key == "rules":
        return _parse_rules(value)
    return value


def parse_stage_layers(text: str) -> tuple[int, ...]:
    """`3/4*30/3` -> (3, 4, ..., 4, 3): counts joined by '/', `n*k` standing for k stages of n."""
    counts: list[int] = []
    try:
        for part in text.split("/"):
            count, star, times = part.partition("*")
            if star and int(times) < 1:
                raise ValueError(part)
            counts.extend([int(count)] * (int(times) if star else 1))
    except ValueError:
        raise PlanError(f"stage_layers={text!r} must be layer counts joined by '/', one per "
                        f"stage, `n*k` for k stages of n (stage_layers=7/8/8/7 or "
                        f"3/4*30/3)") from None
    return tuple(counts)


def layout_text(counts: tuple) -> str:
    """Counts joined by '/', runs of three or more written `n*k` (the parser's inverse)."""
    parts, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        run = j - i
        parts.extend([f"{counts[i]}*{run}"] if run >= 3 else [str(counts[i])] * run)
        i = j
    return "/".join(parts)


def uneven_layouts(layers: int, stages: int) -> list[tuple[int, ...]]:
    """Megatron's uneven pipeline (`--decoder-first-pipeline-num-layers` and `--decoder-last-
    pipeline-num-layers` applied to virtual stages): the first and the last stage hold `edge`
    layers, fewer than the `middle` every other stage holds, with 2*edge + (stages-2)*middle
    == layers; every such layout, fullest edges first (edge 0: the embedding alone and the head
    and loss alone). Empty when stages < 3 or no such split exists."""
    if stages < 3:
        return []
    out = []
    for middle in range(-(-layers // stages), layers // (stages - 2) + 1):
        edge2 = layers - (stages - 2) * middle
        if edge2 >= 0 and edge2 % 2 == 0 and edge2 // 2 < middle:
            out.append((edge2 // 2, *[middle] * (stages - 2), edge2 // 2))
    return out


def _parse_rules(text: str) -> tuple[Rule, ...]:
    rules = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        pattern, sep, kind = item.rpartition(":")
        if not sep or not pattern:
            raise PlanError(f"rule {item!r} must be glob:kind")
        if kind not in get_args(RuleKind):
            raise PlanError(f"rule {item!r}: kind {kind!r} is unknown; choose one of "
                            f"{get_args(RuleKind)}")
        rules.append(Rule(pattern, kind))
    return tuple(rules)


def coerce_plan(plan: "Plan | str | dict") -> "Plan":
    """A Plan from a Plan, a plan string or a dict of fields ("auto" is resolved by the caller)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        return Plan.parse(plan)
    if isinstance(plan, dict):
        return Plan(**plan)
    raise TypeError(f"plan must be a Plan, a plan string or a dict, not {type(plan).__name__}")

