"""The fast FAIG engine: path-integrated gradients for every parameter, per image, for any ``nn.Module``.

Every strategy computes the same quantities — ḡ = Σ_k w_k ∂L/∂γ and the slopes f_k = ∂L/∂γ·Δ at
γ = θ + α_k(θ̄ − θ) — over the parameters and floating buffers of
:class:`~faig_fast.core.paths.ParameterPath` (integer buffers stay model_b's), on a private copy of
model_b (:class:`ModuleRunner`; the caller's models are never touched) in the module mode ``mode``;
every pass gets its own copy of the input.  The strategies (:mod:`faig_fast.core.strategies`):

* ``loop``      — one forward+backward per node, in place in the private network's own tensors.
  Fastest on CPU, where one pass already saturates the cores.
* ``persample`` — node-major: all equal-size images of a batch in one pass per node, per-sample
  gradients from ``torch.func``; on CUDA the node pass is captured in a CUDA graph.
* ``vmap``      — ``torch.func`` ``vmap`` over a chunk of steps (and images), gradient w.r.t. the base θ.
* ``linear``    — conv(h, θ + αΔ) = conv(h, θ) + α·conv(h, Δ): a chunk of steps as one batch (plain
  zero-padded ``nn.Conv2d`` models only).
* ``tune``      — time the candidates on the first batch and keep the fastest (``auto`` on GPU;
  on CPU ``auto`` is ``loop``).

A model that a ``torch.func`` strategy cannot run (a custom ``autograd.Function`` without a vmap
rule, ``.data`` under ``vmap``) falls back to ``loop`` with one warning naming the module.  Per-image
results stay separate: Eq. 7 takes |·| per image.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair
from faig_fast.core.path_params import check_mode, private_copy
from faig_fast.core.paths import ParameterPath
from faig_fast.core.probe import check_private, explained, failing_module, inplace_suspects, is_autograd_error, \
    warn_unused
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.strategies import REGISTRY, ImageResult, Strategy, linear_path_blocker, linear_path_conv
from faig_fast.errors import FAIGError, InvalidInputError
from faig_fast.utils.device import sync

STRATEGIES = ("auto", "tune", *REGISTRY)
PRECISIONS = ("fp32", "tf32", "bf16", "fp64")

__all__ = ["ImageResult", "ModuleRunner", "PathEngine", "PRECISIONS", "STRATEGIES", "linear_path_blocker",
           "linear_path_conv", "resolve_device"]


def resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """The device to run on (default: model_b's); a clear error when it does not exist here."""
    if device is None:
        first = next(iter(model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device={str(device)!r} was requested but CUDA is not available here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False): use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device={str(device)!r} does not exist: this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else :class:`InvalidInputError`."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision '{precision}'; choose one of {PRECISIONS}")
    return precision


#: Default working set of one batched pass on CPU.  Batching buys nothing there (one pass already
#: keeps the cores busy) while GB-sized activation buffers are page-faulted in anew on every pass:
#: measured, LAM's 50 steps of a 64×64 LR crop (MSRResNet 4×32) as one 1.5 GB chunk took 2.0 s, in
#: chunks of 4–10 steps 1.1–1.4 s.
CPU_CHUNK_BYTES = 256 << 20


class ModuleRunner:
    """Module semantics for ONE network, shared by every path (FAIG's parameter path, LAM's input path).

    ``net`` is a private deep copy of ``model`` (instance-level functions rebound onto the copy) in
    ``mode`` (``"eval"``, ``"train"`` or ``"as-is"``), on ``device``, in float64 for ``fp64`` and float32
    otherwise, with ``requires_grad`` off; the caller's model is never touched.  The runner owns the
    precision's autocast and math mode, the explanation of autograd errors, the check that the copy
    no longer reaches the caller's model, and the one chunking and out-of-memory policy.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None, precision: str = "fp32",
                 mode: str = "eval", chunk_size: int | None = None, memory_budget: int | None = None):
        self.precision = check_precision(precision)
        self.mode = check_mode(mode)
        self.device = resolve_device(device, model)
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.name = type(model).__name__
        self.net = private_copy(model, mode).to(self.device, self.dtype)
        for p in self.net.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.private_checked = False
        self._model = model  # the caller's, only to prove the copy never reaches it
        self._saved: dict[Any, int] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for precision ``bf16``, else a no-op."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def math_mode(self) -> contextlib.AbstractContextManager:
        """TF32 on for ``tf32`` and OFF for every other precision on CUDA (PyTorch lets cuDNN use TF32 by
        default), restored afterwards.  Callers wrap a whole run (passes, endpoint losses, reductions)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return _tf32(self.precision == "tf32")

    def explained(self, probe_forward: Callable[[], torch.Tensor]) -> contextlib.AbstractContextManager:
        """Turns autograd's in-place / no-grad errors inside the block into an :class:`InvalidInputError`
        naming the modules involved (found by re-running ``probe_forward`` with hooks)."""
        return explained(self.name, self.mode, lambda: inplace_suspects(self.net, probe_forward))

    def check_private(self, forward: Callable[[], Any]) -> Any:
        """``forward()`` — the first time under :func:`~faig_fast.core.probe.check_private`, which refuses a
        copy that still calls the caller's modules or touches its tensors."""
        if self.private_checked:
            return forward()
        out = check_private(self._model, self.name, forward)
        self.private_checked = True
        return out

    def saved_bytes(self, key: Any, fn: Callable[[], torch.Tensor]) -> int:
        """Bytes autograd saves for one call of ``fn`` plus twice its output (measured once per ``key``)."""
        if key not in self._saved:
            seen: dict[tuple, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
                return t

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
            self._saved[key] = sum(seen.values()) + 2 * out.numel() * out.element_size()
        return self._saved[key]

    def plan_chunk(self, n: int, item_bytes: int, factor: int = 2) -> int:
        """Items per chunk (≤ ``n``) that fit ``chunk_size``, else ``memory_budget`` bytes, else 70 % of free
        device memory (:data:`CPU_CHUNK_BYTES` on CPU), at ``factor`` × ``item_bytes`` each."""
        if self.chunk_size:
            return max(1, min(self.chunk_size, n))
        if self.memory_budget is not None:
            budget = self.memory_budget
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.7)
        else:
            budget = CPU_CHUNK_BYTES
        return int(max(1, min(n, budget // max(1, item_bytes * factor))))

    @contextlib.contextmanager
    def cpu_layout(self, enabled: bool = True) -> Iterator[None]:
        """On CPU, hold the network's 4-D parameters and buffers channels-last meanwhile (oneDNN's fast
        path: measured ≈ 9% faster FAIG passes, ≈ 18% faster LAM passes of MSRResNet on 64 px crops);
        only those, so Conv3d weights and 5-D filters keep theirs."""
        if not enabled or self.device.type != "cpu":
            yield
            return
        self._set_format(torch.channels_last)
        try:
            yield
        finally:
            self._set_format(torch.contiguous_format)

    def _set_format(self, fmt: torch.memory_format) -> None:
        with torch.no_grad():
            for t in [*self.net.parameters(), *self.net.buffers()]:
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=fmt)

    def run_chunks(self, n: int, chunk: int, run: Callable[[int, int], None]) -> None:
        """``run(start, stop)`` over [0, n) in chunks, halving the chunk on out-of-memory (the one policy;
        out-of-memory at chunk 1 is raised)."""
        start = 0
        while start < n:
            stop = min(n, start + chunk)
            try:
                run(start, stop)
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start = stop


class PathEngine:
    """Holds a model pair on one device and integrates gradients along the straight parameter path."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, device: torch.device | str | None = None,
                 strategy: str = "auto", precision: str = "fp32", chunk_size: int | None = None,
                 memory_budget: int | None = None, mode: str = "eval"):
        """``model_a`` is the baseline θ̄, ``model_b`` the target θ; neither is modified.  ``mode`` is the
        module mode of every pass: ``"eval"``, ``"train"`` or ``"as-is"`` (each submodule as model_b has it).
        ``chunk_size`` caps the steps (images, for ``persample``) of one batched pass; by default chunks
        are planned from free memory or ``memory_budget`` bytes."""
        if strategy not in STRATEGIES:
            raise InvalidInputError(f"unknown strategy '{strategy}'; choose one of {STRATEGIES}")
        check_precision(precision)
        check_mode(mode)
        check_pair(model_a, model_b)
        self.runner = ModuleRunner(model_b, device=device, precision=precision, mode=mode,
                                   chunk_size=chunk_size, memory_budget=memory_budget)
        r = self.runner
        self.net, self.device, self.dtype, self.precision, self.mode, self.name = \
            r.net, r.device, r.dtype, r.precision, r.mode, r.name
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.space = ParameterPath(self.net, model_a)
        self.param_names = self.space.param_names
        self.theta, self.delta = self.space.theta, self.space.delta
        self.buffer_delta = self.space.buf_delta
        # floating buffers that differ between the models move along the path without a gradient: their
        # share of L(θ̄) − L(θ) is not in Σ_i FAIG_i over parameters (Eq. 4); fixed, so found once
        self.moved_buffers = [n for n, d in self.buffer_delta.items() if bool(d.ne(0).any())]
        self.buffers_move = bool(self.moved_buffers)
        self._model_b = model_b
        self._index: FilterIndex | None = None
        self.strategies: dict[str, Strategy] = {name: cls(self) for name, cls in REGISTRY.items()}
        if strategy == "auto":
            strategy = "loop" if self.device.type == "cpu" else "tune"
        if strategy in self.strategies:
            why = self.strategies[strategy].blocker()
            if why is not None:
                raise InvalidInputError(f"strategy '{strategy}' cannot run {self.name}: {why}; use 'loop', "
                                        "'persample' or 'vmap'")
        self.strategy = strategy
        self.tuning: dict[str, float] = {}
        self.tuning_failures: dict[str, str] = {}
        self.unused: list[str] | None = None
        self.fallback: str | None = None  # why a torch.func strategy gave way to loop, if it did

    @property
    def index(self) -> FilterIndex:
        """Default filter numbering of model_b (built on first use; the API builds its own)."""
        if self._index is None:
            self._index = FilterIndex.from_model(self._model_b)
        return self._index


    # passes -------------------------------------------------------------------------------------
    def forward(self, alpha: float, x: torch.Tensor, buffer_alpha: float | None = None) -> torch.Tensor:
        """The network's output at γ(α) (floating buffers at ``buffer_alpha``, default α; private
        tensors; ``x`` is not modified)."""
        b_alpha = alpha if buffer_alpha is None else buffer_alpha

        def run() -> torch.Tensor:
            with self.runner.autocast():
                return functional_call(self.net, (self.space.params_at(alpha), self.space.buffers_at(b_alpha)),
                                       (x.clone(),))
        return self.runner.check_private(run)

    def loss_at(self, alpha: float, x: torch.Tensor, y: torch.Tensor,
                buffer_alpha: float | None = None) -> torch.Tensor:
        """L = ‖F(γ(α), x) − y‖² as a 0-d float64 tensor on the device (no grad, no host sync), with the
        parameters at α and the floating buffers at ``buffer_alpha`` (default α), under the precision's
        math mode."""
        x = x.to(self.device, self.dtype)
        y = y.to(self.device, torch.float64)
        with torch.no_grad(), self.runner.math_mode():
            return self.loss(self.forward(alpha, x, buffer_alpha), y).sum()

    def image_loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L at the given parameters for one image ``x`` (C,h,w) — the function ``torch.func`` differentiates."""
        with self.runner.autocast():
            out = functional_call(self.net, (params, buffers), (x[None].clone(),))
        return self.loss(out, y[None]).sum()

    def loss(self, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Per-image Σ (out − gt)² in gt's dtype, shape (B,); a clear error when the shapes differ."""
        if out.shape[-3:] != gt.shape[-3:]:
            raise InvalidInputError(
                f"model output is {tuple(out.shape[-3:])} (C, H, W) but gt is {tuple(gt.shape[-3:])}: "
                "lq/gt sizes or channel counts do not match the model")
        return ((out.to(gt.dtype) - gt) ** 2).flatten(1).sum(1)

    def step_bytes(self, x: torch.Tensor) -> int:
        """Bytes autograd saves for one forward of one image at one step (measured once per shape)."""
        def one() -> torch.Tensor:
            params = {n: t.clone().requires_grad_() for n, t in self.theta.items()}
            with self.runner.autocast():
                return functional_call(self.net, (params, self.space.buffers_at(0.0)), (x[:1].clone(),))
        return self.runner.saved_bytes(("step", tuple(x.shape[1:])), one)

    def note_unused(self, names: list[str]) -> None:
        """Record which parameters the forward does not use; warn once per engine."""
        if self.unused is None:
            self.unused = list(names)
            if names:
                warn_unused(self.name, self.unused)

    def _probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One plain autograd pass at α = 0: finds unused parameters (``torch.func`` silently gives zeros)."""
        params = {n: t.clone().requires_grad_() for n, t in self.theta.items()}
        loss = self.image_loss(params, self.space.buffers_at(0.0), x[0], y[0])
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        self.note_unused([n for n, g in zip(self.param_names, gs) if g is None])

    # public -------------------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        """Strategies ``tune`` times, in order (those that can run this model)."""
        return [name for name, s in self.strategies.items() if s.blocker() is None]

    def tune(self, lq: torch.Tensor, gt: torch.Tensor, steps: int = 8) -> dict[str, float]:
        """Time each candidate on a few nodes of this batch and keep the fastest (seconds per node)."""
        alphas, weights = nodes_and_weights("riemann_left", steps)
        timings, failures = {}, {}
        for s in self.candidates():
            try:
                for _ in range(2):  # the first call warms caches and kernels up
                    sync(self.device)
                    t0 = time.perf_counter()
                    self.strategies[s].integrate(lq, gt, alphas, weights)
                    sync(self.device)
                timings[s] = (time.perf_counter() - t0) / steps
            except torch.OutOfMemoryError:
                failures[s] = "out of memory"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            except (RuntimeError, InvalidInputError) as exc:  # e.g. a torch.func limitation; loop's are real
                if s == "loop":
                    raise
                failures[s] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        self.tuning, self.tuning_failures = timings, failures
        if not timings:
            raise FAIGError(
                f"strategy 'tune': every candidate failed on a batch of {lq.shape[0]} image(s) of "
                f"{tuple(lq.shape[1:])} ({'; '.join(f'{k}: {v}' for k, v in failures.items())}); lower "
                "internal_batch_size or memory_budget, use smaller images, or pick a strategy")
        self.strategy = min(timings, key=timings.get)
        return timings

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, method: str = "riemann_left",
                  steps: int = 100) -> list[ImageResult]:
        """ḡ and the node slopes for each image of a same-size batch ``lq`` (B,C,h,w), ``gt`` (B,C',H,W)."""
        alphas, weights = nodes_and_weights(method, steps)
        lq = lq.to(self.device, self.dtype)
        gt = gt.to(self.device, self.dtype)
        with self.runner.math_mode(), self.runner.explained(lambda: self.forward(0.0, lq[:1])):
            if not self.runner.private_checked:
                with torch.no_grad():
                    self.forward(0.0, lq[:1])
            if self.unused is None and self.strategy != "loop":
                self._probe(lq[:1], gt[:1])
            if self.strategy == "tune":
                self.tune(lq, gt, min(steps, 8))
            return self._run(lq, gt, alphas, weights)

    def _run(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
             weights: torch.Tensor) -> list[ImageResult]:
        """The current strategy's results; a ``torch.func`` limitation of the model falls back to ``loop``."""
        strategy = self.strategies[self.strategy]
        try:
            return strategy.integrate(lq, gt, alphas, weights)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if not strategy.transforms or is_autograd_error(exc):
                raise
            self._fall_back(strategy, exc, lambda: strategy.integrate(lq[:1], gt[:1], alphas[:1], weights[:1]))
        return self.strategies["loop"].integrate(lq, gt, alphas, weights)

    def _fall_back(self, strategy: Strategy, exc: RuntimeError, retry: Callable[[], Any]) -> None:
        """Switch to ``loop`` for good, with one warning naming the module the transform failed in."""
        where = failing_module(self.net, retry)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        self.fallback = (f"{self.name}: strategy '{strategy.name}' (torch.func) cannot run "
                         f"{'module ' + where if where else 'this model'}: {reason}")
        warnings.warn(f"{self.fallback}; using strategy 'loop' instead (the same result, one pass per node)",
                      UserWarning, stacklevel=4)
        self.strategy = "loop"


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
