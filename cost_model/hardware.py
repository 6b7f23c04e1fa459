"""Device profiles, the roofline with efficiency curves, and clusters.

A profile holds datasheet peaks (dense 16-bit FLOP/s, HBM bytes/s, NVLink and network bytes/s
per direction) and the *achieved* fractions of them. Achieved GEMM throughput is not one
constant: a matmul of shape (m, n, k) reaches `gemm_eff * g(m) g(n) g(k)` of peak with
g(x) = x / (x + gemm_half), so thin or small GEMMs (a 96-wide head dimension, a 256-token
microbatch) fall off the way cuBLAS tile quantization makes them, and every kernel is also bounded
by memory traffic (roofline) and pays a launch latency.

Every function here accepts plain numbers or sympy expressions, so layer costs can be built
symbolically over the parallel degrees and lambdified once (see layer_costs.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import sympy

GiB = 1024 ** 3
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float
    """Dense 16-bit tensor FLOP/s (never the sparsity figure)."""
    memory_bytes: float
    """Device memory usable by the framework."""
    hbm_bw: float
    """Device memory bandwidth, bytes/s."""
    intra_bw: float
    """Per-GPU, per-direction bandwidth inside a node (NVLink), bytes/s."""
    inter_bw: float
    """Per-GPU network bandwidth across nodes (one NIC per GPU), bytes/s."""
    gpus_per_node: int = 8
    gemm_eff: float = 0.80
    """Fraction of peak a large, well-shaped GEMM reaches."""
    gemm_half: float = 96.0
    """Dimension at which a GEMM side halves efficiency: g(x) = x / (x + gemm_half)."""
    mem_eff: float = 0.75
    """Fraction of HBM bandwidth memory-bound kernels reach."""
    intra_eff: float = 0.78
    """NCCL bus bandwidth / NVLink bandwidth for large messages."""
    inter_eff: float = 0.90
    """NCCL bus bandwidth / network bandwidth for large messages."""
    intra_latency: float = 6e-6
    """Seconds per ring step inside a node (alpha)."""
    inter_latency: float = 12e-6
    """Seconds per ring step across nodes (alpha)."""
    kernel_latency: float = 4e-6
    """Launch/tail cost of one kernel."""
    reserved_bytes: float = 2.0 * GiB
    """Device memory no tensor gets, whatever the plan: what the driver keeps of
    `memory_bytes`, the CUDA context, NCCL's and cuBLAS's buffers - everything outside
    PyTorch's caching allocator."""
    allocator_margin: float = 0.0
    """Bytes PyTorch's caching allocator holds beyond the tensors it hands out (blocks rounded
    up, split blocks it cannot return), as a fraction of those tensors' bytes. A plan fits when
    tensors x (1 + allocator_margin) + reserved_bytes <= memory_bytes."""
    fp32_peak_ratio: float = 0.5
    """fp32 matmul FLOP/s over the 16-bit peak: TF32 tensor cores run at half the bf16 rate
    on A100, H100 and H200."""
    p2p_overlap: float = 0.0
    """Fraction of pipeline send/recv time hidden behind compute (0: blocking p2p)."""
    cores: int | None = None
    """Physical cores one node gives the job where its ranks share cores (CPU hosts); None where
    every rank has a device of its own (GPUs). The rates above are then one rank's on one core,
    and a node running more ranks than cores shares them (step_time.py)."""
    elem_bytes: int = 2
    """Bytes of one activation or parameter element in the precision the job runs: 2 for 16-bit
    mixed precision on GPUs, 4 for the float32 that CPU ranks train in and tools/calibrate.py
    times."""
    all_gather_eff: float = 1.0
    """All-gather bus bandwidth as a fraction of all-reduce's: 1 for NCCL's rings; gloo's two
    are separate implementations, and tools/calibrate.py fits the ratio from its timings."""
    reduce_scatter_is_all_reduce: bool = False
    """The collective library builds reduce-scatter from an all-reduce of the whole buffer and
    keeps this rank's chunk (gloo, PyTorch #118911): it costs a full all-reduce."""
    attention_eff: float = 1.0
    """Fused attention's throughput over the GEMM roofline of the same shape: 1 where flash
    attention runs its two matmuls as tensor-core GEMMs (GPUs); on a CPU the kernel's online
    softmax runs on the same vector units, and tools/calibrate.py times it."""
    math_rate: float | None = None
    """Elements per second a kernel with per-element math (norm, GeLU, softmax) processes; such
    a kernel takes the longer of its bytes over the memory bandwidth and its elements over this
    rate. None: memory bound (GPUs, whose math outruns HBM); a CPU core's exp/erf/rsqrt are
    slower than its memory, and tools/calibrate.py times them."""
    op_overhead: float = 0.0
    """Seconds one node of the captured graph costs in forward beyond its kernels: the runtime's
    Python, the dispatcher and autograd recording, paid per op however small the op. Hidden
    behind asynchronous kernel launches on GPUs (0); on a CPU rank it runs on the core that does
    the arithmetic, and tools/calibrate.py times it on a tiny block. It is what makes many small
    microbatches slower than a few large ones."""
    op_overhead_bwd: float = 0.0
    """The same per node in backward (autograd's engine and the backward formulas' ops)."""

    # --- roofline -------------------------------------------------------------------------
    def gemm_shape_eff(self, m, n, k):
        g = self.gemm_half
        return self.gemm_eff * (m / (m + g)) * (n / (n + g)) * (k / (k + g))

    def gemm_time(self, m, n, k, batch=1):
        """One (batched) matmul (batch, m, k) @ (batch, k, n): roofline of compute at the
        shape's efficiency and memory traffic of its operands, plus a launch."""
        flops = 2 * batch * m * n * k
        traffic = self.elem_bytes * batch * (m * k + k * n + m * n)
        compute = flops / (self.peak_flops * self.gemm_shape_eff(m, n, k))
        memory = traffic / (self.hbm_bw * self.mem_eff)
        return _max(compute, memory) + self.kernel_latency

    def memory_time(self, nbytes, kernels=1):
        """A memory-bound kernel (norms, elementwise, softmax, optimizer) moving `nbytes`."""
        return nbytes / (self.hbm_bw * self.mem_eff) + kernels * self.kernel_latency

    def math_time(self, nbytes, elements, kernels=1):
        """An elementwise kernel with per-element math (norm, activation, softmax) moving
        `nbytes` over `elements`: memory bound, unless the profile's math rate is slower."""
        if self.math_rate is None:
            return self.memory_time(nbytes, kernels)
        return (_max(nbytes / (self.hbm_bw * self.mem_eff), elements / self.math_rate)
                + kernels * self.kernel_latency)

    def attention_time(self, flops, sq, sk, head_dim):
        """Forward of fused (flash) attention executing `flops` over (sq x sk) scores of
        `head_dim`: its matmuls at the GEMM shape efficiency, times the kernel's own."""
        rate = self.peak_flops * self.attention_eff * self.gemm_shape_eff(sq, sk, head_dim)
        return flops / rate + self.kernel_latency

    def graph_ops_time(self, nodes):
        """(forward, backward) framework seconds of `nodes` graph ops."""
        return nodes * self.op_overhead, nodes * self.op_overhead_bwd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Hardware":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hardware profile keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _max(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


GPU_RESERVED_BYTES = ((80 - 79.18) + (78.09 - 75.31 - 1.83)) * GiB
"""Outside the caching allocator on an 80 GB GPU (1.77 GiB), from one PyTorch out-of-memory
report (vllm-project/compressed-tensors PR 587): "a total capacity of 79.18 GiB ... this process
has 78.09 GiB memory in use. Of the allocated memory 75.31 GiB is allocated by PyTorch, and 1.83
GiB is reserved by PyTorch but unallocated": 80 - 79.18 = 0.82 GiB the driver keeps, 78.09 -
75.31 - 1.83 = 0.95 GiB of the process outside the allocator. NCCL communicators of a training
job add to it, so this is the least a job loses, not a bound; the other GPUs take the same."""
GPU_ALLOCATOR_MARGIN = 0.025
"""The same report's reserved-but-unallocated over allocated, 1.83 / 75.31 = 2.4%, rounded up:
the allocator's default (non-expandable) segments. A job run with expandable segments
(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) can set it near 0 in a cluster file."""


def _gpu(name, peak_tflops, mem_gib, hbm_gbs, nvlink_gbs, net_gbs, **kw) -> Hardware:
    kw = {"reserved_bytes": GPU_RESERVED_BYTES, "allocator_margin": GPU_ALLOCATOR_MARGIN, **kw}
    return Hardware(name=name, peak_flops=peak_tflops * 1e12, memory_bytes=mem_gib * GiB,
                    hbm_bw=hbm_gbs * GB, intra_bw=nvlink_gbs * GB, inter_bw=net_gbs * GB, **kw)


A100_FITTED = {"gemm_eff": 0.810, "mem_eff": 0.715}
"""A100's GEMM and memory-bound efficiencies fitted to the 18 published A100 runs of
cost_model/data/published_runs.json (Narayanan et al. 2021 Table 1, Korthikanti et al. 2022) by
`benchmarks/cost_model_accuracy.py --published` (fit.py `fit_published`): least squares on the
log of predicted over published step time. The 40 GB part has the same chip and takes them too."""

H100_FITTED = {"gemm_eff": 0.599, "mem_eff": 1.0}
"""H100's efficiencies fitted the same way to its 8 published runs from two sources (Llama 3
405B, Meta; Nemotron-4 340B, NVIDIA's dgxc-benchmarking recipe). The memory-bound efficiency
runs to its upper bound: those runs do not separate it from the GEMM one (their memory-bound
kernels are a few percent of the step), so it says little about HBM. Hopper's larger tiles
reach a smaller fraction of its higher peak than Ampere's (0.60 against 0.81). H200 and H800
are the same chip (more HBM; less NVLink) and take them too."""

# Datasheet numbers from published-runs.md; achieved fractions are the defaults above (NCCL ~235
# of 300 GB/s NVLink bus bandwidth) or fitted to published runs (A100, H100).
PROFILES: dict[str, Hardware] = {
    "A100-40G": _gpu("A100-40G", 312, 40, 1555, 300, 25, **A100_FITTED),
    "A100-80G": _gpu("A100-80G", 312, 80, 2039, 300, 25, **A100_FITTED),
    "H100": _gpu("H100", 989, 80, 3350, 450, 50, gemm_half=128.0, **H100_FITTED),
    "H200": _gpu("H200", 989, 141e9 / GiB, 4800, 450, 50, gemm_half=128.0, **H100_FITTED),
    "H800": _gpu("H800", 989, 80, 3350, 200, 50, gemm_half=128.0, intra_eff=0.80,
                 **H100_FITTED),
}
_ALIASES = {"A100": "A100-80G", "A100-80GB": "A100-80G", "A100-40GB": "A100-40G",
            "H100-80G": "H100", "H100-SXM": "H100", "H200-141G": "H200", "H800-80G": "H800"}


def available_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, with hyperthread siblings of
    one core counted once (they share its execution units, so two ranks on them share a core)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (containers, non-Linux): one core each
    return max(1, len(cores))


def local_cpu() -> Hardware:
    """A rough profile of one core of this machine (replace it with `tools/calibrate.py`'s
    measurement). Ranks run one per core; more ranks than cores share them."""
    cores = available_cores()
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = 8 * GiB
    return Hardware(name="cpu", peak_flops=50e9, memory_bytes=float(pages), fp32_peak_ratio=1.0,
                    hbm_bw=10 * GB, intra_bw=5 * GB, inter_bw=1 * GB, gpus_per_node=cores,
                    gemm_eff=0.6, gemm_half=32.0, mem_eff=0.6, intra_eff=0.5, inter_eff=0.5,
                    intra_latency=50e-6, inter_latency=100e-6, kernel_latency=10e-6,
                    reserved_bytes=0.5 * GiB, cores=cores, elem_bytes=4,
                    reduce_scatter_is_all_reduce=True)


def known_gpus() -> list[str]:
    return sorted(PROFILES) + ["cpu"]


def get_hardware(name: str | Hardware) -> Hardware:
    """A profile by name (`H100`, `A100-80G`, `cpu`, ...) or from a JSON profile path."""
    if isinstance(name, Hardware):
        return name
    if name.endswith(".json") or os.path.sep in name:
        return load_profile(name)
    key = name.strip()
    for candidate in (key, key.upper(), _ALIASES.get(key.upper(), "")):
        if candidate in PROFILES:
            return PROFILES[candidate]
    if key.lower() in ("cpu", "local-cpu", "local"):
        return local_cpu()
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(known_gpus())} "
                     f"(or a profile written by tools/calibrate.py, or --cluster-file)")


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in `path`; a missing or malformed file is a one-line ValueError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not JSON: {exc}") from None


def load_profile(path: str | Path) -> Hardware:
    """A profile JSON (`tools/calibrate.py` output, or any dict of Hardware fields)."""
    data = read_json(path, "hardware profile")
    data = data.get("hardware", data)
    return Hardware.from_dict(data)


@dataclass(frozen=True)
class Cluster:
    hardware: Hardware
    num_gpus: int
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"cluster needs at least one GPU, got {self.num_gpus}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} must be >= 1")

    @property
    def nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)

    def __str__(self) -> str:
        return f"{self.num_gpus}x{self.hardware.name}"


_CLUSTER_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z0-9_.\-]+?)\s*$")


def parse_cluster(text: str) -> Cluster:
    """`64xH100`, `3072xA100-80G`, `16xA100-40G` (8 GPUs a node) -> Cluster."""
    m = _CLUSTER_RE.match(text)
    if not m:
        raise ValueError(f"bad cluster {text!r}: expected NxGPU[-MEM], e.g. 64xH100 or "
                         f"512xA100-80G")
    count, gpu = int(m.group(1)), m.group(2)
    hw = get_hardware(gpu)
    return Cluster(hardware=hw, num_gpus=count, gpus_per_node=min(hw.gpus_per_node, count)
                   if hw.name == "cpu" else hw.gpus_per_node)


def load_cluster_file(path: str | Path) -> Cluster:
    """A cluster JSON file:

    {"num_gpus": 128, "gpus_per_node": 4,
     "gpu": "H100" | {...Hardware fields...} | "path/to/profile.json",
     "overrides": {"inter_bw": 25e9, ...}}
    """
    data = read_json(path, "cluster file")
    if "num_gpus" not in data or "gpu" not in data:
        raise ValueError(f"cluster file {str(path)!r} needs keys 'num_gpus' and 'gpu'")
    gpu = data["gpu"]
    if isinstance(gpu, dict):
        hw = Hardware.from_dict(gpu)
    else:
        if str(gpu).endswith(".json") and not os.path.isabs(gpu):
            gpu = str(Path(path).parent / gpu)
        hw = get_hardware(str(gpu))
    overrides = data.get("overrides", {})
    if overrides:
        known = {f.name for f in dataclasses.fields(Hardware)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"cluster file {str(path)!r}: unknown overrides {bad}")
        hw = dataclasses.replace(hw, **overrides)
    per_node = int(data.get("gpus_per_node", hw.gpus_per_node))
    hw = dataclasses.replace(hw, gpus_per_node=per_node)
    return Cluster(hardware=hw, num_gpus=int(data["num_gpus"]), gpus_per_node=per_node)
