"""convlib.data: IDX parsing, the offline TFDS builder, the source chain, the device pipeline."""

import functools
import gzip
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from convlib import data

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
OFFLINE = dict(apt_install=None, download=False)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Writes uint8 ``array`` as an IDX file (gzip when the name ends in .gz)."""
    magic = magic if magic is not None else 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_folder(folder: Path, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes 12 train / 5 test random 28x28 images with labels 0..9; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 12, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / (STEMS[key] + (".gz" if gz else "")), array)
    return arrays


def assert_nothing_prepared(data_dir: Path) -> None:
    builder = data.IdxImages(config="fashion_mnist", data_dir=data_dir)
    assert not builder.is_prepared()
    assert not builder.data_path.exists()
    leftovers = list(data_dir.rglob("incomplete.*")) if data_dir.exists() else []
    assert leftovers == []


# --- the TFDS builder -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_builder_prepares_and_reads_back_exactly(tmp_path, gz):
    arrays = make_idx_folder(tmp_path / "src", gz=gz)
    data_dir = tmp_path / "tfds"
    for split in ("train", "test"):
        images, labels = data.load("fashion_mnist", split, data_dir=data_dir, source_dir=tmp_path / "src", **OFFLINE)
        assert images.dtype == np.uint8 and images.shape == (len(arrays[f"{split}_labels"]), 28, 28, 1)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(images[..., 0], arrays[f"{split}_images"])
        np.testing.assert_array_equal(labels, arrays[f"{split}_labels"])

    # The prepared folder stands on its own: TFDS reads it back without convlib's builder.
    path = data_dir / "convlib_idx" / "fashion_mnist" / str(data.IdxImages.VERSION)
    builder = tfds.builder_from_directory(path)
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 12, "test": 5}
    source = builder.as_data_source(split="test")
    assert len(source) == 5
    np.testing.assert_array_equal(source[3]["image"][..., 0], arrays["test_images"][3])
    assert source[3]["label"] == arrays["test_labels"][3]
    assert "tensorflow" not in sys.modules


def test_prepared_dataset_is_reused_without_sources(tmp_path):
    arrays = make_idx_folder(tmp_path / "src")
    data.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    for f in (tmp_path / "src").iterdir():
        f.unlink()
    _, labels = data.load("mnist", "train", data_dir=tmp_path / "tfds", **OFFLINE)
    np.testing.assert_array_equal(labels, arrays["train_labels"])


def test_load_rejects_bad_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="name='cifar7'"):
        data.load("cifar7", data_dir=tmp_path, **OFFLINE)
    with pytest.raises(ValueError, match="split='validation'"):
        data.load("mnist", "validation", data_dir=tmp_path, **OFFLINE)


# --- the real Fashion-MNIST from the Debian package ---------------------------------------------


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per test session (about 15 s on 2 cores)."""
    if not all((DEBIAN_FASHION / f"{stem}.gz").is_file() for stem in STEMS.values()):
        pytest.skip(f"{DEBIAN_FASHION} lacks the IDX files: apt-get install dataset-fashion-mnist")
    data_dir = tmp_path_factory.mktemp("tfds_real")
    data.prepare("fashion_mnist", data_dir=data_dir, **OFFLINE)
    return data_dir


def test_real_fashion_mnist(fashion_mnist_dir):
    train_images, train_labels = data.load("fashion_mnist", "train", data_dir=fashion_mnist_dir, **OFFLINE)
    test_images, test_labels = data.load("fashion_mnist", "test", data_dir=fashion_mnist_dir, **OFFLINE)
    assert train_images.shape == (60000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert train_labels.min() == 0 and train_labels.max() == 9
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), np.full(10, 1000))
    # Read back in the IDX files' order, byte for byte.
    raw_images, raw_labels = data.read_idx_split(DEBIAN_FASHION, "test")
    np.testing.assert_array_equal(test_images[..., 0], raw_images)
    np.testing.assert_array_equal(test_labels, raw_labels)
    mean, std = data.channel_stats(train_images)
    np.testing.assert_allclose(mean, data.MEAN_STD["fashion_mnist"][0], atol=1e-4)
    np.testing.assert_allclose(std, data.MEAN_STD["fashion_mnist"][1], atol=1e-4)


# --- bad data ---------------------------------------------------------------------------------


def _wrong_magic(folder):
    path = folder / f"{STEMS['train_images']}.gz"
    write_idx(path, np.zeros((12, 28, 28), np.uint8), magic=0x00000801)
    return path.name


def _truncated(folder):
    path = folder / f"{STEMS['test_images']}.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    return path.name


def _truncated_gzip(folder):
    path = folder / f"{STEMS['train_labels']}.gz"
    path.write_bytes(path.read_bytes()[:-10])
    return path.name


def _count_mismatch(folder):
    path = folder / f"{STEMS['train_labels']}.gz"
    write_idx(path, np.zeros(11, np.uint8))
    return path.name


def _label_out_of_range(folder):
    path = folder / f"{STEMS['test_labels']}.gz"
    write_idx(path, np.full(5, 10, np.uint8))
    return path.name


def _wrong_image_size(folder):
    path = folder / f"{STEMS['train_images']}.gz"
    write_idx(path, np.zeros((12, 28, 27), np.uint8))
    return path.name


def _missing(folder):
    path = folder / f"{STEMS['test_labels']}.gz"
    path.unlink()
    return STEMS["test_labels"]


@pytest.mark.parametrize(
    "corrupt",
    [_wrong_magic, _truncated, _truncated_gzip, _count_mismatch, _label_out_of_range, _wrong_image_size, _missing],
)
def test_bad_idx_file_names_the_file_and_leaves_nothing(tmp_path, corrupt):
    src, data_dir = tmp_path / "src", tmp_path / "tfds"
    make_idx_folder(src)
    name = corrupt(src)
    with pytest.raises((ValueError, FileNotFoundError), match=name.replace(".", r"\.")):
        data.load("fashion_mnist", data_dir=data_dir, source_dir=src, **OFFLINE)
    assert_nothing_prepared(data_dir)

    # A later run with good files prepares afresh and returns the good data.
    arrays = make_idx_folder(src, seed=1)
    images, _ = data.load("fashion_mnist", data_dir=data_dir, source_dir=src, **OFFLINE)
    np.testing.assert_array_equal(images[..., 0], arrays["train_images"])


def test_failure_mid_generation_leaves_nothing(tmp_path, monkeypatch):
    src, data_dir = tmp_path / "src", tmp_path / "tfds"
    make_idx_folder(src)
    original = data.IdxImages._generate_examples

    def failing(self, images, labels):
        yield from list(original(self, images, labels))[:3]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(data.IdxImages, "_generate_examples", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        data.prepare("fashion_mnist", data_dir=data_dir, source_dir=src, **OFFLINE)
    assert_nothing_prepared(data_dir)
    with pytest.raises(FileNotFoundError, match=r"source_dir=DIR"):
        # No sources, nothing prepared: a later load must not find a dataset.
        data.load("mnist", data_dir=data_dir, **OFFLINE)


def test_read_idx_reports_wrong_shape_header(tmp_path):
    path = tmp_path / "images-idx3"
    write_idx(path, np.zeros((2, 3, 4), np.uint8))
    assert data.read_idx(path, 0x00000803).shape == (2, 3, 4)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"images-idx3 .*trailing data"):
        data.read_idx(path, 0x00000803)


# --- what was prepared, and recovering from damage ------------------------------------------------


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def mnist_path(data_dir: Path) -> Path:
    return Path(data.IdxImages(config="mnist", data_dir=data_dir).data_path)


def test_prepared_dataset_records_its_source(tmp_path):
    make_idx_folder(tmp_path / "src")
    assert data.provenance("mnist", tmp_path / "tfds") is None  # not prepared
    data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    record = data.provenance("mnist", tmp_path / "tfds")
    assert record["dataset"] == "mnist" and record["source"] == str((tmp_path / "src").resolve())
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "src").iterdir()}
    assert record["files"] == files


def test_other_source_dir_is_refused_not_silently_ignored(tmp_path):
    arrays = make_idx_folder(tmp_path / "src")
    make_idx_folder(tmp_path / "other", seed=1)
    data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    with pytest.raises(ValueError, match=r"source_dir='.*other'.*prepared from other files.*rm -r") as error:
        data.load("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "other", **OFFLINE)
    one_line(error)
    shutil.copytree(tmp_path / "src", tmp_path / "copy")  # the same files elsewhere are the same source
    _, labels = data.load("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "copy", **OFFLINE)
    np.testing.assert_array_equal(labels, arrays["train_labels"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-50])


def _overwrite_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 - 8 : len(raw) // 2 + 8] = bytes(16)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _overwrite_middle])
def test_damaged_prepared_shard_is_named_with_the_rebuild_command(tmp_path, damage):
    arrays = make_idx_folder(tmp_path / "src")
    data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    (shard,) = mnist_path(tmp_path / "tfds").glob("*-train.array_record-*")
    damage(shard)
    with pytest.raises(ValueError, match=rf"{shard.name}.*rebuild it with `rm -r ") as error:
        data.load("mnist", "train", data_dir=tmp_path / "tfds", **OFFLINE)
    command = one_line(error).split("`")[1]
    subprocess.run(command, shell=True, check=True)  # the command the message gives rebuilds it
    _, labels = data.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    np.testing.assert_array_equal(labels, arrays["train_labels"])


def test_interrupted_preparation_is_removed_by_the_next(tmp_path):
    make_idx_folder(tmp_path / "src")
    leftover = mnist_path(tmp_path / "tfds").parent / f"incomplete.ABC123_{data.IdxImages.VERSION}"
    leftover.mkdir(parents=True)
    (leftover / "convlib_idx-train.array_record-00000-of-00001").write_bytes(b"partial")  # as SIGKILL leaves it
    data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    assert not leftover.exists() and mnist_path(tmp_path / "tfds").is_dir()


def test_ctrl_c_while_preparing_stops_in_one_line(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "src")
    original = data.IdxImages._generate_examples

    def interrupted(self, images, labels):
        yield from list(original(self, images, labels))[:3]
        raise KeyboardInterrupt

    monkeypatch.setattr(data.IdxImages, "_generate_examples", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"preparing fashion_mnist .* interrupted") as error:
        data.prepare("fashion_mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src", **OFFLINE)
    assert isinstance(error.value, data.PreparationInterrupted) and error.value.__suppress_context__
    one_line(error)
    assert_nothing_prepared(tmp_path / "tfds")


@pytest.mark.parametrize("inside", [False, True])
def test_data_dir_that_is_a_file_is_one_line(tmp_path, inside):
    (tmp_path / "file").write_text("not a folder")
    data_dir = tmp_path / "file" / "tfds" if inside else tmp_path / "file"
    make_idx_folder(tmp_path / "src")
    with pytest.raises(ValueError, match=r"data_dir='.*' \(--data-dir\): .*file is a file, not a folder") as error:
        data.load("mnist", data_dir=data_dir, source_dir=tmp_path / "src", **OFFLINE)
    one_line(error)


def test_unwritable_data_dir_is_one_line(tmp_path):
    make_idx_folder(tmp_path / "src")
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses even root
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root without /sys: no folder root cannot write")
        data_dir = Path("/sys/kernel/convlib_tfds")
    else:
        data_dir = tmp_path / "read_only"
        data_dir.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"data_dir='.*convlib_tfds|read_only' \(--data-dir\) cannot be written"):
        data.load("mnist", data_dir=data_dir, source_dir=tmp_path / "src", **OFFLINE)


DISK_FULL = """
import resource, signal, sys
from convlib import data
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
    data.prepare("mnist", data_dir=sys.argv[1], source_dir=sys.argv[2], apt_install=None, download=False)
except data.DatasetError as error:
    print(error)
"""


def test_disk_full_while_preparing_is_one_line(tmp_path):
    make_idx_folder(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", DISK_FULL, str(tmp_path / "tfds"), str(tmp_path / "src")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = run.stdout.strip().splitlines()[-1:]
    assert re.search(r"no space to prepare mnist in .*tfds \(.*\): the file system at /.* has \d+ bytes free", line)
    assert f"about {17 * (28 * 28 + 1)} bytes are needed" in line  # 17 images of 28 x 28 and their labels
    assert not mnist_path(tmp_path / "tfds").exists()
    assert list((tmp_path / "tfds").rglob("incomplete.*")) == []


CONCURRENT = """
import sys, time
from convlib import data
original = data.IdxImages._generate_examples
def slow(self, images, labels):  # long enough for the two preparations to overlap
    for example in original(self, images, labels):
        time.sleep(0.1)
        yield example
data.IdxImages._generate_examples = slow
_, labels = data.load("mnist", data_dir=sys.argv[1], source_dir=sys.argv[2], apt_install=None, download=False)
print(labels.tolist())
"""


def test_two_processes_preparing_at_once_both_read_one_dataset(tmp_path):
    arrays = make_idx_folder(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", CONCURRENT, str(tmp_path / "tfds"), str(tmp_path / "src")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == str(arrays["train_labels"].tolist())
    assert [p.name for p in mnist_path(tmp_path / "tfds").parent.iterdir() if p.name.startswith("incomplete")] == []


# --- finding the files ------------------------------------------------------------------------


@pytest.fixture
def debian_dir(tmp_path, monkeypatch) -> Path:
    """Fashion-MNIST's Debian folder, empty, under tmp_path (and no network)."""
    folder = tmp_path / "usr-share"
    source = data.IdxSource(url="http://127.0.0.1:9/", debian_package="dataset-fashion-mnist", debian_dir=folder)
    monkeypatch.setitem(data.IDX_SOURCES, "fashion_mnist", source)
    return folder


def test_ensure_idx_files_installs_the_debian_package_when_missing(debian_dir):
    installed = []

    def fake_apt(package):
        installed.append(package)
        make_idx_folder(debian_dir)
        return True

    assert data.ensure_idx_files("fashion_mnist", apt_install=fake_apt) == debian_dir
    assert installed == ["dataset-fashion-mnist"]
    assert data.ensure_idx_files("fashion_mnist", apt_install=fake_apt) == debian_dir
    assert installed == ["dataset-fashion-mnist"]  # present now: apt not run again


def test_load_installs_nothing_unless_asked(tmp_path, monkeypatch, debian_dir):
    commands = []

    def fake_run(command, **kwargs):  # apt-get as root would run here
        commands.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(FileNotFoundError) as error:
        data.load("fashion_mnist", data_dir=tmp_path / "tfds", download=False)
    assert commands == []
    assert "install them with `apt-get install dataset-fashion-mnist`" in one_line(error)
    with pytest.raises(FileNotFoundError):  # opted in: apt-get runs (and fails here)
        data.load("fashion_mnist", data_dir=tmp_path / "tfds", download=False, apt_install=data.apt_get_install)
    assert commands[0][:2] == ["apt-get", "install"] and "dataset-fashion-mnist" in commands[0]


def test_ensure_idx_files_downloads_through_tfds(tmp_path):
    arrays = make_idx_folder(tmp_path / "mirror")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path / "mirror")
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        folder = data.ensure_idx_files(
            "mnist",
            apt_install=None,
            download_dir=tmp_path / "downloads",
            url=f"http://127.0.0.1:{server.server_address[1]}/",
        )
    finally:
        server.shutdown()
    images, labels = data.read_idx_split(folder, "test")
    np.testing.assert_array_equal(images, arrays["test_images"])
    np.testing.assert_array_equal(labels, arrays["test_labels"])
    # Found again without a server.
    assert data.ensure_idx_files("mnist", apt_install=None, download_dir=tmp_path / "downloads") == folder


def test_ensure_idx_files_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"put the four files .* source_dir=DIR"):
        data.ensure_idx_files("mnist", apt_install=None, download_dir=None)
    with pytest.raises(FileNotFoundError, match=r"lacks the IDX files .*t10k-labels-idx1-ubyte"):
        data.ensure_idx_files("mnist", tmp_path, apt_install=None)
    with pytest.raises(ValueError, match="name='emnist'"):
        data.ensure_idx_files("emnist")


# --- device-side transforms -------------------------------------------------------------------


@pytest.fixture
def images():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 8, 6, 3), dtype=np.uint8))


@pytest.mark.parametrize("augment", [data.random_crop, data.random_flip])
def test_augmentation_is_deterministic_per_key(images, augment):
    a = augment(jax.random.key(1), images)
    np.testing.assert_array_equal(a, augment(jax.random.key(1), images))
    np.testing.assert_array_equal(a, jax.jit(augment)(jax.random.key(1), images))
    assert not np.array_equal(a, augment(jax.random.key(2), images))
    assert a.shape == images.shape and a.dtype == images.dtype


def test_random_crop_takes_a_window_of_the_padded_image(images):
    p = 2
    out = np.asarray(data.random_crop(jax.random.key(0), images, padding=p))
    padded = np.pad(np.asarray(images), ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = images.shape[1:3]
    offsets = set()
    for o, pad in zip(out, padded):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(o, pad[dy : dy + h, dx : dx + w])
        ]
        assert matches, "crop is not a window of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 1  # per-image offsets
    np.testing.assert_array_equal(data.random_crop(jax.random.key(0), images, padding=0), images)
    with pytest.raises(ValueError, match="padding=-1"):
        data.random_crop(jax.random.key(0), images, padding=-1)


def test_random_flip_flips_some_images_horizontally(images):
    out = np.asarray(data.random_flip(jax.random.key(0), images))
    x = np.asarray(images)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_pad_images_centres_with_zeros():
    x = jnp.ones((2, 28, 28, 1), jnp.uint8)
    out = data.pad_images(x, to=32)
    assert out.shape == (2, 32, 32, 1) and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out[:, 2:30, 2:30], x)
    assert int(out.sum()) == x.size
    assert data.pad_images(jnp.ones((1, 5, 4, 1)), to=8)[0, :, :, 0].sum(axis=1).tolist() == [0, 4, 4, 4, 4, 4, 0, 0]
    with pytest.raises(ValueError, match="to=16"):
        data.pad_images(x, to=16)
    with pytest.raises(ValueError, match=r"images: expected shape \(N, H, W, C\)"):
        data.pad_images(x[0], to=32)


def test_normalize_and_channel_stats(images):
    mean, std = data.channel_stats(np.asarray(images))
    x = np.asarray(images, np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-12)
    out = data.normalize(images, mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-5)
    with pytest.raises(TypeError, match="float32"):
        data.channel_stats(np.zeros((1, 2, 2, 1), np.float32))


# --- batching ---------------------------------------------------------------------------------


def _dataset(n=23):
    labels = np.arange(n, dtype=np.int32)
    images = np.broadcast_to(labels[:, None, None, None], (n, 4, 4, 1)).astype(np.uint8)
    return images, labels


def test_batches_cover_a_permutation_exactly_once():
    images, labels = _dataset()
    out = list(data.batches(jax.random.key(0), images, labels, 5, drop_remainder=False))
    assert [b["image"].shape for b in out] == [(5, 4, 4, 1)] * 4 + [(3, 4, 4, 1)]
    seen = np.concatenate([b["label"] for b in out])
    np.testing.assert_array_equal(np.sort(seen), labels)
    assert not np.array_equal(seen, labels)  # shuffled
    for b in out:  # images travel with their labels
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
        assert b["image"].dtype == jnp.uint8 and b["label"].dtype == jnp.int32
        assert isinstance(b["image"], jax.Array)


def test_batches_are_deterministic_and_drop_the_remainder():
    images, labels = _dataset()
    epoch = lambda key: np.concatenate([b["label"] for b in data.batches(key, images, labels, 5)])
    np.testing.assert_array_equal(epoch(jax.random.key(3)), epoch(jax.random.key(3)))
    assert not np.array_equal(epoch(jax.random.key(3)), epoch(jax.random.key(4)))
    assert len(epoch(jax.random.key(3))) == 20
    ordered = data.batches(jax.random.key(3), images, labels, 5, shuffle=False, drop_remainder=False)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in ordered]), labels)


def test_batches_apply_the_transform_on_device():
    images, labels = _dataset(8)
    flip_all = lambda key, x: x[:, :, ::-1] + 1
    (batch,) = data.batches(jax.random.key(0), images, labels, 8, transform=flip_all)
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"] + 1)
    crop = functools.partial(data.random_crop, padding=1)
    run = lambda: [b["image"] for b in data.batches(jax.random.key(5), images, labels, 4, transform=crop)]
    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


def test_batches_reject_bad_arguments():
    images, labels = _dataset()
    with pytest.raises(ValueError, match="batch_size=0"):
        data.batches(jax.random.key(0), images, labels, 0)
    with pytest.raises(ValueError, match="labels: expected shape"):
        data.batches(jax.random.key(0), images, labels[:-1], 4)


def test_pipeline_throughput_reports_a_rate():
    images, labels = _dataset(64)
    rate = data.pipeline_throughput(
        jax.random.key(0), images, labels, 16, transform=functools.partial(data.random_crop, padding=1)
    )
    assert rate > 0
    with pytest.raises(ValueError, match="batch_size=128"):
        data.pipeline_throughput(jax.random.key(0), images, labels, 128)
