"""The fast-path rule of `keras.layers.Conv2D`: forward natively or as image patches × kernel, and
per-unit gradients from patches, by one grouped-convolution filter-gradient op over the batch, or, with
one input channel, by one depthwise filter-gradient op."""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from dpsgd_cli.training.fastgrad.kernel import KernelRule


class Conv2DRule(KernelRule):
    """Forward `native` (tf.nn.conv2d) or `patches` (patches × reshaped kernel, one GEMM); per-unit
    gradients `materialize`, `ghost`, `grouped` (where TensorFlow computes grouped convolutions'
    filter gradients: `grouped_filter_gradients`) or, for one input channel, `depthwise`."""

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
        if grouped_filter_gradients():
            choices.append({"forward": "native", "grads": "grouped"})
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

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        if choice.get("grads") not in ("depthwise", "grouped"):
            return super().shared_unit_terms(layer, uses, units, k, choice, strategy)
        per_unit = depthwise_unit_grads if choice["grads"] == "depthwise" else grouped_unit_grads
        grads = tf.add_n([per_unit(layer, a, dz, units, k) for a, _, dz in uses])
        sq = tf.reduce_sum(tf.square(grads), axis=[1, 2])
        bias = None
        if layer.use_bias:
            bias = tf.add_n([tf.reduce_sum(tf.reshape(dz, [units, -1, dz.shape[-1]]), axis=1)
                             for _, _, dz in uses]) / k
            sq += tf.reduce_sum(tf.square(bias), axis=1)
        return sq, (None, False, None, grads, bias)


def _out_and_pad(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """Output length and leading zero-padding of one spatial axis under TensorFlow's 'same'/'valid' rules."""
    if padding == "same":
        out = -(-n // s)
        return out, max((out - 1) * s + k - n, 0) // 2
    return (n - k) // s + 1, 0


def _patches_by_phase(a: tf.Tensor, layer) -> tf.Tensor:
    """Patches [B, kh·kw·cin, T] from plain slices of a stride-phase view (fast for few input channels).
    kh·kw slices are slow to trace (tens of ms), and the planner traces the same geometry in many
    candidates: the slicing is one traced function per geometry, called from each (an ordinary function
    call in the graph, inlined when it runs)."""
    if not tf.executing_eagerly():
        geometry = (tuple(layer.kernel_size), tuple(layer.strides), layer.padding, tuple(a.shape), a.dtype)
        if None not in geometry[3]:
            return _phase_function(*geometry)(a)
    return _phase_slices(a, tuple(layer.kernel_size), tuple(layer.strides), layer.padding)


@functools.lru_cache(maxsize=64)
def _phase_function(kernel_size, strides, padding, shape, dtype):
    return tf.function(lambda a: _phase_slices(a, kernel_size, strides, padding), autograph=False,
                       input_signature=[tf.TensorSpec(shape, dtype)])


def _phase_slices(a: tf.Tensor, kernel_size, strides, padding: str) -> tf.Tensor:
    (kh, kw), (sh, sw), (b, h, w, cin) = kernel_size, strides, a.shape
    (oh, top), (ow, left) = _out_and_pad(h, kh, sh, padding), _out_and_pad(w, kw, sw, padding)
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


def depthwise_unit_grads(layer, a, dz, units: int, k: int) -> tf.Tensor:
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


def grouped_unit_grads(layer, a, dz, units: int, k: int) -> tf.Tensor:
    """Per-unit kernel gradients [units, kh·kw·cin, c] of a Conv2D by one native op: the batch becomes B
    groups of a grouped convolution (input [1, H, W, B·cin], output-gradients [1, oh, ow, B·c], filter
    [kh, kw, cin, B·c]), whose filter gradient holds every example's own kernel gradient."""
    (kh, kw), (b, h, w, cin), c = layer.kernel_size, a.shape, dz.shape[-1]
    image = tf.reshape(tf.transpose(a, [1, 2, 0, 3]), [1, h, w, b * cin])
    out_backprop = tf.reshape(tf.transpose(dz, [1, 2, 0, 3]), [1, dz.shape[1], dz.shape[2], b * c])
    grads = tf.raw_ops.Conv2DBackpropFilter(input=image, filter_sizes=[kh, kw, cin, b * c],
                                            out_backprop=out_backprop, strides=[1, *layer.strides, 1],
                                            padding=layer.padding.upper())
    grads = tf.transpose(tf.reshape(grads, [kh * kw * cin, b, c]), [1, 0, 2])
    return grads if k == 1 else tf.reduce_sum(tf.reshape(grads, [units, k, kh * kw * cin, c]), axis=1) / k


@functools.cache
def grouped_filter_gradients() -> bool:
    """Whether this TensorFlow build computes a grouped convolution's filter gradient (with oneDNN on CPU,
    or on GPU; TensorFlow's own CPU kernel refuses groups), checked once on a tiny case against two
    ungrouped ones."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((1, 4, 4, 4), dtype=np.float32))
    d = tf.constant(rng.random((1, 4, 4, 6), dtype=np.float32))

    def filter_grad(x, d, channels):
        return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=[3, 3, channels, d.shape[-1]],
                                               out_backprop=d, strides=[1, 1, 1, 1], padding="SAME")

    with tf.init_scope():  # eagerly, also when first asked while a tf.function is traced
        try:
            grouped = filter_grad(x, d, 2).numpy()
        except (tf.errors.OpError, ValueError):
            return False
        parts = [filter_grad(x[..., 2 * i:2 * i + 2], d[..., 3 * i:3 * i + 3], 2).numpy() for i in range(2)]
    return bool(np.allclose(grouped, np.concatenate(parts, axis=-1), rtol=1e-5, atol=1e-5))
