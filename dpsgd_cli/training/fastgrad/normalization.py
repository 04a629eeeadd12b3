"""Fast-path rules of Group and Layer normalisation (each example by its own statistics)."""

from __future__ import annotations

import keras
import tensorflow as tf

from dpsgd_cli.training.engine import without_dropped
from dpsgd_cli.training.fastgrad.base import LayerRule, WeightRule, extra_variables, norm_axes


class PerExampleNormRule(LayerRule):
    """Group/Layer normalisation without γ, β: each example normalised by its own statistics."""

    def problem(self, layer):
        if 0 in norm_axes(layer):
            return "normalises across examples (axis 0)"
        return super().problem(layer)


class AffineNormRule(WeightRule):
    """Group/Layer normalisation, each example by its own statistics, with or without γ (scale) and β
    (center): y = x̂ ⊙ γ + β. Per unit (k examples, mean loss): γ's gradient is Σ dL/dy ⊙ x̂ and β's
    Σ dL/dy over the unit's examples and every input axis γ does not span, / k. Without γ and β it is a
    weightless layer (no per-unit terms). Not handled (off the fast path): normalising over the batch
    axis, LayerNormalization's `rms_scaling`, GroupNormalization over an axis other than the last."""

    def problem(self, layer):
        axes = norm_axes(layer)
        if 0 in axes:
            return "normalises across examples (axis 0)"
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling"
        if isinstance(layer, keras.layers.GroupNormalization) and axes != [len(layer.input.shape) - 1]:
            return "groups over an axis other than the last"
        if layer.compute_dtype != "float32":
            return f"compute dtype {layer.compute_dtype}"
        if extra_variables(layer, (getattr(layer, "gamma", None), getattr(layer, "beta", None))):
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
        mean, variance = tf.nn.moments(a, axes=norm_axes(layer), keepdims=True)
        return (a - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def _broadcast(self, layer, v: tf.Variable, rank: int) -> tf.Tensor:
        axes = norm_axes(layer)
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
        return self.shared_unit_terms(layer, [(a, x_hat, dz)], units, k, choice, strategy)

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        """γ's and β's per-unit gradients, summed over the calls (they are small: materialized)."""
        axes = norm_axes(layer)

        def per_unit(t):  # Σ over the axes γ does not span, then over each unit's k examples, / k
            others = [i for i in range(1, t.shape.rank) if i not in axes]
            t = tf.reduce_sum(t, axis=others) if others else t
            return tf.reduce_sum(tf.reshape(t, [units, k, *t.shape[1:]]), axis=1) / k

        grads = {}
        if layer.scale:
            grads[id(layer.gamma)] = tf.add_n([per_unit(dz * x_hat) for _, x_hat, dz in uses])
        if layer.center:
            grads[id(layer.beta)] = tf.add_n([per_unit(dz) for _, _, dz in uses])
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [units, -1]), axis=1) for g in grads.values()]
                      or [tf.zeros([units])])
        return sq, grads

    def weighted_sums(self, layer, term, weights):
        return [tf.reshape(tf.tensordot(weights, without_dropped(weights, term[id(v)]), 1), v.shape)
                for v in layer.trainable_variables]



class NormRule(PerExampleNormRule):
    """Group/Layer normalisation: the weightless rule without trainable γ, β, else `AffineNormRule`."""

    def __init__(self) -> None:
        self.affine = AffineNormRule()

    def for_layer(self, layer) -> LayerRule:
        return self.affine if layer.trainable_variables else self

