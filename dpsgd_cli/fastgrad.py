"""Fast per-example clipping for Sequential models of Dense and Conv2D layers (issue 4).

Same contract as `engine.vmap_clipped_gradient_sum`. One forward pass keeps each Dense/Conv2D layer's input
and pre-activation output z; one backward pass of the *summed* loss w.r.t. the z's gives every example's
output-gradient dz (example i's loss depends on example i's activations only: no BatchNorm). A unit's
(example's, or microbatch's) kernel gradient is A_u·D_u with A_u [p, T] its inputs (Conv2D: image patches,
p = kh·kw·cin, T = output positions × k) and D_u [T, c] its dz / k; bias gradient Σ_T D_u. Per layer,
the squared norms come from materialized A_u·D_u or, when cheaper (`_prefer_ghost`: Dense layers here),
from Gram matrices Σ (A_uᵀA_u) ⊙ (D_u D_uᵀ) ("ghost norms", Li et al. 2022) plus one weighted GEMM.

CPU choices, measured on this 2-core machine: patches from slices of a stride-phase view (few input
channels) or a gather (many), never `tf.image.extract_patches` (3x slower); the first conv's z as a GEMM
on those patches (8×8 stride-2 `tf.nn.conv2d` with one input channel is slow); stride-1 max pooling as a
max of shifted slices whose gradient is cheap, routed like TensorFlow's (XLA's select-and-scatter and
MaxPoolGrad dominate the non-private step's backward pass).

Seconds per `engine.make_train_step` step, tutorial CNN (relu), batch 256, 2 threads, other jobs sharing
the CPU (load ≈ 2; minima over 7×8 interleaved steps; ratios are within one run):
                                     graph (jit off)    XLA (jit on)
    non-private Keras step               36 ms             59 ms
    DP, vectorized_map                   48 ms (1.31×)    110 ms (1.88×)
    DP, fast (this module)               32 ms (0.88×)     51 ms (0.86×)
      … with Keras MaxPooling2D          38 ms (1.05×)     71 ms (1.21×)
      … materializing every layer        42 ms             57 ms
      … ghost norms for every layer     115 ms             96 ms
Ratios are to the non-private step, which would gain the same from the pooling above.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dpsgd_cli import engine
from dpsgd_cli.errors import ConfigError

GRADIENT_PATHS = ("auto", "fast", "vectorized_map")
_WEIGHT_LAYERS = (keras.layers.Dense, keras.layers.Conv2D)
_WEIGHTLESS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Flatten,
               keras.layers.Activation, keras.layers.ReLU, keras.layers.Reshape, keras.layers.Dropout,
               keras.layers.ZeroPadding2D, keras.layers.GlobalAveragePooling2D,
               keras.layers.GlobalMaxPooling2D,
               keras.layers.GroupNormalization)  # per-example statistics; weightless without center/scale


def _unsupported_layer(model: keras.Model) -> str | None:
    """What the fast path cannot handle in `model` (a short phrase), or None when it handles everything."""
    if not isinstance(model, keras.Sequential):
        return f"{type(model).__name__} model {model.name!r} (only Sequential models)"
    for layer in model.layers:
        if type(layer) in _WEIGHT_LAYERS:
            problem = _weight_layer_problem(layer)
            if problem:
                return f"{type(layer).__name__} layer {layer.name!r} ({problem})"
        elif not isinstance(layer, _WEIGHTLESS) or layer.weights:
            return f"{type(layer).__name__} layer {layer.name!r}"
    owned = {id(v) for layer in model.layers for v in layer.trainable_variables}
    if any(id(v) not in owned for v in model.trainable_variables):
        return "a trainable variable outside the model's layers"
    return None


def _weight_layer_problem(layer) -> str | None:
    """Why this Dense/Conv2D layer is outside the fast path, or None (plain float32 kernel and bias)."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "LoRA or quantization"
    if layer.compute_dtype != "float32":
        return f"compute dtype {layer.compute_dtype}"
    conv = isinstance(layer, keras.layers.Conv2D)
    if conv and (layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1)
                 or layer.groups != 1):
        return "channels_first, dilation or groups"
    expected = {id(layer.kernel)} | ({id(layer.bias)} if layer.use_bias else set())
    if not {id(v) for v in layer.trainable_variables} <= expected:
        return "extra trainable variables"
    return None


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
    """Patches [B, kh·kw·cin, T] by gathering cin-vectors at constant offsets (fast for many channels)."""
    (kh, kw), (sh, sw), (b, h, w, cin) = layer.kernel_size, layer.strides, a.shape
    (oh, top), (ow, left) = _out_and_pad(h, kh, sh, layer.padding), _out_and_pad(w, kw, sw, layer.padding)
    bottom, right = max((oh - 1) * sh + kh - h - top, 0), max((ow - 1) * sw + kw - w - left, 0)
    padded = tf.pad(a, [[0, 0], [top, bottom], [left, right], [0, 0]])
    rows = np.arange(oh)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None]
    cols = np.arange(ow)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :]
    index = tf.constant((rows * padded.shape[2] + cols).reshape(-1), dtype=tf.int32)
    patches = tf.gather(tf.reshape(padded, [b, -1, cin]), index, axis=1)
    return tf.transpose(tf.reshape(patches, [b, oh * ow, kh * kw * cin]), [0, 2, 1])


def _patches(a: tf.Tensor, layer) -> tf.Tensor:
    """Image patches [B, p = kh·kw·cin, T = output positions], p ordered like the reshaped kernel."""
    return _patches_by_phase(a, layer) if a.shape[-1] < 8 else _patches_by_gather(a, layer)


def _pre_activation(layer, a: tf.Tensor, patches: tf.Tensor | None) -> tf.Tensor:
    """The layer's output before its activation, from its own kernel and bias (and patches when given)."""
    kernel = tf.convert_to_tensor(layer.kernel)
    if patches is not None:  # one GEMM per example; beats tf.nn.conv2d for few input channels on CPU
        z = tf.matmul(tf.reshape(kernel, [-1, kernel.shape[-1]]), patches, transpose_a=True)
        z = tf.reshape(tf.transpose(z, [0, 2, 1]), layer.compute_output_shape(a.shape))
    elif isinstance(layer, keras.layers.Conv2D):
        z = tf.nn.conv2d(a, kernel, strides=layer.strides, padding=layer.padding.upper())
    else:
        z = tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]]) if a.shape.rank > 2 else a @ kernel
    return z + tf.convert_to_tensor(layer.bias) if layer.use_bias else z


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


def _forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape):
    """Logits and [(layer, input, pre-activation z, patches or None)] per Dense/Conv2D layer; z's watched.

    The first such layer's input needs no gradient, so a Conv2D there gets z from its patches.
    """
    records, h = [], x
    for layer in model.layers:
        if type(layer) in _WEIGHT_LAYERS:
            first_conv = not records and isinstance(layer, keras.layers.Conv2D)
            patches = _patches(h, layer) if first_conv else None
            z = _pre_activation(layer, h, patches)
            tape.watch(z)
            records.append((layer, h, z, patches))
            h = layer.activation(z)
        elif _is_stride1_max_pool(layer):
            h = _max_pool_stride1(h, layer.pool_size)
        else:
            h = layer(h, training=True)
    return h, records


def forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape) -> tf.Tensor:
    """The model's training-mode logits computed with this module's faster ops (patches + matmul for the
    first convolution, stride-1 max pooling by shifted slices): the same function as `model(x)`, for a
    non-private step on the same formulation as the fast DP step. Call inside `tape`."""
    return _forward(model, x, tape)[0]


def _unit_factors(layer, a, dz, patches, units: int, k: int):
    """A [units, p, T] (inputs or patches) and D [units, T, c] (output-gradients / k) of one layer."""
    if isinstance(layer, keras.layers.Conv2D):
        a = _patches(a, layer) if patches is None else patches
    else:
        a = tf.transpose(tf.reshape(a, [a.shape[0], -1, a.shape[-1]]), [0, 2, 1])
    p, t, c = a.shape[1], a.shape[2], dz.shape[-1]
    if k > 1:
        a = tf.transpose(tf.reshape(a, [units, k, p, t]), [0, 2, 1, 3])
    return tf.reshape(a, [units, p, k * t]), tf.reshape(dz, [units, k * t, c]) / k


def _prefer_ghost(p: int, t: int, c: int) -> bool:
    """Whether Gram-matrix norms are cheaper than materializing per-unit kernel gradients.

    Per unit, ghost costs T²(p+c+1) multiply-adds for the norms (the weighted sum then needs one GEMM of
    T·p·c, the same as materializing); materializing costs T·p·c plus 2·p·c to square and weight.
    """
    return t * t * (p + c + 1) < 2 * p * c


def _layer_terms(layer, a_u, d_u, strategy: str):
    """(squared norms [units], kernel grads [units, p, c] or None if ghost, bias grads [units, c] or None)."""
    ghost = strategy == "ghost" or (strategy == "auto" and _prefer_ghost(*a_u.shape[1:], d_u.shape[2]))
    if ghost:
        gram_a = tf.matmul(a_u, a_u, transpose_a=True)
        gram_d = tf.matmul(d_u, d_u, transpose_b=True)
        sq, grads = tf.maximum(tf.reduce_sum(gram_a * gram_d, axis=[1, 2]), 0.0), None
    else:
        grads = tf.matmul(a_u, d_u)
        sq = tf.reduce_sum(tf.square(grads), axis=[1, 2])
    bias = tf.reduce_sum(d_u, axis=1) if layer.use_bias else None
    return (sq if bias is None else sq + tf.reduce_sum(tf.square(bias), axis=1)), grads, bias


def _per_unit_terms(model, x, y, microbatch_size: int, strategy: str):
    """Per-unit squared gradient norms [units], per-layer terms for the weighted sum, losses, logits."""
    k = microbatch_size
    units = x.shape[0] // k
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        logits, records = _forward(model, x, tape)
        losses = engine.per_example_loss(logits, y)
        total = tf.reduce_sum(losses)
    dzs = tape.gradient(total, [z for _, _, z, _ in records])
    terms, sq_norms = [], []
    for (layer, a, _, patches), dz in zip(records, dzs):
        a_u, d_u = _unit_factors(layer, a, dz, patches, units, k)
        sq, grads, bias = _layer_terms(layer, a_u, d_u, strategy)
        sq_norms.append(sq)
        terms.append((layer, a_u, d_u, grads, bias))
    return tf.add_n(sq_norms), terms, losses, logits


def _weighted_sums(model, terms, weights: tf.Tensor) -> list[tf.Tensor]:
    """Σ_u weights_u · g_u for every trainable variable, in `model.trainable_variables` order."""
    sums = {}
    for layer, a_u, d_u, grads, bias in terms:
        if grads is None:
            rows = tf.reshape(tf.transpose(a_u, [1, 0, 2]), [a_u.shape[1], -1])  # [p, units·T]
            kernel = tf.matmul(rows, tf.reshape(d_u * weights[:, None, None], [rows.shape[1], -1]))
        else:
            kernel = tf.tensordot(weights, grads, axes=1)
        sums[id(layer.kernel)] = tf.reshape(kernel, layer.kernel.shape)
        if bias is not None:
            sums[id(layer.bias)] = tf.tensordot(weights, bias, axes=1)
    return [sums[id(v)] for v in model.trainable_variables]


def per_unit_norms(model, x, y, microbatch_size: int = 1, strategy: str = "auto") -> tf.Tensor:
    """Global L2 norm of each unit's gradient (of its mean loss), shape [capacity / microbatch_size]."""
    return tf.sqrt(_per_unit_terms(model, x, y, microbatch_size, strategy)[0])


def _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, strategy="auto"):
    """`fast_clipped_gradient_sum` with the per-layer norm strategy: "auto", "ghost" or "materialize"."""
    sq_norms, terms, losses, logits = _per_unit_terms(model, x, y, microbatch_size, strategy)
    weights = engine.clip_factors(tf.sqrt(sq_norms), l2_norm_clip) * mask[::microbatch_size]
    return _weighted_sums(model, terms, weights), losses, logits


def fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1):
    """Σ_units mask_u · clip(g_u) per trainable variable; same contract as `engine.vmap_clipped_gradient_sum`.

    Requires `supports_fast_path(model)`. Returns (sums aligned with `model.trainable_variables`,
    per-example loss [capacity], logits [capacity, classes]).
    """
    return _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size)
