"""AlexNet's two-GPU split (Fig. 2) as model parallelism on 2 forced CPU devices (a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from convlib import models
    from convlib.train import shard_output_channels

    assert jax.device_count() == 2
    model = models.create("alexnet_small", num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    def run(graphdef, state):
        params, rest = state.filter(nnx.Param), state.filter(nnx.Not(nnx.Param))
        forward = lambda p, x: nnx.merge(graphdef, p, rest)(x)
        loss = lambda p, x: jnp.sum(forward(p, x) ** 2)
        compiled = jax.jit(forward).lower(params, x).compile()
        return forward(params, x), jax.grad(loss)(params, x), compiled.as_text(), compiled

    graphdef, state = nnx.split(model)
    y1, g1, _, _ = run(graphdef, state)
    split_graphdef, split_state, mesh = shard_output_channels(model)
    with jax.set_mesh(mesh):
        y2, g2, hlo, compiled = run(split_graphdef, split_state)
    scale = lambda a: float(jnp.max(jnp.abs(a)))
    convs = re.findall(r"f32\\[4,(\\d+),(\\d+),(\\d+)\\][^\\n]* convolution\\(", hlo)
    print(json.dumps({
        "y_error": scale(y1 - y2) / scale(y1),
        "grad_error": max(scale(a - b) / scale(a) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))),
        "conv_channels": sorted(int(c) for _, _, c in convs),
        "kernel_shards": {name: [list(s.data.shape) for s in split_state[name]["kernel"].addressable_shards]
                          for name in ("conv1", "conv2", "conv3", "conv4", "conv5")},
        "kernel_devices": [sorted(str(s.device) for s in split_state[name]["kernel"].addressable_shards)
                           for name in ("conv2", "conv4", "conv5")],
        "collectives": {op: len(re.findall(" " + op + r"(-start)?\\(", hlo))
                        for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")},
    }))
    """
)


def test_alexnet_halves_live_on_separate_devices_with_the_same_outputs_and_gradients():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # float32: the split changes only the order of a few sums
    assert report["y_error"] < 1e-5 and report["grad_error"] < 1e-4, report
    # alexnet_small has 48-128-192-192-128 maps: each device computes exactly half of every conv layer
    assert report["conv_channels"] == sorted([24, 64, 96, 96, 64]), report["conv_channels"]
    assert report["kernel_shards"]["conv2"] == [[5, 5, 24, 64], [5, 5, 24, 64]]
    assert all(len(set(devices)) == 2 for devices in report["kernel_devices"])
    # communication only where the paper's columns meet: conv3's input and the three dense layers'
    # inputs (all-gathers), plus LRN's boundary channels (collective-permutes); no all-reduce.
    assert report["collectives"]["all-gather"] <= 4, report["collectives"]
    assert report["collectives"]["all-reduce"] == 0 and report["collectives"]["all-to-all"] == 0
