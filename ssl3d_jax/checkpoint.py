"""Orbax checkpoints: the train state, a JSON description of the run, and the data iterator.

This is the only module that talks to orbax. A checkpoint step folder holds three items:

- `state`: the `TrainState` pytree (params, per-part optimizer states, step, RNG key);
- `meta`: JSON with the task, library version, input spec (modalities, cube size, normalisation)
  and the full config, so that a checkpoint explains itself;
- `data`: the grain iterator position, so that a resumed run reads the batches it would have read.

Orbax writes each step into a temporary folder and renames it when complete, so a crash during a
save never leaves a half-written step that looks finished, and the earlier steps are untouched.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ssl3d_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def _handlers() -> dict:
    return {
        "state": ocp.PyTreeCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


class Checkpointer:
    """A `CheckpointManager` over `directory` with the items above and a keep-N policy."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, create: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))  # orbax refuses relative paths
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, meta: dict, data_iter=None) -> None:
        """Asynchronous save of `state` (and the iterator position) at `step`."""
        args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the full state (shapes/shardings from `abstract_state`) and the iterator."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = {"state": ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._mngr.restore(step, args=ocp.args.Composite(**args))["state"]

    def param_shapes(self, step: int) -> dict:
        """On-disk params as a nested dict of `jax.ShapeDtypeStruct`, read from metadata only."""
        metadata = self._mngr.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Restore only the params listed in `abstract_params` (partial restore, host numpy)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        return self._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flatten(tree: dict) -> dict[str, object]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def restore_encoder(ckpt_dir: str | os.PathLike, encoder_params: dict, *, part: str = "encoder"):
    """Load `params[part]` of the latest pretraining checkpoint into `encoder_params`.

    Mirrors big_vision's `merge_params` contract: every leaf of the target whose path exists in the
    checkpoint is loaded; shapes must agree; nothing matching is an error; leaves that stay at their
    initial value are logged. (The original fell back to Keras `load_weights(by_name=True,
    skip_mismatch=True)`, which could silently load nothing.)

    Args:
      ckpt_dir: the pretraining run's `checkpoints` folder.
      encoder_params: nested dict of arrays, the finetuning model's freshly initialised encoder.

    Returns:
      (params, report): the merged nested dict (loaded leaves as numpy arrays, others unchanged) and
      a dict with 'step', 'loaded', 'missing' (in the target, not in the checkpoint) and 'unused'
      (in the checkpoint, not in the target) leaf paths.

    Raises:
      CheckpointError: no checkpoint, no `params/<part>` in it, no matching leaf, or any matched
      leaf with a different shape.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(
            f"pretraining checkpoint folder {ckpt_dir} does not exist "
            "(set config.finetune.init_from, or run the pretraining first)"
        )
    with Checkpointer(ckpt_dir, create=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint step in {ckpt_dir}")
        on_disk = ckpt.param_shapes(step)
        if part not in on_disk:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}/{step} has no params/{part}; "
                f"its parts are {sorted(on_disk)}"
            )
        disk_flat = _flatten(on_disk[part])
        target_flat = _flatten(encoder_params)
        matched = sorted(set(disk_flat) & set(target_flat))
        if not matched:
            raise CheckpointError(
                f"no encoder parameter of the model matches checkpoint {ckpt_dir}/{step}: "
                "model has "
                f"{sorted(target_flat)[:5]}..., checkpoint has {sorted(disk_flat)[:5]}..."
            )
        bad = [
            f"{k}: checkpoint {tuple(disk_flat[k].shape)} "
            f"vs model {tuple(np.shape(target_flat[k]))}"
            for k in matched
            if tuple(disk_flat[k].shape) != tuple(np.shape(target_flat[k]))
        ]
        if bad:
            raise CheckpointError(
                f"encoder in {ckpt_dir}/{step} does not fit the model "
                "(wrong in_channels, widths or dimensionality?): " + "; ".join(bad[:8])
            )
        loaded = ckpt.restore_params(step, {part: on_disk[part]})[part]
    loaded_flat = _flatten(loaded)

    def pick(path, leaf):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        return np.asarray(loaded_flat[key]) if key in loaded_flat else leaf

    merged = jax.tree_util.tree_map_with_path(pick, encoder_params)
    report = {
        "step": int(step),
        "loaded": matched,
        "missing": sorted(set(target_flat) - set(disk_flat)),
        "unused": sorted(set(disk_flat) - set(target_flat)),
    }
    by_module: dict[str, int] = {}
    for k in matched:
        by_module[k.split("/")[0]] = by_module.get(k.split("/")[0], 0) + 1
    log.info(
        "Restored %d encoder tensors from %s (step %d): %s",
        len(matched),
        ckpt_dir,
        step,
        ", ".join(f"{m} ({n})" for m, n in sorted(by_module.items())),
    )
    for k in report["missing"]:
        log.warning("  NOT in checkpoint, stays at its initial value: %s", k)
    return merged, report
