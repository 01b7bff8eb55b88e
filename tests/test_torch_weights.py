"""PyTorch weights in convlib models: reference modules written here by hand in PyTorch (torchvision's names for
ResNet and VGG), their random weights loaded with `models.load_torch_state_dict`, logits compared in float32.

Small widths and inputs keep it fast; the refusals run without torch, on NumPy arrays."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32: the same sums in another order


def torch_modules():
    """The reference modules (built only where torch is installed)."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class LeNet5Modern(tnn.Module):
        def __init__(self, channels=(6, 16), hidden=(120, 84)):
            super().__init__()
            self.conv1 = tnn.Conv2d(1, channels[0], 5, padding=2)
            self.conv2 = tnn.Conv2d(channels[0], channels[1], 5)
            self.fc1 = tnn.Linear(channels[1] * 25, hidden[0])
            self.fc2 = tnn.Linear(*hidden)
            self.fc3 = tnn.Linear(hidden[1], 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.relu(self.fc1(torch.flatten(x, 1)))
            return self.fc3(torch.relu(self.fc2(x)))

    class Classifier(tnn.Module):
        def __init__(self, features, hidden, classes):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = (
                tnn.Linear(features, hidden),
                tnn.Linear(hidden, hidden),
                tnn.Linear(hidden, classes),
            )

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    class AlexNet(tnn.Module):
        """convlib's AlexNet: groups=2 in conv2/4/5; LRN with PyTorch's alpha = n x the paper's."""

        def __init__(self, channels, hidden, side):
            super().__init__()
            c1, c2, c3, c4, c5 = channels
            self.conv1 = tnn.Conv2d(3, c1, 5, padding=2)
            self.conv2 = tnn.Conv2d(c1, c2, 5, padding=2, groups=2)
            self.conv3 = tnn.Conv2d(c2, c3, 3, padding=1)
            self.conv4 = tnn.Conv2d(c3, c4, 3, padding=1, groups=2)
            self.conv5 = tnn.Conv2d(c4, c5, 3, padding=1, groups=2)
            self.norm = tnn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
            self.classifier = Classifier(c5 * side * side, hidden, 10)

        def forward(self, x):
            x = torch.max_pool2d(self.norm(torch.relu(self.conv1(x))), 3, 2)
            x = torch.max_pool2d(self.norm(torch.relu(self.conv2(x))), 3, 2)
            x = torch.relu(self.conv4(torch.relu(self.conv3(x))))
            x = torch.max_pool2d(torch.relu(self.conv5(x)), 3, 2)
            return self.classifier(torch.flatten(x, 1))

    def vgg(config, widths, batch_norm, flat, hidden):
        """torchvision's VGG without its adaptive pool (convlib's fc1 reads the last map as it is)."""
        layers, c_in = [], 3
        for width, convs in zip(widths, config):
            for _ in range(convs):
                layers += [tnn.Conv2d(c_in, width, 3, padding=1)]
                layers += [tnn.BatchNorm2d(width)] if batch_norm else []
                layers += [tnn.ReLU()]
                c_in = width
            layers += [tnn.MaxPool2d(2)]
        model = tnn.Module()
        model.features = tnn.Sequential(*layers)
        model.classifier = tnn.Sequential(
            tnn.Linear(flat, hidden),
            tnn.ReLU(),
            tnn.Dropout(),
            tnn.Linear(hidden, hidden),
            tnn.ReLU(),
            tnn.Dropout(),
            tnn.Linear(hidden, 10),
        )
        model.forward = lambda x: model.classifier(torch.flatten(model.features(x), 1))
        return model

    def conv_bn(c_in, c_out, k, stride=1):
        return tnn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), tnn.BatchNorm2d(c_out)

    class BasicBlock(tnn.Module):
        expansion = 1

        def __init__(self, c_in, width, stride, shortcut):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(c_in, width, 3, stride)
            self.conv2, self.bn2 = conv_bn(width, width, 3)
            self.shortcut = make_shortcut(self, c_in, width, stride, shortcut)

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + self.shortcut(x))

    class Bottleneck(tnn.Module):
        """torchvision's v1.5: the stride on the 3x3."""

        expansion = 4

        def __init__(self, c_in, width, stride, shortcut):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(c_in, width, 1)
            self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
            self.conv3, self.bn3 = conv_bn(width, 4 * width, 1)
            self.shortcut = make_shortcut(self, c_in, 4 * width, stride, shortcut)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
            return torch.relu(y + self.shortcut(x))

    def make_shortcut(block, c_in, c_out, stride, option):
        """Identity, option A (every stride-th position, new channels zero at the end) or torchvision's downsample."""
        if c_in == c_out and stride == 1:
            return lambda x: x
        if option == "A":
            return lambda x: torch.nn.functional.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, c_out - c_in))
        block.downsample = tnn.Sequential(*conv_bn(c_in, c_out, 1, stride))
        return lambda x: block.downsample(x)

    class ResNet(tnn.Module):
        def __init__(self, block, stage_sizes, widths, stem, shortcut):
            super().__init__()
            self.stem = stem
            self.conv1 = tnn.Conv2d(
                3,
                widths[0],
                7 if stem == "imagenet" else 3,
                2 if stem == "imagenet" else 1,
                3 if stem == "imagenet" else 1,
                bias=False,
            )
            self.bn1 = tnn.BatchNorm2d(widths[0])
            c_in = widths[0]
            for i, (size, width) in enumerate(zip(stage_sizes, widths), 1):
                blocks = []
                for j in range(size):
                    blocks.append(block(c_in, width, 2 if i > 1 and j == 0 else 1, shortcut))
                    c_in = block.expansion * width
                setattr(self, f"layer{i}", tnn.Sequential(*blocks))
            self.stages = len(stage_sizes)
            self.fc = tnn.Linear(c_in, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            if self.stem == "imagenet":
                x = torch.max_pool2d(x, 3, 2, 1)
            for i in range(1, self.stages + 1):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return torch, {m.__name__: m for m in (LeNet5Modern, AlexNet, vgg, ResNet, BasicBlock, Bottleneck)}


def randomised(torch, module):
    """Random BatchNorm affine parameters and running statistics, so every array the loader maps matters."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            for tensor, low, high in [
                (layer.weight, 0.5, 1.5),
                (layer.bias, -0.5, 0.5),
                (layer.running_mean, -0.5, 0.5),
                (layer.running_var, 0.5, 1.5),
            ]:
                tensor.data.uniform_(low, high)
    return module.eval()


def assert_same_logits(torch, reference, model, x_nchw):
    reference = randomised(torch, reference)
    models.load_torch_state_dict(model, reference.state_dict())
    model.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x_nchw)).numpy()
    got = model(jnp.transpose(x_nchw, (0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), expected, **TOLERANCE)


def images(size, channels=3):
    return np.random.default_rng(0).normal(size=(2, channels, size, size)).astype(np.float32)


def test_lenet5_modern():
    torch, ref = torch_modules()
    model = models.create("lenet5_modern", in_channels=1, input_size=28, rngs=nnx.Rngs(0))
    assert_same_logits(torch, ref["LeNet5Modern"](), model, images(28, 1))


def test_alexnet_with_groups_lrn_and_a_3x3_last_map():
    torch, ref = torch_modules()
    channels = (8, 16, 16, 16, 16)
    model = models.create("alexnet_small", channels=channels, hidden=32, rngs=nnx.Rngs(0))
    assert_same_logits(torch, ref["AlexNet"](channels, 32, side=3), model, images(32))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_whose_last_map_is_2x2(batch_norm):
    torch, ref = torch_modules()
    widths = (4, 8, 8, 16, 16)
    model = models.VGG(depth=11, batch_norm=batch_norm, widths=widths, input_size=64, hidden=32, rngs=nnx.Rngs(0))
    reference = ref["vgg"]((1, 1, 2, 2, 2), widths, batch_norm, flat=16 * 2 * 2, hidden=32)
    assert_same_logits(torch, reference, model, images(64))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet(shortcut):
    torch, ref = torch_modules()
    model = models.CifarResNet(depth=8, widths=(4, 8, 16), shortcut=shortcut, rngs=nnx.Rngs(0))
    reference = ref["ResNet"](ref["BasicBlock"], (1, 1, 1), (4, 8, 16), "cifar", shortcut)
    assert_same_logits(torch, reference, model, images(16))


def test_imagenet_resnet18():
    torch, ref = torch_modules()
    widths = (4, 8, 16, 32)
    model = models.ImageNetResNet(depth=18, widths=widths, rngs=nnx.Rngs(0))
    reference = ref["ResNet"](ref["BasicBlock"], (2, 2, 2, 2), widths, "imagenet", "B")
    assert_same_logits(torch, reference, model, images(32))


def test_imagenet_resnet50_v1_5_needs_the_stride_on_the_3x3():
    torch, ref = torch_modules()
    widths = (4, 8, 16, 32)
    model = models.ImageNetResNet(depth=50, widths=widths, bottleneck_stride="3x3", rngs=nnx.Rngs(0))
    reference = ref["ResNet"](ref["Bottleneck"], (3, 4, 6, 3), widths, "imagenet", "B")
    assert_same_logits(torch, reference, model, images(32))


# --------------------------------------------------------------------------- refusals (no torch needed)


def zeros_for(model):
    return {key: np.zeros(shape, np.float32) for key, shape in models.torch_shapes(model).items()}


def resnet20():
    return models.create("resnet20", widths=(4, 8, 16), rngs=nnx.Rngs(0))


def test_refusals_name_the_key_and_copy_nothing():
    model = resnet20()
    before = np.asarray(model.fc.kernel[...])
    state = zeros_for(model)
    for bad, message in [
        (state | {"layer4.0.conv1.weight": np.zeros((1,))}, "key 'layer4.0.conv1.weight' names no variable of ResNet"),
        ({k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}, "no key 'layer2.0.bn1.running_var'"),
        (
            state | {"layer1.0.conv1.weight": np.zeros((4, 4, 3, 3, 1))},
            r"'layer1.0.conv1.weight' has shape \(4, 4, 3, 3, 1\)",
        ),
        (state | {"fc.weight": np.zeros((16, 10))}, r"'fc.weight' has shape \(16, 10\); ResNet expects \(10, 16\)"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            models.load_torch_state_dict(model, bad)
        assert "\n" not in str(error.value)
    np.testing.assert_array_equal(model.fc.kernel[...], before)


def test_num_batches_tracked_is_ignored_and_any_array_like_loads():
    model = resnet20()
    state = {key: list(value.tolist()) if value.ndim == 1 else value for key, value in zeros_for(model).items()}
    state["bn1.num_batches_tracked"] = np.array(7)
    models.load_torch_state_dict(model, state)
    assert float(jnp.abs(model.fc.kernel[...]).sum()) == 0.0


def test_an_unsupported_model_is_refused():
    with pytest.raises(TypeError, match=r"model must be one of .* got ContextModule"):
        models.load_torch_state_dict(models.create("context_basic", rngs=nnx.Rngs(0)), {})
