"""Block sizes and launch settings for the kernels, per pass, chosen per dtype and shape."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel pass.

    ``block_n`` tokens x ``block_v`` vocabulary entries form one logit tile; the hidden
    dimension is reduced ``block_h`` at a time.  ``group_n`` token blocks are walked per
    vocabulary tile or split before the next (grouped program order, see
    ``tiles.grouped_tile``).  ``fp32_precision`` is the ``tl.dot`` input precision used for
    fp32 inputs: ``"ieee"`` (exact fp32, the default, because accuracy against an fp64
    reference is part of what we promise) or ``"tf32"``.  Forward only: ``vocab_splits``
    vocabulary splits per token block (0: fill whole waves of the device, see
    :func:`whole_wave_splits`).  Atomic backward only: ``weight_grad_chunk_bytes`` caps the
    fp32 accumulator of a half-precision head's weight gradient (the vocabulary is
    processed in chunks of that many bytes of fp32 rows, at least one ``block_v`` tile,
    each rounded into the gradient once done, instead of one fp32 copy of the whole
    gradient).
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8
    fp32_precision: str = "ieee"
    vocab_splits: int = 0
    weight_grad_chunk_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")
        if self.group_n < 1:
            raise ValueError(f"KernelConfig.group_n must be >= 1, got {self.group_n}")
        if self.vocab_splits < 0:
            raise ValueError(f"KernelConfig.vocab_splits must be >= 0, got {self.vocab_splits}")
        if self.weight_grad_chunk_bytes <= 0:
            raise ValueError(
                f"KernelConfig.weight_grad_chunk_bytes must be positive, got {self.weight_grad_chunk_bytes}"
            )
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(
                f"KernelConfig.fp32_precision must be 'ieee', 'tf32' or 'tf32x3', got {self.fp32_precision!r}"
            )

    def launch_options(self) -> dict:
        """Keyword arguments for a kernel launch (ignored by the interpreter)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


BACKWARD_STRATEGIES = ("fused", "matmul")
# The "matmul" backward's default budget of fp32 logits per chunk.
MATMUL_CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class HeadConfigs:
    """The configuration of each pass over one head: the forward kernel, the atomic
    backward kernel, the deterministic backward kernels, and the chunk budget of the
    ``"matmul"`` backward strategy (bytes of fp32 logits per vocabulary chunk).
    ``forward_entropy`` is the forward's when it also computes the entropy (more live
    state per row: a wide tile that fits the plain forward may spill there); None: the
    same as ``forward``."""

    forward: KernelConfig
    backward: KernelConfig
    deterministic: KernelConfig
    matmul_chunk_bytes: int = MATMUL_CHUNK_BYTES
    forward_entropy: KernelConfig | None = None

    def forward_for(self, entropy: bool) -> KernelConfig:
        """The forward's configuration, with or without the entropy."""
        return self.forward_entropy if entropy and self.forward_entropy is not None else self.forward

    def map(self, change) -> HeadConfigs:
        """These configs with ``change(config)`` applied to each pass's ``KernelConfig``."""
        passes = {name: change(getattr(self, name)) for name in ("forward", "backward", "deterministic")}
        entropy = change(self.forward_entropy) if self.forward_entropy is not None else None
        return dataclasses.replace(self, **passes, forward_entropy=entropy)

    @classmethod
    def of(cls, config: KernelConfig | HeadConfigs) -> HeadConfigs:
        """``config`` as per-pass configs (one ``KernelConfig`` serves every pass)."""
        if isinstance(config, HeadConfigs):
            return config
        if not isinstance(config, KernelConfig):
            raise TypeError(f"kernel_config must be a KernelConfig or HeadConfigs, got {type(config).__name__}")
        return cls(forward=config, backward=config, deterministic=config)


# The compiled defaults, per compute dtype: each compiles for sm_90 with the launch-time
# specialisation without register spills and within the shared memory of a Hopper SM
# (tests/kernels/test_compile.py; the table is benchmarks/results/kernel-resources-sm90-*.md).
# The forward's 128 x 256 tiles (wgmma 64x256x16, 255 registers, 144 KiB) load half as
# many weight bytes per FLOP from L2 as 128 x 128 (85 FLOP per byte against 64), which
# the cost model says is what bounds a 128 x 128 forward on an H100
# (hardfocus_fused.kernels.cost_model; benchmarks/results/cost-model-*.md); with the entropy's
# extra state they spill (168-256 bytes), so that forward keeps 128 x 128.
_HALF = HeadConfigs(
    forward=KernelConfig(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3),
    backward=KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3),
    deterministic=KernelConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3),
    forward_entropy=KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3),
)
# fp32 (exact "ieee" dots): 64 x 64 x 32 spills at 4 warps (a 4.4 KB stack in the
# backward) and at 8 (128 registers a thread); 64 x 64 x 16 at 8 warps does not, except in
# the deterministic weight-gradient kernel with the extra loss terms, where 64 x 32 x 16
# does not either.
_FP32_TILE = KernelConfig(block_n=64, block_v=64, block_h=16, num_warps=8, num_stages=2)
_FP32 = HeadConfigs(forward=_FP32_TILE, backward=_FP32_TILE, deterministic=dataclasses.replace(_FP32_TILE, block_v=32))
# Before Hopper (sm_80/86/89) and on consumer Blackwell (sm_120) the matmuls are
# mma.sync (HMMA), whose fragments live in registers: the 128 x 128 forward spills (up to
# 512 bytes a thread with every term and the entropy), and the 3-stage 128 x 128 backward
# needs 128 KiB of shared memory, more than the 99 KiB a block may have on sm_86/89/120.
# A 2-stage backward (96 KiB) compiles clean on all of them, and so does a 128 x 128 x 32
# forward at 4 stages (48 KiB) without the entropy (with it: 128 x 64 x 64); the fp32
# backward takes the deterministic kernels' 64 x 32 x 16 tile (64 x 64 spilled 16 bytes
# with every term and the entropy).  The tables are
# benchmarks/results/kernel-resources-sm{80,86,89,100,120}-*.md.
_HALF_MMA = HeadConfigs(
    forward=KernelConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=4),
    backward=KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=2),
    deterministic=_HALF.deterministic,
    forward_entropy=KernelConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3),
)
_FP32_MMA = HeadConfigs(forward=_FP32.forward, backward=_FP32.deterministic, deterministic=_FP32.deterministic)
# sm_120 and sm_100a spill even the 64 x 64 fp32 forward with every term and the entropy
# (8 bytes): every fp32 pass there takes 64 x 32 x 16.
_FP32_NARROW = HeadConfigs.of(_FP32.deterministic)
# sm_100a (tcgen05) compiles Hopper's forward clean, but its 128 x 128 backward spills (176
# bytes with the extra terms) and so does the 64 x 128 x 64 deterministic weight gradient
# (64 x 64 x 64 then spills the deterministic hidden gradient): 128 x 64 x 64 and 64 x 64 x 32
# do not.
_HALF_TCGEN05 = HeadConfigs(
    forward=_HALF.forward_entropy,
    backward=KernelConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3),
    deterministic=KernelConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=3),
)


@dataclass(frozen=True)
class Architecture:
    """A GPU architecture the defaults are chosen for: its name (as Triton's ptxas targets
    it), the shared memory one block may use, and the default configurations of half
    precision and fp32 heads."""

    name: str
    shared_bytes: int
    half: HeadConfigs
    fp32: HeadConfigs


# By compute capability; ``architecture`` maps any other to the nearest one below.
ARCHITECTURES = {
    80: Architecture("sm_80", 163 * 1024, _HALF_MMA, _FP32_MMA),  # A100
    86: Architecture("sm_86", 99 * 1024, _HALF_MMA, _FP32_MMA),  # RTX 30xx, A10, A40
    89: Architecture("sm_89", 99 * 1024, _HALF_MMA, _FP32_MMA),  # RTX 40xx, L4, L40S
    90: Architecture("sm_90a", 227 * 1024, _HALF, _FP32),  # H100, H200
    100: Architecture("sm_100a", 227 * 1024, _HALF_TCGEN05, _FP32_NARROW),  # B200
    120: Architecture("sm_120", 99 * 1024, _HALF_MMA, _FP32_NARROW),  # RTX 50xx
}


def architecture(capability: int | None) -> Architecture:
    """The :class:`Architecture` of a compute capability (``major * 10 + minor``): the
    nearest listed one at or below it (sm_87 is sm_86's, sm_103 sm_100's), sm_80 below
    sm_80, and sm_90 when it is unknown (None: no GPU)."""
    if capability is None:
        return ARCHITECTURES[90]
    known = [c for c in ARCHITECTURES if c <= capability]
    return ARCHITECTURES[max(known)] if known else ARCHITECTURES[80]


def device_capability(device: torch.device) -> int | None:
    """``major * 10 + minor`` of a CUDA device, None elsewhere (and under the interpreter)."""
    if device.type != "cuda" or interpreter_active():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# Few tokens (decoding-sized batches, a handful of sequences): 64-token blocks waste less
# on masked rows.
SMALL_N = 512
_INTERPRETER = KernelConfig(block_n=32, block_v=64, block_h=64, num_warps=4, num_stages=1)


# Measured defaults in force (``benchmarks.tuned.apply``): a function of the
# architecture's defaults and the head, ``(configs, n_tokens, n_vocab, n_hidden, dtype)``.
_measured_configs = None


def use_measured_configs(choose):
    """Make ``choose(configs, n_tokens, n_vocab, n_hidden, dtype)`` adjust every
    :func:`default_configs` from now on (None: the architecture's defaults again); returns
    the one it replaces, to restore."""
    global _measured_configs
    previous, _measured_configs = _measured_configs, choose
    return previous


def default_configs(
    n_tokens: int,
    n_vocab: int,
    n_hidden: int,
    dtype: torch.dtype,
    capability: int | None = None,
    interpreted: bool | None = None,
) -> HeadConfigs:
    """The per-pass configurations used when the caller passes none.

    Under the interpreter every program is executed in Python, so large tiles (few
    programs) are what keeps tests fast.  On a GPU, half precision uses 128 x 128 logit
    tiles (about 64 FLOP per byte from L2 in the forward, against 43 for 64 x 128), down
    to 64-token blocks for small token counts; fp32 smaller tiles at 8 warps, so that
    nothing spills, on tensor cores (tf32) when torch's fp32 matmuls may use them
    (:func:`fp32_on_tensor_cores`).  The tiles are those of the ``capability``'s
    :func:`architecture` (sm_90's when None), each compiling there without spills and
    within the shared memory a block may have (``tests/kernels/test_compile.py``).  ``interpreted``
    (None: whether the interpreter is on now) picks the interpreter's config instead.
    Measured defaults (:func:`use_measured_configs`) adjust the result.
    """
    configs = _architecture_configs(n_tokens, dtype, capability, interpreted)
    if _measured_configs is None:
        return configs
    return _measured_configs(configs, n_tokens, n_vocab, n_hidden, dtype)


def _architecture_configs(
    n_tokens: int, dtype: torch.dtype, capability: int | None, interpreted: bool | None
) -> HeadConfigs:
    if interpreter_active() if interpreted is None else interpreted:
        return HeadConfigs.of(_INTERPRETER)
    arch = architecture(capability)
    if dtype == torch.float32:
        if fp32_on_tensor_cores():
            return arch.fp32.map(lambda c: dataclasses.replace(c, fp32_precision="tf32"))
        return arch.fp32
    if n_tokens <= SMALL_N:  # 64-token blocks; the forward keeps 128 columns (64 x 64 spills at 8 warps)
        small_forward = dataclasses.replace(arch.half.forward, block_n=64, block_v=128)
        return dataclasses.replace(
            arch.half,
            forward=small_forward,
            forward_entropy=None,
            backward=dataclasses.replace(arch.half.backward, block_n=64),
        )
    return arch.half


def fp32_on_tensor_cores() -> bool:
    """Whether fp32 heads multiply on tensor cores (tf32 inputs): as torch's own fp32
    matmuls do, when ``torch.set_float32_matmul_precision`` is "high" or "medium" (or
    ``torch.backends.cuda.matmul.allow_tf32`` is set).  Otherwise ("highest", torch's
    default) they run exact fp32 products on the FMA units, without tensor cores."""
    return torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32


def default_config(n_tokens: int, n_vocab: int, n_hidden: int, dtype: torch.dtype) -> KernelConfig:
    """The forward's default configuration (see :func:`default_configs`)."""
    return default_configs(n_tokens, n_vocab, n_hidden, dtype).forward


def device_sm_count(device: torch.device) -> int | None:
    """The number of streaming multiprocessors of a CUDA device, None elsewhere."""
    if device.type != "cuda" or interpreter_active():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory of a CUDA device in bytes, None elsewhere."""
    if device.type != "cuda" or interpreter_active():
        return None
    return torch.cuda.get_device_properties(device).total_memory


def device_l2_bytes(device: torch.device) -> int | None:
    """The L2 cache size of a CUDA device in bytes, None elsewhere (or when torch does not say)."""
    if device.type != "cuda" or interpreter_active():
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def whole_wave_splits(n_row_blocks: int, n_tiles: int, sm_count: int | None, min_fill: float = 0.9) -> int:
    """Vocabulary splits per token block for the forward so that its ``n_row_blocks x
    splits`` programs fill whole waves of ``sm_count`` multiprocessors (one program each).

    The smallest split count whose programs fill their waves to ``min_fill`` on average
    (and make at least that much of one wave), among those that leave no split empty; 1
    without a device size (CPU, interpreter).  At N=1024 and 64-token blocks on 132 SMs
    that is 8 splits (128 programs, 97% of one wave), where "about two waves" gave 17
    (272 programs: a third wave 6% full).
    """
    if not sm_count or n_tiles <= 1:
        return 1
    best, best_fill = 1, _wave_fill(n_row_blocks, sm_count)
    for splits in range(1, n_tiles + 1):
        if -(-n_tiles // -(-n_tiles // splits)) != splits:  # some split would be empty
            continue
        programs = n_row_blocks * splits
        fill = _wave_fill(programs, sm_count)
        if programs >= min_fill * sm_count and fill >= min_fill:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
        if programs > 8 * sm_count:  # past a few waves: the best seen
            break
    return best


def _wave_fill(n_programs: int, sm_count: int) -> float:
    """How full the waves of ``n_programs`` programs on ``sm_count`` SMs are, on average."""
    waves = -(-n_programs // sm_count)
    return n_programs / (waves * sm_count)


# The share of L2 that one wave's hidden blocks may take in the forward (the rest: the
# weight tiles in flight, the partial statistics, and on two-partition L2s the far copies).
L2_HIDDEN_SHARE = 0.5


@functools.lru_cache(maxsize=256)
def wave_footprint(n_row_blocks: int, n_cols: int, group_n: int, wave: int) -> tuple[int, int]:
    """``(token blocks, columns)`` that the first ``wave`` programs of a grouped grid cover
    (the host-side twin of ``tiles.grouped_tile``)."""
    rows, cols = set(), set()
    per_group = group_n * n_cols
    for pid in range(min(wave, n_row_blocks * n_cols)):
        first = (pid // per_group) * group_n
        size = min(n_row_blocks - first, group_n)
        local = pid % per_group
        rows.add(first + local % size)
        cols.add(local // size)
    return len(rows), len(cols)


def forward_splits(
    n_row_blocks: int,
    n_tiles: int,
    sm_count: int | None,
    group_n: int,
    hidden_block_bytes: int,
    l2_bytes: int | None,
    min_fill: float = 0.9,
) -> int:
    """Vocabulary splits per token block for the forward: whole waves
    (:func:`whole_wave_splits`), and few enough token blocks in one wave that their hidden
    rows, which every program re-reads for each vocabulary tile it walks, stay in L2
    (``L2_HIDDEN_SHARE`` of ``l2_bytes``).

    With one split every program walks the whole vocabulary, so a wave holds one token
    block per SM: at the Llama-3-8B head (16384 tokens, H=4096, bf16) 128 blocks of 1 MiB,
    far over an H100's 50 MB L2, and the hidden rows come from HBM again for every tile
    (cost_model: about 95 GB).  In grouped order a wave covers ``group_n`` token blocks
    per column: 8 splits there give waves of 17 blocks (17 MiB) that fill 97% of their
    waves.  The smallest split count that fits and fills its waves to ``min_fill``; where
    none fills, the fitting one that fills best; without the device's sizes, the whole-wave
    count."""
    splits = whole_wave_splits(n_row_blocks, n_tiles, sm_count, min_fill)
    if not sm_count or not l2_bytes or n_tiles <= 1:
        return splits
    budget = L2_HIDDEN_SHARE * l2_bytes

    def fits(s: int) -> bool:
        return wave_footprint(n_row_blocks, s, group_n, sm_count)[0] * hidden_block_bytes <= budget

    if fits(splits):
        return splits
    best, best_fill = None, -1.0
    for s in range(splits + 1, n_tiles + 1):
        if -(-n_tiles // -(-n_tiles // s)) != s or not fits(s):  # an empty split, or too many blocks
            continue
        fill = _wave_fill(n_row_blocks * s, sm_count)
        if fill >= min_fill:
            return s
        if fill > best_fill:
            best, best_fill = s, fill
        if n_row_blocks * s > 16 * sm_count:
            break
    return best if best is not None else splits


def split_plan(
    n_row_blocks: int,
    n_tiles: int,
    config: KernelConfig,
    sm_count: int | None,
    hidden_block_bytes: int,
    l2_bytes: int | None,
) -> tuple[int, int]:
    """``(splits, tiles per split)`` of the forward: ``config.vocab_splits`` when it fixes
    them, else :func:`forward_splits`; then as many splits as the tiles per split need (no
    split is empty)."""
    if config.vocab_splits:
        splits = min(config.vocab_splits, n_tiles)
    else:
        splits = forward_splits(n_row_blocks, n_tiles, sm_count, config.group_n, hidden_block_bytes, l2_bytes)
    per_split = -(-n_tiles // splits)
    return -(-n_tiles // per_split), per_split
