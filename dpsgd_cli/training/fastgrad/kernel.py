"""Dense and Conv2D's shared algebra: z = op(input, kernel) + bias, a unit's kernel gradient A_u·D_u,
its squared norm by materializing or by Gram matrices ("ghost": an upper bound, from float64 Grams and a
rounding margin), and the weighted sum as one GEMM (float64 when a unit has several positions)."""

from __future__ import annotations

import tensorflow as tf

from dpsgd_cli.training.engine import without_dropped
from dpsgd_cli.training.fastgrad.base import WeightRule, extra_variables


class KernelRule(WeightRule):
    """Dense and Conv2D: z = op(input, kernel) + bias. A unit's kernel gradient is A_u·D_u with A_u
    [p, T] its inputs (Conv2D: patches) and D_u [T, c] its dz / k; its bias gradient Σ_T D_u."""

    def problem(self, layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantization"
        if layer.compute_dtype != "float32":
            return f"compute dtype {layer.compute_dtype}"
        if extra_variables(layer, (layer.kernel, layer.bias if layer.use_bias else None)):
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
        return self.shared_unit_terms(layer, [(a, aux, dz)], units, k, choice, strategy)

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        """The calls' factors joined along the positions (A_u = [A_u¹ A_u² …], D_u likewise): A_u·D_u is then
        the sum of the calls' gradients, and its norm (materialized or ghost) has every cross term."""
        if strategy == "auto" and choice.get("grads", "auto") != "auto":
            strategy = choice["grads"]
        a_u, rows, d_u = joined_factors([unit_factors(*self.inputs(layer, a, aux), dz, units, k)
                                         for a, aux, dz in uses])
        sq, grads, bias = layer_terms(layer, a_u, rows, d_u, strategy)
        return sq, (a_u, rows, d_u, grads, bias)

    def weighted_sums(self, layer, term, weights):
        a_u, rows, d_u, grads, bias = term
        sums = [tf.reshape(weighted_kernel_sum(a_u, rows, d_u, grads, weights), layer.kernel.shape)]
        return sums + ([] if bias is None else [tf.tensordot(weights, without_dropped(weights, bias), 1)])


def weighted_kernel_sum(a_u, rows: bool, d_u, grads, weights: tf.Tensor) -> tf.Tensor:
    """Σ_u weights_u · A_u·D_u [p, c]: one GEMM [p, units·T] · [units·T, c] (a dropped unit's A_u and D_u
    zeroed; float64 when a unit has several positions, whose terms may cancel: summed as exactly as its
    norm was taken), or from materialized `grads`."""
    if grads is not None:
        return tf.tensordot(weights, without_dropped(weights, grads), axes=1)
    a_u = without_dropped(weights, a_u)
    if rows:
        a_all, transpose = tf.reshape(a_u, [-1, a_u.shape[2]]), True
    else:
        a_all, transpose = tf.reshape(tf.transpose(a_u, [1, 0, 2]), [a_u.shape[1], -1]), False
    weighted = tf.reshape(tf.math.multiply_no_nan(d_u, weights[:, None, None]), [-1, d_u.shape[2]])
    if d_u.shape[1] > 1:
        a_all, weighted = tf.cast(a_all, tf.float64), tf.cast(weighted, tf.float64)
    return tf.cast(tf.matmul(a_all, weighted, transpose_a=transpose), d_u.dtype)


def joined_factors(factors):
    """One (A_u, rows, D_u) from several calls' (A_u, rows, D_u) of the same kernel, joined along the
    positions T (A_u in the rows layout when the calls' layouts differ)."""
    if len(factors) == 1:
        return factors[0]
    rows = any(r for _, r, _ in factors)
    parts = [a if r == rows else tf.transpose(a, [0, 2, 1]) for a, r, _ in factors]
    return tf.concat(parts, axis=1 if rows else 2), rows, tf.concat([d for _, _, d in factors], axis=1)


def unit_factors(a: tf.Tensor, rows: bool, dz: tf.Tensor, units: int, k: int):
    """(A_u, rows, D_u) of each unit's k examples: A_u [units, k·T, p] if `rows` (a [B, T, p]) else
    [units, p, k·T] (a [B, p, T]), and D_u [units, k·T, c] = dz / k."""
    c = dz.shape[-1]
    if rows:
        return tf.reshape(a, [units, k * a.shape[1], a.shape[2]]), rows, tf.reshape(dz, [units, -1, c]) / k
    p, t = a.shape[1], a.shape[2]
    if k > 1:
        a = tf.transpose(tf.reshape(a, [units, k, p, t]), [0, 2, 1, 3])
    return tf.reshape(a, [units, p, k * t]), rows, tf.reshape(dz, [units, k * t, c]) / k


def prefer_ghost(p: int, t: int, c: int) -> bool:
    """Whether Gram-matrix norms are cheaper than materializing per-unit kernel gradients.

    Per unit, ghost costs T²(p+c+1) multiply-adds for the norms (the weighted sum then needs one GEMM of
    T·p·c, the same as materializing); materializing costs T·p·c plus 2·p·c to square and weight.
    """
    return t * t * (p + c + 1) < 2 * p * c


def layer_terms(layer, a_u, rows: bool, d_u, strategy: str):
    """(squared norms [units], kernel grads [units, p, c] or None if ghost, bias grads [units, c] or None)
    from A_u ([units, T, p] if `rows`, else [units, p, T]) and D_u [units, T, c]."""
    t, p = (a_u.shape[1], a_u.shape[2]) if rows else (a_u.shape[2], a_u.shape[1])
    if strategy == "ghost" or (strategy == "auto" and prefer_ghost(p, t, d_u.shape[2])):
        if t == 1:  # one row per unit (a Dense layer on flat inputs): ‖a dᵀ‖² = ‖a‖²‖d‖², no GEMM
            sq = tf.reduce_sum(tf.square(a_u), axis=[1, 2]) * tf.reduce_sum(tf.square(d_u), axis=[1, 2])
            return with_bias(layer, sq, None, d_u)
        sq, grads = ghost_squared_norms(a_u, rows, d_u), None
    else:
        grads = tf.matmul(a_u, d_u, transpose_a=rows)
        sq = tf.reduce_sum(tf.square(grads), axis=[1, 2])
    return with_bias(layer, sq, grads, d_u)


def ghost_squared_norms(a_u: tf.Tensor, rows: bool, d_u: tf.Tensor) -> tf.Tensor:
    """An upper bound [units] on ‖A_uᵀD_u‖², the squared norm of a unit's kernel gradient, from Gram
    matrices (Li et al. 2022): Σ (A_uᵀA_u) ⊙ (D_u D_uᵀ).

    The Gram sum cancels when positions' terms nearly cancel (near-opposite input rows), so in float32 it
    can come out far below the true norm (or negative, clamped to 0) and the unit would escape clipping.
    Here the Grams are accumulated in float64 (the float32 factors' products are exact there) and a margin
    covers the rounding left: γ_n·E² with n = p + c + T² + 2 terms at most and E = Σ_t ‖a_t‖‖d_t‖ per unit
    (E² bounds Σ |A_uᵀA_u| ⊙ |D_u D_uᵀ|). `weighted_sums` adds the same gradient in float64 when T > 1."""
    a64, d64 = tf.cast(a_u, tf.float64), tf.cast(d_u, tf.float64)
    gram_a = tf.matmul(a64, a64, transpose_a=not rows, transpose_b=rows)  # [units, T, T]
    gram_d = tf.matmul(d64, d64, transpose_b=True)
    sq = tf.reduce_sum(gram_a * gram_d, axis=[1, 2])
    e = tf.reduce_sum(tf.norm(a64, axis=2 if rows else 1) * tf.norm(d64, axis=2), axis=1)
    t, p, c = d_u.shape[1], a_u.shape[2] if rows else a_u.shape[1], d_u.shape[2]
    n = p + c + t * t + 2
    margin = n * 2.0 ** -53 / (1.0 - n * 2.0 ** -53) * e * e  # γ_n (Higham) · E²
    return tf.cast(tf.maximum(sq, 0.0) + margin, a_u.dtype)


def with_bias(layer, sq, grads, d_u):
    """(squared norms with the bias gradient's added, kernel grads, bias grads Σ_T D_u or None)."""
    bias = tf.reduce_sum(d_u, axis=1) if layer.use_bias else None
    return (sq if bias is None else sq + tf.reduce_sum(tf.square(bias), axis=1)), grads, bias
