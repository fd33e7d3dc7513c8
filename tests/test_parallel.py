"""Logical-axis rules and the sharded forward on an 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxgrounding.model as jm
from jaxgrounding import parallel
from tests.model import hf_reference as ref


def test_rules_map_logical_names_to_mesh_axes():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert parallel.logical_to_spec(("embed", "heads", None), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # a dimension the mesh axis does not divide is replicated instead of failing
    assert parallel.logical_to_spec(("embed", "kv_heads", None), (64, 1, 16), mesh) == P("fsdp", None, None)
    # an axis already used by an earlier dimension is not reused
    assert parallel.logical_to_spec(("batch", "embed"), (4, 64), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no rule"):
        parallel.logical_to_spec(("nonsense",))


def test_make_mesh_checks_device_count():
    assert dict(parallel.make_mesh(fsdp=-1, tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh(data=2, fsdp=4, tensor=2)


def test_sharded_forward_equals_single_device(tmp_path):
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
    ref.build_reference("qwen2_5_vl", str(tmp_path))
    single = jm.from_pretrained(str(tmp_path))
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = jm.from_pretrained(str(tmp_path), mesh=mesh)

    specs = {".".join(map(str, k)): v.get_value().sharding.spec for k, v in nnx.to_flat_state(nnx.state(sharded))}
    assert specs["decoder.layers.self_attn.q_proj.kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["decoder.layers.mlp.down_proj.kernel"] == P(None, "tensor", "fsdp")
    assert specs["decoder.embed_tokens"] == P("tensor", "fsdp")
    # each device's block was read from the file on its own: together they are the whole parameter
    for (key, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single)), nnx.to_flat_state(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(key))

    samples = [
        [("text", 3), ("video", (2, 4, 8), 1.0), ("text", 2)],
        [("text", 5)],
        [("text", 2), ("image", (1, 4, 4)), ("text", 4)],
        [("text", 8)],
    ]
    batch = ref.ours_inputs(
        ref.make_batch(samples, rng=np.random.default_rng(0), patch_dim=single.config.vision.patch_dim)
    )
    want = np.asarray(single(**batch).logits)
    with jax.set_mesh(mesh):
        got = sharded(**batch).logits
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-5)


def test_cloud_tpu_vm_joins_the_slice_without_environment_variables(monkeypatch):
    """On a TPU VM nothing in the environment names the slice's hosts: jax.distributed.initialize() reads
    them from the VM (launch/tpu_pod.sh exports nothing)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel, "cloud_tpu_vm", lambda: False)
    parallel.initialize_distributed()
    assert calls == []
    monkeypatch.setattr(parallel, "cloud_tpu_vm", lambda: True)
    parallel.initialize_distributed()
    assert calls == [((), {})]


def test_vision_tower_runs_split_over_the_batch():
    # The tower sees a batch's patches flattened to [N, ...]; without its sharding constraints XLA ran the whole
    # batch on every device (bench/accelerator.py: 118 GB per device for the 3B MeCo batch).
    from jax.sharding import NamedSharding

    from jaxgrounding.grounding_model import batch_plan
    from jaxgrounding.model import presets
    from jaxgrounding.model.config import ModelConfig
    from jaxgrounding.model.vision import VisionTower

    config = ModelConfig.from_hf_dict(presets.tiny(hidden=64, layers=1, vision_depth=2, vision_hidden=64))
    frame_size, grids, batch = (112, 112), 4, 8
    plan = batch_plan({"grid_times": np.zeros((batch, grids))}, config, frame_size)
    patches = batch * grids * (frame_size[0] // 14) * (frame_size[1] // 14)

    def temp_bytes(mesh):
        with jax.set_mesh(mesh):
            tower = nnx.eval_shape(
                lambda: VisionTower(
                    config.vision, param_dtype=jnp.float32, compute_dtype=jnp.float32, attention_impl="xla",
                    rngs=nnx.Rngs(0),
                )
            )
            graphdef, state = nnx.split(tower)
            state = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                state,
                parallel.state_shardings(state, mesh),
            )
            pixels = jax.ShapeDtypeStruct(
                (patches, config.vision.patch_dim), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp")))
            )
            run = jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels, plan))
            return run.lower(state, pixels).compile().memory_analysis().temp_size_in_bytes

    split = temp_bytes(parallel.make_mesh(data=1, fsdp=8, tensor=1))
    whole = temp_bytes(parallel.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1]))
    assert split < whole / 2, (split, whole)  # 0.41 here; 1.0 before the constraints
