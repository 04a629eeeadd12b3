"""Fast per-example clipping for models of Dense, Conv2D, DepthwiseConv2D, SeparableConv2D, normalisation,
embedding and weightless layers, wired as a Sequential, a Functional graph (residual adds, concatenations,
branches, shared layers, nested models) or a subclassed model whose `call` traces to such a graph.

Package layout (one rule family a module, like Opacus's `grad_sample/`): `base` (the rule interface),
`kernel` (Dense and Conv2D's shared GEMM algebra), `dense`, `conv`, `depthwise`, `pooling`, `normalization`,
`embedding`, `merge` (layers and operations joining branches), `registry` (layer type → rule), `graph` (the
model as calls in topological order) and `driver` (the forward pass, per-unit terms, clipped sums, path
choice).

One dispatch point: `REGISTRY` maps a layer type to its `LayerRule` (like TF Privacy's layer registry):
whether a layer is supported, its forward formulations and default, and for layers with weights
(`WeightRule`) the per-unit squared norms and the weighted sum of per-unit gradients. Adding a layer type
is one `register(layer_type, rule)` and a test equal to the per-example GradientTape loop.

Same contract as `engine.vmap_clipped_gradient_sum`. One forward pass walks the model's graph and keeps
each weight layer call's input and pre-activation output z; one backward pass of the *summed* loss w.r.t.
the z's gives every example's output-gradient dz (example i's loss depends on example i's activations
only: no BatchNorm, no layer mixing examples). A unit's (example's, or microbatch's) kernel gradient is
A_u·D_u with A_u [p, T] its inputs (Conv2D: image patches, p = kh·kw·cin, T = output positions × k) and
D_u [T, c] its dz / k; bias gradient Σ_T D_u. A_u is kept in the layout its construction gives ([T, p]
for Dense inputs and gathered patches, [p, T] for phase-slice patches): the GEMMs take either, so no
factor is transposed in memory. A layer called more than once (shared) has, per unit, the *sum* of its
calls' gradients: its rule joins the calls (`WeightRule.shared_unit_terms`), so the norm keeps the cross
terms between calls.

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
- on another 2-core machine, patches and slices were the faster forms.
`default_formulation` (used when no plan is given): first conv as patches, stride-1 pooling as slices,
`kernel.prefer_ghost` by operation count.
"""

from __future__ import annotations

from dpsgd_cli.config import GRADIENT_PATHS
from dpsgd_cli.training.fastgrad.base import SIGNATURE_KEYS, LayerRule, WeightRule
from dpsgd_cli.training.fastgrad.conv import Conv2DRule
from dpsgd_cli.training.fastgrad.dense import DenseRule
from dpsgd_cli.training.fastgrad.depthwise import DepthwiseConv2DRule, SeparableConv2DRule
from dpsgd_cli.training.fastgrad.driver import (
    FORWARDS,
    GRADS,
    _clipped_sum,
    choose_gradient_path,
    choose_gradient_sum_fn,
    default_formulation,
    fast_clipped_gradient_sum,
    fast_path_problem,
    formulation_choices,
    forward,
    graph_signature,
    layer_input_shapes,
    layers_in_order,
    make_forward_fn,
    make_grad_sum_fn,
    per_unit_norms,
    supports_fast_path,
    unit_terms,
)
from dpsgd_cli.training.fastgrad.embedding import EmbeddingRule
from dpsgd_cli.training.fastgrad.graph import GraphProblem, as_functional, graph_of
from dpsgd_cli.training.fastgrad.kernel import KernelRule
from dpsgd_cli.training.fastgrad.merge import ConcatenateRule, ElementwiseOpRule, MergeRule
from dpsgd_cli.training.fastgrad.normalization import AffineNormRule, NormRule, PerExampleNormRule
from dpsgd_cli.training.fastgrad.pooling import MaxPool2DRule
from dpsgd_cli.training.fastgrad.registry import REGISTRY, register, rule_for

__all__ = [
    "FORWARDS", "GRADIENT_PATHS", "GRADS", "REGISTRY", "SIGNATURE_KEYS", "AffineNormRule",
    "ConcatenateRule", "Conv2DRule", "DenseRule", "DepthwiseConv2DRule", "ElementwiseOpRule",
    "EmbeddingRule", "GraphProblem", "KernelRule", "LayerRule", "MaxPool2DRule", "MergeRule", "NormRule",
    "PerExampleNormRule", "SeparableConv2DRule", "WeightRule", "_clipped_sum", "as_functional",
    "choose_gradient_path", "choose_gradient_sum_fn", "default_formulation", "fast_clipped_gradient_sum",
    "fast_path_problem", "formulation_choices", "forward", "graph_of", "graph_signature",
    "layer_input_shapes", "layers_in_order", "make_forward_fn", "make_grad_sum_fn", "per_unit_norms",
    "register", "rule_for", "supports_fast_path", "unit_terms",
]
