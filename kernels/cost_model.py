"""A cost model of the head's passes: work, traffic and a predicted time per launch.

**A model, not a measurement.**  No GPU has measured these kernels yet; this module turns
what the launchers actually do (their grids, tile sizes, program order and vocabulary
splits, from :mod:`hardfocus_fused.kernels.config`) into counts, and the counts into a
time with a few constants per GPU that one measurement session can calibrate
(:class:`GPU`).  It decides ``backward_impl="auto"`` until a GPU measures otherwise, and
``benchmarks/cost_table.py`` prints it for our passes and the peers' algorithms.

Each :class:`Launch` carries

- ``flops``: the matrix-multiply work, padded to whole tiles as the kernels do it;
- ``l2_bytes``: operand bytes the programs load from L2 (every program loads its own
  tiles: one load per tile it walks);
- ``atomic_bytes``: fp32 reductions sent to L2 (``REDG``) or lock-protected
  read-modify-writes, counted separately because L2 serves them at a lower rate;
- ``hbm_bytes``: bytes that miss L2 (reads and write-backs), from the working set of one
  wave of co-resident programs (below).

and its time is the slowest of its three pipes (a roofline per launch):

    max(flops / (mma_efficiency * peak),  hbm_bytes / hbm_bandwidth,
        l2_bytes / l2_bandwidth + atomic_bytes / atomic_bandwidth)

with the matrix time rounded up to whole waves of programs (a wave 10% full costs a wave).
Launches run one after another, so a pass's time is the sum of its launches'.

**Traffic of a Triton launch.**  ``sm_count`` programs run at once (one per SM: the
8-warp tiles take most of an SM's registers); in grouped order
(:func:`kernels.tiles.grouped_tile`) one wave covers ``R`` token blocks and ``C`` columns
(vocabulary tiles or splits), which :func:`wave_footprint` counts exactly from the
program order.  A program that walks several vocabulary tiles re-reads its hidden block
for each one: those re-reads hit L2 while the wave's hidden blocks fit
(``L2_USABLE`` of the L2, the rest being the weight tiles in flight, gradients and the
other partition's copies), and otherwise miss in proportion to the excess.  Weight tiles
are read from HBM once per wave that walks them (the programs of a column share them).

**Library matmuls** (cuBLAS, in the ``"matmul"`` strategy and the peers) run at the same
efficiency with each operand read from HBM once and the output written once (read too
when accumulated): the ideal a tuned GEMM comes close to at these sizes.  Elementwise
kernels are bound by their HBM bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from .config import (
    L2_HIDDEN_SHARE,
    MATMUL_CHUNK_BYTES,
    HeadConfigs,
    KernelConfig,
    default_configs,
    split_plan,
    wave_footprint,
)

# The share of L2 a wave's re-read operands may use before they miss (see the module doc).
L2_USABLE = L2_HIDDEN_SHARE


@dataclass(frozen=True)
class GPU:
    """The constants a prediction needs.  Peak rates and HBM bandwidth are the vendor's
    dense figures; ``mma_efficiency`` is the share of the peak a well-fed matmul reaches
    (0.8: an 8192^3 bf16 matmul measured 769-798 of 989 TFLOP/s on this workplace's H200);
    the L2 and atomic bandwidths are estimates (no public figure), the first constants a
    measurement should replace."""

    name: str
    capability: int
    sm_count: int
    half_tflops: float  # bf16/fp16 tensor cores, dense
    tf32_tflops: float
    fp32_tflops: float  # FMA units
    hbm_tbps: float
    l2_mib: float
    l2_tbps: float
    atomic_tbps: float
    mma_efficiency: float = 0.8

    def mma_rate(self, dtype_bytes: int, tf32: bool = False) -> float:
        """Achievable matrix FLOP/s for operands of ``dtype_bytes`` bytes."""
        peak = self.half_tflops if dtype_bytes == 2 else self.tf32_tflops if tf32 else self.fp32_tflops
        return self.mma_efficiency * peak * 1e12

    @property
    def l2_bytes(self) -> float:
        return self.l2_mib * 2**20


GPUS = {
    "H100": GPU("H100 SXM", 90, 132, 989.4, 494.7, 66.9, 3.35, 50, 10.0, 5.0),
    "H200": GPU("H200 SXM", 90, 132, 989.4, 494.7, 66.9, 4.8, 50, 10.0, 5.0),
    "A100": GPU("A100 SXM 80GB", 80, 108, 312.0, 156.0, 19.5, 2.04, 40, 5.0, 2.5),
    "L4": GPU("L4", 89, 58, 121.0, 60.0, 30.3, 0.3, 48, 2.0, 1.0),
}


def gpu_for(capability: int | None, sm_count: int | None = None) -> GPU:
    """The modelled GPU nearest a device: by compute capability (sm_86/89 and sm_120 as the
    L4, sm_80 the A100, sm_90 and above the H100), with the device's own SM count."""
    if capability is None or 90 <= capability < 120:
        gpu = GPUS["H100"]
    else:
        gpu = GPUS["L4"] if capability >= 86 else GPUS["A100"]
    return dataclasses.replace(gpu, sm_count=sm_count) if sm_count else gpu


@dataclass(frozen=True)
class HeadShape:
    """A head problem: ``n_tokens`` scored tokens, hidden size, vocabulary size, the bytes
    of one operand element (2: bf16/fp16, 4: fp32), and the share of tokens the backward
    works on (1: all; MidRanking keeps about a quarter)."""

    n_tokens: int
    n_hidden: int
    n_vocab: int
    dtype_bytes: int = 2
    active: float = 1.0

    @property
    def product_flops(self) -> float:
        """FLOPs of one ``N x H x V`` product, unpadded: the unit of the floors."""
        return 2.0 * self.n_tokens * self.n_hidden * self.n_vocab

    @property
    def backward_tokens(self) -> int:
        return max(1, round(self.n_tokens * self.active))


@dataclass(frozen=True)
class Launch:
    """One kernel launch's counts (see the module doc); ``programs`` 0 for a library call."""

    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    atomic_bytes: float = 0.0
    programs: int = 0
    tf32: bool = False
    dtype_bytes: int = 2

    def pipes(self, gpu: GPU) -> dict[str, float]:
        """Seconds each pipe needs: ``"mma"`` (in whole waves: the last one costs as much as
        a full one), ``"hbm"`` and ``"l2"`` (loads and reductions)."""
        mma = self.flops / gpu.mma_rate(self.dtype_bytes, self.tf32) if self.flops else 0.0
        if self.programs:
            waves = math.ceil(self.programs / gpu.sm_count)
            mma *= waves * gpu.sm_count / self.programs
        return {
            "mma": mma,
            "hbm": self.hbm_bytes / (gpu.hbm_tbps * 1e12),
            "l2": self.l2_bytes / (gpu.l2_tbps * 1e12) + self.atomic_bytes / (gpu.atomic_tbps * 1e12),
        }

    def seconds(self, gpu: GPU) -> float:
        return max(self.pipes(gpu).values())

    def bound(self, gpu: GPU) -> str:
        """Which pipe sets the time: "mma", "hbm" or "l2"."""
        pipes = self.pipes(gpu)
        return max(pipes, key=pipes.get)


@dataclass
class Estimate:
    """The launches of one pass (or several), summed."""

    launches: list[Launch] = field(default_factory=list)

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.launches + other.launches)

    def seconds(self, gpu: GPU) -> float:
        return sum(launch.seconds(gpu) for launch in self.launches)

    def total(self, name: str) -> float:
        """The sum of one count (``"flops"``, ``"hbm_bytes"``, ``"l2_bytes"``, ``"atomic_bytes"``)."""
        return sum(getattr(launch, name) for launch in self.launches)


def gemm(
    name: str,
    m: int,
    n: int,
    k: int,
    a_bytes: int,
    b_bytes: int,
    out_bytes: int,
    accumulate: bool = False,
    dtype_bytes: int = 2,
) -> Launch:
    """A library matmul ``(m x k) @ (k x n)``: each operand read once, the output written
    once (and read once when ``accumulate``)."""
    traffic = m * k * a_bytes + k * n * b_bytes + m * n * out_bytes * (2 if accumulate else 1)
    return Launch(name, flops=2.0 * m * n * k, hbm_bytes=traffic, dtype_bytes=dtype_bytes)


def elementwise(name: str, hbm_bytes: float) -> Launch:
    """A memory-bound kernel moving ``hbm_bytes``."""
    return Launch(name, hbm_bytes=hbm_bytes)


def _miss(working_set: float, gpu: GPU) -> float:
    """The share of a wave's re-reads that miss L2 for a working set of that many bytes."""
    return min(1.0, max(0.0, 1.0 - L2_USABLE * gpu.l2_bytes / working_set)) if working_set else 0.0


def cdiv(n: int, block: int) -> int:
    """``ceil(n / block)``."""
    return -(-n // block)


def configs_for(shape: HeadShape, gpu: GPU) -> HeadConfigs:
    """The default per-pass configs the launchers would use on ``gpu`` for ``shape``."""
    import torch

    dtype = torch.bfloat16 if shape.dtype_bytes == 2 else torch.float32
    return default_configs(shape.n_tokens, shape.n_vocab, shape.n_hidden, dtype, gpu.capability, interpreted=False)


def forward(shape: HeadShape, gpu: GPU, config: KernelConfig | None = None) -> Estimate:
    """Our forward kernel (``kernels.forward.lse_forward``) with its vocabulary splits."""
    config = config or configs_for(shape, gpu).forward
    e, h = shape.dtype_bytes, shape.n_hidden
    n_blocks, n_tiles = cdiv(shape.n_tokens, config.block_n), cdiv(shape.n_vocab, config.block_v)
    hidden_block, weight_tile = config.block_n * h * e, config.block_v * h * e
    splits, per_split = split_plan(n_blocks, n_tiles, config, gpu.sm_count, hidden_block, gpu.l2_bytes)
    programs = n_blocks * splits
    rows, cols = wave_footprint(n_blocks, splits, config.group_n, gpu.sm_count)
    waves = programs / min(programs, gpu.sm_count)
    miss = _miss(rows * hidden_block + cols * config.num_stages * weight_tile, gpu)
    hbm = waves * (rows * hidden_block * (1 + (per_split - 1) * miss) + cols * per_split * weight_tile)
    hbm += shape.n_tokens * splits * 4 * 4  # the per-split partial statistics
    return Estimate(
        [
            Launch(
                "forward",
                flops=2.0 * n_blocks * config.block_n * n_tiles * config.block_v * h,
                hbm_bytes=hbm,
                l2_bytes=n_blocks * n_tiles * (hidden_block + weight_tile),
                programs=programs,
                dtype_bytes=e,
                tf32=config.fp32_precision != "ieee",
            )
        ]
    )


def backward_fused(
    shape: HeadShape, gpu: GPU, config: KernelConfig | None = None, need_weight: bool = True, need_hidden: bool = True
) -> Estimate:
    """The atomic backward kernel (``kernels.backward``), one launch per weight-gradient chunk.

    Each program recomputes its logit tile (loading its hidden block and weight tile),
    then walks the hidden dimension again for the two gradient products (loading both
    again) and adds ``(block_n + block_v) x H`` fp32 partial gradients with reductions."""
    config = config or configs_for(shape, gpu).backward
    e, h, n = shape.dtype_bytes, shape.n_hidden, shape.backward_tokens
    n_blocks = cdiv(n, config.block_n)
    hidden_block, weight_tile = config.block_n * h * e, config.block_v * h * e
    products = 1 + need_hidden + need_weight
    if e == 4 or not need_weight:
        chunk_rows = shape.n_vocab
    else:
        chunk_rows = max(config.block_v, config.weight_grad_chunk_bytes // (4 * h) // config.block_v * config.block_v)
    launches = []
    for v0 in range(0, shape.n_vocab, chunk_rows):
        tiles = cdiv(min(chunk_rows, shape.n_vocab - v0), config.block_v)
        programs = n_blocks * tiles
        rows, cols = wave_footprint(n_blocks, tiles, config.group_n, gpu.sm_count)
        groups = cdiv(n_blocks, config.group_n)
        # Operands: each token block once per chunk, each weight tile once per group of
        # token blocks; accumulators: the hidden gradient's rows once per chunk (read and
        # written), each fp32 weight-gradient tile once per group (it is cold again by
        # the time the next group reaches it, unless the whole chunk fits).
        chunk_weight = tiles * config.block_v * h
        weight_revisits = 1 if chunk_weight * 4 <= L2_USABLE * gpu.l2_bytes else groups
        hbm = n * h * e + groups * chunk_weight * e
        hbm += need_hidden * 2 * n * h * 4 + need_weight * weight_revisits * 2 * chunk_weight * 4
        loads = programs * (hidden_block + weight_tile) * (1 + (need_hidden or need_weight))
        atomics = programs * h * 4 * (need_hidden * config.block_n + need_weight * config.block_v)
        launches.append(
            Launch(
                f"backward[{v0}:]",
                flops=2.0 * products * programs * config.block_n * config.block_v * h,
                hbm_bytes=hbm,
                l2_bytes=loads,
                atomic_bytes=atomics,
                programs=programs,
                dtype_bytes=e,
                tf32=config.fp32_precision != "ieee",
            )
        )
        if need_weight and e == 2:
            launches.append(elementwise("cast weight-gradient chunk", chunk_weight * (4 + e)))
    return Estimate(launches)


def backward_matmul(
    shape: HeadShape,
    gpu: GPU,
    chunk_bytes: int = MATMUL_CHUNK_BYTES,
    need_weight: bool = True,
    need_hidden: bool = True,
) -> Estimate:
    """The ``"matmul"`` strategy (``kernels.backward_matmul``): per vocabulary chunk, the
    recompute (fp32 logits written), the elementwise ``dlogits`` kernel (fp32 read, the
    compute dtype written), the weight gradient's rows and the hidden gradient's fp32
    accumulation, as library matmuls."""
    e, h, n = shape.dtype_bytes, shape.n_hidden, shape.backward_tokens
    cols = max(128, min(shape.n_vocab, chunk_bytes // (4 * n)) // 128 * 128)
    launches = [elementwise("gather active hidden", 2 * n * h * e)] if shape.active < 1 else []
    for v0 in range(0, shape.n_vocab, cols):
        c = min(cols, shape.n_vocab - v0)
        launches.append(gemm("recompute", n, c, h, e, e, 4, dtype_bytes=e))
        launches.append(elementwise("dlogits", n * c * (4 + e)))
        if need_weight:
            launches.append(gemm("grad weight", c, h, n, e, e, 4, dtype_bytes=e))
            if e == 2:
                launches.append(elementwise("cast weight rows", c * h * (4 + e)))
        if need_hidden:
            launches.append(gemm("grad hidden", n, h, c, e, e, 4, accumulate=True, dtype_bytes=e))
    if need_hidden:
        launches.append(elementwise("scatter hidden gradient", n * h * (4 + e)))
    return Estimate(launches)


def forward_gradients(
    shape: HeadShape,
    gpu: GPU,
    chunk_bytes: int = MATMUL_CHUNK_BYTES,
    need_weight: bool = True,
    need_hidden: bool = True,
) -> Estimate:
    """The three-product path (``op.forward_gradients``), forward and backward together:
    per chunk of scored tokens, the logits as one library matmul (fp32 written), the
    forward kernel's statistics read from them, the ``dlogits`` kernel, and the two
    gradient products (the weight gradient accumulated in fp32 across chunks, read and
    written each time); the backward only scales the stored gradients."""
    e, h, n, v = shape.dtype_bytes, shape.n_hidden, shape.n_tokens, shape.n_vocab
    rows = max(128, min(n, chunk_bytes // (4 * v)) // 128 * 128)
    launches = [elementwise("gather scored hidden", 2 * n * h * e)]
    for t0 in range(0, n, rows):
        c = min(rows, n - t0)
        launches.append(gemm("logits", c, v, h, e, e, 4, dtype_bytes=e))
        launches.append(elementwise("statistics", c * v * 4))
        launches.append(elementwise("dlogits", c * v * (4 + e)))
        if need_hidden:
            launches.append(gemm("grad hidden", c, h, v, e, e, 4, dtype_bytes=e))
        if need_weight:
            launches.append(gemm("grad weight", v, h, c, e, e, 4, accumulate=True, dtype_bytes=e))
    if need_weight and e == 2:
        launches.append(elementwise("cast weight gradient", v * h * (4 + e)))
    if need_hidden:
        launches.append(elementwise("scatter and scale hidden gradient", 2 * n * h * e))
    if need_weight:
        launches.append(elementwise("scale weight gradient", 2 * v * h * e))
    return Estimate(launches)


def forward_gradient_extra_bytes(
    shape: HeadShape, need_weight: bool = True, chunk_bytes: int = MATMUL_CHUNK_BYTES
) -> int:
    """Memory the three-product path holds beyond the four-product one's: the logits chunk
    and its ``dlogits``, and for a trainable half-precision head its fp32 weight-gradient
    sum (the four-product backward sums 256 MiB of it at a time)."""
    accumulator = shape.n_vocab * shape.n_hidden * 4 if need_weight and shape.dtype_bytes != 4 else 0
    return matmul_extra_bytes(chunk_bytes, shape.dtype_bytes) + accumulator


def backward_deterministic(
    shape: HeadShape, gpu: GPU, config: KernelConfig | None = None, need_weight: bool = True, need_hidden: bool = True
) -> Estimate:
    """The deterministic kernels (``kernels.backward_deterministic``): one program per token
    block walks every vocabulary tile (hidden gradient), one per vocabulary tile walks
    every token block (weight gradient); each recomputes its logits."""
    config = config or configs_for(shape, gpu).deterministic
    e, h, n = shape.dtype_bytes, shape.n_hidden, shape.backward_tokens
    n_blocks, n_tiles = cdiv(n, config.block_n), cdiv(shape.n_vocab, config.block_v)
    hidden_block, weight_tile = config.block_n * h * e, config.block_v * h * e
    tile_flops = 2.0 * config.block_n * config.block_v * h
    launches = []
    if need_hidden:  # each program re-reads its hidden block per tile; the weight streams past
        rows = min(n_blocks, gpu.sm_count)
        miss = _miss(rows * hidden_block, gpu)
        waves = n_blocks / rows
        hbm = waves * (rows * hidden_block * (1 + (n_tiles - 1) * miss) + n_tiles * weight_tile) + n * h * 4
        launches.append(
            Launch(
                "grad hidden",
                flops=2 * tile_flops * n_blocks * n_tiles,
                hbm_bytes=hbm,
                l2_bytes=2 * n_blocks * n_tiles * (hidden_block + weight_tile),
                programs=n_blocks,
                dtype_bytes=e,
            )
        )
    if need_weight:  # each program re-reads its weight tile per token block; the hidden states stream past
        cols = min(n_tiles, gpu.sm_count)
        miss = _miss(cols * weight_tile, gpu)
        waves = n_tiles / cols
        hbm = waves * (cols * weight_tile * (1 + (n_blocks - 1) * miss) + n_blocks * hidden_block)
        hbm += shape.n_vocab * h * 4
        launches.append(
            Launch(
                "grad weight",
                flops=2 * tile_flops * n_blocks * n_tiles,
                hbm_bytes=hbm,
                l2_bytes=2 * n_blocks * n_tiles * (hidden_block + weight_tile),
                programs=n_tiles,
                dtype_bytes=e,
            )
        )
    return Estimate(launches)


def backward(
    shape: HeadShape, gpu: GPU, strategy: str, need_weight: bool = True, deterministic: bool = False
) -> Estimate:
    """The backward of one ``strategy`` (``"fused"``, ``"matmul"``)."""
    if strategy == "matmul":
        return backward_matmul(shape, gpu, need_weight=need_weight)
    if deterministic:
        return backward_deterministic(shape, gpu, need_weight=need_weight)
    return backward_fused(shape, gpu, need_weight=need_weight)


def floor_seconds(shape: HeadShape, gpu: GPU, products: float) -> float:
    """``products`` unpadded ``N x H x V`` products at the achievable matrix rate."""
    return products * shape.product_flops / gpu.mma_rate(shape.dtype_bytes)


# "auto" takes the "matmul" strategy only where its chunk buffers (the fp32 logits chunk
# and its dlogits in the compute dtype) take at most this share of the device's memory.
MATMUL_MEMORY_SHARE = 0.05


def matmul_extra_bytes(chunk_bytes: int = MATMUL_CHUNK_BYTES, dtype_bytes: int = 2) -> int:
    """Memory the ``"matmul"`` strategy holds beyond the fused one's: the fp32 logits chunk
    and its ``dlogits`` (in the compute dtype; the same buffer for fp32)."""
    return chunk_bytes + (chunk_bytes * dtype_bytes // 4 if dtype_bytes != 4 else 0)


@functools.lru_cache(maxsize=1024)
def choose_backward(
    n_tokens: int,
    n_hidden: int,
    n_vocab: int,
    dtype_bytes: int,
    capability: int | None,
    sm_count: int | None = None,
    need_weight: bool = True,
    memory_bytes: int | None = None,
) -> str:
    """The backward strategy the model predicts faster on a device (``backward_impl="auto"``).

    ``"fused"`` without a device (CPU, the interpreter); where the model predicts the two
    within 5% of each other (the fused kernel needs no host synchronisation and no logits
    chunk in memory); and where the ``"matmul"`` chunk buffers would take more than
    ``MATMUL_MEMORY_SHARE`` of the device's ``memory_bytes``."""
    if capability is None:
        return "fused"
    if memory_bytes is not None and matmul_extra_bytes(dtype_bytes=dtype_bytes) > MATMUL_MEMORY_SHARE * memory_bytes:
        return "fused"
    gpu = gpu_for(capability, sm_count)
    shape = HeadShape(n_tokens, n_hidden, n_vocab, dtype_bytes)
    fused = backward_fused(shape, gpu, need_weight=need_weight).seconds(gpu)
    matmul = backward_matmul(shape, gpu, need_weight=need_weight).seconds(gpu)
    return "matmul" if matmul < 0.95 * fused else "fused"


# Without a device's memory size (the interpreter), the three-product path may hold this
# much beyond the four-product one (the latter's own fp32 weight-gradient chunk budget).
FORWARD_GRADIENT_FALLBACK_BYTES = 256 * 2**20


def forward_gradients_fit(
    n_tokens: int, n_hidden: int, n_vocab: int, dtype_bytes: int, need_weight: bool, memory_bytes: int | None
) -> bool:
    """Whether the three-product path's extra memory (:func:`forward_gradient_extra_bytes`)
    stays within ``MATMUL_MEMORY_SHARE`` of the device's memory (256 MiB when unknown)."""
    extra = forward_gradient_extra_bytes(HeadShape(n_tokens, n_hidden, n_vocab, dtype_bytes), need_weight)
    budget = MATMUL_MEMORY_SHARE * memory_bytes if memory_bytes else FORWARD_GRADIENT_FALLBACK_BYTES
    return extra <= budget


@functools.lru_cache(maxsize=1024)
def choose_forward_gradients(
    n_tokens: int,
    n_hidden: int,
    n_vocab: int,
    dtype_bytes: int,
    capability: int | None,
    sm_count: int | None = None,
    need_weight: bool = True,
    memory_bytes: int | None = None,
) -> bool:
    """Whether ``backward_impl="auto"`` forms the gradients in the forward (three
    products) for a loss whose per-token weights are known up front: on a GPU, when the
    extra memory fits (:func:`forward_gradients_fit`) and the model predicts it faster than
    the forward plus the backward ``choose_backward`` would take."""
    if capability is None or not forward_gradients_fit(
        n_tokens, n_hidden, n_vocab, dtype_bytes, need_weight, memory_bytes
    ):
        return False
    gpu = gpu_for(capability, sm_count)
    shape = HeadShape(n_tokens, n_hidden, n_vocab, dtype_bytes)
    strategy = choose_backward(
        n_tokens, n_hidden, n_vocab, dtype_bytes, capability, sm_count, need_weight, memory_bytes
    )
    four = (forward(shape, gpu) + backward(shape, gpu, strategy, need_weight=need_weight)).seconds(gpu)
    return forward_gradients(shape, gpu, need_weight=need_weight).seconds(gpu) < four
