"""Filter groups: parameters and time of one conv layer against the number of groups, and a small network trained
with groups = 1, 2, 4 (the lecture: fewer parameters, a regularising effect).

1. One 3x3 'same' conv, C -> C channels, groups 1, 2, 4, ..., C (depthwise): parameters (9 C^2 / g + C), forward
   FLOPs, and the time of the forward, of dX and dW alone (hand-derived backward) and of forward + backward with
   the hand-derived backward and with autodiff, median of repeats taken in turns.
2. A small net built from convlib.nn layers: conv 3x3 (1 -> w1) - ReLU - conv (w1 -> w2, g) - ReLU - max-pool -
   conv (w2 -> w2, g) - ReLU - max-pool - conv (w2 -> w3, g) - ReLU - global average pool - linear, trained on
   Fashion-MNIST for each g from the same seed(s); final train and test error and their gap. The grouped convs are
   nn.Conv(groups=g), or with --implementation split one dense nn.Conv per group on channel slices (the same
   function and parameters; useful with backward="autodiff" on a CPU, where XLA's grouped weight gradient is slow).

Writes into --out: layer.csv, training.csv, results.json, groups_layer.png, groups_training.png.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convlib import models, nn, ops, train
from experiments import fashion_training, outputs
from experiments.timing import median_times

IMPLEMENTATIONS = ("conv", "split")


class SplitConv(nnx.Module):
    """A grouped 3x3 'same' conv as `groups` dense convs on channel slices, outputs concatenated: the same function
    and parameters as nn.Conv(..., groups=groups), without XLA's grouped weight gradient (batch_group_count),
    which XLA:CPU runs 10-100x slower than a dense conv of the same size."""

    def __init__(self, in_features: int, out_features: int, groups: int, *, rngs: nnx.Rngs):
        self.groups = groups
        self.convs = nnx.List(
            [nn.Conv(in_features // groups, out_features // groups, 3, padding=1, rngs=rngs) for _ in range(groups)]
        )

    def __call__(self, x):
        parts = jnp.split(x, self.groups, axis=-1)
        return jnp.concatenate([conv(part) for conv, part in zip(self.convs, parts)], axis=-1)


class GroupedNet(nnx.Module):
    """x (N, H, W, 1) -> logits (N, num_classes); every conv after the first has `groups` filter groups, computed
    as one grouped nn.Conv (implementation "conv") or as `groups` dense nn.Convs on channel slices ("split")."""

    def __init__(
        self, groups: int, widths=(16, 32, 64), num_classes: int = 10, *, implementation: str = "conv", rngs: nnx.Rngs
    ):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        w1, w2, w3 = widths

        def grouped(c_in, c_out):
            if implementation == "split":
                return SplitConv(c_in, c_out, groups, rngs=rngs)
            return nn.Conv(c_in, c_out, 3, padding=1, groups=groups, rngs=rngs)

        self.convs = nnx.List(
            [nn.Conv(1, w1, 3, padding=1, rngs=rngs), grouped(w1, w2), grouped(w2, w2), grouped(w2, w3)]
        )
        self.pool = nn.MaxPool(2)
        self.head = nn.GlobalAvgPool()
        self.fc = nnx.Linear(w3, num_classes, rngs=rngs)

    def __call__(self, x):
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i in (1, 2):
                x = self.pool(x)
        return self.fc(self.head(x))


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "groups")
    p.add_argument(
        "--channels", type=int, default=None, help="C of the single layer (default: 4 smoke, 64 default, 256 full)"
    )
    p.add_argument(
        "--layer-batch",
        type=int,
        default=None,
        help="batch of the single layer (default: 2 smoke, 8 default, 128 full)",
    )
    p.add_argument("--layer-size", type=int, default=32, help="height = width of the single layer's input")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: 2 smoke, 5 default, 20 full)")
    p.add_argument(
        "--train-groups",
        default=None,
        help="comma-separated groups of the trained nets (default: 1,2 smoke, else 1,2,4)",
    )
    p.add_argument(
        "--widths",
        default=None,
        help="w1,w2,w3 of the small net (default: 4,8,16 smoke, 16,32,64 "
        "default, 32,64,128 full); each must be divisible by every --train-groups",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 2 smoke, 600 default, 6000 full)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="training runs per groups value, seeds --seed, --seed+1, ... (default: 1 smoke, 1 default, 3 full)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training images used (default: all; a smaller set makes over-fitting, and so regularisation, visible)",
    )
    p.add_argument(
        "--implementation",
        choices=IMPLEMENTATIONS,
        default="conv",
        help="grouped convs of the trained nets: one nn.Conv(groups=g), or one dense nn.Conv per group on "
        "channel slices (same function and parameters)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine)")
    fashion_training.add_data_flags(p)
    args = p.parse_args(argv)
    outputs.positive(
        p, args, "channels", "layer_batch", "layer_size", "repeats", "steps", "seeds", "train_size", "batch_size", "lr"
    )
    args.channels = args.channels or outputs.pick(args.size, 4, 64, 256)
    args.layer_batch = args.layer_batch or outputs.pick(args.size, 2, 8, 128)
    args.repeats = args.repeats or outputs.pick(args.size, 2, 5, 20)
    args.steps = args.steps or outputs.pick(args.size, 2, 600, 6000)
    args.seeds = args.seeds or outputs.pick(args.size, 1, 1, 3)
    try:
        args.train_groups = [
            int(g) for g in (args.train_groups or outputs.pick(args.size, "1,2", "1,2,4", "1,2,4")).split(",")
        ]
        args.widths = tuple(
            int(w) for w in (args.widths or outputs.pick(args.size, "4,8,16", "16,32,64", "32,64,128")).split(",")
        )
    except ValueError:
        p.error(
            f"--train-groups and --widths must be comma-separated ints, got {args.train_groups!r} and {args.widths!r}"
        )
    if (
        len(args.widths) != 3
        or any(w % g for w in args.widths for g in args.train_groups)
        or min(args.train_groups) < 1
    ):
        p.error(
            f"--widths must be 3 ints, each divisible by every --train-groups {args.train_groups}, got {args.widths}"
        )
    return args


def layer_sweep(args, key) -> list[dict]:
    c = args.channels
    rows = []
    groups = [g for g in (2**i for i in range(int(math.log2(c)) + 1)) if c % g == 0]
    kx, kg = jax.random.split(key)
    x = jax.random.normal(kx, (args.layer_batch, args.layer_size, args.layer_size, c))
    dy = jax.random.normal(kg, x.shape)
    for g in tqdm(groups, desc="groups", disable=args.no_progress):
        w = jax.random.normal(jax.random.fold_in(key, g), (3, 3, c // g, c)) / math.sqrt(9 * c / g)

        def conv(x, w, backward="custom", g=g):
            return ops.conv(x, w, padding=1, groups=g, backward=backward)

        def pullback(backward, wrt):
            def f(x, w, dy):
                y, pull = jax.vjp(lambda x, w: conv(x, w, backward), x, w)
                grads = pull(dy)
                return (y, *grads) if wrt is None else grads[wrt]

            return jax.jit(f)

        calls = {
            "forward": jax.jit(lambda x, w, dy: conv(x, w)),
            "dX": pullback("custom", 0),
            "dW": pullback("custom", 1),
            "fwd+bwd": pullback("custom", None),
            "fwd+bwd autodiff": pullback("autodiff", None),
        }
        times = median_times({name: (fn, (x, w, dy)) for name, fn in calls.items()}, repeats=args.repeats)
        rows.append(
            {
                "groups": g,
                "depthwise": g == c,
                "parameters": 9 * c * c // g + c,
                "gflop": 2 * x.shape[0] * args.layer_size**2 * c * 9 * c / g / 1e9,
                **{f"{name}_ms": 1e3 * t for name, t in times.items()},
            }
        )
    return rows


def train_sweep(args) -> list[dict]:
    dataset = fashion_training.load(
        args,
        train_size=args.train_size or outputs.pick(args.size, 256, None, None),
        test_size=outputs.pick(args.size, 128, None, None),
        seed=args.seed,
    )
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        for g in args.train_groups:
            model = GroupedNet(g, args.widths, implementation=args.implementation, rngs=nnx.Rngs(seed))
            training = fashion_training.fit(
                model,
                dataset,
                steps=args.steps,
                batch_size=min(args.batch_size, dataset.train.labels.shape[0]),
                key=jax.random.key(seed),
                evaluations=outputs.pick(args.size, 1, 6, 10),
                recipe=train.Recipe(learning_rate=args.lr, warmup_steps=max(1, args.steps // 20)),
                progress=not args.no_progress,
            )
            final = training.curve[-1]
            rows.append(
                {
                    "groups": g,
                    "seed": seed,
                    "parameters": models.param_count(model),
                    "train_error": final["train_error"],
                    "test_error": final["test_error"],
                    "gap": final["test_error"] - final["train_error"],
                    "train_loss": final["train_loss"],
                    "test_loss": final["test_loss"],
                    "images_per_s": training.result.images_per_s,
                    "curve": training.curve,
                    "dataset": dataset.name,
                }
            )
    return rows


def plot_layer(run, rows, args, machine):
    plt = outputs.pyplot()
    fig, (par, tim) = plt.subplots(1, 2, figsize=(12, 4.3))
    g = [r["groups"] for r in rows]
    par.plot(g, [r["parameters"] for r in rows], "o-", label="parameters")
    par.plot(g, [r["gflop"] * 1e9 / args.layer_batch for r in rows], "s--", label="forward FLOPs per image")
    par.set_xscale("log", base=2)
    par.set_yscale("log")
    par.set_xlabel(f"groups (C = {args.channels}; last = depthwise)")
    par.set_ylabel("count")
    par.set_title(f"3x3 conv {args.channels} -> {args.channels}: parameters and FLOPs ~ 1/groups")
    par.legend()
    par.grid(alpha=0.3, which="both")
    for column, label, style in (
        ("forward_ms", "forward", "o-"),
        ("dX_ms", "dX (custom)", "^-"),
        ("dW_ms", "dW (custom)", "v-"),
        ("fwd+bwd_ms", "fwd + bwd (custom)", "s-"),
        ("fwd+bwd autodiff_ms", "fwd + bwd (autodiff)", "x--"),
    ):
        tim.plot(g, [r[column] for r in rows], style, label=label)
    tim.plot(g, [rows[0]["fwd+bwd_ms"] / x for x in g], "k:", label="fwd + bwd at groups=1, / groups")
    tim.set_xscale("log", base=2)
    tim.set_yscale("log")
    tim.set_xlabel("groups")
    tim.set_ylabel("time (ms), median")
    tim.set_title(f"time, batch {args.layer_batch} x {args.layer_size}x{args.layer_size}")
    tim.legend(fontsize=8)
    tim.grid(alpha=0.3, which="both")
    fig.suptitle(machine, fontsize=9)
    run.save_figure(fig, "groups_layer.png")


def plot_training(run, rows):
    plt = outputs.pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.3))
    groups = sorted({r["groups"] for r in rows})
    for g, color in zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for i, r in enumerate(r for r in rows if r["groups"] == g):
            steps = [p["step"] for p in r["curve"]]
            label = lambda text: text if i == 0 else None  # noqa: E731
            curves.plot(
                steps,
                [p["test_error"] for p in r["curve"]],
                "o-",
                color=color,
                label=label(f"groups={g} ({r['parameters']:,} params) test"),
            )
            curves.plot(steps, [p["train_error"] for p in r["curve"]], "--", color=color, label=label("train"))
    curves.set_xlabel("step")
    curves.set_ylabel("error")
    curves.set_title(f"small net on {rows[0]['dataset']}: test (solid), running train (dashed)", fontsize=10)
    curves.legend(fontsize=8)
    curves.grid(alpha=0.3)
    x = np.arange(len(groups))
    for offset, column in ((-0.2, "train_error"), (0.2, "test_error")):
        means = [np.mean([r[column] for r in rows if r["groups"] == g]) for g in groups]
        bars.bar(x + offset, means, 0.4, label=column.replace("_", " ") + " (final)")
    bars.set_xticks(x, [f"groups={g}" for g in groups])
    bars.set_ylabel("error (mean over seeds)")
    bars.set_title("final errors")
    bars.legend()
    run.save_figure(fig, "groups_training.png")


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    layer = layer_sweep(args, jax.random.key(args.seed))
    run.write_csv("layer.csv", layer)
    plot_layer(run, layer, args, machine)
    training = train_sweep(args)
    run.write_csv("training.csv", [{k: v for k, v in r.items() if k != "curve"} for r in training])
    plot_training(run, training)
    return run.finish({"layer": layer, "training": training})


if __name__ == "__main__":
    main()
