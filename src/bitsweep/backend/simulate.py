"""The integer-exact simulation: a lowered program run with fast float kernels.

Fake-quant (quantize, dequantize, compute in float) is how quantization is
usually simulated, but its float32 convolutions round where integer
hardware does not, so a few images in a thousand change class once
deployed. bitsweep's accuracies come from this executor instead. It runs the
program of :mod:`bitsweep.backend.lowering` with *integers held in float32
tensors* between layers, so convolutions use the fast float kernels (oneDNN
on CPU): sums of integers are exact in float32 while they stay below 2**24,
which the lowering checks per layer from the worst-case accumulator.
Requantization ``(acc * m0 + 2**(shift-1)) >> shift`` runs in float64,
exactly: the lowering keeps ``|acc| * m0 < 2**52``, so ``y = acc * m0 *
2**-shift + 1/2`` is exact and so is ``floor(y)``. (The integer reference computes
the same thing with int64 multiplies and shifts; float64 is used here
because CPUs without AVX-512 have no vector int64 multiply or arithmetic
shift, and int64 requantization was most of the time on AVX2-only CPUs.)
Every intermediate integer therefore equals the reference's
(:mod:`bitsweep.backend.intref`), and so do the logits.

Convolutions whose operands fit in 8 bits run on oneDNN's int8 kernels
where they sum exactly (:func:`int8_pair_limit`, measured once per process):
where the kernels sum in int32 (VNNI, AMX) always; where they add pairs of
``u8 x s8`` products into a saturating int16 (AVX2-only x86 CPUs, or any x86
CPU with ``ONEDNN_MAX_CPU_ISA=AVX2``), only when every pair is below 2**15,
and otherwise with the weights split into parts that each keep that bound
(two parts at 8-bit weights and activations; the part sums add exactly).

Layers whose worst-case sum can reach 2**24 (16-bit weights or activations)
are listed in ``Program.inexact``: their float32 sums may round by a unit in
the last place, like fake-quant's. Linear layers run in float64 (exact
below 2**53; they are small).

Speed: the requantization is several elementwise int64 passes in eager
mode, so :class:`CompiledRunner` compiles the program once with
``torch.compile`` (every per-configuration number is a tensor input, so
all bit widths of one model share one compiled graph) and fuses each
requantization into one pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.backend import lowering as lw
from bitsweep.errors import BitsweepError
from bitsweep.runtime import compile_options

Plan = tuple[tuple[Any, ...], ...]  # static, hashable: op kinds, value names, conv geometry, tensor indices


def _requant_consts(m0: torch.Tensor, shift: torch.Tensor, binary: bool, constant: int | None, lo: int, hi: int,
                    dim: int) -> list[torch.Tensor]:  # fmt: skip
    """``(ms, c, lo, hi)`` of ``clamp(floor(acc * ms + c), lo, hi)``: ``ms``, ``c`` float64, ``lo``, ``hi`` float32.

    ``ms = m0 * 2**-shift`` and ``c = 1/2`` give ``(acc * m0 + 2**(shift-1)) >> shift``. A binary
    output ``+1 if acc >= 0 else -1`` is ``ms = 2, c = 1``: ``2 acc + 1`` clamped to [-1, 1]; a
    constant +-1 is ``ms = 0, c = 1`` clamped to ``[constant, constant]``. The clamp bounds
    are integers below 2**24 (or powers of two), so float32 holds them exactly.
    """
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    if binary:
        ms = torch.full(m0.shape, 0.0 if constant is not None else 2.0, dtype=torch.float64)
        c = torch.ones(m0.shape, dtype=torch.float64)
        if constant is not None:
            lo = hi = constant
    else:
        ms = m0.double() * torch.pow(2.0, -shift.double())  # exact: a power of two times an integer below 2**31
        c = torch.full(m0.shape, 0.5, dtype=torch.float64)
    return [lw.channel_view(ms, dim), lw.channel_view(c, dim), f32(lo), f32(hi)]


INT16_PAIR_LIMIT = 2**15 - 1  # AVX2 int8 kernels: vpmaddubsw adds two u8 x s8 products into a saturating int16


@functools.cache
def int8_pair_limit() -> float | None:
    """How exactly oneDNN's int8 (``u8 x s8``) convolutions sum in this process.

    Returns ``inf`` when products are summed in int32 (VNNI or AMX: exact),
    :data:`INT16_PAIR_LIMIT` on other x86 CPUs with AVX2 (pairs of products are summed
    into a saturating int16 first, so ``|x1 w1 + x2 w2|`` must stay below 2**15 for the
    sum to be exact), and None elsewhere (int8 kernels not used).

    Which of the two is *measured*, not read from the CPU's flags: oneDNN can be told to
    use fewer instructions than the CPU has (``ONEDNN_MAX_CPU_ISA=AVX2`` on a VNNI machine
    gives the AVX2 kernels), so one small convolution whose pairs would saturate decides.
    Cached: the answer cannot change within a process (oneDNN reads its settings once).
    """
    try:
        cap = torch._C._cpu._get_cpu_capability()
    except Exception:  # noqa: BLE001 - not x86, or a torch without the query
        return None
    if not cap.get("avx2"):
        return None
    try:
        exact = _int8_sums_exactly()
    except Exception:  # noqa: BLE001 - a torch without oneDNN's int8 ops: the conservative answer
        exact = False
    return math.inf if exact else float(INT16_PAIR_LIMIT)


def int8_conv1x1(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One oneDNN ``u8 x s8`` 1x1 convolution as the simulation calls it (scales 1, zero points 0): float32 sums.

    ``x`` holds integers in [0, 255], ``w`` integers in [-128, 127], shaped (C_out, C_in, 1, 1).
    """
    c = w.shape[0]
    packed = torch.ops.onednn.qconv_prepack(w.to(torch.int8), torch.ones(c), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    out: torch.Tensor = torch.ops.onednn.qconv2d_pointwise.tensor(
        x.to(torch.uint8), torch.ones(()), torch.tensor(0), packed, torch.ones(c), torch.zeros(c, dtype=torch.int64),
        None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    return out


def _int8_sums_exactly() -> bool:
    """Whether a dense oneDNN u8 x s8 convolution sums 32 products of 255 x 127 exactly (no int16 pairs)."""
    c_in = 32
    out = int8_conv1x1(torch.full((1, c_in, 2, 2), 255), torch.full((8, c_in, 1, 1), 127))
    return bool((out == 255 * 127 * c_in).all())


def _int8_zero_point(s: lw.Accumulate) -> int | None:
    """The uint8 offset that holds the layer's input integers, or None when int8 kernels cannot run it."""
    if s.op != "conv" or s.sum_bound >= lw.FLOAT32_EXACT:
        return None
    if int(s.weight.min()) < -128 or int(s.weight.max()) > 127:
        return None
    zp = max(0, -s.x_lo)
    return zp if s.x_hi + zp <= 255 else None


def split_weights(weight: torch.Tensor, x_max: int, pair_limit: float) -> list[torch.Tensor]:
    """Integer weights as parts that sum to them, each with ``2 * x_max * |part| <= pair_limit``.

    >>> [p.tolist() for p in split_weights(torch.tensor([127, -128, 5]), 255, 32767)]
    [[64, -64, 5], [63, -64, 0]]
    """
    cap = max(1, int(pair_limit // (2 * max(x_max, 1)))) if math.isfinite(pair_limit) else None
    if cap is None or int(weight.abs().max()) <= cap:
        return [weight]
    parts, rest = [], weight
    while int(rest.abs().max()) > cap:
        part = rest.clamp(-cap, cap)
        parts.append(part)
        rest = rest - part
    return [*parts, rest]


def build(program: lw.Program, device: torch.device, int8: bool | None = None) -> tuple[Plan, list[torch.Tensor]]:
    """Split ``program`` into a static plan and the list of tensors it reads (the per-configuration numbers).

    ``int8``: run convolutions whose operands fit in 8 bits on oneDNN's int8 kernels (exact sums,
    with the weights split where :func:`int8_pair_limit` asks; about 2x faster than float32).
    Default: on CPU when this CPU has int8 kernels.
    """
    limit = int8_pair_limit()
    if int8 is None:
        int8 = device.type == "cpu" and limit is not None
    if int8 and limit is None:
        limit = math.inf  # asked for explicitly (tests on other CPUs): trust the kernels
    plan: list[tuple[Any, ...]] = []
    tensors: list[torch.Tensor] = []

    def add(*ts: torch.Tensor) -> int:
        tensors.extend(t.to(device) for t in ts)
        return len(tensors) - len(ts)

    i64 = functools.partial(torch.tensor, dtype=torch.int64)
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    for s in program.steps:
        if isinstance(s, lw.QuantizeInput):
            inv = 1.0 / s.scale.float()  # float32 1/scale: the fake-quant formula
            plan.append(("input", s.src, s.dst, add(inv, f32(s.lo), f32(s.hi), torch.tensor(s.binary))))
        elif isinstance(s, lw.Accumulate):
            # Convolutions return the exact sum without the bias (float32); the integer bias is added in int64.
            zp = _int8_zero_point(s) if int8 else None
            c = s.weight.shape[0]
            if s.op == "conv":
                geometry = (tuple(s.stride), tuple(s.padding), tuple(s.dilation), s.groups)
            if s.op == "conv" and zp is not None:
                lists = (list(s.stride), list(s.padding), list(s.dilation), s.groups)
                parts = [torch.ops.onednn.qconv_prepack(p.to(torch.int8), torch.ones(c), 1.0, zp, *lists, None)
                         for p in split_weights(s.weight, s.x_hi + zp, limit or math.inf)]  # fmt: skip
                k = add(torch.ones(c), torch.zeros(c, dtype=torch.int64), torch.ones(()), i64(zp), *parts)
                plan.append(("qconv", s.src, s.dst, *geometry, k, len(parts)))
            elif s.op == "conv":
                plan.append(("conv", s.src, s.dst, *geometry, add(s.weight.float())))
            if s.op == "conv":
                b = s.bias if s.bias is not None else torch.zeros(c, dtype=torch.int64)
                plan.append(("bias", s.dst, add(lw.channel_view(b.double(), 4))))  # exact: |bias| < 2**53
            else:
                b = s.bias.double() if s.bias is not None else torch.zeros(c, dtype=torch.float64)
                plan.append(("linear", s.src, s.dst, add(s.weight.double(), b)))
        elif isinstance(s, lw.Requantize):
            k = add(*_requant_consts(s.m0, s.shift, s.binary, s.constant, s.lo, s.hi, s.dim))
            plan.append(("requant", s.src, s.dst, k))
        elif isinstance(s, lw.AddGrids):
            consts = _requant_consts(i64([1]), i64([s.prec]), s.binary, None, s.lo, s.hi, 1)
            ma, mb = (torch.tensor(float(m), dtype=torch.float64) for m in (s.ma, s.mb))
            plan.append(("add", s.a, s.b, s.dst, add(ma, mb, *consts)))
        elif isinstance(s, lw.PoolSum):
            plan.append(("pool", s.src, s.dst, s.kernel, s.stride))
        elif isinstance(s, lw.ClampInts):
            plan.append(("clamp", s.src, s.dst, add(f32(s.lo), f32(s.hi))))
        elif isinstance(s, lw.Apply):
            plan.append(("apply", s.src, s.dst, s.op))
        elif isinstance(s, lw.Output):
            dim = 2  # logits (N, classes); a (1,) scale broadcasts anyway
            k = add(lw.channel_view(s.scale.double(), dim), torch.tensor(s.lo, dtype=torch.float64),
                    torch.tensor(s.hi, dtype=torch.float64))  # fmt: skip
            plan.append(("output", s.src, k))
    return tuple(plan), tensors


def _requant(acc: torch.Tensor, ms: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp(floor(acc * ms + c), lo, hi)`` as float32; ``acc`` holds integers.

    ``acc * ms + c`` is exact in float64 (see the module docstring and ``lowering.fixed_point``),
    so is its floor. The floor goes to float32 *before* the clamp: that conversion is exact
    below 2**24 and otherwise rounds monotonically, never across the integer bounds, so the
    clamped result is the same, and the clamp runs on twice as many lanes: about 30 % less
    time than clamping in float64, and this kernel is most of the simulation's time.
    """
    q = torch.floor(acc.to(torch.float64) * ms + c).to(torch.float32)
    return torch.minimum(torch.maximum(q, lo), hi)


def run(plan: Plan, tensors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Execute ``plan`` on float images ``x`` (N, C, H, W); returns float32 logits. Pure: no state."""
    env: dict[str, torch.Tensor] = {}
    t = tensors
    out = x
    for step in plan:
        kind = step[0]
        if kind == "input":
            _, src, dst, k = step
            v = env.get(src, x).float()
            q = torch.minimum(torch.maximum(torch.round(v * t[k]), t[k + 1]), t[k + 2])
            env[dst] = torch.where(t[k + 3], torch.where(v >= 0, 1.0, -1.0), q)
        elif kind == "conv":
            _, src, dst, stride, padding, dilation, groups, k = step
            env[dst] = F.conv2d(env[src], t[k], None, stride, padding, dilation, groups)
        elif kind == "qconv":  # u8 x s8 -> exact int32 sums (oneDNN), returned as float32: exact below 2**24
            _, src, dst, stride, padding, dilation, groups, k, parts = step
            xq = (env[src] + t[k + 3]).to(torch.uint8)  # centered integers + the layer's zero point
            sums = [
                torch.ops.onednn.qconv2d_pointwise.tensor(
                    xq,
                    t[k + 2],
                    t[k + 3],
                    t[k + 4 + j],
                    t[k],
                    t[k + 1],
                    None,
                    list(stride),
                    list(padding),
                    list(dilation),
                    groups,
                    1.0,
                    0,
                    torch.float32,
                    "none",
                    [],
                    "",
                )  # fmt: skip
                for j in range(parts)  # weight parts (AVX2 pair limit): partial sums of integers add exactly
            ]
            env[dst] = sums[0] if parts == 1 else sum(sums[1:], sums[0])
        elif kind == "bias":
            _, dst, k = step
            env[dst] = env[dst].to(torch.float64) + t[k]
        elif kind == "linear":
            _, src, dst, k = step
            env[dst] = F.linear(env[src].double(), t[k], t[k + 1])
        elif kind == "requant":
            _, src, dst, k = step
            env[dst] = _requant(env[src], *t[k : k + 4])
        elif kind == "add":
            _, a, b, dst, k = step
            total = env[a].to(torch.float64) * t[k] + env[b].to(torch.float64) * t[k + 1]  # exact below 2**52
            env[dst] = _requant(total, *t[k + 2 : k + 6])
        elif kind == "pool":
            _, src, dst, kernel, stride = step
            v = env[src].double()
            if kernel is None:
                env[dst] = v.sum(dim=(-2, -1), keepdim=True)
            else:
                env[dst] = F.avg_pool2d(v, kernel, stride, divisor_override=1)
        elif kind == "clamp":
            _, src, dst, k = step
            env[dst] = torch.minimum(torch.maximum(env[src], t[k]), t[k + 1])
        elif kind == "apply":
            _, src, dst, op = step
            env[dst] = lw.apply_op(op, env[src])
        elif kind == "output":
            _, src, k = step
            v = env[src].double()
            flat = (
                v.reshape(v.shape[0], -1) if v.dim() > 2 and v.shape[2:].numel() == 1 else v
            )  # (N, C, 1, 1) -> (N, C)
            scale = t[k] if flat.dim() == 2 else t[k].reshape(-1)
            out = torch.minimum(torch.maximum(flat * scale, t[k + 1]), t[k + 2]).float().reshape(v.shape)
    return out


class Simulator(nn.Module):
    """The integer-exact simulation of one converted model: ``forward(x)`` takes normalized images, returns logits.

    Build it with :func:`simulate`. Inference only. ``plan`` and ``tensors`` are
    what :class:`CompiledRunner` reuses across configurations.
    """

    def __init__(self, program: lw.Program, device: torch.device | str = "cpu", int8: bool | None = None) -> None:
        super().__init__()
        self.program = program
        self.plan, self.tensors = build(program, torch.device(device), int8)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _exact_float(x):
            return run(self.plan, self.tensors, x)


def _exact_float(x: torch.Tensor) -> Any:
    """No bf16 autocast and no TF32: float32 sums must stay exact (cuDNN allows TF32 convolutions by default)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(x.device.type, enabled=False))
    if x.is_cuda:
        stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
    return stack


def simulate(model: nn.Module, example: torch.Tensor) -> Simulator:
    """The integer-exact simulation of a converted ``model`` for inputs shaped like ``example``.

    Raises:
        BitsweepError: when the model has an op the integer arithmetic does not cover (see ``lowering``).
    """
    return Simulator(lw.lower(model, example), example.device).eval()


def _qconv_fake(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, stride, padding, dilation, groups,  # type: ignore[no-untyped-def]
                output_scale, output_zero_point, output_dtype, attr, scalars, algorithm):  # fmt: skip
    """Output shape and dtype of ``onednn::qconv2d_pointwise.tensor``: those of the scalar overload."""
    return torch.ops.onednn.qconv2d_pointwise.default(
        qx, 1.0, 0, qw, w_scale, w_zp, bias, stride, padding, dilation, groups, output_scale, output_zero_point,
        output_dtype, attr, scalars, algorithm,
    )  # fmt: skip


def _teach_compiler_int8() -> None:
    """Give torch.compile the shape rule of the int8 convolution with tensor zero points.

    torch ships one only for the overload with Python-number zero points, which would
    bake each cell's zero points into the graph and recompile per cell. Registering
    is idempotent here: a second registration (or an older torch without the op) is ignored.
    """
    try:
        torch.library.register_fake("onednn::qconv2d_pointwise.tensor", _qconv_fake)
    except (RuntimeError, AttributeError, ValueError):
        pass


class CompiledRunner:
    """Runs simulators through ``torch.compile``, compiling once per plan and batch size.

    Every number that changes with the bit widths is a tensor input, so one
    compiled graph serves all cells of a sweep over one model. Batches are
    padded to ``batch_size`` (one input shape, no recompilation). If
    compilation fails (no C++ compiler, an unsupported platform), it warns
    once and runs eagerly: same results, slower.

    The first batch of every compiled program is also run eagerly and must
    match the compiled logits bit for bit (integer-exact programs only); if
    not, it warns once and runs eagerly from then on. A compiled program is trusted
    only after it has agreed: torch 2.13's FX graph cache does not key on
    the vector instructions, and a cache filled with AVX-512 kernels then
    used with ``ATEN_CPU_CAPABILITY=avx2`` returned garbage logits (measured;
    a fresh cache was exact). With that variable set, compiling skips the FX
    graph cache; a cache shared between machines of different CPU kinds is
    what the check is left for. It costs one eager batch per compiled graph.
    """

    def __init__(self, batch_size: int) -> None:
        _teach_compiler_int8()
        self.batch_size = batch_size
        self._compiled: dict[Plan, Callable[..., torch.Tensor]] = {}
        self._agreed: set[Plan] = set()
        self.eager = False

    def _fn(self, plan: Plan) -> Callable[..., torch.Tensor]:
        fn = self._compiled.get(plan)
        if fn is None:
            fn = torch.compile(functools.partial(run, plan), dynamic=False, options=compile_options())
            self._compiled[plan] = fn
        return fn

    @torch.inference_mode()
    def __call__(self, sim: Simulator, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.eager or n > self.batch_size:
            eager: torch.Tensor = sim(x)
            return eager
        if n < self.batch_size:  # pad to the compiled shape; padded rows are dropped
            pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format
            )
        try:
            with _exact_float(x):
                out = self._fn(sim.plan)(sim.tensors, x)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same program, eagerly
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); simulating eagerly", stacklevel=3)
            self.eager = True
            out = sim(x)
        if not self.eager and sim.plan not in self._agreed and sim.program.float32_exact:
            eager = sim(x)
            if not torch.equal(out, eager):
                warnings.warn(
                    "the compiled simulation disagreed with the eager one on its first batch (a torch.compile cache "
                    "made on another CPU or with another ATEN_CPU_CAPABILITY can do this: clear it or set "
                    "TORCHINDUCTOR_CACHE_DIR); simulating eagerly: same numbers, slower",
                    stacklevel=3,  # the caller of __call__ (inference_mode wraps it)
                )
                self.eager = True
                out = eager
            self._agreed.add(sim.plan)
        return out[:n]


COMPILE_MIN_IMAGES = 5000  # below this, a ~30 s compilation costs more than it saves


def runner_for(mode: str, images: int, batch_size: int) -> CompiledRunner | None:
    """The :class:`CompiledRunner` that ``--compile MODE`` asks for (``on``, ``off``, or ``auto``:
    compile when at least :data:`COMPILE_MIN_IMAGES` images will be evaluated), or None for eager."""
    if mode == "on" or (mode == "auto" and images >= COMPILE_MIN_IMAGES):
        return CompiledRunner(batch_size)
    return None


class SimulatedModel(nn.Module):
    """A :class:`Simulator` behind an ``nn.Module`` face, run through a :class:`CompiledRunner` when given one."""

    def __init__(self, sim: Simulator, runner: CompiledRunner | None = None) -> None:
        super().__init__()
        self.sim = sim
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.sim, x) if self.runner is not None else self.sim(x)


def evaluation_model(
    model: nn.Module, example: torch.Tensor, runner: CompiledRunner | None = None
) -> tuple[nn.Module, str]:
    """What to measure a converted ``model``'s accuracy with, and what it is.

    Returns ``(module, kind)``: the integer-exact simulation (``kind`` =
    ``"integer-exact"``, or ``"integer"`` when some float32 sums may round, see
    ``Program.inexact``) or, for models the lowering does not cover, the
    fake-quant model itself (``"fake-quant: <reason>"``).
    """
    try:
        sim = simulate(model, example)
    except BitsweepError as e:
        return model, f"fake-quant: {e}"
    return SimulatedModel(sim, runner), "integer-exact" if sim.program.float32_exact else "integer"
