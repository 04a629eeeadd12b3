"""The fast-path rule of `keras.layers.MaxPooling2D` (stride-1 'valid' pooling: native or shifted slices)."""

from __future__ import annotations

import keras
import tensorflow as tf

from dpsgd_cli.training.fastgrad.base import LayerRule


class MaxPool2DRule(LayerRule):
    """Stride-1 'valid' max pooling: `native` (Keras) or `slices` (`max_pool_stride1`)."""

    def choices(self, layer, private):
        return [{"forward": "native"}, {"forward": "slices"}] if is_stride1_max_pool(layer) else []

    def default(self, layer, first):
        return {"forward": "slices"} if is_stride1_max_pool(layer) else None

    def forward(self, layer, h, choice):
        if choice.get("forward") == "slices":
            return max_pool_stride1(h, layer.pool_size)
        return layer(h, training=True)



def is_stride1_max_pool(layer) -> bool:
    return (isinstance(layer, keras.layers.MaxPooling2D) and tuple(layer.strides) == (1, 1)
            and layer.padding == "valid" and layer.data_format == "channels_last")


def max_pool_stride1(h: tf.Tensor, pool_size: tuple[int, int]) -> tf.Tensor:
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
