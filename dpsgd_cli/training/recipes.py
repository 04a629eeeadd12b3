"""Training options of the large-batch recipes: learning-rate schedule and weight averaging.

Both are post-processing of the noisy gradients, so they cost no privacy: the averaged weights (an
exponential moving average, EMA, over the steps, Polyak & Juditsky 1992; De et al. 2022) and a decaying
learning rate are functions of the released noisy updates only.

EMA uses Keras' optimizer option (`use_ema`, `ema_momentum` = `training.ema_decay`): after every step
average ← d·average + (1 − d)·weights (the first step copies the weights). The averages are optimizer
variables, so checkpoints hold them and a resumed run continues them. The evaluation and the saved
weights use the averaged weights (`averaged_weights`); training continues from the raw ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from dpsgd_cli.config import ExperimentConfig

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: ExperimentConfig, total_steps: int) -> Any:
    """`training.learning_rate` as is ('constant'), or cosine-decayed to 0 over the run's steps."""
    t = cfg.training
    if t.lr_schedule == "cosine":
        import keras

        return keras.optimizers.schedules.CosineDecay(t.learning_rate, decay_steps=max(total_steps, 1))
    return t.learning_rate


def optimizer_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments for the Keras optimizer: EMA of the weights when `training.ema_decay` is set."""
    decay = cfg.training.ema_decay
    return {} if decay is None else {"use_ema": True, "ema_momentum": decay}


@contextmanager
def averaged_weights(model, optimizer):
    """Within the block the model holds the optimizer's averaged weights (when it keeps an EMA)."""
    if not getattr(optimizer, "use_ema", False) or not optimizer.built:
        yield
        return
    variables = model.trainable_variables
    raw = [v.numpy() for v in variables]
    averages = {id(v): a for v, a in zip(optimizer._trainable_variables,
                                         optimizer._model_variables_moving_average)}
    try:
        for v in variables:
            v.assign(averages[id(v)])
        yield
    finally:
        for v, value in zip(variables, raw):
            v.assign(value)
