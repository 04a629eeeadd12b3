"""Fast-path rules of `keras.layers.DepthwiseConv2D` and `keras.layers.SeparableConv2D`.

A depthwise convolution filters each input channel c with its own kernel K[:, :, c, q] (q < depth
multiplier m): output channel c·m + q. Example b's kernel gradient is
G_b[i, j, c, q] = Σ_positions x_b[patch (i, j), c] · dz_b[position, c·m + q], computed two ways (equal to
the GradientTape loop, tests/test_fastgrad_graph.py):
- `depthwise`: the batch folded into the channels of one image, input [1, H, W, B·cin] and output-gradients
  [1, oh, ow, B·cin·m]; one native depthwise filter-gradient op then gives every example's own kernel
  gradient (its filter shape [kh, kw, B·cin, m]);
- `materialize`: image patches [B, T, kh·kw, cin] and dz [B, T, cin, m], contracted over the positions T.
A SeparableConv2D is that depthwise convolution (output y) followed by a 1×1 "pointwise" convolution P and
a bias: z = y·P + b. From dz (the one output-gradient the driver gives) the rule takes dy = dz·Pᵀ for the
depthwise kernel, and the pointwise kernel's per-example gradient is yᵀ·dz, a Dense-like kernel term
(`kernel.layer_terms`: materialized or ghost norms). The squared norm of a unit's gradient is the sum over
the three variables. Not handled (off the fast path): channels_first, dilation, unequal strides.
"""

from __future__ import annotations

import tensorflow as tf

from dpsgd_cli.training.engine import without_dropped
from dpsgd_cli.training.fastgrad.base import WeightRule, extra_variables
from dpsgd_cli.training.fastgrad.kernel import joined_factors, layer_terms, unit_factors, weighted_kernel_sum

DEPTHWISE_GRADS = ("depthwise", "materialize")


class _DepthwiseBase(WeightRule):
    """Shared checks, choices and the depthwise kernel's per-unit gradients."""

    def depthwise_kernel(self, layer) -> tf.Variable:
        raise NotImplementedError

    def variables(self, layer) -> tuple:
        raise NotImplementedError

    def problem(self, layer):
        if (layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1)
                or layer.strides[0] != layer.strides[1]):
            return "channels_first, dilation or unequal strides"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantization"
        if layer.compute_dtype != "float32":
            return f"compute dtype {layer.compute_dtype}"
        if extra_variables(layer, self.variables(layer)):
            return "extra trainable variables"
        return None

    def choices(self, layer, private):
        return [{"forward": "native", "grads": g} for g in DEPTHWISE_GRADS] if private else []

    def default(self, layer, first):
        return {"forward": "native", "grads": "depthwise"}

    def activation(self, layer, z):
        return layer.activation(z)

    def depthwise(self, layer, a: tf.Tensor) -> tf.Tensor:
        kernel = tf.convert_to_tensor(self.depthwise_kernel(layer))
        return tf.nn.depthwise_conv2d(a, kernel, [1, *layer.strides, 1], layer.padding.upper())

    def depthwise_grads(self, layer, uses, units: int, k: int, choice) -> tf.Tensor:
        """Per-unit depthwise kernel gradients [units, kh, kw, cin, m], summed over `uses` ((a, dy) pairs)."""
        grads = [(_folded_grads if choice.get("grads", "depthwise") == "depthwise" else _patch_grads)(
            layer, self.depthwise_kernel(layer).shape, a, dy) for a, dy in uses]
        grads = tf.add_n(grads)
        return grads if k == 1 else tf.reduce_sum(tf.reshape(grads, [units, k, *grads.shape[1:]]), 1) / k


class DepthwiseConv2DRule(_DepthwiseBase):
    def depthwise_kernel(self, layer):
        return layer.kernel

    def variables(self, layer):
        return (layer.kernel, layer.bias if layer.use_bias else None)

    def pre_activation(self, layer, a, choice):
        z = self.depthwise(layer, a)
        return (z + tf.convert_to_tensor(layer.bias) if layer.use_bias else z), None

    def unit_terms(self, layer, a, aux, dz, units, k, choice, strategy="auto"):
        return self.shared_unit_terms(layer, [(a, aux, dz)], units, k, choice, strategy)

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        grads = self.depthwise_grads(layer, [(a, dz) for a, _, dz in uses], units, k, choice)
        sq = tf.reduce_sum(tf.square(tf.reshape(grads, [units, -1])), axis=1)
        bias = _bias_grads([dz for _, _, dz in uses], units, k) if layer.use_bias else None
        return (sq if bias is None else sq + tf.reduce_sum(tf.square(bias), axis=1)), (grads, bias)

    def weighted_sums(self, layer, term, weights):
        return [tf.tensordot(weights, without_dropped(weights, t), 1) for t in term if t is not None]


class SeparableConv2DRule(_DepthwiseBase):
    def depthwise_kernel(self, layer):
        return layer.depthwise_kernel

    def variables(self, layer):
        return (layer.depthwise_kernel, layer.pointwise_kernel, layer.bias if layer.use_bias else None)

    def pre_activation(self, layer, a, choice):
        y = self.depthwise(layer, a)
        pointwise = tf.reshape(tf.convert_to_tensor(layer.pointwise_kernel), [y.shape[-1], -1])
        z = tf.tensordot(y, pointwise, axes=[[3], [0]])
        return (z + tf.convert_to_tensor(layer.bias) if layer.use_bias else z), y

    def unit_terms(self, layer, a, aux, dz, units, k, choice, strategy="auto"):
        return self.shared_unit_terms(layer, [(a, aux, dz)], units, k, choice, strategy)

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        pointwise = tf.reshape(tf.convert_to_tensor(layer.pointwise_kernel), [-1, layer.filters])
        dys = [tf.tensordot(dz, pointwise, axes=[[3], [1]]) for _, _, dz in uses]  # dz·Pᵀ
        depthwise = self.depthwise_grads(layer, [(a, dy) for (a, _, _), dy in zip(uses, dys)], units, k,
                                         choice)
        a_u, rows, d_u = joined_factors([unit_factors(tf.reshape(y, [y.shape[0], -1, y.shape[-1]]), True,
                                                      dz, units, k) for _, y, dz in uses])
        pointwise_strategy = strategy if strategy in ("ghost", "materialize") else "auto"
        sq, kernel_grads, _ = layer_terms(_NoBias, a_u, rows, d_u, pointwise_strategy)
        sq += tf.reduce_sum(tf.square(tf.reshape(depthwise, [units, -1])), axis=1)
        bias = _bias_grads([dz for _, _, dz in uses], units, k) if layer.use_bias else None
        if bias is not None:
            sq += tf.reduce_sum(tf.square(bias), axis=1)
        return sq, (depthwise, (a_u, rows, d_u, kernel_grads), bias)

    def weighted_sums(self, layer, term, weights):
        depthwise, (a_u, rows, d_u, kernel_grads), bias = term
        pointwise = weighted_kernel_sum(a_u, rows, d_u, kernel_grads, weights)
        sums = [tf.tensordot(weights, without_dropped(weights, depthwise), 1),
                tf.reshape(pointwise, layer.pointwise_kernel.shape)]
        return sums + ([] if bias is None else [tf.tensordot(weights, without_dropped(weights, bias), 1)])


class _NoBias:
    """Stands for the pointwise part in `kernel.layer_terms` (the layer's bias is counted once, apart)."""

    use_bias = False


def _bias_grads(dzs, units: int, k: int) -> tf.Tensor:
    """Per-unit bias gradients [units, c]: Σ over positions and the unit's examples of dz, / k."""
    return tf.add_n([tf.reduce_sum(tf.reshape(dz, [units, -1, dz.shape[-1]]), axis=1) for dz in dzs]) / k


def _folded_grads(layer, shape, a: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """Per-example depthwise kernel gradients [B, kh, kw, cin, m] by one filter-gradient op, the batch
    folded into the channels (see the module docstring)."""
    kh, kw, cin, m = shape
    b, h, w, _ = a.shape
    image = tf.reshape(tf.transpose(a, [1, 2, 0, 3]), [1, h, w, b * cin])
    out_backprop = tf.reshape(tf.transpose(dy, [1, 2, 0, 3]), [1, dy.shape[1], dy.shape[2], b * cin * m])
    grads = tf.nn.depthwise_conv2d_backprop_filter(image, [kh, kw, b * cin, m], out_backprop,
                                                   [1, *layer.strides, 1], layer.padding.upper())
    return tf.transpose(tf.reshape(grads, [kh, kw, b, cin, m]), [2, 0, 1, 3, 4])


def _patch_grads(layer, shape, a: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """Per-example depthwise kernel gradients [B, kh, kw, cin, m] from image patches and dy."""
    kh, kw, cin, m = shape
    (sh, sw), b = layer.strides, a.shape[0]
    patches = tf.image.extract_patches(a, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], layer.padding.upper())
    patches = tf.reshape(patches, [b, -1, kh * kw, cin])
    grads = tf.einsum("btkc,btcm->bkcm", patches, tf.reshape(dy, [b, -1, cin, m]))
    return tf.reshape(grads, [b, kh, kw, cin, m])
