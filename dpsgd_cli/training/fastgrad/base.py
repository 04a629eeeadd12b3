"""The rule interface of the fast path: `LayerRule` (weightless layers) and `WeightRule` (layers with
trainable variables), and helpers the rules share."""

from __future__ import annotations

import tensorflow as tf

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
        return "" if getattr(layer, "weights", None) else None

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

    def shared_unit_terms(self, layer, uses, units: int, k: int, choice, strategy: str = "auto"):
        """`unit_terms` of a layer called more than once (shared): `uses` holds (input, aux, dz) of each
        call. A unit's gradient is the *sum* over the calls, so its squared norm has cross terms between
        calls (‖Σ_j g_j‖² ≠ Σ_j ‖g_j‖²): a rule joins the calls' factors (e.g. one GEMM over the positions
        of every call) or sums materialized gradients. A rule without it keeps shared layers of its type
        off the fast path."""
        raise NotImplementedError

    def shares(self) -> bool:
        """Whether this rule handles a layer called more than once (`shared_unit_terms`)."""
        return type(self).shared_unit_terms is not WeightRule.shared_unit_terms

    def weighted_sums(self, layer, term, weights: tf.Tensor) -> list[tf.Tensor]:
        """Σ_u weights_u · g_u for each of `layer.trainable_variables`, in that order. A unit whose weight
        is 0 adds exactly 0, even when its terms hold ∞ or NaN (`engine.without_dropped`, or a
        `tf.math.multiply_no_nan` by the weights): the engine drops units with a non-finite norm so."""
        raise NotImplementedError


def extra_variables(layer, allowed) -> bool:
    """Whether `layer` trains variables other than `allowed` (which a rule's per-unit terms would miss)."""
    return not {id(v) for v in layer.trainable_variables} <= {id(v) for v in allowed if v is not None}


def norm_axes(layer) -> list[int]:
    """A normalisation layer's `axis` as sorted non-negative input axes (batch = 0)."""
    rank = len(layer.input.shape)
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axes)

