"""convlib.data's CIFAR-10: the official python archive (or its folder) through the offline TFDS builder."""

import hashlib
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from convlib import data
from convlib.data import cifar

TRAIN_ROWS, TEST_ROWS = 4, 3  # per batch: 5 training batches of 4 rows, a test batch of 3


_RECONSTRUCT = np.zeros(1).__reduce__()[0]


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle with NumPy 1 did the official files: bytes as BINSTRING (Python 3's protocol 2
    writes a call of _codecs.encode instead), arrays rebuilt by numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        short = n < 256
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if short else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if obj is not _RECONSTRUCT:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    _Python2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def official_batches(seed: int = 0) -> dict[str, dict]:
    """The dicts of cifar-10-batches-py/, with the official keys, dtypes and row layout, but few rows."""
    rng = np.random.default_rng(seed)

    def batch(label: bytes, rows: int) -> dict:
        return {
            b"batch_label": label,
            b"labels": [int(v) for v in rng.integers(0, 10, rows)],
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"filenames": [f"image_{i}.png".encode() for i in range(rows)],
        }

    batches = {f"data_batch_{i}": batch(f"training batch {i} of 5".encode(), TRAIN_ROWS) for i in range(1, 6)}
    batches["test_batch"] = batch(b"testing batch 1 of 1", TEST_ROWS)
    batches["batches.meta"] = {
        b"label_names": [c.encode() for c in cifar.CLASSES],
        b"num_cases_per_batch": TRAIN_ROWS,
        b"num_vis": 3072,
    }
    return batches


def write_folder(folder: Path, batches: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in batches.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else py2_pickle(content))
    return folder


def write_archive(path: Path, batches: dict[str, dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in batches.items():
            raw = content if isinstance(content, bytes) else py2_pickle(content)
            info = tarfile.TarInfo(f"{cifar.FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def expected(batches: dict[str, dict], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded the slow, obvious way: pixel (y, x) of channel c is data[row, c * 1024 + y * 32 + x]."""
    parts = [batches[name] for name in cifar.SPLIT_FILES[split]]
    rows = np.concatenate([p[b"data"] for p in parts])
    images = np.empty((len(rows), 32, 32, 3), np.uint8)
    for c in range(3):
        for y in range(32):
            images[:, y, :, c] = rows[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return images, np.array([v for p in parts for v in p[b"labels"]], np.int32)


def assert_nothing_prepared(data_dir: Path) -> None:
    builder = data.Cifar10Images(data_dir=data_dir)
    assert not builder.is_prepared() and not builder.data_path.exists()
    assert (list(data_dir.rglob("incomplete.*")) if data_dir.exists() else []) == []


@pytest.mark.parametrize("layout", ["archive", "folder", "archive_path", "batches_folder"])
def test_round_trip_is_exact(tmp_path, layout):
    batches = official_batches()
    src = tmp_path / "src"
    if layout in ("archive", "archive_path"):
        archive = write_archive(src / cifar.ARCHIVE, batches)
        source_dir = archive if layout == "archive_path" else src
    else:
        folder = write_folder(src / cifar.FOLDER, batches)
        source_dir = folder if layout == "batches_folder" else src
    data_dir = tmp_path / "tfds"
    for split, n in (("train", 5 * TRAIN_ROWS), ("test", TEST_ROWS)):
        images, labels = data.load("cifar10", split, data_dir=data_dir, source_dir=source_dir)
        want_images, want_labels = expected(batches, split)
        assert images.dtype == np.uint8 and images.shape == (n, 32, 32, 3)
        assert labels.dtype == np.int32 and labels.shape == (n,)
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
    # Prepared once: read back without the sources, and by TFDS alone.
    for f in sorted(src.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    _, labels = data.load("cifar10", "test", data_dir=data_dir)
    np.testing.assert_array_equal(labels, expected(batches, "test")[1])
    builder = tfds.builder_from_directory(data_dir / "convlib_cifar10" / str(data.Cifar10Images.VERSION))
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 20, "test": 3}
    assert builder.info.features["label"].names == list(cifar.CLASSES)
    assert "tensorflow" not in sys.modules


def test_mean_std_has_one_entry_per_channel():
    mean, std = data.MEAN_STD["cifar10"]
    assert len(mean) == len(std) == 3


def test_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{cifar.ARCHIVE}.*{cifar.URL}.*put it in .*downloads/manual"):
        data.load("cifar10", data_dir=tmp_path / "tfds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"empty/{cifar.ARCHIVE}"):
        data.load("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path / "empty")
    assert_nothing_prepared(tmp_path / "tfds")


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"name='cifar100'.*'cifar10', 'fashion_mnist', 'mnist'"):
        data.load("cifar100", data_dir=tmp_path)


def test_prepared_from_the_archive_records_it_and_refuses_another(tmp_path):
    archive = write_archive(tmp_path / "src" / cifar.ARCHIVE, official_batches())
    other = write_archive(tmp_path / "other" / cifar.ARCHIVE, official_batches(seed=1))
    data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=archive)
    record = data.provenance("cifar10", tmp_path / "tfds")
    assert record["source"] == str(archive.resolve())
    assert record["files"] == {cifar.ARCHIVE: hashlib.sha256(archive.read_bytes()).hexdigest()}
    with pytest.raises(ValueError, match=r"source_dir='.*other'.*was prepared from other files"):
        data.load("cifar10", data_dir=tmp_path / "tfds", source_dir=other.parent)


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


def _truncated_archive(src):
    path = write_archive(src / cifar.ARCHIVE, official_batches())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cifar.ARCHIVE


def _not_gzip(src):
    (src / cifar.ARCHIVE).write_bytes(b"<html>404 Not Found</html>")
    return cifar.ARCHIVE


def _missing_batch(src):
    batches = official_batches()
    del batches["data_batch_3"]
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_3"


def _wrong_row_length(src):
    batches = official_batches()
    batches["data_batch_2"][b"data"] = batches["data_batch_2"][b"data"][:, :3071]
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_2"


def _wrong_dtype(src):
    batches = official_batches()
    batches["test_batch"][b"data"] = batches["test_batch"][b"data"].astype(np.float32)
    write_archive(src / cifar.ARCHIVE, batches)
    return "test_batch"


def _wrong_keys(src):
    batches = official_batches()
    batches["data_batch_1"]["data"] = batches["data_batch_1"].pop(b"data")  # str key: a Python 3 re-pickle
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_1"


def _label_count(src):
    batches = official_batches()
    batches["data_batch_4"][b"labels"].pop()
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_4"


def _label_out_of_range(src):
    batches = official_batches()
    batches["data_batch_5"][b"labels"][0] = 10
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_5"


def _not_a_pickle(src):
    batches = official_batches()
    batches["test_batch"] = b"\x89PNG not a pickle"
    write_archive(src / cifar.ARCHIVE, batches)
    return "test_batch"


def _code_in_pickle(src):
    batches = official_batches()
    batches["data_batch_1"] = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    write_archive(src / cifar.ARCHIVE, batches)
    return "data_batch_1"


def _wrong_meta(src):
    batches = official_batches()
    batches["batches.meta"][b"label_names"] = [b"apple"] * 10  # CIFAR-100's file, say
    write_archive(src / cifar.ARCHIVE, batches)
    return "batches.meta"


def _folder_missing_batch(src):
    batches = official_batches()
    del batches["test_batch"]
    write_folder(src / cifar.FOLDER, batches)
    return "test_batch"


def _folder_wrong_shape(src):
    batches = official_batches()
    batches["data_batch_1"][b"data"] = batches["data_batch_1"][b"data"].reshape(-1, 3, 32, 32)
    write_folder(src / cifar.FOLDER, batches)
    return "data_batch_1"


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncated_archive,
        _not_gzip,
        _missing_batch,
        _wrong_row_length,
        _wrong_dtype,
        _wrong_keys,
        _label_count,
        _label_out_of_range,
        _not_a_pickle,
        _code_in_pickle,
        _wrong_meta,
        _folder_missing_batch,
        _folder_wrong_shape,
    ],
)
def test_bad_source_names_the_file_and_leaves_nothing(tmp_path, corrupt, capsys):
    src, data_dir = tmp_path / "src", tmp_path / "tfds"
    src.mkdir()
    name = corrupt(src)
    with pytest.raises((ValueError, FileNotFoundError), match=name.replace(".", r"\.")):
        data.load("cifar10", data_dir=data_dir, source_dir=src)
    assert "ran code" not in capsys.readouterr().out
    assert_nothing_prepared(data_dir)

    # A later run with good files prepares afresh and returns the good data.
    for f in sorted(src.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    batches = official_batches(seed=1)
    write_archive(src / cifar.ARCHIVE, batches)
    images, _ = data.load("cifar10", data_dir=data_dir, source_dir=src)
    np.testing.assert_array_equal(images, expected(batches, "train")[0])


def test_failure_mid_generation_leaves_nothing(tmp_path, monkeypatch):
    src, data_dir = tmp_path / "src", tmp_path / "tfds"
    write_archive(src / cifar.ARCHIVE, official_batches())
    original = data.Cifar10Images._generate_examples

    def failing(self, images, labels):
        yield from list(original(self, images, labels))[:3]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(data.Cifar10Images, "_generate_examples", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        data.prepare("cifar10", data_dir=data_dir, source_dir=src)
    assert_nothing_prepared(data_dir)
    with pytest.raises(FileNotFoundError, match=cifar.ARCHIVE):
        data.load("cifar10", data_dir=data_dir)  # no sources, nothing prepared: no dataset found


# --- the scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train", "degradation"])
def test_scripts_say_where_to_put_a_missing_archive(tmp_path, script, capsys):
    import importlib

    out = tmp_path / "out"
    flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds"), "--out", str(out)]
    with pytest.raises(SystemExit) as raised:
        importlib.import_module(f"experiments.{script}").main(flags)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{script}.py: error: CIFAR-10 not found")
    assert cifar.ARCHIVE in err[0] and "downloads/manual" in err[0]
    assert not out.exists()


def test_train_script_trains_on_cifar10(tmp_path):
    from experiments import train as train_script

    write_archive(tmp_path / "src" / cifar.ARCHIVE, official_batches())
    flags = ["--dataset", "cifar10", "--source-dir", str(tmp_path / "src"), "--data-dir", str(tmp_path / "tfds")]
    results = train_script.main(
        [
            *flags,
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--warmup-epochs",
            "0",
            "--flip",
            "--no-progress",
        ]
    )
    assert 0 <= results["test_accuracy"] <= 1 and results["steps"] == 2


def test_experiments_load_cifar10_in_colour(tmp_path):
    import argparse

    from experiments import fashion_training

    batches = official_batches()
    write_archive(tmp_path / "src" / cifar.ARCHIVE, batches)
    args = argparse.Namespace(synthetic=False, size="default", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src")
    dataset = fashion_training.load(args, train_size=6, test_size=None, pad_to=32, name="cifar10")
    assert dataset.name == "cifar10" and dataset.train.images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(dataset.test.images, expected(batches, "test")[0])
    x = np.asarray(fashion_training.preprocess(dataset.test.images, "cifar10"))
    mean, std = data.MEAN_STD["cifar10"]
    np.testing.assert_allclose(x[..., 2], (expected(batches, "test")[0][..., 2] / 255 - mean[2]) / std[2], atol=1e-5)
