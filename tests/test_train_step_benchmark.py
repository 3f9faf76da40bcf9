"""benchmarks/train_step.py: the script runs at smoke size and its JSON and markdown agree; the
PyTorch twins (benchmarks/torch_models.py) have exactly our parameter counts, train at smoke
size, and compute the JAX heads' and losses' math.

Why: the benchmark's numbers are only worth publishing if each row is the step it names (a
finite loss from the library's own step), its GFLOP/s is the XLA FLOP count over the measured
median, the markdown shows the same rows as the JSON, and the PyTorch model it compares against
is the same network (same layers and widths, hence the same parameter count). One smoke RPL step
(batch 8: a multiple of the 8 simulated test devices), one timed step, no fresh processes.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import step_flops
from benchmarks import train_step as ts


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train_step") / "ts")
    report = ts.main(
        ["--sizes=smoke", "--tasks=rpl", "--steps=1", "--rounds=1", "--phases=", f"--out={out}"]
    )
    return report, out


@pytest.mark.slow
def test_json_rows_are_consistent(smoke_run):
    report, out = smoke_run
    with open(out + ".json") as f:
        written = json.load(f)
    assert written["steps"] == json.loads(json.dumps(report["steps"]))
    (row,) = written["steps"]
    assert (row["kind"], row["size"]) == ("pretext/rpl", "smoke")
    assert row["finite"]
    assert len(row["step_s"]) == 1 and row["median_s"] == row["step_s"][0] > 0
    assert row["flops"] > 0 and row["compile_s"] > 0
    assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["median_s"] / 1e9)
    # The same parameter count as benchmarks/step_flops.py's abstract build of the step.
    spec = ts.step_spec("pretext/rpl", "smoke")
    _, abstract = step_flops.abstract_state(spec["build"], spec["tx"])
    assert row["params"] == step_flops.param_count(abstract)
    if "torch_median_s" in row:
        # Both sides timed in their own fresh processes.
        assert row["ratio"] == pytest.approx(row["fresh_median_s"] / row["torch_median_s"])
        assert len(row["fresh_round_medians_s"]) == len(row["torch_round_medians_s"]) == 1
        assert row["torch_params"] == row["params"]
    m = written["machine"]
    assert m["cores"] >= 1 and m["versions"]["jax"]
    assert "--sizes=smoke" in written["command"] and written["date"]
    assert written["phases"] == []


@pytest.mark.slow
def test_markdown_shows_the_json_rows(smoke_run):
    report, out = smoke_run
    with open(out + ".md") as f:
        md = f.read()
    assert report["command"] in md and report["machine"]["cpu"] in md
    table = [line for line in md.splitlines() if line.startswith("| pretext/")]
    assert len(table) == len(report["steps"]) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    row = report["steps"][0]
    assert cells[:2] == ["pretext/rpl", "smoke"]
    assert float(cells[5]) == pytest.approx(row["median_s"], rel=1e-2)
    assert float(cells[7]) == pytest.approx(row["gflops_per_s"], rel=1e-2)


TWIN_KINDS = (
    "pretext/rpl",
    "pretext/rotation",
    "pretext/jigsaw",
    "pretext/cpc",
    "pretext/exemplar",
    "finetune/full",
)


@pytest.mark.parametrize("kind", TWIN_KINDS)
@pytest.mark.parametrize("size", ["default", "paper"])
def test_torch_twin_has_our_parameter_count(kind, size):
    pytest.importorskip("torch")
    twin = ts.torch_twin(kind, size)
    assert twin is not None
    spec = ts.step_spec(kind, size)
    _, abstract = step_flops.abstract_state(spec["build"], spec["tx"])
    import torch_models  # importable once benchmarks/train_step.py is

    assert torch_models.param_count(twin[0]) == step_flops.param_count(abstract)


@pytest.mark.parametrize(
    "kind", ["pretext/rotation", "pretext/jigsaw", "pretext/cpc", "pretext/exemplar"]
)
def test_torch_twin_smoke_step_trains_every_parameter(kind):
    """One forward + loss + backward of the new twins at the smoke size (seconds on a CPU)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)  # the twin's initialisation
    twin = ts.torch_twin(kind, "smoke")
    assert twin is not None
    model, x, loss_fn, lr = twin
    spec = ts.step_spec(kind, "smoke")
    _, abstract = step_flops.abstract_state(spec["build"], spec["tx"])
    import torch_models

    assert torch_models.param_count(model) == step_flops.param_count(abstract)
    loss = loss_fn(model, x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert lr > 0


@pytest.mark.slow
def test_torch_twin_heads_and_losses_match_jax():
    """The twins' non-convolutional math (Flax GRU cell, CPC InfoNCE with the GRU context and
    per-term predictors, exemplar normalisation + triplet loss) equals the JAX code's on the same
    numbers, parameters copied across."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import torch_models
    from ssl3d_jax.models.unet import EncoderConfig
    from ssl3d_jax.tasks import cpc, exemplar

    rng = np.random.default_rng(0)
    b, n, e, hidden = 3, 64, 12, 8  # P = 4 grid in 3D: 64 patches, 16 columns, 10 + 2
    ctx, tgt = cpc.context_indices(4, 3), cpc.target_indices(4, 3)
    latents = rng.standard_normal((b, n, e)).astype(np.float32)

    # GRU (last state) + predictors, both sides from the same latents and weights.
    jax_model = cpc.CPCModel(
        4,
        patches_per_side=4,
        code_size=e,
        gru_units=hidden,
        encoder=EncoderConfig(filters=(4,), bottom_filters=4, num_groups=1),
        rngs=nnx.Rngs(0),
    )
    context = jnp.take(jnp.asarray(latents), jnp.asarray(ctx), axis=1)
    jax_pred = jax_model.predict(context.reshape(b * ctx.shape[0], ctx.shape[1], e))
    jax_pred = np.array(jax_pred).reshape(b, ctx.shape[0], tgt.shape[1], e)
    twin = torch_models.CPCModel(4, ctx.tolist(), tgt.shape[1], e, hidden, (4,), 4, 1)
    cell = jax_model.context.cell
    with torch.no_grad():
        twin.context.weight_ih.copy_(torch.from_numpy(np.array(cell.dense_i.kernel[...]).T))
        twin.context.bias_ih.copy_(torch.from_numpy(np.array(cell.dense_i.bias[...])))
        twin.context.weight_hh.copy_(torch.from_numpy(np.array(cell.dense_h.kernel[...]).T))
        for k, lin in enumerate(twin.predict):
            dense = getattr(jax_model, f"predict{k}")
            lin.weight.copy_(torch.from_numpy(np.array(dense.kernel[...]).T))
            lin.bias.copy_(torch.from_numpy(np.array(dense.bias[...])))
        t_latents = torch.from_numpy(latents)
        t_context = t_latents[:, twin.context_index]
        state = twin.context(t_context.reshape(b * ctx.shape[0], ctx.shape[1], e))
        t_pred = torch.stack([p(state) for p in twin.predict], dim=1)
    np.testing.assert_allclose(
        t_pred.reshape(jax_pred.shape).numpy(), jax_pred, rtol=1e-5, atol=1e-5
    )

    # InfoNCE on the same predictions and latents.
    jax_loss, _ = cpc.info_nce(
        jnp.asarray(jax_pred).reshape(b, -1, e), jnp.asarray(latents), tgt.reshape(-1)
    )
    t_loss = torch_models.info_nce(
        torch.from_numpy(jax_pred), t_latents, torch.as_tensor(tgt, dtype=torch.long)
    )
    np.testing.assert_allclose(t_loss.item(), float(jax_loss), rtol=1e-5)

    # Exemplar: L2 normalisation and the triplet loss with gathered negatives.
    z = rng.standard_normal((2 * b, e)).astype(np.float32)
    neg = np.array([2, 0, 1])
    jax_codes = z / np.sqrt((z * z).sum(-1, keepdims=True) + 1e-12)
    for squared in (False, True):
        a, p = jnp.asarray(jax_codes[:b]), jnp.asarray(jax_codes[b:])
        want = exemplar.triplet_loss(a, p, p[neg], margin=1.0, squared=squared)
        tz = torch.from_numpy(z)
        t_codes = tz * torch.rsqrt(tz.square().sum(-1, keepdim=True) + 1e-12)
        got = torch_models.triplet_loss(t_codes, torch.from_numpy(neg), 1.0, squared)
        np.testing.assert_allclose(got.item(), float(want), rtol=1e-5)
