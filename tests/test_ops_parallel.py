"""The hand-derived backward passes inside shard_map and pmap, on 4 forced CPU devices (a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from convlib import ops

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((8, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)

    def loss(x, w, b, backward):
        y = ops.conv(x, w, b, stride=2, padding=1, backward=backward)
        y = ops.max_pool(y, 2, backward=backward) + ops.avg_pool(y, 2, backward=backward)
        return jnp.sum(jnp.sin(y))

    def grads(backward):
        return jax.grad(loss, (1, 2))(x, w, b, backward)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    errors = {}
    for backward in ("custom", "autodiff"):
        want = grads("autodiff")
        # Inside shard_map, the gradient of a replicated weight is summed over devices automatically.
        sharded = jax.jit(jax.shard_map(
            lambda x, w, b: jax.grad(loss, (1, 2))(x, w, b, backward),
            mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P()))(x, w, b)
        pmapped = jax.pmap(
            lambda x, w, b: jax.lax.psum(jax.grad(loss, (1, 2))(x, w, b, backward), "data"),
            axis_name="data", in_axes=(0, None, None))(x.reshape(4, 2, 6, 6, 2), w, b)
        pmapped = jax.tree.map(lambda a: a[0], pmapped)
        errors[backward] = [float(np.max(np.abs(np.asarray(g) - np.asarray(h))))
                            for got in (sharded, pmapped) for g, h in zip(got, want)]
    print(json.dumps(errors))
    """
)


def test_custom_vjp_inside_shard_map_and_pmap_on_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for backward, values in errors.items():
        assert max(values) < 1e-12, (backward, values)  # float64 sums over 4 devices
