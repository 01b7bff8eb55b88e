"""Layer suite: every convolution and pooling case timed with each backward mode, side by side in one process.

Conv: the forward, dX alone, dW alone and the whole forward + backward (y, dX, dW, db) for backward="autodiff",
"textbook", "custom" and "composable"; pools: forward, dX and forward + backward for "autodiff", "custom" and
"composable" (custom/composable: the custom_vjp's time over the primitives'). With PyTorch
importable, the same layer in PyTorch eager (channels_last) is timed as a reference right after, in rounds of its
own (its idle OpenMP workers would slow the JAX call after each of its own).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from convlib import ops
from convlib.ops.geometry import conv_geometry
from convlib.ops.plan import plan
from experiments.benchmarks.machine import gemm_call, gflops, torch_device, torch_module
from experiments.timing import compiled_program, interleaved_times, jit

CONV_MODES = ("autodiff", "textbook", "custom", "composable")
POOL_MODES = ("autodiff", "custom", "composable")


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution: `batch` images of `spatial` x `c_in` channels, `c_out` filters of side `kernel`."""

    name: str
    batch: int
    spatial: tuple[int, ...]
    c_in: int
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    def options(self, layout: str) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups, layout=layout)

    def arrays(self, layout: str, key):
        """x, w, b in `layout` (float32), w scaled by 1/sqrt(fan-in)."""
        kx, kw, kb = jax.random.split(key, 3)
        kernel = (self.kernel,) * self.ndim
        axes = ops.layout_axes(layout, self.ndim)
        x_shape = axes.array_shape(self.batch, self.c_in, self.spatial)
        w_shape = axes.kernel_shape(kernel, self.c_in // self.groups, self.c_out)
        fan_in = self.kernel**self.ndim * self.c_in // self.groups
        return (
            jax.random.normal(kx, x_shape),
            jax.random.normal(kw, w_shape) / math.sqrt(fan_in),
            jax.random.normal(kb, (self.c_out,)),
        )

    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (h + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1 for h in self.spatial
        )

    def flops(self) -> int:
        """2 x the multiply-adds of the forward (dX and dW have as many)."""
        return (
            2
            * self.batch
            * math.prod(self.out_spatial())
            * self.c_out
            * self.kernel**self.ndim
            * self.c_in
            // self.groups
        )

    def describe(self) -> str:
        extra = "".join(f" {k}{v}" for k, v in (("s", self.stride), ("d", self.dilation), ("g", self.groups)) if v > 1)
        size = "x".join(map(str, self.spatial))
        return f"{self.batch}x{size} {self.c_in}->{self.c_out} k{self.kernel}{extra}"


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """One pooling layer over `batch` images of `spatial` x `channels` (NHWC)."""

    name: str
    kind: str  # "max" or "avg"
    batch: int
    spatial: tuple[int, int]
    channels: int
    window: int
    stride: int
    padding: int = 0

    def function(self, backward: str):
        pool = ops.max_pool if self.kind == "max" else ops.avg_pool
        return lambda x: pool(x, self.window, self.stride, self.padding, backward=backward)

    def describe(self) -> str:
        size = "x".join(map(str, (self.batch, *self.spatial, self.channels)))
        return f"{size} {self.kind} {self.window}/{self.stride}"


CONV_CASES = (
    ConvCase("LeNet-5 C1", 256, (32, 32), 1, 6, 5),
    ConvCase("LeNet-5 C3", 256, (14, 14), 6, 16, 5),
    ConvCase("ResNet-20 stem", 128, (32, 32), 3, 16, 3, padding=1),
    ConvCase("VGG-small conv1", 128, (32, 32), 3, 64, 3, padding=1),
    ConvCase("AlexNet-small conv1", 128, (32, 32), 3, 48, 5, padding=2),
    ConvCase("ResNet-20 stage 1", 128, (32, 32), 16, 16, 3, padding=1),
    ConvCase("ResNet-20 down 2", 128, (32, 32), 16, 32, 3, stride=2, padding=1),
    ConvCase("ResNet-20 stage 2", 128, (16, 16), 32, 32, 3, padding=1),
    ConvCase("ResNet-20 down 3", 128, (16, 16), 32, 64, 3, stride=2, padding=1),
    ConvCase("ResNet-20 stage 3", 128, (8, 8), 64, 64, 3, padding=1),
    ConvCase("VGG-small block 4", 128, (4, 4), 512, 512, 3, padding=1),
    ConvCase("VGG-small block 5", 128, (2, 2), 512, 512, 3, padding=1),
    ConvCase("dilated 2", 128, (16, 16), 32, 32, 3, padding=2, dilation=2),
    ConvCase("AlexNet-small conv2 g2", 128, (15, 15), 48, 128, 5, padding=2, groups=2),
    ConvCase("AlexNet-small conv4 g2", 128, (7, 7), 192, 192, 3, padding=1, groups=2),
    ConvCase("depthwise", 128, (16, 16), 32, 32, 3, padding=1, groups=32),
    ConvCase("depthwise x2", 128, (16, 16), 32, 64, 3, stride=2, padding=1, groups=32),
    ConvCase("1-D k5", 128, (256,), 32, 32, 5, padding=2),
    ConvCase("1-D k5 s2", 128, (256,), 32, 64, 5, stride=2, padding=2),
    ConvCase("3-D k3", 16, (16, 16, 16), 8, 16, 3, padding=1),
)
QUICK_CONV_CASES = (ConvCase("quick down", 2, (8, 8), 4, 8, 3, stride=2, padding=1),)

POOL_CASES = (
    PoolCase("max 2/2 (LeNet, VGG)", "max", 128, (32, 32), 16, 2, 2),
    PoolCase("max 3/2 overlapping (AlexNet)", "max", 128, (31, 31), 48, 3, 2),
    PoolCase("avg 2/2 (LeNet S2)", "avg", 256, (28, 28), 6, 2, 2),
)
QUICK_POOL_CASES = (PoolCase("quick max", "max", 2, (8, 8), 4, 3, 2, 1),)


# --------------------------------------------------------------------------- conv


def conv_calls(case: ConvCase, layout: str, modes, key) -> dict:
    """name -> (jitted fn, args): "forward" and "<mode> dX" / "<mode> dW" / "<mode> fwd+bwd" for each mode."""
    x, w, b = case.arrays(layout, key)
    options = case.options(layout)
    y = ops.conv(x, w, b, **options)
    g = jax.random.normal(jax.random.fold_in(key, 1), y.shape)
    calls = {"forward": (jit(lambda x, w, b: ops.conv(x, w, b, **options)), (x, w, b))}
    for mode in modes:

        def f(x, w, b, mode=mode):
            return ops.conv(x, w, b, **options, backward=mode)

        calls[f"{mode} dX"] = (jit(lambda x, w, b, g, f=f: jax.vjp(lambda x: f(x, w, b), x)[1](g)), (x, w, b, g))
        calls[f"{mode} dW"] = (jit(lambda x, w, b, g, f=f: jax.vjp(lambda w: f(x, w, b), w)[1](g)), (x, w, b, g))
        calls[f"{mode} fwd+bwd"] = (jit(lambda x, w, b, g, f=f: _value_and_vjp(f, g, x, w, b)), (x, w, b, g))
    return calls


def _value_and_vjp(f, g, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(g)


def torch_conv_calls(case: ConvCase, torch) -> dict:
    """The same layer in PyTorch eager, channels_last (channels_last_3d for 3-D): forward, dX, dW, fwd+bwd."""
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[case.ndim]
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(case.ndim, torch.contiguous_format)
    x, w, b = (torch.from_numpy(np.array(a)).to(torch_device(torch)) for a in case.arrays("NCHW", jax.random.key(0)))
    x, w = x.to(memory_format=fmt), w.to(memory_format=fmt)
    conv = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    with torch.no_grad():
        g = torch.randn_like(fn(x, w, b, **conv))
    n = case.ndim

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            [case.c_out],
            [case.stride] * n,
            [case.padding] * n,
            [case.dilation] * n,
            False,
            [0] * n,
            case.groups,
            mask,
        )

    def fwd_bwd():
        return fn(x, w, b, **conv), backward([True, True, True])

    calls = {
        "forward": lambda: fn(x, w, b, **conv),
        "dX": lambda: backward([True, False, False]),
        "dW": lambda: backward([False, True, False]),
        "fwd+bwd": fwd_bwd,
    }
    return {f"torch {k}": (_no_grad(torch, v), ()) for k, v in calls.items()}


def _no_grad(torch, fn):
    def call():
        with torch.no_grad():
            fn()

    return _synchronised(torch, call)


def _synchronised(torch, fn):
    """fn, then waiting for the GPU (if any): a time then covers the work, not its launch."""

    def call():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return call


def _jax_then_torch(jax_calls: dict, torch_calls: dict, repeats: int) -> dict:
    """`interleaved_times` of JAX's calls, then of PyTorch's reference calls in turns of their own: interleaved with
    them, PyTorch's spinning OpenMP workers slowed the JAX call after each of its own (:mod:`experiments.timing`)."""
    times = interleaved_times(jax_calls, repeats)
    return {**times, **interleaved_times(torch_calls, repeats)} if torch_calls else times


def conv_row(case: ConvCase, layout: str, modes, repeats: int, gemm, with_torch: bool, key) -> dict:
    """Times one conv case in one layout, with the GEMM `gemm` (fn, args, flop) in the same rounds; returns its
    row (ms, GFLOP/s, fraction of that GEMM's GFLOP/s, ratios to autodiff)."""
    calls = {**conv_calls(case, layout, modes, key), "gemm": gemm[:2]}
    torch = torch_module() if with_torch else None
    times = _jax_then_torch(calls, torch_conv_calls(case, torch) if torch is not None else {}, repeats)
    flop = case.flops()
    x, w, _ = case.arrays(layout, key)
    planned = plan(conv_geometry(x, w, **case.options(layout)), x.shape, w.shape, jax.default_backend())
    gemm_gflops = gflops(gemm[2], times.pop("gemm")["ms"])
    row = {
        "layer": case.name,
        "layout": layout,
        "shape": case.describe(),
        "gflop": flop / 1e9,
        "custom plan": str(planned),
        "gemm GFLOP/s": gemm_gflops,
    }
    for name, t in times.items():
        work = 3 * flop if name.endswith("fwd+bwd") else flop
        row[f"{name} ms"], row[f"{name} best ms"], row[f"{name} cpu_ms"] = t["ms"], t["best_ms"], t["cpu_ms"]
        row[f"{name} GFLOP/s"] = gflops(work, t["ms"])
        row[f"{name} of GEMM"] = gflops(work, t["ms"]) / gemm_gflops
    for mode in modes[1:]:
        for part in ("dX", "dW"):
            row[f"{mode}/autodiff {part}"] = times[f"{mode} {part}"]["ms"] / times[f"autodiff {part}"]["ms"]
        row.update(_fwd_bwd_ratios(times, mode))
    if "composable" in modes:
        row.update(_custom_over_composable(times))
    # where the plan reorders nothing, custom compiles to autodiff's very program: its ratio is the noise
    # (both are compiled already: these calls hit JAX's cache)
    (custom, custom_args), (autodiff, autodiff_args) = calls["custom fwd+bwd"], calls["autodiff fwd+bwd"]
    row["custom program = autodiff's"] = compiled_program(custom, *custom_args) == compiled_program(
        autodiff, *autodiff_args
    )
    return row


# --------------------------------------------------------------------------- pools


def pool_row(case: PoolCase, repeats: int, with_torch: bool, key) -> dict:
    """Times one pooling case: forward, dX and forward + backward for each mode (and PyTorch's)."""
    x = jax.random.normal(key, (case.batch, *case.spatial, case.channels))
    g = jax.random.normal(jax.random.fold_in(key, 1), case.function("custom")(x).shape)
    calls = {"forward": (jit(case.function("autodiff")), (x,))}
    for mode in POOL_MODES:
        f = case.function(mode)
        calls[f"{mode} dX"] = (jit(lambda x, g, f=f: jax.vjp(f, x)[1](g)), (x, g))
        calls[f"{mode} fwd+bwd"] = (jit(lambda x, g, f=f: _value_and_vjp(f, g, x)), (x, g))
    torch = torch_module() if with_torch else None
    times = _jax_then_torch(calls, _torch_pool_calls(case, x, g, torch) if torch is not None else {}, repeats)
    row = {"layer": case.name, "shape": case.describe()}
    for name, t in times.items():
        row[f"{name} ms"], row[f"{name} best ms"], row[f"{name} cpu_ms"] = t["ms"], t["best_ms"], t["cpu_ms"]
    row["custom/autodiff dX"] = times["custom dX"]["ms"] / times["autodiff dX"]["ms"]
    return {**row, **_fwd_bwd_ratios(times, "custom"), **_custom_over_composable(times)}


# The estimates of a mode's forward + backward time over autodiff's: key suffix -> the time of `interleaved_times`.
# Medians of wall time (the headline, as recorded since 2026-11-28), fastest calls (steadiest where other tenants
# slow calls down), medians of CPU time.
ESTIMATES = {"": "ms", " best": "best_ms", " cpu": "cpu_ms"}
ESTIMATE_NAMES = dict(zip(("median", "best", "cpu"), ESTIMATES))  # summary key -> key suffix
# keys of the summary
SAME_PROGRAM_ROWS = "rows where custom compiles to autodiff's program"
OWN_PROGRAMS_WORST = "worst of custom's own programs"
NOISE_RANGE = "range on autodiff's program"


def _fwd_bwd_ratios(times: dict, mode: str) -> dict:
    """`<mode>/autodiff fwd+bwd<suffix>` for each estimate of ESTIMATES."""
    return {
        f"{mode}/autodiff fwd+bwd{suffix}": times[f"{mode} fwd+bwd"][t] / times["autodiff fwd+bwd"][t]
        for suffix, t in ESTIMATES.items()
    }


def _custom_over_composable(times: dict) -> dict:
    """`custom/composable fwd+bwd`: the custom_vjp's forward + backward time over the composable primitives'."""
    return {"custom/composable fwd+bwd": times["custom fwd+bwd"]["ms"] / times["composable fwd+bwd"]["ms"]}


def _torch_pool_calls(case: PoolCase, x, g, torch) -> dict:
    pool = torch.nn.functional.max_pool2d if case.kind == "max" else torch.nn.functional.avg_pool2d
    tx, tg = (
        torch.from_numpy(np.array(jnp.moveaxis(a, -1, 1)))
        .to(torch_device(torch))
        .contiguous(memory_format=torch.channels_last)
        for a in (x, g)
    )
    tx.requires_grad_(True)

    def forward():
        with torch.no_grad():
            pool(tx, case.window, case.stride, case.padding)

    def fwd_bwd():
        torch.autograd.grad(pool(tx, case.window, case.stride, case.padding), tx, tg)

    return {"torch forward": (_synchronised(torch, forward), ()), "torch fwd+bwd": (_synchronised(torch, fwd_bwd), ())}


# --------------------------------------------------------------------------- suite


def run(quick: bool, repeats: int, layouts, modes, gemm_size: int, with_torch: bool, seed: int, progress) -> dict:
    """All rows of the layer suite and their summary; `modes`: the conv backward modes, "autodiff" first;
    each conv row times a float32 GEMM of side `gemm_size` in its rounds, its ceiling."""
    gemm = gemm_call(gemm_size)
    key = jax.random.key(seed)
    conv_cases = QUICK_CONV_CASES if quick else CONV_CASES
    pool_cases = QUICK_POOL_CASES if quick else POOL_CASES
    jobs = [(c, layout) for c in conv_cases for layout in layouts]
    conv_rows = [
        conv_row(c, layout, modes, repeats, gemm, with_torch, jax.random.fold_in(key, i))
        for i, (c, layout) in enumerate(progress(jobs, "conv layers"))
    ]
    pool_rows = [
        pool_row(c, repeats, with_torch, jax.random.fold_in(key, 1000 + i))
        for i, c in enumerate(progress(pool_cases, "pools"))
    ]
    return {"conv": conv_rows, "pool": pool_rows, "summary": summary(conv_rows, conv_cases)}


def summary(rows, cases) -> dict:
    """custom/autodiff forward + backward per estimate of ESTIMATES ("median", "best", "cpu"): geometric mean,
    worst row, worst of the rows where custom compiles to its own program, and the range on the rows where it
    compiles to autodiff's (that range is the estimate's noise in this run); and the weight gradient's fraction of
    the GEMM ceiling on the 3x3 layers with >= 16 channels."""
    by_name = {c.name: c for c in cases}
    own_programs = [r for r in rows if not r["custom program = autodiff's"]]
    same_programs = [r for r in rows if r["custom program = autodiff's"]]
    wide_3x3 = [
        r
        for r in rows
        if by_name[r["layer"]].kernel == 3
        and by_name[r["layer"]].ndim == 2
        and min(by_name[r["layer"]].c_in, by_name[r["layer"]].c_out) >= 16
        and by_name[r["layer"]].groups == 1
    ]
    return {
        **{
            name: _estimate_summary(f"custom/autodiff fwd+bwd{suffix}", rows, own_programs, same_programs)
            for name, suffix in ESTIMATE_NAMES.items()
        },
        SAME_PROGRAM_ROWS: len(same_programs),
        "custom dW of GEMM (3x3, >= 16 channels)": {
            f"{r['layer']} {r['layout']}": r["custom dW of GEMM"] for r in wide_3x3
        },
        "gemm GFLOP/s median": statistics.median(r["gemm GFLOP/s"] for r in rows),
    }


def _estimate_summary(key: str, rows, own_programs, same_programs) -> dict:
    ratios = [r[key] for r in same_programs]
    return {
        "geomean": math.exp(statistics.fmean(math.log(r[key]) for r in rows)),
        "worst": _worst(rows, key),
        OWN_PROGRAMS_WORST: _worst(own_programs, key),
        NOISE_RANGE: [min(ratios), max(ratios)] if ratios else None,
    }


def _worst(rows, key: str) -> dict | None:
    worst = max(rows, key=lambda r: r[key], default=None)
    return None if worst is None else {"layer": worst["layer"], "layout": worst["layout"], "ratio": worst[key]}


CONV_COLUMNS = (
    "layer",
    "layout",
    "shape",
    "forward GFLOP/s",
    "autodiff dX GFLOP/s",
    "custom dX GFLOP/s",
    "autodiff dW GFLOP/s",
    "custom dW GFLOP/s",
    "gemm GFLOP/s",
    "custom dW of GEMM",
    "autodiff fwd+bwd ms",
    "textbook fwd+bwd ms",
    "custom fwd+bwd ms",
    "custom/autodiff fwd+bwd",
    "custom/autodiff fwd+bwd best",
    "custom/autodiff fwd+bwd cpu",
    "composable fwd+bwd ms",
    "custom/composable fwd+bwd",
    "custom program = autodiff's",
    "torch fwd+bwd ms",
    "custom plan",
)
POOL_COLUMNS = (
    "layer",
    "shape",
    "forward ms",
    "autodiff dX ms",
    "custom dX ms",
    "autodiff fwd+bwd ms",
    "custom fwd+bwd ms",
    "custom/autodiff fwd+bwd",
    "custom/autodiff fwd+bwd best",
    "composable fwd+bwd ms",
    "custom/composable fwd+bwd",
    "torch fwd+bwd ms",
)
