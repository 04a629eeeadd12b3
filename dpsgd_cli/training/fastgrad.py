"""Fast per-example clipping for Sequential models of Dense, Conv2D and weightless layers (issues 4, 13, 14).

One dispatch point: `REGISTRY` maps a layer type to its `LayerRule` (like TF Privacy's layer registry):
whether a layer is supported, its forward formulations and default, and for layers with weights
(`WeightRule`) the per-unit squared norms and the weighted sum of per-unit gradients. Adding a layer type
is one `register(layer_type, rule)` and a test equal to the per-example GradientTape loop.

Same contract as `engine.vmap_clipped_gradient_sum`. One forward pass keeps each Dense/Conv2D layer's input
and pre-activation output z; one backward pass of the *summed* loss w.r.t. the z's gives every example's
output-gradient dz (example i's loss depends on example i's activations only: no BatchNorm). A unit's
(example's, or microbatch's) kernel gradient is A_u·D_u with A_u [p, T] its inputs (Conv2D: image patches,
p = kh·kw·cin, T = output positions × k) and D_u [T, c] its dz / k; bias gradient Σ_T D_u. A_u is kept in
the layout its construction gives ([T, p] for Dense inputs and gathered patches, [p, T] for phase-slice
patches): the GEMMs take either, so no factor is transposed in memory.

Each layer can be computed several ways ("formulations", `formulation_choices`), all equal to the
per-example GradientTape reference (tests/test_fastgrad.py), so choosing one changes speed only:
- forward of a Conv2D: `native` (tf.nn.conv2d) or `patches` (image patches × reshaped kernel, one GEMM);
  patches come from slices of a stride-phase view (few input channels) or a gather (many);
- per-unit gradients or norms: `materialize` (A_u·D_u, then squared), `ghost` (norms from Gram matrices
  Σ (A_uᵀA_u) ⊙ (D_u D_uᵀ), Li et al. 2022, and the clipped sum as one weighted GEMM), or, for a Conv2D with
  one input channel, `depthwise` (the batch becomes the channels of one image, input [1, H, W, B] and
  output-gradients [1, oh, ow, B·c]: one depthwise filter-gradient op gives every example's kernel gradient);
- stride-1 max pooling: `native` (Keras MaxPooling2D) or `slices` (a max of shifted slices with a cheap
  custom gradient routed like TensorFlow's: first maximum of each window in row-major order).
Which is fastest depends on the device, the TensorFlow build (oneDNN or not) and XLA, so it is measured
(`planner`), never assumed. Two examples, tutorial CNN, batch 256–288, per-layer time alone:
- on one 2-core AMD EPYC (TF 2.21, oneDNN on, other jobs sharing the CPU): without XLA, the native
  conv1 forward took 2.3 ms vs 10.5 ms as patches, native pooling forward+backward 1.3 ms vs 9.9 ms as
  slices, conv1's per-example gradients 4.7 ms by `depthwise` vs 8.4 ms from patches; under XLA the order
  flips for pooling (slices 0.9 ms, native 30 ms) and `depthwise` takes seconds;
- on the 2-core machine of issue 4, patches and slices were the faster forms (see README, Speed).
`default_formulation` (used when no plan is given) is the issue-4 choice: first conv as patches, stride-1
pooling as slices, `_prefer_ghost` by operation count.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from dpsgd_cli.config import GRADIENT_PATHS
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import engine

# Layer configuration that changes the work (the planner's cache key), unless a rule names its own.
SIGNATURE_KEYS = ("filters", "kernel_size", "strides", "padding", "activation", "use_bias", "units",
                  "pool_size", "data_format", "dilation_rate", "groups", "rate")


class LayerRule:
    """How the fast path runs one layer type (an entry of `REGISTRY`, added by `register`).

    This base class is a weightless layer that treats each example on its own: called as Keras calls it,
    nothing to choose. `WeightRule` adds per-unit gradient rules for layers with trainable variables."""

    subclasses = True  # the entry also covers subclasses of the registered type
    weighted = False  # has trainable variables and per-unit rules (see `WeightRule`)
    signature_keys = SIGNATURE_KEYS

    def problem(self, layer) -> str | None:
        """Why this layer is off the fast path (a phrase, "" for no detail), or None when it is handled."""
        return "" if layer.weights else None

    def choices(self, layer, private: bool) -> list[dict[str, str]]:
        """Formulations this rule can run for `layer`, each tested equal to the GradientTape loop."""
        return []

    def default(self, layer, first: bool) -> dict[str, str] | None:
        """The formulation used without a plan (`first`: no weight layer comes before this one)."""
        return None

    def forward(self, layer, h: tf.Tensor, choice: dict[str, str]) -> tf.Tensor:
        """The layer's training-mode output under `choice` (the same values as `layer(h)`)."""
        return layer(h, training=True)

    def for_layer(self, layer) -> LayerRule:
        """The rule for this very layer (a type's entry may hand a layer to another rule, e.g. by whether
        it has trainable variables)."""
        return self


class WeightRule(LayerRule):
    """A layer with trainable variables. The step keeps `pre_activation`'s z, gets every example's dz =
    dL/dz from one backward pass of the summed loss (example i's loss depends on its own z only), and
    `unit_terms` turns (input, z's companion `aux`, dz) into per-unit squared norms and a term from which
    `weighted_sums` gives Σ_u w_u · g_u for each of the layer's trainable variables."""

    subclasses = False
    weighted = True

    def pre_activation(self, layer, a: tf.Tensor, choice) -> tuple[tf.Tensor, tf.Tensor | None]:
        """(z, aux): the tensor whose output-gradient the rules need, and anything kept for them."""
        raise NotImplementedError

    def activation(self, layer, z: tf.Tensor) -> tf.Tensor:
        """The layer's output from z."""
        return z

    def forward(self, layer, h, choice):
        if choice.get("forward", "native") == "native":
            return layer(h, training=True)
        return self.activation(layer, self.pre_activation(layer, h, choice)[0])

    def unit_terms(self, layer, a, aux, dz, units: int, k: int, choice, strategy: str = "auto"):
        """(squared norm of each unit's gradient over this layer's variables [units], term for
        `weighted_sums`). A unit is k consecutive examples; its gradient is that of its mean loss."""
        raise NotImplementedError

    def weighted_sums(self, layer, term, weights: tf.Tensor) -> list[tf.Tensor]:
        """Σ_u weights_u · g_u for each of `layer.trainable_variables`, in that order."""
        raise NotImplementedError


def _extra_variables(layer, allowed) -> bool:
    """Whether `layer` trains variables other than `allowed` (which a rule's per-unit terms would miss)."""
    return not {id(v) for v in layer.trainable_variables} <= {id(v) for v in allowed if v is not None}


def _norm_axes(layer) -> list[int]:
    """A normalisation layer's `axis` as sorted non-negative input axes (batch = 0)."""
    rank = len(layer.input.shape)
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axes)


class KernelRule(WeightRule):
    """Dense and Conv2D: z = op(input, kernel) + bias. A unit's kernel gradient is A_u·D_u with A_u
    [p, T] its inputs (Conv2D: patches) and D_u [T, c] its dz / k; its bias gradient Σ_T D_u."""

    def problem(self, layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantization"
        if layer.compute_dtype != "float32":
            return f"compute dtype {layer.compute_dtype}"
        if _extra_variables(layer, (layer.kernel, layer.bias if layer.use_bias else None)):
            return "extra trainable variables"
        return None

    def activation(self, layer, z):
        return layer.activation(z)

    def pre_activation(self, layer, a, choice):
        z = self.linear(layer, a, tf.convert_to_tensor(layer.kernel))
        return (z + tf.convert_to_tensor(layer.bias) if layer.use_bias else z), None

    def linear(self, layer, a: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        """op(a, kernel): the layer's output before bias and activation."""
        raise NotImplementedError

    def inputs(self, layer, a: tf.Tensor, aux) -> tuple[tf.Tensor, bool]:
        """(A, rows): each example's inputs that multiply the reshaped [p, c] kernel, as A [B, T, p] (rows,
        the layout of the forward GEMM) or A [B, p, T], whichever its construction gives without a
        transpose; the rules below use either layout as it is."""
        raise NotImplementedError

    def unit_terms(self, layer, a, aux, dz, units, k, choice, strategy="auto"):
        if strategy == "auto" and choice.get("grads", "auto") != "auto":
            strategy = choice["grads"]
        a_u, rows, d_u = _unit_factors(*self.inputs(layer, a, aux), dz, units, k)
        sq, grads, bias = _layer_terms(layer, a_u, rows, d_u, strategy)
        return sq, (a_u, rows, d_u, grads, bias)

    def weighted_sums(self, layer, term, weights):
        a_u, rows, d_u, grads, bias = term
        if grads is None:  # one GEMM [p, units·T] · [units·T, c]
            if rows:
                a_all, transpose = tf.reshape(a_u, [-1, a_u.shape[2]]), True
            else:
                a_all, transpose = tf.reshape(tf.transpose(a_u, [1, 0, 2]), [a_u.shape[1], -1]), False
            weighted = tf.reshape(d_u * weights[:, None, None], [-1, d_u.shape[2]])
            kernel = tf.matmul(a_all, weighted, transpose_a=transpose)
        else:
            kernel = tf.tensordot(weights, grads, axes=1)
        sums = [tf.reshape(kernel, layer.kernel.shape)]
        return sums + ([] if bias is None else [tf.tensordot(weights, bias, 1)])


class DenseRule(KernelRule):
    def choices(self, layer, private):
        return [{"forward": "native", "grads": g} for g in ("materialize", "ghost")] if private else []

    def default(self, layer, first):
        return {"forward": "native", "grads": "auto"}

    def linear(self, layer, a, kernel):
        return tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]]) if a.shape.rank > 2 else a @ kernel

    def inputs(self, layer, a, aux):
        return tf.reshape(a, [a.shape[0], -1, a.shape[-1]]), True


class Conv2DRule(KernelRule):
    """Forward `native` (tf.nn.conv2d) or `patches` (patches × reshaped kernel, one GEMM); per-unit
    gradients `materialize`, `ghost` or, for one input channel, `depthwise`."""

    def problem(self, layer):
        if (layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1)
                or layer.groups != 1):
            return "channels_first, dilation or groups"
        return super().problem(layer)

    def choices(self, layer, private):
        forwards = ("native", "patches")
        if not private:
            return [{"forward": f} for f in forwards]
        choices = [{"forward": f, "grads": g} for f in forwards for g in ("materialize", "ghost")]
        if layer.kernel.shape[2] == 1:
            choices.append({"forward": "native", "grads": "depthwise"})
        return choices

    def default(self, layer, first):
        return {"forward": "patches" if first else "native", "grads": "auto"}

    def pre_activation(self, layer, a, choice):
        if choice.get("forward") != "patches":
            return super().pre_activation(layer, a, choice)
        # one GEMM per example with the patches, which the per-example gradients need anyway
        kernel = tf.convert_to_tensor(layer.kernel)
        patches, rows = _patches(a, layer)
        kernel = tf.reshape(kernel, [-1, kernel.shape[-1]])
        if rows:  # [B·T, p] · [p, c]
            z = tf.matmul(tf.reshape(patches, [-1, patches.shape[2]]), kernel)
        else:  # [p, c]ᵀ · [B, p, T], then [B, T, c]
            z = tf.transpose(tf.matmul(kernel, patches, transpose_a=True), [0, 2, 1])
        z = tf.reshape(z, layer.compute_output_shape(a.shape))
        return (z + tf.convert_to_tensor(layer.bias) if layer.use_bias else z), (patches, rows)

    def linear(self, layer, a, kernel):
        return tf.nn.conv2d(a, kernel, strides=layer.strides, padding=layer.padding.upper())

    def inputs(self, layer, a, aux):
        return _patches(a, layer) if aux is None else aux

    def unit_terms(self, layer, a, aux, dz, units, k, choice, strategy="auto"):
        if choice.get("grads") != "depthwise":
            return super().unit_terms(layer, a, aux, dz, units, k, choice, strategy)
        grads = _depthwise_unit_grads(layer, a, dz, units, k)
        sq = tf.reduce_sum(tf.square(grads), axis=[1, 2])
        bias = None
        if layer.use_bias:
            bias = tf.reduce_sum(tf.reshape(dz, [units, -1, dz.shape[-1]]), axis=1) / k
            sq += tf.reduce_sum(tf.square(bias), axis=1)
        return sq, (None, False, None, grads, bias)


class MaxPool2DRule(LayerRule):
    """Stride-1 'valid' max pooling: `native` (Keras) or `slices` (`_max_pool_stride1`)."""

    def choices(self, layer, private):
        return [{"forward": "native"}, {"forward": "slices"}] if _is_stride1_max_pool(layer) else []

    def default(self, layer, first):
        return {"forward": "slices"} if _is_stride1_max_pool(layer) else None

    def forward(self, layer, h, choice):
        if choice.get("forward") == "slices":
            return _max_pool_stride1(h, layer.pool_size)
        return layer(h, training=True)


class PerExampleNormRule(LayerRule):
    """Group/Layer normalisation without γ, β: each example normalised by its own statistics."""

    def problem(self, layer):
        if 0 in _norm_axes(layer):
            return "normalises across examples (axis 0)"
        return super().problem(layer)


class AffineNormRule(WeightRule):
    """Group/Layer normalisation, each example by its own statistics, with or without γ (scale) and β
    (center): y = x̂ ⊙ γ + β. Per unit (k examples, mean loss): γ's gradient is Σ dL/dy ⊙ x̂ and β's
    Σ dL/dy over the unit's examples and every input axis γ does not span, / k. Without γ and β it is a
    weightless layer (no per-unit terms). Not handled (off the fast path): normalising over the batch
    axis, LayerNormalization's `rms_scaling`, GroupNormalization over an axis other than the last."""

    def problem(self, layer):
        axes = _norm_axes(layer)
        if 0 in axes:
            return "normalises across examples (axis 0)"
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling"
        if isinstance(layer, keras.layers.GroupNormalization) and axes != [len(layer.input.shape) - 1]:
            return "groups over an axis other than the last"
        if layer.compute_dtype != "float32":
            return f"compute dtype {layer.compute_dtype}"
        if _extra_variables(layer, (getattr(layer, "gamma", None), getattr(layer, "beta", None))):
            return "extra trainable variables"
        return None

    def _normalised(self, layer, a: tf.Tensor) -> tf.Tensor:
        """x̂: zero mean, unit variance per example (and group) over the layer's axes, + epsilon."""
        if isinstance(layer, keras.layers.GroupNormalization):
            c, g = a.shape[-1], layer.groups
            grouped = tf.reshape(a, [-1, *a.shape[1:-1], g, c // g])
            axes = [i for i in range(1, grouped.shape.rank) if i != grouped.shape.rank - 2]
            mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
            return tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), [-1, *a.shape[1:]])
        mean, variance = tf.nn.moments(a, axes=_norm_axes(layer), keepdims=True)
        return (a - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def _broadcast(self, layer, v: tf.Variable, rank: int) -> tf.Tensor:
        axes = _norm_axes(layer)
        return tf.reshape(v, [v.shape[axes.index(i)] if i in axes else 1 for i in range(rank)])

    def pre_activation(self, layer, a, choice):
        x_hat = self._normalised(layer, a)
        z = x_hat
        if layer.scale:
            z = z * self._broadcast(layer, layer.gamma, a.shape.rank)
        if layer.center:
            z = z + self._broadcast(layer, layer.beta, a.shape.rank)
        return z, x_hat

    def unit_terms(self, layer, a, x_hat, dz, units, k, choice, strategy="auto"):
        rank, axes = dz.shape.rank, _norm_axes(layer)
        others = [i for i in range(1, rank) if i not in axes]

        def per_unit(t):  # Σ over the axes γ does not span, then over each unit's k examples, / k
            t = tf.reduce_sum(t, axis=others) if others else t
            return tf.reduce_sum(tf.reshape(t, [units, k, *t.shape[1:]]), axis=1) / k

        grads = {}
        if layer.scale:
            grads[id(layer.gamma)] = per_unit(dz * x_hat)
        if layer.center:
            grads[id(layer.beta)] = per_unit(dz)
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [units, -1]), axis=1) for g in grads.values()]
                      or [tf.zeros([units])])
        return sq, grads

    def weighted_sums(self, layer, term, weights):
        return [tf.reshape(tf.tensordot(weights, term[id(v)], 1), v.shape) for v in layer.trainable_variables]


class EmbeddingRule(WeightRule):
    """Embedding lookup z = E[ids]. A unit's gradient is sparse: row v of E gets Σ dL/dz over the unit's
    positions holding id v. Its squared norm is computed exactly without densifying: dz rows are summed
    per distinct (unit, id) pair (`tf.unique` + segment sums, O(B·T·D)), then the squared row norms per
    unit; the weighted sum scatters w_u·dz into the rows its ids name. Not handled: `mask_zero` (the fast
    path does not propagate Keras masks), LoRA, quantization."""

    def problem(self, layer):
        if layer.mask_zero:
            return "mask_zero"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantization"
        if _extra_variables(layer, (layer.embeddings,)):
            return "extra trainable variables"
        return None

    def pre_activation(self, layer, a, choice):
        ids = tf.cast(a, tf.int32)
        return tf.gather(tf.convert_to_tensor(layer.embeddings), ids), ids

    def unit_terms(self, layer, a, ids, dz, units, k, choice, strategy="auto"):
        vocab, width = layer.embeddings.shape
        rows = tf.reshape(dz, [-1, width]) / k  # one row per (example, position)
        unit = tf.repeat(tf.range(units, dtype=tf.int64), tf.size(ids) // units)
        pair = unit * vocab + tf.cast(tf.reshape(ids, [-1]), tf.int64)
        distinct, which = tf.unique(pair)
        summed = tf.math.unsorted_segment_sum(rows, which, tf.size(distinct))
        sq = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(summed), axis=1), distinct // vocab, units)
        return sq, (rows, tf.reshape(ids, [-1]), unit)

    def weighted_sums(self, layer, term, weights):
        rows, ids, unit = term
        weighted = rows * tf.gather(weights, unit)[:, None]
        return [tf.math.unsorted_segment_sum(weighted, ids, layer.embeddings.shape[0])]


class NormRule(PerExampleNormRule):
    """Group/Layer normalisation: the weightless rule without trainable γ, β, else `AffineNormRule`."""

    def __init__(self) -> None:
        self.affine = AffineNormRule()

    def for_layer(self, layer) -> LayerRule:
        return self.affine if layer.trainable_variables else self


REGISTRY: dict[type, LayerRule] = {
    keras.layers.Dense: DenseRule(),
    keras.layers.Conv2D: Conv2DRule(),
    keras.layers.Embedding: EmbeddingRule(),
    keras.layers.MaxPooling2D: MaxPool2DRule(),
    keras.layers.GroupNormalization: NormRule(),
    keras.layers.LayerNormalization: NormRule(),
    **{layer_type: LayerRule() for layer_type in (
        keras.layers.AveragePooling2D, keras.layers.Flatten, keras.layers.Activation, keras.layers.ReLU,
        keras.layers.Rescaling,
        keras.layers.Reshape, keras.layers.Dropout, keras.layers.ZeroPadding2D,
        keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
        keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D)},
}


def register(layer_type: type, rule: LayerRule) -> None:
    """Put `layer_type` on the fast path with `rule` (replacing any rule it had)."""
    REGISTRY[layer_type] = rule


def rule_for(layer) -> LayerRule | None:
    """The registered rule for `layer`'s type (or, for rules that allow it, a base type), else None."""
    for cls in type(layer).__mro__:
        rule = REGISTRY.get(cls)
        if rule is not None:
            return rule.for_layer(layer) if cls is type(layer) or rule.subclasses else None
    return None


def _unsupported_layer(model: keras.Model) -> str | None:
    """What the fast path cannot handle in `model` (a short phrase), or None when it handles everything."""
    if not isinstance(model, keras.Sequential):
        return f"{type(model).__name__} model {model.name!r} (only Sequential models)"
    for layer in model.layers:
        rule = rule_for(layer)
        problem = "" if rule is None else rule.problem(layer)
        if problem is not None:
            return f"{type(layer).__name__} layer {layer.name!r}" + (f" ({problem})" if problem else "")
    owned = {id(v) for layer in model.layers for v in layer.trainable_variables}
    if any(id(v) not in owned for v in model.trainable_variables):
        return "a trainable variable outside the model's layers"
    return None


def fast_path_problem(model: keras.Model) -> str | None:
    """What keeps `model` off the fast path (a phrase, e.g. "LayerNormalization layer 'ln'"), or None."""
    return _unsupported_layer(model)


def supports_fast_path(model: keras.Model) -> bool:
    """True when `fast_clipped_gradient_sum` handles every layer and every trainable variable of `model`."""
    return _unsupported_layer(model) is None


def choose_gradient_sum_fn(model: keras.Model, gradient_path: str) -> engine.GradSumFn:
    """The `grad_sum_fn` for `engine.make_train_step`.

    `gradient_path`: "auto" (the fast path when `supports_fast_path`, else the vmap reference), "fast"
    (ConfigError when unsupported) or "vectorized_map".
    """
    if gradient_path not in GRADIENT_PATHS:
        raise ConfigError(f"training.gradient_path must be one of {', '.join(GRADIENT_PATHS)}, "
                          f"got {gradient_path!r}")
    if gradient_path == "vectorized_map":
        return engine.vmap_clipped_gradient_sum
    reason = _unsupported_layer(model)
    if reason is None:
        return fast_clipped_gradient_sum
    if gradient_path == "fast":
        raise ConfigError(f"training.gradient_path 'fast' does not support {reason}; "
                          "use 'auto' or 'vectorized_map'")
    return engine.vmap_clipped_gradient_sum


def _out_and_pad(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """Output length and leading zero-padding of one spatial axis under TensorFlow's 'same'/'valid' rules."""
    if padding == "same":
        out = -(-n // s)
        return out, max((out - 1) * s + k - n, 0) // 2
    return (n - k) // s + 1, 0


def _patches_by_phase(a: tf.Tensor, layer) -> tf.Tensor:
    """Patches [B, kh·kw·cin, T] from plain slices of a stride-phase view (fast for few input channels)."""
    (kh, kw), (sh, sw), (b, h, w, cin) = layer.kernel_size, layer.strides, a.shape
    (oh, top), (ow, left) = _out_and_pad(h, kh, sh, layer.padding), _out_and_pad(w, kw, sw, layer.padding)
    hs, ws = (kh - 1) // sh + oh, (kw - 1) // sw + ow  # phase-view rows / columns that patches touch
    at = tf.transpose(a, [0, 3, 1, 2]) if cin > 1 else tf.reshape(a, [b, 1, h, w])
    at = tf.pad(at, [[0, 0], [0, 0], [top, max(hs * sh - h - top, 0)], [left, max(ws * sw - w - left, 0)]])
    view = tf.reshape(at[:, :, :hs * sh, :ws * sw], [b, cin, hs, sh, ws, sw])
    parts = [view[:, :, i // sh:i // sh + oh, i % sh, j // sw:j // sw + ow, j % sw]
             for i in range(kh) for j in range(kw)]
    return tf.reshape(tf.stack(parts, axis=1), [b, kh * kw * cin, oh * ow])


def _patches_by_gather(a: tf.Tensor, layer) -> tf.Tensor:
    """Patches [B, T, kh·kw·cin] by gathering cin-vectors at constant offsets (fast for many channels)."""
    (kh, kw), (sh, sw), (b, h, w, cin) = layer.kernel_size, layer.strides, a.shape
    (oh, top), (ow, left) = _out_and_pad(h, kh, sh, layer.padding), _out_and_pad(w, kw, sw, layer.padding)
    bottom, right = max((oh - 1) * sh + kh - h - top, 0), max((ow - 1) * sw + kw - w - left, 0)
    padded = tf.pad(a, [[0, 0], [top, bottom], [left, right], [0, 0]])
    rows = np.arange(oh)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None]
    cols = np.arange(ow)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :]
    index = tf.constant((rows * padded.shape[2] + cols).reshape(-1), dtype=tf.int32)
    patches = tf.gather(tf.reshape(padded, [b, -1, cin]), index, axis=1)
    return tf.reshape(patches, [b, oh * ow, kh * kw * cin])


def _patches(a: tf.Tensor, layer) -> tuple[tf.Tensor, bool]:
    """(image patches, rows), p = kh·kw·cin ordered like the reshaped kernel, T = output positions: by
    phase slices [B, p, T] (rows False) for few input channels, else by a gather [B, T, p] (rows True)."""
    if a.shape[-1] < 8:
        return _patches_by_phase(a, layer), False
    return _patches_by_gather(a, layer), True


def _is_stride1_max_pool(layer) -> bool:
    return (isinstance(layer, keras.layers.MaxPooling2D) and tuple(layer.strides) == (1, 1)
            and layer.padding == "valid" and layer.data_format == "channels_last")


def _max_pool_stride1(h: tf.Tensor, pool_size: tuple[int, int]) -> tf.Tensor:
    """'valid' max pooling with stride 1, as a max of shifted slices (same values as tf.nn.max_pool2d).

    Its gradient goes to the first maximum of each window in row-major order, as TensorFlow's does, but
    costs a few element-wise passes: MaxPoolGrad on CPU (and XLA's select-and-scatter) is 10-25x slower.
    """
    (ph, pw), (_, height, width, _) = pool_size, h.shape
    oh, ow = height - ph + 1, width - pw + 1
    offsets = [(i, j) for i in range(ph) for j in range(pw)]

    @tf.custom_gradient
    def pool(h):
        views = [h[:, i:i + oh, j:j + ow, :] for i, j in offsets]
        out = views[0]
        for view in views[1:]:
            out = tf.maximum(out, view)

        def grad(upstream):
            taken, dh = tf.zeros_like(out, dtype=tf.bool), tf.zeros_like(h)
            for (i, j), view in zip(offsets, views):
                hit = tf.logical_and(tf.equal(view, out), tf.logical_not(taken))
                taken = tf.logical_or(taken, hit)
                pads = [[0, 0], [i, ph - 1 - i], [j, pw - 1 - j], [0, 0]]
                dh += tf.pad(tf.where(hit, upstream, tf.zeros_like(upstream)), pads)
            return dh

        return out, grad

    return pool(h)


# weight layers: native | patches; stride-1 max pooling: native | slices
FORWARDS = ("native", "patches", "slices")
GRADS = ("materialize", "ghost", "depthwise")  # per-unit kernel gradients or norms of Dense/Conv2D layers


def default_formulation(model: keras.Model) -> dict[str, dict[str, str]]:
    """The formulation used when none is given (each rule's `default`): the first Conv2D as patches ×
    kernel (its patches are needed for its per-example gradients anyway), every other weight layer native,
    stride-1 max pooling as shifted slices, per-layer norms by `_prefer_ghost`'s operation count. A plan
    (`planner`) replaces it."""
    out, first = {}, True
    for layer in model.layers:
        rule = rule_for(layer)
        choice = rule.default(layer, first) if rule else None
        if choice:
            out[layer.name] = choice
        first = first and not (rule and rule.weighted)
    return out


def formulation_choices(layer, first: bool, private: bool) -> list[dict[str, str]]:
    """Every formulation this module can run for `layer` (all tested equal to the GradientTape reference).

    `first`: the layer is the first weight layer (its input needs no gradient). Empty for layers with
    nothing to choose."""
    rule = rule_for(layer)
    return rule.choices(layer, private) if rule else []


def _choice(formulation, layer, default: dict[str, str] | None) -> dict[str, str]:
    return {**(default or {}), **(formulation or {}).get(layer.name, {})}


class _Record(NamedTuple):
    """One weight layer's share of the forward pass: its input `a`, the watched z and the rule's `aux`."""

    rule: WeightRule
    layer: keras.layers.Layer
    a: tf.Tensor
    z: tf.Tensor
    aux: tf.Tensor | None
    choice: dict[str, str]


def _forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None):
    """Logits and a `_Record` per weight layer, z's watched. `formulation`: {layer name: {"forward": ...,
    "grads": ...}} (missing: `default_formulation`)."""
    defaults = default_formulation(model)
    records, h = [], x
    for layer in model.layers:
        rule = rule_for(layer)
        choice = _choice(formulation, layer, defaults.get(layer.name))
        if rule.weighted:
            z, aux = rule.pre_activation(layer, h, choice)
            tape.watch(z)
            records.append(_Record(rule, layer, h, z, aux, choice))
            h = rule.activation(layer, z)
        else:
            h = rule.forward(layer, h, choice)
    return h, records


def forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None) -> tf.Tensor:
    """The model's training-mode logits through `formulation` (default: `default_formulation`): the same
    function as `model(x)`, for a non-private step. Native choices call the Keras layer itself, so an
    all-native formulation is the plain Keras forward. Call inside `tape`."""
    defaults = default_formulation(model)
    h = x
    for layer in model.layers:
        rule = rule_for(layer)
        choice = _choice(formulation, layer, defaults.get(layer.name))
        h = rule.forward(layer, h, choice) if rule else layer(h, training=True)
    return h


def make_forward_fn(formulation):
    """`forward_fn` for `engine.make_train_step` following `formulation` (None when it is all native: the
    plain Keras step)."""
    if not any(c.get("forward", "native") != "native" for c in formulation.values()):
        return None
    return lambda model, x, tape: forward(model, x, tape, formulation)


def _unit_factors(a: tf.Tensor, rows: bool, dz: tf.Tensor, units: int, k: int):
    """(A_u, rows, D_u) of each unit's k examples: A_u [units, k·T, p] if `rows` (a [B, T, p]) else
    [units, p, k·T] (a [B, p, T]), and D_u [units, k·T, c] = dz / k."""
    c = dz.shape[-1]
    if rows:
        return tf.reshape(a, [units, k * a.shape[1], a.shape[2]]), rows, tf.reshape(dz, [units, -1, c]) / k
    p, t = a.shape[1], a.shape[2]
    if k > 1:
        a = tf.transpose(tf.reshape(a, [units, k, p, t]), [0, 2, 1, 3])
    return tf.reshape(a, [units, p, k * t]), rows, tf.reshape(dz, [units, k * t, c]) / k


def _prefer_ghost(p: int, t: int, c: int) -> bool:
    """Whether Gram-matrix norms are cheaper than materializing per-unit kernel gradients.

    Per unit, ghost costs T²(p+c+1) multiply-adds for the norms (the weighted sum then needs one GEMM of
    T·p·c, the same as materializing); materializing costs T·p·c plus 2·p·c to square and weight.
    """
    return t * t * (p + c + 1) < 2 * p * c


def _layer_terms(layer, a_u, rows: bool, d_u, strategy: str):
    """(squared norms [units], kernel grads [units, p, c] or None if ghost, bias grads [units, c] or None)
    from A_u ([units, T, p] if `rows`, else [units, p, T]) and D_u [units, T, c]."""
    t, p = (a_u.shape[1], a_u.shape[2]) if rows else (a_u.shape[2], a_u.shape[1])
    if strategy == "ghost" or (strategy == "auto" and _prefer_ghost(p, t, d_u.shape[2])):
        if t == 1:  # one row per unit (a Dense layer on flat inputs): ‖a dᵀ‖² = ‖a‖²‖d‖², no GEMM
            sq = tf.reduce_sum(tf.square(a_u), axis=[1, 2]) * tf.reduce_sum(tf.square(d_u), axis=[1, 2])
            return _with_bias(layer, sq, None, d_u)
        gram_a = tf.matmul(a_u, a_u, transpose_a=not rows, transpose_b=rows)  # [units, T, T]
        gram_d = tf.matmul(d_u, d_u, transpose_b=True)
        sq, grads = tf.maximum(tf.reduce_sum(gram_a * gram_d, axis=[1, 2]), 0.0), None
    else:
        grads = tf.matmul(a_u, d_u, transpose_a=rows)
        sq = tf.reduce_sum(tf.square(grads), axis=[1, 2])
    return _with_bias(layer, sq, grads, d_u)


def _with_bias(layer, sq, grads, d_u):
    """(squared norms with the bias gradient's added, kernel grads, bias grads Σ_T D_u or None)."""
    bias = tf.reduce_sum(d_u, axis=1) if layer.use_bias else None
    return (sq if bias is None else sq + tf.reduce_sum(tf.square(bias), axis=1)), grads, bias


def _depthwise_unit_grads(layer, a, dz, units: int, k: int) -> tf.Tensor:
    """Per-unit kernel gradients [units, kh·kw, c] of a Conv2D with one input channel, by one native op.

    The batch becomes the channels of one image: input [1, H, W, B], output-gradients [1, oh, ow, B·c];
    the gradient of a depthwise convolution's filter is then every example's own kernel gradient."""
    (kh, kw), (b, h, w, _), c = layer.kernel_size, a.shape, dz.shape[-1]
    image = tf.reshape(tf.transpose(tf.reshape(a, [b, h, w]), [1, 2, 0]), [1, h, w, b])
    out_backprop = tf.reshape(tf.transpose(dz, [1, 2, 0, 3]), [1, dz.shape[1], dz.shape[2], b * c])
    grads = tf.nn.depthwise_conv2d_backprop_filter(image, [kh, kw, b, c], out_backprop,
                                                   [1, *layer.strides, 1], layer.padding.upper())
    grads = tf.reshape(tf.transpose(grads, [2, 0, 1, 3]), [b, kh * kw, c])
    return grads if k == 1 else tf.reduce_sum(tf.reshape(grads, [units, k, kh * kw, c]), axis=1) / k


def _per_unit_terms(model, x, y, microbatch_size: int, strategy: str, formulation=None,
                    loss_fn: engine.LossFn = engine.per_example_loss):
    """Per-unit squared gradient norms [units], (record, term) per weight layer, losses, logits."""
    k = microbatch_size
    units = x.shape[0] // k
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        logits, records = _forward(model, x, tape, formulation)
        losses = loss_fn(logits, y)
        total = tf.reduce_sum(losses)
    dzs = tape.gradient(total, [r.z for r in records])
    terms, sq_norms = [], []
    for r, dz in zip(records, dzs):
        sq, term = r.rule.unit_terms(r.layer, r.a, r.aux, dz, units, k, r.choice, strategy)
        sq_norms.append(sq)
        terms.append((r, term))
    return tf.add_n(sq_norms), terms, losses, logits


def _weighted_sums(model, terms, weights: tf.Tensor) -> list[tf.Tensor]:
    """Σ_u weights_u · g_u for every trainable variable, in `model.trainable_variables` order."""
    sums = {}
    for record, term in terms:
        variables = record.layer.trainable_variables
        sums.update(zip(map(id, variables), record.rule.weighted_sums(record.layer, term, weights)))
    return [sums[id(v)] for v in model.trainable_variables]


def per_unit_norms(model, x, y, microbatch_size: int = 1, strategy: str = "auto",
                   formulation=None, loss_fn: engine.LossFn = engine.per_example_loss) -> tf.Tensor:
    """Global L2 norm of each unit's gradient (of its mean loss), shape [capacity / microbatch_size]."""
    return tf.sqrt(_per_unit_terms(model, x, y, microbatch_size, strategy, formulation, loss_fn)[0])


def unit_terms(model, x, y, microbatch_size: int = 1, strategy: str = "auto", formulation=None,
               loss_fn: engine.LossFn = engine.per_example_loss) -> engine.UnitTerms:
    """This backend's answer (`engine.UnitTerms`): per-unit squared norms from the per-layer rules, and
    the weighted sum of per-unit gradients as one GEMM per layer. Requires `supports_fast_path(model)`."""
    sq_norms, terms, losses, logits = _per_unit_terms(model, x, y, microbatch_size, strategy, formulation,
                                                      loss_fn)
    return sq_norms, lambda weights: _weighted_sums(model, terms, weights), losses, logits


def _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, strategy="auto", formulation=None,
                 loss_fn: engine.LossFn = engine.per_example_loss):
    """`fast_clipped_gradient_sum` with the per-layer norm strategy: "auto" (each layer's formulation
    choice, else `_prefer_ghost`), "ghost" or "materialize" (for every layer that is not "depthwise")."""
    terms = unit_terms(model, x, y, microbatch_size, strategy, formulation, loss_fn)
    return engine.clipped_sum(terms, mask, l2_norm_clip, microbatch_size)


def fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, formulation=None,
                              loss_fn: engine.LossFn = engine.per_example_loss):
    """Σ_units mask_u · clip(g_u) per trainable variable; same contract as `engine.vmap_clipped_gradient_sum`.

    Requires `supports_fast_path(model)`. `formulation`: per-layer choices (see `formulation_choices`;
    default `default_formulation`); every formulation computes the same sums, only the speed differs.
    Returns (sums aligned with `model.trainable_variables`, per-example loss [capacity], logits).
    """
    return _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size, formulation=formulation,
                        loss_fn=loss_fn)


def make_grad_sum_fn(formulation) -> engine.GradSumFn:
    """`grad_sum_fn` for `engine.make_train_step` that follows `formulation`."""
    def grad_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1,
                 loss_fn: engine.LossFn = engine.per_example_loss):
        return fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size, formulation,
                                         loss_fn=loss_fn)
    return grad_sum


def choose_gradient_path(model: keras.Model, gradient_path: str, private: bool):
    """(grad_sum_fn, forward_fn, name) for `engine.make_train_step` following `training.gradient_path`,
    with this backend's default formulation (`planner` chooses measured ones).

    Private: the fast per-example path when the model supports it (or `gradient_path` says so), else
    `tf.vectorized_map`. Non-private: the plain gradient of the mean loss, through the fast path's
    forward formulation when supported, so DP and non-private runs differ only in clipping and noise.
    """
    if gradient_path == "vectorized_map":
        return (engine.vmap_clipped_gradient_sum if private else None), None, "vectorized_map"
    fn = choose_gradient_sum_fn(model, gradient_path)  # raises ConfigError for "fast" if unsupported
    fast = fn is not engine.vmap_clipped_gradient_sum
    if not private:
        return None, (forward if fast else None), ("fast" if fast else "keras")
    return fn, None, ("fast" if fast else "vectorized_map")
