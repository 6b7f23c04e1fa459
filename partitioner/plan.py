"""The parallel plan: which degrees, which schedule, which overrides.

A `Plan` is a frozen, validated value. It knows nothing about models or process groups; checks
that need the model (heads divisible by tp, experts by ep) run in the passes, and checks that need
the world size run in `Plan.resolve(world_size)`. This module imports nothing from the project.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Literal, get_args

Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]
CpAlgo = Literal["ring", "a2a"]
Recompute = Literal["none", "selective", "full"]
RuleKind = Literal["colwise", "rowwise", "vocab", "replicate", "moe", "pp_split"]

MESH_DIMS = ("tp", "cp", "ep", "dp", "pp")
"""Names of the dense mesh dimensions that `order` permutes (ep is laid over cp*dp*tp ranks)."""

_INT_FIELDS = ("tp", "pp", "cp", "dp", "ep", "etp", "microbatches", "vpp", "zero")
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
    etp: int = 1
    """Tensor-parallel degree inside each expert."""
    sp: bool = False
    """Sequence parallelism: activations between TP regions stay split along the sequence."""
    microbatches: int = 1
    """Microbatches per step (per data-parallel rank)."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B only)."""
    cp_algo: CpAlgo = "ring"
    """Context-parallel attention: ring (send/recv of k/v blocks) or a2a (Ulysses all-to-all)."""
    zero: int = 0
    """1 shards optimizer state over dp (Megatron's distributed optimizer / ZeRO-1)."""
    recompute: Recompute = "none"
    """Activation recomputation: none, selective (attention core) or full (each block)."""
    order: str = "tp-cp-ep-dp-pp"
    """Rank layout, fastest-varying first, as in Megatron-Core's RankGenerator."""
    rules: tuple[Rule, ...] = field(default=())
    """Overrides by module path, first match wins: `rules=glob:kind;glob:kind` in the string."""

    def __post_init__(self) -> None:
        if isinstance(self.rules, str):
            object.__setattr__(self, "rules", _parse_rules(self.rules))
        elif not isinstance(self.rules, tuple):
            object.__setattr__(self, "rules", tuple(self.rules))
        problems = self._problems()
        if problems:
            raise PlanError(f"invalid plan {self}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "dp":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 and name != "zero":
                problems.append(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.sp, bool):
            problems.append(f"sp={self.sp!r} must be a bool (on/off)")
        for name, choices in (("schedule", Schedule), ("cp_algo", CpAlgo),
                              ("recompute", Recompute)):
            if getattr(self, name) not in get_args(choices):
                problems.append(
                    f"{name}={getattr(self, name)!r} is unknown; choose one of {get_args(choices)}")
        if self.zero not in (0, 1):
            problems.append(f"zero={self.zero!r} must be 0 or 1 (ZeRO-1 shards optimizer state)")
        if problems:  # the rules below assume well-typed fields
            return problems
        if self.sp and self.tp == 1:
            problems.append("sp=on needs tp>1 (sequence parallelism splits the TP region's "
                            "activations); set tp>1 or sp=off")
        if self.vpp > 1 and self.schedule != "interleaved-1f1b":
            problems.append(f"vpp={self.vpp} needs schedule=interleaved-1f1b "
                            f"(got schedule={self.schedule})")
        if self.schedule == "interleaved-1f1b" and self.microbatches % self.pp:
            problems.append(f"interleaved-1f1b needs microbatches % pp == 0 "
                            f"(microbatches={self.microbatches}, pp={self.pp}); "
                            f"use mb={self.pp * max(1, round(self.microbatches / self.pp))}")
        order = self.order.split("-")
        if sorted(order) != sorted(MESH_DIMS):
            problems.append(f"order={self.order!r} must be a permutation of "
                            f"{'-'.join(MESH_DIMS)}")
        if self.dp is not None:
            problems.extend(self._expert_problems(self.dp))
        return problems

    def _expert_problems(self, dp: int) -> list[str]:
        dense = self.tp * self.cp * dp
        if dense % (self.etp * self.ep):
            return [f"etp*ep={self.etp}*{self.ep}={self.etp * self.ep} must divide "
                    f"tp*cp*dp={self.tp}*{self.cp}*{dp}={dense} (experts are laid over the "
                    f"dense ranks of one pipeline stage)"]
        return []

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
                raise PlanError(
                    f"world size {world_size} is not divisible by tp*pp*cp="
                    f"{self.tp}*{self.pp}*{self.cp}={self.model_parallel}; launch a multiple of "
                    f"{self.model_parallel} ranks or change the degrees")
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
        value = getattr(self, dim)
        if value is None:
            raise PlanError("dp is not resolved yet: call plan.resolve(world_size)")
        return value

    @property
    def stages(self) -> int:
        return self.pp * self.vpp

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
        return out

    def __str__(self) -> str:
        defaults = Plan()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name) and f.name not in ("tp", "pp"):
                continue
            if f.name == "rules":
                value = ";".join(str(rule) for rule in value)
            elif isinstance(value, bool):
                value = "on" if value else "off"
            parts.append(f"{f.name}={value}")
        return ",".join(parts)


def _parse_value(key: str, value: str, text: str):
    if key in _INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise PlanError(f"{key}={value!r} in {text!r} must be an integer") from None
    if key == "sp":
        if value.lower() not in _BOOL_WORDS:
            raise PlanError(f"sp={value!r} in {text!r} must be on or off")
        return _BOOL_WORDS[value.lower()]
    if key == "rules":
        return _parse_rules(value)
    return value


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

