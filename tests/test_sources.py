"""The data sources (`dpsgd_cli.training.sources`): each reads back exactly what a test wrote in its format,
and each kind of bad data is refused with one line naming the file and what is wrong."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources import load_source
from dpsgd_cli.training.sources.cifar import write_batches


# ------------------------------------------------------------------------------------------------
# Writers of each format (also used by the slow equality tests)
# ------------------------------------------------------------------------------------------------
def write_npz(path: Path, x_train, y_train, x_test, y_test) -> Path:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def write_png_folder(root: Path, x_train: np.ndarray, y_train, x_test, y_test,
                     names: tuple[str, ...]) -> Path:
    """uint8 images [N, H, W] (grayscale) or [N, H, W, 3] as root/<split>/<class>/<index>.png."""
    from PIL import Image

    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(x, y)):
            Image.fromarray(image).save(root / split / names[label] / f"{i:06d}.png")
    return root


def write_csv_folder(folder: Path, x_train: np.ndarray, y_train, x_test, y_test,
                     label_column: str = "label") -> Path:
    """Float32 features [N, D] written with repr (so they read back exactly), the label last."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train.csv", x_train, y_train), ("test.csv", x_test, y_test)):
        header = [f"f{j}" for j in range(x.shape[1])] + [label_column]
        lines = [",".join(header)]
        lines += [",".join([*(repr(float(v)) for v in row), str(int(label))]) for row, label in zip(x, y)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def _images(n: int, rng, shape=(8, 8)) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 3
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), labels.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Each source reads back what was written
# ------------------------------------------------------------------------------------------------
def test_npz_reads_pixels_as_the_builtin_loader_scales_them(tmp_path):
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = _images(12, rng), _images(6, rng)
    data = load_source("npz", path=write_npz(tmp_path / "d.npz", x, y, xt, yt))
    assert data.x_train.shape == (12, 8, 8, 1) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.x_train, (x.astype(np.float32) / 255.0)[..., None])
    np.testing.assert_array_equal(data.y_test, yt)
    assert data.class_names == ("0", "1", "2") and data.num_classes == 3
    assert "x_train" in data.record


def test_npz_float_features_are_used_as_they_are(tmp_path):
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(10, 5)) * 100, rng.normal(size=(4, 5))
    data = load_source("npz", path=write_npz(tmp_path / "d.npz", x, np.arange(10) % 2, xt, np.arange(4) % 2))
    np.testing.assert_array_equal(data.x_train, x.astype(np.float32))
    assert data.input_shape == (5,)


def test_image_folder_reads_pngs_in_file_name_order(tmp_path):
    rng = np.random.default_rng(2)
    (x, y), (xt, yt) = _images(9, rng), _images(3, rng)
    root = write_png_folder(tmp_path / "img", x, y, xt, yt, ("cat", "dog", "emu"))
    data = load_source("image_folder", path=root)
    np.testing.assert_array_equal(data.x_train, (x.astype(np.float32) / 255.0)[..., None])
    np.testing.assert_array_equal(data.y_train, y)
    np.testing.assert_array_equal(data.y_test, yt)
    assert data.class_names == ("cat", "dog", "emu")


def test_image_folder_reads_colour_images(tmp_path):
    rng = np.random.default_rng(3)
    (x, y), (xt, yt) = _images(6, rng, (5, 7, 3)), _images(3, rng, (5, 7, 3))
    data = load_source("image_folder", path=write_png_folder(tmp_path / "img", x, y, xt, yt, ("a", "b", "c")))
    assert data.input_shape == (5, 7, 3)
    np.testing.assert_array_equal(data.x_test, xt.astype(np.float32) / 255.0)


def test_csv_reads_float32_features_exactly(tmp_path):
    rng = np.random.default_rng(4)
    x, xt = rng.random((10, 4), dtype=np.float32), rng.random((5, 4), dtype=np.float32)
    y, yt = np.arange(10) % 2, np.arange(5) % 2
    data = load_source("csv", path=write_csv_folder(tmp_path / "tab", x, y, xt, yt))
    np.testing.assert_array_equal(data.x_train, x)
    np.testing.assert_array_equal(data.x_test, xt)
    np.testing.assert_array_equal(data.y_train, y)
    assert data.input_shape == (4,) and "train.csv" in data.record


def test_csv_label_column_is_configurable_and_test_columns_may_be_reordered(tmp_path):
    folder = tmp_path / "tab"
    folder.mkdir()
    (folder / "train.csv").write_text("target,a,b\n1,0.5,2\n0,1.5,3\n")
    (folder / "test.csv").write_text("b,target,a\n7,1,0.25\n")
    data = load_source("csv", path=folder, label_column="target")
    np.testing.assert_array_equal(data.x_test, np.array([[0.25, 7]], np.float32))
    np.testing.assert_array_equal(data.y_train, [1, 0])


def test_cifar_reads_the_canonical_pickle_files(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    y, yt = np.arange(10) % 10, np.array([0, 3, 9, 9])
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    folder = write_batches(tmp_path, "cifar10", {"train": (x, y), "test": (xt, yt)}, names)
    assert sorted(p.name for p in folder.iterdir()) == [
        "batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    # the canonical layout: a row is 1024 red, 1024 green, 1024 blue values, each plane row-major
    with open(folder / "data_batch_1", "rb") as handle:
        first = pickle.load(handle, encoding="bytes")
    assert first[b"data"][0, 1024 + 32 * 2 + 5] == x[0, 2, 5, 1]
    for data_dir in (tmp_path, folder):  # the folder holding it, or the folder itself
        data = load_source("cifar10", data_dir=data_dir)
        np.testing.assert_array_equal(data.x_train, x.astype(np.float32) / 255.0)
        np.testing.assert_array_equal(data.y_test, yt)
        assert data.class_names == names and data.input_shape == (32, 32, 3)


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    y = np.arange(100)
    names = tuple(f"class{k}" for k in range(100))
    write_batches(tmp_path, "cifar100", {"train": (x, y), "test": (x[:5], y[:5])}, names)
    data = load_source("cifar100", data_dir=tmp_path)
    assert data.num_classes == 100 and data.class_names[42] == "class42"
    np.testing.assert_array_equal(data.y_train, y)


# ------------------------------------------------------------------------------------------------
# Bad data: one line each, naming the file and what is wrong
# ------------------------------------------------------------------------------------------------
def _refused(match: str, name: str, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_source(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _arrays(rng=None):
    rng = rng or np.random.default_rng(7)
    return {"x_train": rng.random((9, 3)), "y_train": np.arange(9) % 3,
            "x_test": rng.random((3, 3)), "y_test": np.arange(3)}


def _npz(tmp_path, **changes) -> Path:
    arrays = {**_arrays(), **changes}
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_missing_arrays_and_columns(tmp_path):
    message = _refused("lacks y_test", "npz", path=_npz(tmp_path, y_test=None))
    assert "bad.npz" in message
    folder = write_csv_folder(tmp_path / "tab", np.ones((3, 2)), [0, 1, 1], np.ones((2, 2)), [0, 1])
    _refused(r"train.csv: no label column 'target'", "csv", path=folder, label_column="target")
    (folder / "test.csv").write_text("f0,label\n1,0\n")
    _refused(r"test.csv: lacks the column\(s\) 'f1'", "csv", path=folder)
    _refused("file not found", "npz", path=tmp_path / "nowhere.npz")


def test_mismatched_lengths(tmp_path):
    _refused("train split has 9 inputs but 8 labels", "npz", path=_npz(tmp_path, y_train=np.arange(8) % 3))
    folder = tmp_path / "tab"
    folder.mkdir()
    (folder / "train.csv").write_text("a,label\n1,0\n2,1,5\n")
    (folder / "test.csv").write_text("a,label\n1,0\n")
    _refused(r"train.csv: not a readable CSV table", "csv", path=folder)


def test_non_integer_and_negative_labels(tmp_path):
    _refused(r"y_train: labels must be whole numbers 0..K−1; record 1 has 2.5",
             "npz", path=_npz(tmp_path, y_train=np.array([0, 2.5, 1, 0, 1, 2, 0, 1, 2])))
    _refused(r"y_test: .*record 2 has -1", "npz", path=_npz(tmp_path, y_test=np.array([0, 1, -1])))
    folder = write_csv_folder(tmp_path / "tab", np.ones((3, 2)), [0, 1, 1], np.ones((2, 2)), [0, 1])
    (folder / "train.csv").write_text("f0,f1,label\n1,2,cat\n3,4,0\n")
    _refused(r"train.csv: column 'label' is not numeric \(row 1: 'cat'\)", "csv", path=folder)


def test_an_empty_class(tmp_path):
    _refused(r"class '1' has no training record", "npz",
             path=_npz(tmp_path, y_train=np.array([0, 2, 0, 2, 0, 2, 0, 2, 0]), y_test=np.array([0, 2, 2])))
    rng = np.random.default_rng(8)
    (x, y), (xt, yt) = _images(6, rng), _images(3, rng)
    root = write_png_folder(tmp_path / "img", x, y, xt, yt, ("a", "b", "c"))
    (root / "train" / "d").mkdir()
    _refused(r"class 'd' has no training record", "image_folder", path=root)


def test_nan_or_infinite_features(tmp_path):
    x = np.ones((9, 3))
    x[4, 1] = np.inf
    _refused(r"x_train: record 4 has a NaN or infinite feature", "npz", path=_npz(tmp_path, x_train=x))
    folder = write_csv_folder(tmp_path / "tab", np.ones((3, 2)), [0, 1, 1], np.ones((2, 2)), [0, 1])
    (folder / "test.csv").write_text("f0,f1,label\n1,,0\n2,3,1\n")
    _refused(r"test.csv: record 0 has a NaN or infinite feature", "csv", path=folder)


def test_images_of_mixed_sizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(9)
    (x, y), (xt, yt) = _images(6, rng), _images(3, rng)
    root = write_png_folder(tmp_path / "img", x, y, xt, yt, ("a", "b", "c"))
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "test" / "b" / "zz.png")
    message = _refused(r"zz.png: is 9×8×1 but .*000000.png is 8×8×1; images of mixed sizes",
                       "image_folder", path=root)
    assert str(root) in message
    (root / "test" / "b" / "zz.png").write_bytes(b"not an image")
    _refused(r"zz.png: not a readable image", "image_folder", path=root)


def test_test_labels_the_training_set_lacks(tmp_path):
    _refused(r"the test split has labels the training split lacks: 3", "npz",
             path=_npz(tmp_path, y_test=np.array([0, 3, 1])))
    rng = np.random.default_rng(10)
    (x, y), (xt, yt) = _images(6, rng), _images(3, rng)
    root = write_png_folder(tmp_path / "img", x, y, xt, yt, ("a", "b", "c"))
    (root / "test" / "zebra").mkdir()
    _refused(r"test split has classes the training split lacks: zebra", "image_folder", path=root)


def test_cifar_files_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("owned",))

    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(pickle.dumps({b"data": Boom()}, protocol=2))
    _refused(r"data_batch_1: not a CIFAR pickle file \(UnpicklingError: refused \w+\.print\)",
             "cifar10", data_dir=tmp_path)


def test_cifar_missing_folder_says_how_to_download(tmp_path):
    _refused(r"cifar-10-batches-py: folder not found .*download it with Keras", "cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Through the CLI and the runner
# ------------------------------------------------------------------------------------------------
def _cli(*args) -> tuple[int, list[str], str]:
    from typer.testing import CliRunner

    from dpsgd_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()], result.stdout


def _tiny_cifar(root: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10
    write_batches(root, "cifar10", {"train": (x, y), "test": (x[:40], y[:40])}, tuple("abcdefghij"))
    return root


@pytest.mark.parametrize("sets, expected", [
    (["model.architecture=scatter_linear"], "model.architecture: scatter_linear needs 28×28×1 grayscale "
                                            "images (its ScatterNet features are computed for that size); "
                                            "the data's inputs are 32×32×3"),
    (["model.architecture=tfp_cnn", "data.augmentation=none"], None),
])
def test_builtin_models_check_the_data_fit_them(tmp_path, sets, expected):
    if expected is None:  # the CNN adapts to 32×32×3 and 10 classes: checked without training
        from dpsgd_cli.training.model import model_from_config

        cfg = load_config(None, ["privacy.noise_multiplier=1", *sets])
        assert model_from_config(cfg.model, 0, (32, 32, 3), 10).output_shape == (None, 10)
        return
    code, lines, _ = _cli("train", "--sigma", 1, "--set", "data.dataset=cifar10",
                          "--set", f"data.data_dir={_tiny_cifar(tmp_path / 'c')}",
                          "--set", f"output_dir={tmp_path / 'out'}", *(a for s in sets for a in ("--set", s)))
    assert code == 2 and lines == [f"error: {expected}; use tfp_cnn, tanh_cnn, mlp or a model.builder"]
    assert not (tmp_path / "out").exists()


def test_a_cnn_refuses_tabular_features_and_mirror_needs_images(tmp_path):
    folder = write_csv_folder(tmp_path / "tab", np.ones((8, 3)), np.arange(8) % 2, np.ones((2, 3)), [0, 1])
    code, lines, _ = _cli("train", "--sigma", 1, "--set", "data.dataset=csv", "--set", f"data.path={folder}",
                          "--set", "data.batch_size=4", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: model.architecture: tfp_cnn is a CNN for images H×W×C; the data's "
                               "inputs are of shape 3 (e.g. a CSV's features); use mlp")
    code, lines, _ = _cli("train", "--sigma", 1, "--set", "data.dataset=csv", "--set", f"data.path={folder}",
                          "--set", "data.batch_size=4", "--set", "model.architecture=mlp",
                          "--set", "data.augmentation=mirror", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and lines[0].startswith("error: data.augmentation: mirror mirrors images")
    assert not (tmp_path / "out").exists()


def test_bad_data_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    x = np.ones((9, 3))
    x[4, 1] = np.nan
    path = _npz(tmp_path, x_train=x)
    code, lines, _ = _cli("train", "--sigma", 1, "--set", "data.dataset=npz", "--set", f"data.path={path}",
                          "--set", "model.architecture=mlp", "--set", "data.batch_size=4",
                          "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and lines == [f"error: {path}: x_train: record 4 has a NaN or infinite feature (1 such "
                                   "values in all); remove or impute them before training"]
    assert not (tmp_path / "out").exists()


def test_epsilon_of_a_config_counts_the_records_of_data_path(tmp_path):
    import json

    y = np.arange(500) % 2
    folder = write_csv_folder(tmp_path / "tab", np.ones((500, 3)), y, np.ones((2, 3)), [0, 1])
    code, _, out = _cli("epsilon", "--json", "--config", "configs/quickstart.yaml",
                        "--set", "data.dataset=csv", "--set", f"data.path={folder}",
                        "--set", "data.batch_size=50", "--set", "training.epochs=2")
    assert code == 0
    answer = json.loads(out)
    assert answer["dataset_size"] == 500 and answer["sampling_rate"] == 50 / 500 and answer["steps"] == 20


# Equal data → equal runs: the same Fashion-MNIST images from each source train, in reproducible mode with
# the same key, to exactly the metrics of the built-in loader.
BASE = ["privacy.reproducible=true", "privacy.noise_multiplier=1.1", "data.batch_size=64",
        "training.epochs=2"]


@pytest.fixture(scope="module")
def fashion(data_dir):
    from dpsgd_cli.training.data import load_dataset

    return load_dataset("fashion_mnist", data_dir, train_size=256, test_size=100)


def _train(root: Path, name: str, sets: list[str]):
    import pandas as pd
    import yaml

    from dpsgd_cli.experiment.run import run

    result = run(load_config(None, [*BASE, f"name={name}", f"output_dir={root / 'results'}", *sets]))
    doc = yaml.safe_load((result.run_dir / "run.yaml").read_text())
    return pd.read_csv(result.run_dir / "metrics.csv").drop(columns=["elapsed_s"]), doc


def _pixels(x: np.ndarray) -> np.ndarray:
    return np.rint(x[..., 0] * 255.0).astype(np.uint8)


@pytest.mark.slow
def test_npz_and_png_folder_train_exactly_like_the_builtin_loader(fashion, data_dir, tmp_path):
    import pandas as pd

    x, xt = _pixels(fashion.x_train), _pixels(fashion.x_test)
    assert np.array_equal(x.astype(np.float32) / 255.0, fashion.x_train[..., 0])  # the pixels round-trip
    npz = write_npz(tmp_path / "fashion.npz", x, fashion.y_train, xt, fashion.y_test)
    png = write_png_folder(tmp_path / "png", x, fashion.y_train, xt, fashion.y_test,
                           tuple(str(k) for k in range(10)))
    builtin, doc = _train(tmp_path, "builtin", [f"data.data_dir={data_dir}", "data.train_size=256",
                                                "data.test_size=100"])
    assert doc["resolved"]["data"]["train_records"] == doc["resolved"]["dataset_size"] == 256
    for name, sets in (("npz", ["data.dataset=npz", f"data.path={npz}"]),
                       ("png", ["data.dataset=image_folder", f"data.path={png}"])):
        metrics, doc = _train(tmp_path, name, sets)
        pd.testing.assert_frame_equal(metrics, builtin, check_exact=True)
        assert doc["resolved"]["data"]["train_records"] == 256
        assert "One example, the unit of privacy, is " + doc["resolved"]["data"]["record"] in \
            doc["privacy_statement"]


@pytest.mark.slow
def test_a_csv_of_pixels_trains_an_mlp_exactly_like_the_builtin_images(fashion, data_dir, tmp_path):
    import pandas as pd

    flat = fashion.x_train.reshape(len(fashion.x_train), -1)
    folder = write_csv_folder(tmp_path / "csv", flat, fashion.y_train,
                              fashion.x_test.reshape(len(fashion.x_test), -1), fashion.y_test)
    mlp = ["model.architecture=mlp"]
    builtin, _ = _train(tmp_path, "builtin", [*mlp, f"data.data_dir={data_dir}", "data.train_size=256",
                                              "data.test_size=100"])
    metrics, doc = _train(tmp_path, "csv", [*mlp, "data.dataset=csv", f"data.path={folder}"])
    pd.testing.assert_frame_equal(metrics, builtin, check_exact=True)
    assert doc["resolved"]["data"]["input_shape"] == [784]
    assert "is one row of train.csv (its 784 features and its label)" in doc["privacy_statement"]


@pytest.mark.slow
def test_cifar10_trains_from_canonical_files_through_the_cli(tmp_path):
    import pandas as pd
    import yaml

    data_dir = _tiny_cifar(tmp_path / "c")
    code, lines, _ = _cli("train", "--quiet", "--sigma", 1, "--epochs", 1, "--set", "data.dataset=cifar10",
                          "--set", f"data.data_dir={data_dir}", "--set", "data.batch_size=32",
                          "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 0, lines
    doc = yaml.safe_load((tmp_path / "out" / "run" / "run.yaml").read_text())
    data = doc["resolved"]["data"]
    assert data["input_shape"] == [32, 32, 3] and data["num_classes"] == 10 and data["train_records"] == 120
    assert data["class_names"] == list("abcdefghij")
    assert "one 32×32 colour image of the CIFAR-10 training set with its label" in doc["privacy_statement"]
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv")
    assert [c for c in metrics.columns if c.startswith("test_accuracy_class_")] == [
        f"test_accuracy_class_{k}" for k in range(10)]
