"""The fast-path rule of `keras.layers.Embedding` (sparse per-unit row gradients, exact norms)."""

from __future__ import annotations

import tensorflow as tf

from dpsgd_cli.training.fastgrad.base import WeightRule, extra_variables


class EmbeddingRule(WeightRule):
    """Embedding lookup z = E[ids]. A unit's gradient is sparse: row v of E gets Σ dL/dz over the unit's
    positions holding id v. Its squared norm is computed exactly without densifying: dz rows are summed
    per distinct (unit, id) pair (`tf.unique` + segment sums, O(B·T·D)), then the squared row norms per
    unit; the weighted sum scatters w_u·dz into the rows its ids name. Not handled: `mask_zero` (the fast
    path does not propagate Keras masks), LoRA, quantization.

    Ids outside [0, vocab) are caught here, on every device (a GPU's gather returns zeros for them instead
    of failing, and unit·vocab + id would alias another unit's row): they are looked up as row 0 and their
    unit's squared norm is NaN, so the engine drops the unit (weight 0, terms left out, counted) and no
    other unit's norm or sum sees them."""

    def problem(self, layer):
        if layer.mask_zero:
            return "mask_zero"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantization"
        if extra_variables(layer, (layer.embeddings,)):
            return "extra trainable variables"
        return None

    def pre_activation(self, layer, a, choice):
        ids = tf.cast(a, tf.int32)
        valid = tf.logical_and(ids >= 0, ids < layer.embeddings.shape[0])
        ids = tf.where(valid, ids, tf.zeros_like(ids))  # looked up, never paired, as row 0
        return tf.gather(tf.convert_to_tensor(layer.embeddings), ids), (ids, valid)

    def unit_terms(self, layer, a, aux, dz, units, k, choice, strategy="auto"):
        return self.shared_unit_terms(layer, [(a, aux, dz)], units, k, choice, strategy)

    def shared_unit_terms(self, layer, uses, units, k, choice, strategy="auto"):
        """Every call's (unit, id, row) triples together: the segment sums add a row's terms across calls;
        a unit with an id outside the vocabulary in any call gets a NaN norm (dropped by the engine)."""
        vocab, width = layer.embeddings.shape
        rows = tf.concat([tf.reshape(dz, [-1, width]) for _, _, dz in uses], 0) / k  # (example, position)
        unit = tf.concat([tf.repeat(tf.range(units, dtype=tf.int64), tf.size(ids) // units)
                          for _, (ids, _), _ in uses], 0)
        ids = tf.concat([tf.reshape(ids, [-1]) for _, (ids, _), _ in uses], 0)
        pair = unit * vocab + tf.cast(ids, tf.int64)
        distinct, which = tf.unique(pair)
        summed = tf.math.unsorted_segment_sum(rows, which, tf.size(distinct))
        sq = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(summed), axis=1), distinct // vocab, units)
        valid = tf.concat([tf.reshape(valid, [units, -1]) for _, (_, valid), _ in uses], axis=1)
        invalid = tf.reduce_any(tf.logical_not(valid), axis=1)
        sq = tf.where(invalid, tf.fill(tf.shape(sq), float("nan")), sq)  # the engine drops such units
        return sq, (rows, ids, unit)

    def weighted_sums(self, layer, term, weights):
        rows, ids, unit = term
        weighted = tf.math.multiply_no_nan(rows, tf.gather(weights, unit)[:, None])  # 0 for a dropped unit
        return [tf.math.unsorted_segment_sum(weighted, ids, layer.embeddings.shape[0])]

