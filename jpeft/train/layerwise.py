"""The train step run one decoder layer at a time from Python: the CPU executor for a 16-bit frozen base.

`train_step` scans the layers over the `[L, ...]` stacks of the base. On XLA:CPU each iteration of that scan
copies its layer's weights out of the stacks before its dots (a dynamic slice is never read in place), in the
forward and again in the backward's recomputation: 2 x 2.3 GiB of copies per step for a 1B bf16 base, ~0.3 s of
its 1.5 s (bench/RESULTS.md, issue 20). `LayerwiseStep` computes the same step with no copy of a weight:

- each layer's weights are zero-copy views of the stacks' host memory, one array per layer and leaf;
- one jitted layer forward, called once per layer, keeps only each layer's input (what `remat="full"` keeps);
- the last layer, the final norm and the fused lm_head + loss run as one differentiated program (that layer is
  not recomputed), giving the gradient of the last layer's input;
- one jitted layer backward per earlier layer recomputes that layer from its input (`jax.vjp`) and returns the
  gradients of its input and of its slice of the (prepared) adapters; each layer program takes the whole
  adapters and cuts its own slice (`_layer_slice`), so the step holds no per-layer copy of them;
- the embedding stage's VJP carries those slices back through each method's `prepare`, accumulating over the
  micro-batches, and one jitted update applies the optimizer (`jpeft.train.step.apply_gradients`).

It is the same computation as `train_step(..., remat="full")`: the same layer function (`decoder_layer`), the
same dropout keys, the same loss, the same update. XLA fuses the two programs differently, so the numbers agree
to rounding, not bit for bit (tests/train/test_layerwise.py compares losses, gradients and updates).

It applies where the scan's copies exist and nothing needs the whole stack at once: the CPU backend, one device,
bf16/f16 layer stacks carried as host words (`jpeft.models.model.as_host_bits`), `remat="full"`, no MoE layers,
and methods whose only model hooks are per layer (`linear`, `block_out`, `prepare`, `loss`, `override_params` of
non-layer modules): LoRA and its variants, AdaLoRA, SoRA, IA3, VeRA, bottleneck adapters (prefix tuning shifts
positions, prompt tuning prepends tokens, full fine-tuning trains layer weights: those scan).
`layerwise_blocker` names what rules a run out; `jpeft train --executor auto` (the default) then runs the scan.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import kernel_mode
from jpeft.models.config import ModelConfig
from jpeft.models.decoder import decoder_layer, rms_norm
from jpeft.models.model import STACKS, Bits16, _embed_inputs, _mask_info, host16_stack, with_overrides
from jpeft.models.records import LayerContext
from jpeft.runtime import release_host_memory
from jpeft.sites import Method, SiteContext
from jpeft.train.settings import EXECUTORS, executor_refusal, layerwise_settings_blocker
from jpeft.train.step import apply_gradients, method_loss, nll_from_hidden

F32 = jnp.float32
# Method hooks that act on the whole model rather than on one layer: a method overriding any of them runs the scan.
WHOLE_MODEL_HOOKS = ("embed", "virtual_tokens", "position_offset", "layer_params")


def _is_bits(x: Any) -> bool:
    return isinstance(x, Bits16)


def layerwise_blocker(cfg: ModelConfig, methods: Sequence[Method], base: dict, remat: str, *,
                      mesh: Any = None, offload_optimizer: bool = False) -> str | None:
    """Why `LayerwiseStep` cannot run this training (a sentence), or None when it can.

    base: the params as the single-device loop hands them to the step (`jpeft.train.loop.place_for_step`)."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU backend only (this is {jax.default_backend()})"
    if (why := layerwise_settings_blocker(remat, mesh, offload_optimizer)) is not None:
        return why
    if cfg.has_experts or any(k in base for k in STACKS if k != "layers"):
        return "it runs dense decoder layers only (this model has MoE layers)"
    for m in methods:
        cls = m if isinstance(m, type) else type(m)
        for hook in WHOLE_MODEL_HOOKS:
            if getattr(cls, hook, None) is not getattr(Method, hook):
                return f"method {getattr(m, 'name', cls.__name__)!r} changes the model outside its layers ({hook})"
    leaves = jax.tree_util.tree_leaves(base.get("layers"), is_leaf=_is_bits)
    if not leaves or not all(_host16(x) for x in leaves):
        return ("it reads a 16-bit frozen base in place (bf16/f16 layer stacks in host memory); this base is "
                "another dtype or 4-bit")
    return None


def _host16(x: Any) -> bool:
    """A layer-stack leaf the step can read in place: `Bits16` words, or a stack `as_host_bits` turns into words
    when the run places the base."""
    return isinstance(x.bits, jax.Array) if _is_bits(x) else host16_stack(x)


def check_executor(executor: str, cfg: ModelConfig, methods: Sequence[Any], params: dict, remat: str) -> None:
    """Before a run starts: a ConfigError naming the reason when `executor` is "layers" and the step cannot run
    layer by layer on this model and method (`methods`: instances or their classes); nothing otherwise."""
    if executor == "layers" and (why := layerwise_blocker(cfg, methods, params, remat)) is not None:
        raise ConfigError(executor_refusal(why))


# `--executor auto` runs layer by layer from this many bytes of 16-bit weights per layer. The 1B shape (122 MiB a
# layer): 0.90x the scan's step time; SmolLM2-135M (6.6 MiB a layer, 30 layers, 4 x 256 tokens): 1.01x, where the
# copies it saves cost about what its per-layer dispatch does (`python bench/layerwise_probe.py`).
AUTO_MIN_LAYER_BYTES = 16 << 20


def _layer_bytes(base: dict) -> float:
    leaves = jax.tree_util.tree_leaves(base["layers"], is_leaf=_is_bits)
    return sum(x.bits.nbytes for x in leaves) / leaves[0].bits.shape[0]


# A layer's slice of a stack that jax cannot alias (its offset in the stack is not aligned as jax needs: e.g. a
# norm or q/k-norm weight whose width in bytes is no multiple of 64) is copied when it is at most this large.
COPY_MAX_BYTES = 1 << 20


def layer_views(layers: dict) -> list[dict] | None:
    """Layer l of every `Bits16` stack in `layers`, as `[...]` float arrays over the stacks' own host memory, for
    each l (a slice of at most `COPY_MAX_BYTES` that jax cannot alias is a copy); None when a larger slice would be
    a copy."""
    leaves, treedef = jax.tree_util.tree_flatten(layers, is_leaf=_is_bits)
    n = leaves[0].bits.shape[0]
    per_leaf = []
    for x in leaves:
        device = next(iter(x.bits.devices()))
        host = np.asarray(x.bits)
        if host.ctypes.data != x.bits.unsafe_buffer_pointer():  # numpy made a copy: views of it would be copies too
            return None
        views = []
        for i in range(n):
            v = host[i].view(x.dtype)
            arr = jax.device_put(v, device)
            if arr.unsafe_buffer_pointer() != v.ctypes.data and v.nbytes > COPY_MAX_BYTES:
                return None
            views.append(arr)
        per_leaf.append(views)
    return [jax.tree_util.tree_unflatten(treedef, [views[i] for views in per_leaf]) for i in range(n)]


# The layer's backward and the last layer with the loss compile with XLA:CPU's older loop emitters: its MLIR fusion
# emitters took ~0.25 GiB of working memory to compile either program for the 1B shape and kept 30-45 MiB per
# program, against 40-46 and 15-19 MiB here, for ~1% more step time (bench/RESULTS.md, issue 20). The per-layer
# forward keeps the default: it compiles in ~90 MiB and keeps nothing. A jaxlib without that option gets XLA's
# defaults (`LayerwiseStep.compile_ahead`).
_LEAN = {"xla_cpu_use_fusion_emitters": False}
_MODEL = ("cfg", "methods", "kernels")


def _micro(batch: dict, i: jax.Array) -> dict:
    return jax.tree_util.tree_map(lambda x: x[i], batch)


def _overridden(small: dict, adapters: dict, methods: tuple) -> dict:
    """The non-layer base params with each method's `override_params` applied (modules_to_save's trained copies
    of the embeddings or the lm_head); a ConfigError for an override of the layer stacks."""
    out = with_overrides(small, adapters, methods)
    if any(k in out for k in STACKS):
        raise ConfigError("a method overrides the base's layer stacks, which --executor layers reads in place; use "
                          "--executor scan")
    return out


def _embedded(adapters: dict, small: dict, mb: dict, cfg: ModelConfig, methods: tuple, dtype: Any):
    """The layer-0 input `[B, T, D]` and the prepared adapters' layer stacks (`{method: tree of [L, ...]}`)."""
    params = _overridden(small, adapters, methods)
    h, prepared, _, _ = _embed_inputs(params, cfg, mb["input_ids"], adapters, methods, None, True, dtype)
    return h, {k: v["layers"] for k, v in prepared.items() if isinstance(v, dict) and "layers" in v}


def _layer_slice(adapters: dict, small: dict, mb: dict, idx: jax.Array, cfg: ModelConfig, methods: tuple,
                 dtype: Any) -> dict:
    """Layer `idx`'s prepared adapter slices, computed inside the program that reads them: each method's `prepare`
    (`_embedded`; XLA drops its unused embedding lookup) and a dynamic slice. The step holds no per-layer copy of the
    adapters (1B LoRA: 43.5 MiB for the whole step, bench/RESULTS.md, issue 20)."""
    _, layer_ad = _embedded(adapters, small, mb, cfg, methods, dtype)
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, idx, keepdims=False), layer_ad)


@functools.partial(jax.jit, static_argnames=_MODEL + ("dtype",))
def _embed_stage(adapters, small, batch, i, rng, *, cfg, methods, kernels, dtype):
    """Micro-batch `i` of `batch` `[accum, B, T]`: (layer-0 input, the micro-batch, its dropout key:
    `fold_in(split(rng)[1], i)`, as `train_step` draws it)."""
    with kernel_mode(kernels):
        mb = _micro(batch, i)
        h, _ = _embedded(adapters, small, mb, cfg, methods, dtype)
        return h, mb, jax.random.fold_in(jax.random.split(rng)[1], i)


@functools.partial(jax.jit, static_argnames=_MODEL + ("dtype",), donate_argnums=(0,))
def _embed_backward(grads, adapters, small, mb, ct_h, ct_layers, ct_head, *, cfg, methods, kernels, dtype):
    """`grads` (None at the first micro-batch) plus the adapters' gradient from the layer-0 input's and the layer
    slices' cotangents (and the head's own adapter gradient `ct_head`, or None)."""
    with kernel_mode(kernels):
        # the layers' slices stacked as one concatenation (the VJP of n slices would sum n padded copies)
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ct_layers)
        _, pull = jax.vjp(lambda ad: _embedded(ad, small, mb, cfg, methods, dtype), adapters)
        (g,) = pull((ct_h, stacked))
        for more in (grads, ct_head):
            if more is not None:
                g = jax.tree_util.tree_map(jnp.add, g, more)
        return g


def _layer(h, lp, ad, idx, rng, mb, cfg: ModelConfig, methods: tuple) -> jax.Array:
    """Decoder layer `idx` on h `[B, T, D]`, as the layer scan's body runs it in training."""
    b, t = mb["input_ids"].shape
    am = mb.get("attention_mask")
    mask = _mask_info(b, t, am, mb.get("positions"), mb.get("segment_ids"), None, 0, flash_ok=True)[0]
    ctx = LayerContext(cfg=cfg, methods=methods, adapters=ad,
                       site=SiteContext(train=True, rng=jax.random.fold_in(rng, idx), layer=idx),
                       token_mask=jnp.ones((b, t), jnp.int32) if am is None else am,
                       window=jnp.asarray(cfg.layer_windows, jnp.int32)[idx], cache_kv=None)
    return decoder_layer(h, lp, ctx, mask)[0]


@functools.partial(jax.jit, static_argnames=_MODEL + ("dtype",))
def _layer_forward(h, lp, adapters, small, idx, rng, mb, *, cfg, methods, kernels, dtype):
    with kernel_mode(kernels):
        return _layer(h, lp, _layer_slice(adapters, small, mb, idx, cfg, methods, dtype), idx, rng, mb, cfg, methods)


def _layer_backward(h, lp, adapters, small, idx, rng, mb, ct, *, cfg, methods, kernels, dtype):
    """(cotangent of the layer's input, of its adapter slice): the layer recomputed from h, then its VJP."""
    with kernel_mode(kernels):
        ad = _layer_slice(adapters, small, mb, idx, cfg, methods, dtype)
        _, pull = jax.vjp(lambda x, a: _layer(x, lp, a, idx, rng, mb, cfg, methods), h, ad)
        return pull(ct)


def _last(h, lp, idx, rng, adapters, small, mb, batch, nll_sum, *, cfg, methods, kernels, dtype, max_targets,
          head_grads):
    """The last layer, the final norm and the fused lm_head + loss as one program, differentiated once: the last
    layer's forward is not run twice. It holds that layer's activations while the loss runs, as every layer's
    backward holds its recomputed ones. Returns (`nll_sum` plus the micro-batch's summed NLL, the gradient of its
    share of the step's loss (divided by the whole batch's target count) w.r.t. the layer's input h `[B, T, D]`,
    w.r.t. its adapter slice, and with `head_grads` w.r.t. the adapters the head reads, else None)."""
    with kernel_mode(kernels):
        total = jnp.maximum(jnp.sum(batch["labels"] >= 0).astype(F32), 1.0)
        ad = _layer_slice(adapters, small, mb, idx, cfg, methods, dtype)

        def loss(x, a, full):
            y = _layer(x, lp, a, idx, rng, mb, cfg, methods)
            params = _overridden(small, full, methods)
            y = rms_norm(y, params["norm"], cfg.rms_norm_eps, cfg.norm_offset)
            s, _ = nll_from_hidden(y, full, params, mb, cfg=cfg, methods=methods, max_targets=max_targets)
            return s / total, s

        (_, s), g = jax.value_and_grad(loss, argnums=(0, 1, 2) if head_grads else (0, 1), has_aux=True)(
            h, ad, adapters)
        return nll_sum + s, g[0], g[1], g[2] if head_grads else None


_BACKWARD_STATIC, _LAST_STATIC = _MODEL + ("dtype",), _MODEL + ("dtype", "max_targets", "head_grads")
# (layer backward, last layer + loss): with `_LEAN`, and with XLA's defaults for a jaxlib without that option
_LEAN_PROGRAMS = (jax.jit(_layer_backward, static_argnames=_BACKWARD_STATIC, compiler_options=_LEAN),
                  jax.jit(_last, static_argnames=_LAST_STATIC, compiler_options=_LEAN))
_DEFAULT_PROGRAMS = (jax.jit(_layer_backward, static_argnames=_BACKWARD_STATIC),
                     jax.jit(_last, static_argnames=_LAST_STATIC))


@functools.partial(jax.jit, static_argnames=_MODEL + ("tx",), donate_argnums=(0,))
def _update(state, grads, nll_sum, batch, *, cfg, methods, tx, kernels):
    """Each method's loss term (`train_step` adds 1/accum of it per micro-batch), then `apply_gradients`."""
    with kernel_mode(kernels):
        g = jax.grad(lambda ad: method_loss(ad, methods))(state["adapters"])
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return apply_gradients(state, jax.random.split(state["rng"])[0], grads, nll_sum, batch, cfg=cfg, tx=tx)


def _head_grads(adapters: dict, methods: tuple) -> bool:
    """Whether the lm_head + loss reads trained params (modules_to_save copies), so that its gradient w.r.t. the
    adapters is needed (a tree of zeros otherwise, not formed)."""
    return any(isinstance(adapters.get(m.name), dict) and bool(adapters[m.name].get("modules_to_save"))
               for m in methods)


def _compiled(fn: Any, *args: Any, **static: Any) -> None:
    """`fn` (a jit) compiled for these arguments into jit's cache, then the compiler's free memory handed back to the
    OS (`LayerwiseStep.compile_ahead`)."""
    fn.lower(*args, **static).compile()
    release_host_memory()


class LayerwiseStep:
    """A drop-in for `train_step(state, base, batch, **kw)` (module docstring) for one base: `base`, as the
    single-device loop hands it to the step. Build it with `layerwise_step`.

    Each call waits for its update and hands the heap's free memory back to the OS (`release_host_memory`). The
    step's ~40 programs allocate their buffers from XLA's worker threads; kept in the heap (what
    `configure_host_memory` asks for), freed blocks did not serve the next step's larger ones, and the high-water
    mark crept up by the size of the loss's logits: 1B bf16 LoRA (`jpeft train`), steps peaking at 733-850 MiB of
    anonymous memory, 620-708 with the trim, for 1.39 instead of 1.36 s a step (the pages are faulted in again each
    step; bench/RESULTS.md, issue 20)."""

    def __init__(self, base: dict, views: list[dict]):
        self.base, self.views = base, views
        self.small = {k: v for k, v in base.items() if k not in STACKS}
        device = next(iter(jax.tree_util.tree_leaves(views[0])[0].devices()))
        self.index = [jax.device_put(jnp.int32(i), device) for i in range(len(views))]
        self.device = device
        self.check_rng: jax.Array | None = None  # set by `compile_ahead`
        self.backward, self.last = _LEAN_PROGRAMS  # `compile_ahead` falls back to `_DEFAULT_PROGRAMS` where needed

    def _zero(self) -> jax.Array:
        """A committed fp32 0, as every later NLL sum is (jit keys its cache on placement)."""
        return jax.device_put(np.float32(0), self.device)

    def _pieces(self, state, base, batch, kw):
        if base is not self.base:
            raise ConfigError("LayerwiseStep was built for another base; build one per base (layerwise_step)")
        model = dict(cfg=kw["cfg"], methods=tuple(kw["methods"]), kernels=kw.get("kernels", "auto"))
        head = dict(max_targets=kw.get("max_targets"), head_grads=_head_grads(state["adapters"], model["methods"]))
        return model, kw.get("dtype", F32), head, kw["tx"]

    def __call__(self, state: dict, base: dict, batch: dict, **kw: Any) -> tuple[dict, dict]:
        """One optimizer step over `batch` `[accum, B, T]` arrays: `(new state, metrics)` as `train_step`.
        `state` is donated."""
        model, dtype, head, tx = self._pieces(state, base, batch, kw)
        adapters, views, idx = state["adapters"], self.views, self.index
        grads, nll_sum = None, self._zero()
        for i in range(batch["input_ids"].shape[0]):
            h, mb, rng = _embed_stage(adapters, self.small, batch, jnp.int32(i), state["rng"], **model, dtype=dtype)
            inputs, last = [], len(views) - 1
            for layer in range(last):
                inputs.append(h)
                h = _layer_forward(h, views[layer], adapters, self.small, idx[layer], rng, mb, **model, dtype=dtype)
            cts = [None] * len(views)
            nll_sum, ct, cts[last], ct_head = self.last(h, views[last], idx[last], rng, adapters, self.small, mb,
                                                        batch, nll_sum, **model, dtype=dtype, **head)
            for layer in reversed(range(last)):
                ct, cts[layer] = self.backward(inputs[layer], views[layer], adapters, self.small, idx[layer], rng,
                                               mb, ct, **model, dtype=dtype)
                inputs[layer] = None
            grads = _embed_backward(grads, adapters, self.small, mb, ct, cts, ct_head, **model, dtype=dtype)
        out = _update(state, grads, nll_sum, batch, **model, tx=tx)
        del grads, cts, inputs
        jax.block_until_ready(out)
        release_host_memory()  # the step's freed temporaries (one reason is in the class docstring)
        return out

    def compile_ahead(self, state: dict, base: dict, batch: dict, **kw: Any) -> None:
        """Compile every program of a step on these shapes, so that the step's calls find them in jit's cache (jit
        keys it on each argument's placement: the stand-ins for the intermediate values are zeros placed where the
        real ones are, committed to the step's device). Nothing runs; `state` is untouched.

        The largest compilations go first, each followed by handing the heap's free memory back to the OS
        (`release_host_memory`), so that each compiles on the least memory held (1B bf16 LoRA, `jpeft train`: the
        run's anonymous peak was 945 MiB while compiling `_last` after the other programs and a dry run's results;
        674 MiB this way, before `_LEAN`; bench/RESULTS.md, issue 20)."""
        model, dtype, head, tx = self._pieces(state, base, batch, kw)
        adapters, lp, idx = state["adapters"], self.views[0], self.index[0]
        embed = functools.partial(_embed_stage, **model, dtype=dtype)
        h, mb, rng = self._zeros(jax.eval_shape(embed, adapters, self.small, batch, jnp.int32(0), state["rng"]))
        nll = self._zero()
        for programs in (_LEAN_PROGRAMS, _DEFAULT_PROGRAMS):
            self.backward, self.last = programs
            try:
                if len(self.views) > 1:
                    _compiled(self.backward, h, lp, adapters, self.small, idx, rng, mb, h, **model, dtype=dtype)
                _compiled(self.last, h, lp, idx, rng, adapters, self.small, mb, batch, nll, **model, dtype=dtype,
                          **head)
                break
            except jax.errors.JaxRuntimeError as e:  # a jaxlib without `_LEAN`'s option: XLA's default emitters
                if "No such compile option" not in str(e) or programs is _DEFAULT_PROGRAMS:
                    raise
        if len(self.views) > 1:
            _compiled(_layer_forward, h, lp, adapters, self.small, idx, rng, mb, **model, dtype=dtype)
        _compiled(_embed_stage, adapters, self.small, batch, jnp.int32(0), state["rng"], **model, dtype=dtype)
        ct_head = self._zeros(jax.eval_shape(lambda a: a, adapters)) if head["head_grads"] else None
        slice_of = functools.partial(_layer_slice, cfg=model["cfg"], methods=model["methods"], dtype=dtype)
        ad = self._zeros(jax.eval_shape(slice_of, adapters, self.small, mb, idx))
        cts = [ad] * len(self.views)
        grads = self._zeros(jax.eval_shape(
            functools.partial(_embed_backward, **model, dtype=dtype), None, adapters, self.small, mb, h, cts, ct_head))
        _compiled(_embed_backward, None, adapters, self.small, mb, h, cts, ct_head, **model, dtype=dtype)
        if batch["input_ids"].shape[0] > 1:  # the later micro-batches add to the gradient so far
            _compiled(_embed_backward, grads, adapters, self.small, mb, h, cts, ct_head, **model, dtype=dtype)
        _compiled(_update, state, grads, nll, batch, **model, tx=tx)
        self.check_rng = jnp.copy(state["rng"])  # placed as the state's, which the steps donate

    def _zeros(self, tree: Any) -> Any:
        """Zeros of `tree`'s shapes and dtypes (ShapeDtypeStructs), committed to the step's device."""
        return jax.tree_util.tree_map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), self.device), tree)

    def first_micro_nll(self, adapters: dict, base: dict, batch: dict, **kw: Any) -> jax.Array:
        """Summed NLL of the first micro-batch of `batch` `[accum, B, T]` with `adapters`, run by the step's own
        compiled programs (after `compile_ahead`): the training loop's check before each checkpoint. It is the step's
        training-mode loss, dropout drawn from a fixed key; a separate forward program would be one more executable
        held for the run, and its loss temporaries come on top of the state at every save (1B bf16: 119 MiB)."""
        if self.check_rng is None:
            raise ConfigError("LayerwiseStep.first_micro_nll needs the step's programs: call compile_ahead first")
        model, dtype, head, _ = self._pieces({"adapters": adapters}, base, batch, kw)
        h, mb, rng = _embed_stage(adapters, self.small, batch, jnp.int32(0), self.check_rng, **model, dtype=dtype)
        last = len(self.views) - 1
        for layer in range(last):
            h = _layer_forward(h, self.views[layer], adapters, self.small, self.index[layer], rng, mb, **model,
                               dtype=dtype)
        nll, *_ = self.last(h, self.views[last], self.index[last], rng, adapters, self.small, mb, batch,
                            self._zero(), **model, dtype=dtype, **head)
        return nll


def layerwise_step(base: dict, cfg: ModelConfig, methods: Sequence[Method], remat: str, executor: str = "auto", *,
                   mesh: Any = None, offload_optimizer: bool = False) -> LayerwiseStep | None:
    """The layer-by-layer step for this run, or None for the scan (`train_step`).

    executor: "auto" (the layer-by-layer step wherever it applies, `layerwise_blocker`, and a layer holds at least
    `AUTO_MIN_LAYER_BYTES` of weights), "scan" (never), or "layers" (always; a ConfigError naming the reason where
    it does not apply)."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r}; use one of {', '.join(EXECUTORS)} (--executor)")
    if executor == "scan":
        return None
    why = layerwise_blocker(cfg, methods, base, remat, mesh=mesh, offload_optimizer=offload_optimizer)
    if why is None and executor == "auto" and _layer_bytes(base) < AUTO_MIN_LAYER_BYTES:
        return None
    views = layer_views(base["layers"]) if why is None else None
    if why is None and views is None:
        why = "it reads the base's layers in place, and this base's memory cannot be aliased"
    if why is not None:
        if executor == "layers":
            raise ConfigError(executor_refusal(why))
        return None
    return LayerwiseStep(base, views)


__all__ = ["EXECUTORS", "LayerwiseStep", "check_executor", "layer_views", "layerwise_blocker", "layerwise_step"]
