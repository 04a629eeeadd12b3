"""The fast-path rule of `keras.layers.Dense`."""

from __future__ import annotations

import tensorflow as tf

from dpsgd_cli.training.fastgrad.kernel import KernelRule


class DenseRule(KernelRule):
    def choices(self, layer, private):
        return [{"forward": "native", "grads": g} for g in ("materialize", "ghost")] if private else []

    def default(self, layer, first):
        return {"forward": "native", "grads": "auto"}

    def linear(self, layer, a, kernel):
        return tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]]) if a.shape.rank > 2 else a @ kernel

    def inputs(self, layer, a, aux):
        return tf.reshape(a, [a.shape[0], -1, a.shape[-1]]), True

