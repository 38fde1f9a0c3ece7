"""Resources of the kernels as they are launched, compiled for Hopper without a GPU.

The package's own launchers run on the benchmark head shapes with CPU tensors (nothing
is computed: each kernel launch is recorded instead of run), and each recorded launch is
compiled for sm_90 exactly as Triton's JIT would compile it at that launch: the same
binder specialises the arguments (integers equal to 1 become constants, integers and
pointers divisible by 16 get ``tt.divisibility=16``), with the launch's ``num_warps`` and
``num_stages``.  For each compiled variant it reports registers, spills (stack and
local memory), shared memory, and from the SASS (the bundled ``cuobjdump``) the memory
barriers and the global reductions/atomics.

    python -m benchmarks.kernel_resources --out benchmarks/results

writes ``kernel-resources-sm90-DATE.md`` / ``.json``.  ``tests/kernels/test_compile.py`` runs the
same compilation and asserts: no spills, shared memory within a Hopper SM's 227 KiB, and
no ``MEMBAR`` in the atomic backward kernel.  Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

from hardfocus_fused.kernels import backward_deterministic, backward_fused, backward_matmul, forward
from hardfocus_fused.kernels.config import ARCHITECTURES, default_configs
from hardfocus_fused.kernels.problem import HeadProblem, launch_flags
from hardfocus_fused.tokens import partition_active

from .report import table

HOPPER_MAX_SHARED_BYTES = 232448  # 227 KiB of shared memory per block on sm_90
HOPPER_SMS = 132  # H100 SXM and H200: the forward's split count depends on it
# (N, H, V): the benchmark heads, and a small batch on the Llama-3 head (the small-N class).
HEADS = {"gemma2-2b": (8192, 2304, 256000), "llama3-8b": (16384, 4096, 128256), "llama3-8b-n512": (512, 4096, 128256)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Every kernel the launchers launch: its name here, and where the launcher finds it.
_LAUNCHED = {
    "forward": (forward, "_lse_forward_kernel"),
    "backward": (backward_fused, "_lce_backward_kernel"),
    "grad_hidden (det.)": (backward_deterministic, "_grad_hidden_kernel"),
    "grad_weight (det.)": (backward_deterministic, "_grad_weight_kernel"),
    "dlogits (matmul)": (backward_matmul, "_dlogits_kernel"),
}
KERNELS = {name: getattr(module, attr) for name, (module, attr) in _LAUNCHED.items()}


@dataclass
class Variant:
    """One compiled launch and what it uses."""

    head: str
    dtype: str
    kernel: str
    flags: str
    blocks: str
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    membar: int
    red: int
    atom: int
    mma: str  # the tensor-core MMA instructions in the SASS (HGMMA, HMMA, UTCHMMA), or "-"

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, name: str, kernel, launches: list) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(launches: list):
    """Every kernel launch of the package's launchers is appended to ``launches``, and
    nothing large is computed (gradient buffers are left uninitialised, the library
    matmuls of the ``"matmul"`` strategy are skipped); the forward's split count is
    sized for a Hopper GPU."""
    saved = []
    try:
        for name, (module, attr) in _LAUNCHED.items():
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, _Recorder(name, getattr(module, attr), launches))
        for module, attr, value in (
            (forward, "device_sm_count", lambda device: HOPPER_SMS),
            (backward_fused, "_fp32_zeros", _uninitialised),
            (backward_matmul, "_mm", _skip_mm),
        ):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield launches
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _uninitialised(problem, *shape):
    return torch.empty(shape, dtype=torch.float32)


def _skip_mm(a, b, out=None, accumulate=False):
    return out if out is not None else torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)


class _Placeholders:
    """Tensors of ``head``'s shapes in ``dtype`` for the launchers to launch on: never
    touched (the launches are recorded, not run), so no memory is committed."""

    def __init__(self, head: str, dtype: torch.dtype, capability: int = 90) -> None:
        n_tokens, n_hidden, n_vocab = HEADS[head]
        self.dtype = dtype
        self.hidden = torch.empty((n_tokens, n_hidden), dtype=dtype)
        self.weight = torch.empty((n_vocab, n_hidden), dtype=dtype)
        self.bias = torch.empty(n_vocab, dtype=dtype)
        self.targets = torch.zeros(n_tokens, dtype=torch.int64)
        self.order, self.n_active = partition_active(torch.ones(n_tokens, dtype=torch.bool))
        self.stats = torch.empty((n_tokens, 2))
        self.coef = torch.ones(n_tokens)
        self.class_weight = torch.empty(n_vocab)
        self.rich = torch.empty((n_tokens, 5))  # (a, e, u[, k, mu]): wide enough for the entropy's too
        self.default_configs = default_configs(n_tokens, n_vocab, n_hidden, dtype, capability)

    def problem(self, config, with_bias=True, terms=False, entropy=None) -> HeadProblem:
        """With a bias and a soft-cap (or neither), and every extra loss term (or none; the
        entropy alone with ``entropy=True``, as the policy-gradient losses use it)."""
        entropy = False if entropy is None else entropy
        return HeadProblem(
            self.hidden,
            self.weight,
            self.bias if with_bias else None,
            self.targets,
            self.order,
            self.n_active,
            30.0 if with_bias else None,
            self.dtype,
            config,
            class_weight=self.class_weight if terms else None,
            smooth=terms,
            argmax=terms,
            rich_coef=terms or entropy,
            entropy=entropy,
        )


def launches_of(head: str, dtype: torch.dtype, configs=None, capability: int = 90) -> list:
    """The launches of a forward and of every backward variant on ``head`` in ``dtype``
    (with ``configs``, default: the package's): with and without bias and soft-cap,
    trainable and frozen head, the deterministic kernels, the ``"matmul"`` strategy's
    elementwise kernel, each with every extra loss term on (``op.loss_terms``), and each with
    the entropy alone; the forward and the atomic backward with every term and the entropy."""
    head_tensors = _Placeholders(head, dtype, capability)
    configs = configs or head_tensors.default_configs
    problem, stats, coef, rich = head_tensors.problem, head_tensors.stats, head_tensors.coef, head_tensors.rich
    launches: list = []

    with recording(launches):
        forward.lse_forward(problem(configs.forward))
        forward.lse_forward(problem(configs.forward, with_bias=False))
        backward_fused.lce_backward(problem(configs.backward), stats, coef)
        backward_fused.lce_backward(problem(configs.backward), stats, coef, need_weight=False)
        backward_fused.lce_backward(problem(configs.deterministic), stats, coef, deterministic=True)
        backward_matmul.matmul_backward(problem(configs.backward), stats, coef, configs.matmul_chunk_bytes)
        # Every extra loss term on (label smoothing with class weights, argmax, rich coefficients).
        forward.lse_forward(problem(configs.forward, terms=True))
        backward_fused.lce_backward(problem(configs.backward, terms=True), stats, rich)
        backward_fused.lce_backward(problem(configs.deterministic, terms=True), stats, rich, deterministic=True)
        backward_matmul.matmul_backward(problem(configs.backward, terms=True), stats, rich, configs.matmul_chunk_bytes)
        # ... and the entropy too, in the kernels with the most live state.
        forward.lse_forward(problem(configs.forward_for(entropy=True), terms=True, entropy=True))
        backward_fused.lce_backward(problem(configs.backward, terms=True, entropy=True), stats, rich)
        # The entropy alone (log-probs and entropy for policy-gradient losses), no bias or soft-cap.
        forward.lse_forward(problem(configs.forward_for(entropy=True), with_bias=False, entropy=True))
        backward_fused.lce_backward(problem(configs.backward, with_bias=False, entropy=True), stats, rich)
        backward_fused.lce_backward(
            problem(configs.deterministic, with_bias=False, entropy=True), stats, rich, deterministic=True
        )
        backward_matmul.matmul_backward(
            problem(configs.backward, with_bias=False, entropy=True), stats, rich, configs.matmul_chunk_bytes
        )
        # The three-product path's forward reads stored logits (plain, and with every term).
        stored = torch.empty((head_tensors.hidden.shape[0], head_tensors.weight.shape[0]))
        for terms in (False, True):
            forward.lse_forward(problem(stored_logits_config(configs), terms=terms), logits=stored)
    return launches


def stored_logits_config(configs):
    """The tile the three-product path reads stored logits with (``op.forward_gradients``)."""
    from hardfocus_fused.op.forward_gradients import STATS_CONFIG

    return dataclasses.replace(STATS_CONFIG, fp32_precision=configs.forward.fp32_precision)


def compile_launch(kernel, args: tuple, kwargs: dict, capability: int = 90):
    """``kernel`` compiled for ``sm_<capability>`` as the JIT compiles it for this launch."""
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=backend.target, options=options.__dict__)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(compiled) -> dict:
    """Registers, stack and local memory (``cuobjdump -res-usage``), shared memory, the
    SASS counts of memory barriers, reductions and atomics of a compiled kernel, and which
    tensor-core MMA instructions it has (``mma``: ``HGMMA`` is Hopper's wgmma, ``HMMA``
    mma.sync, ``UTCHMMA`` Blackwell's tcgen05; "-" for none: FMA products)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)

    def field(key):
        return int(re.search(rf"\b{key}:(\d+)", usage).group(1))

    opcodes = [line.split(";")[0] for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]

    def count(op):
        return sum(bool(re.search(rf"\b{op}\b", line)) for line in opcodes)

    mma = sorted({m for line in opcodes for m in re.findall(r"\b(UTC\w*MMA|HGMMA|HMMA)\b", line)})
    return dict(
        registers=field("REG"),
        stack=field("STACK"),
        local=field("LOCAL"),
        shared=compiled.metadata.shared,
        membar=count("MEMBAR"),
        red=count(r"REDG?(\.\S+)?"),
        atom=count(r"ATOMG?(\.\S+)?"),
        mma=" ".join(mma) or "-",
    )


_FLAGS = (
    "HAS_BIAS",
    "HAS_SOFTCAP",
    "GRAD_HIDDEN",
    "GRAD_WEIGHT",
    "GRAD_BIAS",
    "SMOOTH",
    "CLASS_WEIGHT",
    "ARGMAX",
    "RICH_COEF",
    "ENTROPY",
    "STORED_LOGITS",
)


def variants(heads=tuple(HEADS), dtypes=tuple(DTYPES), capability: int = 90) -> list[Variant]:
    """Every distinct launched variant on ``heads`` x ``dtypes``, compiled and measured."""
    seen, out = set(), []
    for head in heads:
        for dtype_name in dtypes:
            for name, kernel, args, kwargs in launches_of(head, DTYPES[dtype_name], capability=capability):
                compiled = compile_launch(kernel, args, kwargs, capability)
                if compiled.hash in seen:
                    continue
                seen.add(compiled.hash)
                launched = launch_flags(args, kwargs)
                flags = " ".join(f for f in _FLAGS if launched.get(f)) or "-"
                blocks = "x".join(str(kwargs[b]) for b in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if b in kwargs)
                out.append(
                    Variant(
                        head,
                        dtype_name,
                        name,
                        flags,
                        blocks,
                        compiled.metadata.num_warps,
                        compiled.metadata.num_stages,
                        **resources(compiled),
                    )
                )
    return out


def sweep_candidates(head: str = "llama3-8b", capability: int = 90) -> list[dict]:
    """Each ``"fused"`` candidate of ``benchmarks.sweep`` on ``head`` in bf16, compiled as
    the sweep launches it (no bias, no soft-cap, no extra loss terms): ``{"pass",
    "config", **resources}``.  A candidate that spills is not worth a GPU's time."""
    from .sweep import cases

    head_tensors = _Placeholders(head, torch.bfloat16)
    rows = []
    for kind, strategy, configs, label in cases(head_tensors.default_configs):
        if strategy == "matmul":
            continue
        problem = head_tensors.problem(configs.forward if kind == "fwd" else configs.backward, with_bias=False)
        launches: list = []
        with recording(launches):
            if kind == "fwd":
                forward.lse_forward(problem)
            else:
                backward_fused.lce_backward(problem, head_tensors.stats, head_tensors.coef)
        _, kernel, args, kwargs = launches[0]
        rows.append({"pass": kind, "config": label, **resources(compile_launch(kernel, args, kwargs, capability))})
    return rows


def launched(heads=("gemma2-2b", "llama3-8b")) -> list[dict]:
    """On a GPU: the kernels the JIT actually compiled for a forward and backward of each
    head in bf16 (both backward strategies and the deterministic kernels), with the
    registers, spills and shared memory the driver reports."""
    from hardfocus_fused.op.dispatch import token_nll

    for head in heads:
        n_tokens, n_hidden, n_vocab = HEADS[head]
        hidden = (torch.randn(n_tokens, n_hidden, device="cuda") * 0.1).bfloat16().requires_grad_()
        weight = (torch.randn(n_vocab, n_hidden, device="cuda") * 0.02).bfloat16().requires_grad_()
        targets = torch.randint(0, n_vocab, (n_tokens,), device="cuda")
        for backward_impl, deterministic in (("fused", False), ("fused", True), ("matmul", False)):
            nll = token_nll(
                hidden,
                weight,
                targets,
                None,
                -100,
                None,
                "triton",
                deterministic=deterministic,
                backward_impl=backward_impl,
            )
            torch.autograd.grad(nll.mean(), (hidden, weight))
        del hidden, weight
        torch.cuda.empty_cache()
    rows = []
    for name, kernel in KERNELS.items():
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                rows.append(
                    dict(
                        kernel=name,
                        num_warps=compiled.metadata.num_warps,
                        num_stages=compiled.metadata.num_stages,
                        registers=compiled.n_regs,
                        spills=compiled.n_spills,
                        shared=compiled.metadata.shared,
                    )
                )
    return rows


def markdown(rows: list[Variant], meta: dict) -> str:
    arch = ARCHITECTURES.get(meta["capability"])
    limit = f"; a block may have {arch.shared_bytes // 1024} KiB of shared memory there" if arch else ""
    lines = [
        f"# Kernel resources, sm_{meta['capability']}, launch-time specialisation",
        "",
        f"{meta['date']}; triton {meta['triton']}, torch {meta['torch']}; compiled on a CPU-only machine "
        f"with Triton's bundled ptxas (no GPU: nothing here is a timing). "
        f"`python -m benchmarks.kernel_resources`. One row per distinct compiled kernel: a launch that "
        f"specialises exactly like one above (another head with the same argument divisibility) is not "
        f"repeated. stack/local: bytes of spilled registers; RED/ATOM/MEMBAR: global reductions, atomics "
        f"and memory barriers in the SASS; MMA: the tensor-core instructions (HGMMA: wgmma, HMMA: "
        f"mma.sync, UTCHMMA: tcgen05; - for none). The configurations are the package's defaults for this "
        f"architecture (`kernels.config.ARCHITECTURES`){limit}.",
        "",
        *table(
            [
                "head",
                "dtype",
                "kernel",
                "flags",
                "blocks N x V x H",
                "warps",
                "stages",
                "regs",
                "stack",
                "local",
                "shared KiB",
                "MEMBAR",
                "RED",
                "ATOM",
                "MMA",
            ],
            [
                [
                    r.head,
                    r.dtype,
                    r.kernel,
                    r.flags,
                    r.blocks,
                    r.num_warps,
                    r.num_stages,
                    r.registers,
                    r.stack,
                    r.local,
                    f"{r.shared / 1024:.0f}",
                    r.membar,
                    r.red,
                    r.atom,
                    r.mma,
                ]
                for r in rows
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--arch",
        choices=sorted(a.name for a in ARCHITECTURES.values()),
        default=None,
        help="the architecture to compile for (default sm_90a; or --capability)",
    )
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 86 for sm_86")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated benchmark heads")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (bf16, fp16, fp32)")
    parser.add_argument(
        "--launched",
        action="store_true",
        help="on a GPU: report the kernels the JIT compiled for real launches on both heads",
    )
    parser.add_argument(
        "--sweep-candidates",
        action="store_true",
        help="print the resources of benchmarks.sweep's candidates (JSON lines)",
    )
    args = parser.parse_args(argv)
    if args.arch is not None:
        args.capability = next(c for c, a in ARCHITECTURES.items() if a.name == args.arch)
    if args.sweep_candidates:
        for row in sweep_candidates(capability=args.capability):
            print(json.dumps(row))
        return
    if args.launched:
        rows = launched()
        path = Path(args.out) / f"kernel-resources-launched-{datetime.date.today().isoformat()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                dict(
                    device=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__, rows=rows
                ),
                indent=1,
            )
        )
        for row in rows:
            print(row)
        return
    rows = variants(
        heads=tuple(h for h in args.heads.split(",") if h),
        dtypes=tuple(d for d in args.dtypes.split(",") if d),
        capability=args.capability,
    )
    meta = dict(
        date=datetime.date.today().isoformat(),
        triton=triton.__version__,
        torch=torch.__version__,
        capability=args.capability,
    )
    stem = Path(args.out) / f"kernel-resources-sm{args.capability}-{meta['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, variants=[asdict(r) for r in rows]), indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
