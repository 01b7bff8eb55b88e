"""Input-size arguments of the models whose classifier depends on the image size."""

from __future__ import annotations

from convlib.nn.validation import check_positive_int


def check_input_size(input_size) -> int:
    return check_positive_int("input_size", input_size)


def check_image_shape(input_size, in_channels) -> tuple[int, int]:
    """(input_size, in_channels) of a model built for square images, each checked."""
    return check_input_size(input_size), check_positive_int("in_channels", in_channels)


def check_input(x, input_size: int, in_channels: int, model: str) -> None:
    """Raises ValueError unless x is (N, input_size, input_size, in_channels)."""
    expected = (input_size, input_size, in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{model} was built for inputs (N, {input_size}, {input_size}, {in_channels}) "
            f"(input_size={input_size}, in_channels={in_channels}), got x of shape {tuple(x.shape)}"
        )
