"""Train state: a pytree of arrays that the jitted step maps to a new one."""

from __future__ import annotations

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, number of completed steps.
      params: pure nested dict of parameters, top-level keys are model parts ('encoder', 'head',
        'decoder'); finetuning restores `params['encoder']` from pretraining.
      opt_state: dict with the same top-level keys, one optax state per part, so that a part can
        be frozen (its state left untouched) without resetting the others' (the original re-created
        Adam when it unfroze the encoder).
      rng: typed PRNG key; the step's key is `fold_in(rng, step)`, so a resumed run draws the
        same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: dict
    opt_state: dict
    rng: jax.Array
