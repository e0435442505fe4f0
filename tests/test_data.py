"""Tests of vbdropout.data: real MNIST/CIFAR-10, generated files, corrupt inputs, downloads."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import socket
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fakes import (
    CIFAR_BATCHES,
    MNIST_FILES,
    cifar_batch,
    flip_byte,
    idx_bytes,
    md5,
    snapshot,
    write_cifar,
    write_gz,
    write_mnist,
    write_pickle,
    write_sums,
    write_svhn,
    write_tar,
)

from vbdropout.data import (
    DATASETS,
    DataError,
    Dataset,
    iterate_batches,
    load_dataset,
    resolve_data_dir,
)
from vbdropout.data import cifar10 as cifar_module
from vbdropout.data import mnist as mnist_module
from vbdropout.data import svhn as svhn_module

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
needs_real = pytest.mark.skipif(
    not (REAL_DATA / "mnist").is_dir() or not (REAL_DATA / "cifar10").is_dir(),
    reason=f"real datasets not found at {REAL_DATA}",
)


def raises_data_error(root: Path, load: Callable[[], object], *fragments: str) -> str:
    """Run ``load``, expect a DataError containing ``fragments``, and no change under root."""
    before = snapshot(root)
    with pytest.raises(DataError) as info:
        load()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(root) == before
    return message


def denormalize(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return x * std + mean


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_mnist() -> Dataset:
    return load_dataset("mnist", REAL_DATA)


@pytest.fixture(scope="module")
def real_cifar() -> Dataset:
    return load_dataset("cifar10", REAL_DATA)


@needs_real
def test_real_mnist(real_mnist: Dataset) -> None:
    ds = real_mnist
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    for y in (ds.train_y, ds.test_y):
        assert torch.equal(torch.unique(y), torch.arange(10))
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert ds.train_x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert ds.train_x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert denormalize(ds, ds.train_x[:100]).min().item() == pytest.approx(0.0, abs=1e-5)


@needs_real
def test_real_cifar10(real_cifar: Dataset) -> None:
    ds = real_cifar
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=1e-3)
    assert np.allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=1e-3)
    assert torch.equal(torch.unique(ds.train_y), torch.arange(10))
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    test_means = denormalize(ds, ds.test_x).mean(dim=(0, 2, 3))
    assert np.allclose(test_means.numpy(), (0.4942, 0.4851, 0.4504), atol=1e-3)


@needs_real
def test_real_data_dir_is_not_written(real_mnist: Dataset, real_cifar: Dataset) -> None:
    listing = sorted(p.relative_to(REAL_DATA) for p in REAL_DATA.rglob("*"))
    load_dataset("mnist", REAL_DATA, train_subset=10)
    assert sorted(p.relative_to(REAL_DATA) for p in REAL_DATA.rglob("*")) == listing


# ---------------------------------------------------------------- MNIST fakes


def test_fake_mnist_roundtrip(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path, strict=False)
    images, labels = arrays["train"]
    assert ds.train_x.shape == (24, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.mean[0] == pytest.approx(images.mean() / 255)
    assert ds.std[0] == pytest.approx(images.std() / 255)
    torch.testing.assert_close(
        denormalize(ds, ds.train_x)[:, 0] * 255, torch.tensor(images).float()
    )
    assert ds.train_y.tolist() == labels.tolist()
    assert ds.test_y.tolist() == arrays["test"][1].tolist()


def test_fake_mnist_strict_checks_canonical_md5(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raises_data_error(
        tmp_path,
        lambda: load_dataset("mnist", tmp_path),
        "train-images-idx3-ubyte.gz",
        "checksum mismatch",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        str(tmp_path),
    )


def test_train_subset(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    full = load_dataset("mnist", tmp_path, strict=False)
    sub = load_dataset("mnist", tmp_path, strict=False, train_subset=5)
    assert sub.train_x.shape == (5, 1, 28, 28) and sub.test_x.shape == full.test_x.shape
    assert torch.equal(sub.train_x, full.train_x[:5]) and torch.equal(sub.train_y, full.train_y[:5])
    assert sub.mean == full.mean and sub.std == full.std
    for bad in (0, -1, 25, True, 1.5):
        with pytest.raises(ValueError, match="train_subset"):
            load_dataset("mnist", tmp_path, strict=False, train_subset=bad)


def test_missing_mnist_file_message(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    raises_data_error(
        tmp_path,
        lambda: load_dataset("mnist", tmp_path, strict=False),
        str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"),
        "missing",
        f"Data dir searched: {tmp_path}",
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
        "--data-dir",
        "VBD_DATA_DIR",
    )


def test_empty_data_dir(tmp_path: Path) -> None:
    raises_data_error(tmp_path, lambda: load_dataset("mnist", tmp_path), "missing")
    assert list(tmp_path.iterdir()) == []


CORRUPTIONS = {
    "truncated gzip": (
        "train-images-idx3-ubyte.gz",
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "corrupt or truncated gzip",
    ),
    "truncated idx": (
        "train-images-idx3-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.zeros((24, 28, 28), np.uint8))[:-100]),
        "truncated",
    ),
    "bad magic": (
        "train-labels-idx1-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.zeros(24, np.uint8), magic=2050)),
        "bad magic number 2050, expected 2049",
    ),
    "wrong image shape": (
        "train-images-idx3-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.zeros((24, 27, 28), np.uint8))),
        "wrong shape",
    ),
    "count mismatch": (
        "t10k-images-idx3-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.zeros((11, 28, 28), np.uint8))),
        "holds 11 images but t10k-labels-idx1-ubyte.gz holds 12 labels",
    ),
    "label out of range": (
        "t10k-labels-idx1-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.array([0] * 7 + [10] + [1] * 4, np.uint8))),
        "label out of range: 10 at index 7",
    ),
    "trailing bytes": (
        "train-labels-idx1-ubyte.gz",
        lambda p: write_gz(p, idx_bytes(np.zeros(24, np.uint8)) + b"\0"),
        "extra bytes",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_mnist(tmp_path: Path, case: str) -> None:
    write_mnist(tmp_path)
    name, corrupt, problem = CORRUPTIONS[case]
    corrupt(tmp_path / "mnist" / name)
    raises_data_error(
        tmp_path, lambda: load_dataset("mnist", tmp_path, strict=False), name, problem
    )


@pytest.mark.parametrize("alg", ["sha256", "md5"])
def test_flipped_byte_fails_listed_checksum(tmp_path: Path, alg: str) -> None:
    write_mnist(tmp_path)
    folder = tmp_path / "mnist"
    sums = write_sums(folder, sorted(folder.glob("*.gz")), alg)
    assert load_dataset("mnist", tmp_path, strict=False).train_x.shape[0] == 24
    flip_byte(folder / "train-labels-idx1-ubyte.gz", offset=20)
    raises_data_error(
        tmp_path,
        lambda: load_dataset("mnist", tmp_path, strict=False),
        "train-labels-idx1-ubyte.gz",
        f"checksum mismatch: {alg} expected",
        f"listed in {sums}",
        f"got {md5(folder / 'train-labels-idx1-ubyte.gz')}" if alg == "md5" else "got ",
    )


def test_listed_checksum_overrides_canonical_md5(tmp_path: Path) -> None:
    pattern = np.arange(784, dtype=np.uint8).reshape(1, 28, 28)  # compresses fast
    for (images_name, labels_name), n in zip(MNIST_FILES.values(), (60000, 10000), strict=True):
        write_gz(tmp_path / "mnist" / images_name, idx_bytes(np.repeat(pattern, n, axis=0)))
        write_gz(tmp_path / "mnist" / labels_name, idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    write_sums(tmp_path, sorted((tmp_path / "mnist").glob("*.gz")))
    ds = load_dataset("mnist", tmp_path, train_subset=3)  # strict: listed sums, canonical counts
    assert ds.train_x.shape == (3, 1, 28, 28)


def test_malformed_checksum_list(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "mnist" / "SHA256SUMS").write_text("not a checksum line\n")
    raises_data_error(
        tmp_path, lambda: load_dataset("mnist", tmp_path, strict=False), "malformed line 1"
    )


# ---------------------------------------------------------------- CIFAR-10 fakes


def test_fake_cifar_roundtrip(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path, strict=False)
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    train = np.concatenate([batches[name][0] for name in CIFAR_BATCHES[:5]])
    planes = train.reshape(30, 3, 1024)  # R, G, B planes in this order
    for c in range(3):
        assert ds.mean[c] == pytest.approx(planes[:, c].mean() / 255)
    restored = (denormalize(ds, ds.train_x) * 255).round().to(torch.uint8)
    assert torch.equal(restored, torch.from_numpy(train.reshape(30, 3, 32, 32)))
    assert restored[4, 1, 0, 5].item() == train[4, 1024 + 5]  # green channel, row 0, col 5
    labels = [label for name in CIFAR_BATCHES[:5] for label in batches[name][1]]
    assert ds.train_y.tolist() == labels and ds.test_y.tolist() == batches["test_batch"][1]


def test_cifar_forbidden_global_is_not_executed(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    raises_data_error(
        tmp_path / "data",
        lambda: load_dataset("cifar10", tmp_path / "data", strict=False),
        "data_batch_3",
        "forbidden global os.system",
    )
    assert not marker.exists()


def _cifar_case(folder: Path, case: str) -> str:
    """Corrupt a fake CIFAR folder; return the expected problem text."""
    data = np.zeros((6, 3072), np.uint8)
    if case == "wrong shape":
        write_pickle(folder / "data_batch_2", cifar_batch(data[:, :3071], [0] * 6))
        return "wrong shape: b'data' is (6, 3071), expected (n, 3072)"
    if case == "label out of range":
        write_pickle(folder / "data_batch_2", cifar_batch(data, [0, 1, 2, 10, 4, 5]))
        return "label out of range: 10 at index 3"
    if case == "label count":
        write_pickle(folder / "data_batch_2", cifar_batch(data, [0] * 5))
        return "b'labels' must be a list of 6 integers"
    if case == "truncated pickle":
        path = folder / "data_batch_2"
        path.write_bytes(path.read_bytes()[:5000])
        return "not a valid CIFAR-10 pickle"
    if case == "not a dict":
        write_pickle(folder / "data_batch_2", [1, 2, 3])
        return "expected a dict"
    if case == "float data":
        write_pickle(folder / "data_batch_2", cifar_batch(data.astype(np.float32), [0] * 6))
        return "2-D uint8 array"
    (folder / "data_batch_2").unlink()
    return "missing"


@pytest.mark.parametrize(
    "case",
    [
        "wrong shape",
        "label out of range",
        "label count",
        "truncated pickle",
        "not a dict",
        "float data",
        "missing",
    ],
)
def test_corrupt_cifar(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    problem = _cifar_case(folder, case)
    raises_data_error(
        tmp_path,
        lambda: load_dataset("cifar10", tmp_path, strict=False),
        str(folder / "data_batch_2"),
        problem,
        "cifar-10-python.tar.gz",
    )


def test_cifar_strict_requires_canonical_batch_size(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    raises_data_error(
        tmp_path, lambda: load_dataset("cifar10", tmp_path), "6 images, expected 10000"
    )


def test_cifar_sums_in_parent_folder(tmp_path: Path) -> None:
    """Like ../shared/datasets: cifar10/SHA256SUMS lists cifar-10-batches-py/<file>."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    sums = write_sums(tmp_path / "cifar10", sorted(folder.iterdir()))
    assert "  cifar-10-batches-py/data_batch_1\n" in sums.read_text()
    assert load_dataset("cifar10", tmp_path, strict=False).train_x.shape[0] == 30
    flip_byte(folder / "test_batch", offset=300)
    raises_data_error(
        tmp_path,
        lambda: load_dataset("cifar10", tmp_path, strict=False),
        str(folder / "test_batch"),
        "checksum mismatch: sha256",
        f"listed in {sums}",
    )


def _cifar_archive(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "src" / "cifar-10-batches-py"
    batches = write_cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive, batches


def test_cifar_archive_is_extracted(tmp_path: Path) -> None:
    archive, batches = _cifar_archive(tmp_path)
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    (root / "cifar10" / archive.name).write_bytes(archive.read_bytes())
    ds = load_dataset("cifar10", root, strict=False)
    assert ds.test_y.tolist() == batches["test_batch"][1]
    names = sorted(p.name for p in (root / "cifar10").iterdir())
    assert names == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no temp folder left
    assert load_dataset("cifar10", root, strict=False).train_x.shape[0] == 30


def test_cifar_archive_strict_checks_canonical_md5(tmp_path: Path) -> None:
    archive, _ = _cifar_archive(tmp_path)
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    (root / "cifar10" / archive.name).write_bytes(archive.read_bytes())
    raises_data_error(
        root,
        lambda: load_dataset("cifar10", root),
        "cifar-10-python.tar.gz",
        "checksum mismatch: md5 expected c58f30108f718f92721af3b95e74349a (canonical;",
        "strict=False",
        f"got {md5(archive)}",
    )


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "no folder"])
def test_cifar_archive_unsafe_members_refused(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data"
    archive = root / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    if kind == "symlink":
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        problem = "not a file or folder"
    elif kind == "no folder":
        write_tar(archive, {"other/readme": b"hi"})
        problem = "archive has no cifar-10-batches-py/ folder"
    else:
        name = "cifar-10-batches-py/../../evil" if kind == "traversal" else f"{tmp_path}/evil"
        write_tar(archive, {"cifar-10-batches-py/readme": b"hi", name: b"evil"})
        problem = "refusing unsafe member path"
    raises_data_error(
        root, lambda: load_dataset("cifar10", root, strict=False), str(archive), problem
    )
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()


def test_cifar_missing_everything(tmp_path: Path) -> None:
    raises_data_error(
        tmp_path,
        lambda: load_dataset("cifar10", tmp_path),
        str(tmp_path / "cifar10" / "cifar-10-batches-py"),
        "missing (and no cifar-10-python.tar.gz beside it)",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )


# ---------------------------------------------------------------- SVHN fakes


def test_fake_svhn_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    x, _ = write_svhn(tmp_path / "svhn", "train_32x32.mat", n=12, seed=1)
    write_svhn(tmp_path / "svhn", "test_32x32.mat", n=5, seed=2)
    ds = load_dataset("svhn", tmp_path, strict=False)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (5, 3, 32, 32)
    assert ds.train_y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # 10 means digit 0
    restored = (denormalize(ds, ds.train_x) * 255).round().to(torch.uint8)
    assert torch.equal(restored, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert restored[7, 2, 3, 4].item() == x[3, 4, 2, 7]  # X[h, w, c, n] -> x[n, c, h, w]


@pytest.mark.parametrize("case", ["label 0", "wrong shape", "no y", "garbage", "missing"])
def test_corrupt_svhn(tmp_path: Path, case: str) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    folder = tmp_path / "svhn"
    write_svhn(folder, "train_32x32.mat")
    write_svhn(folder, "test_32x32.mat")
    path = folder / "test_32x32.mat"
    x = np.zeros((32, 32, 3, 4), np.uint8)
    if case == "label 0":
        scipy_io.savemat(path, {"X": x, "y": np.array([[1], [0], [2], [3]], np.uint8)})
        problem = "label out of range: 0 at index 1, expected 1..10"
    elif case == "wrong shape":
        scipy_io.savemat(path, {"X": x[:, :, :1], "y": np.ones((4, 1), np.uint8)})
        problem = "wrong shape: X is uint8 (32, 32, 1, 4)"
    elif case == "no y":
        scipy_io.savemat(path, {"X": x})
        problem = "expected variables 'X' and 'y'"
    elif case == "garbage":
        path.write_bytes(b"definitely not a MATLAB file" * 10)
        problem = "not a readable MATLAB file"
    else:
        path.unlink()
        problem = "missing"
    raises_data_error(
        tmp_path,
        lambda: load_dataset("svhn", tmp_path, strict=False),
        str(path),
        problem,
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
    )


def test_svhn_strict_checks_canonical_md5(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    write_svhn(tmp_path / "svhn", "train_32x32.mat")
    write_svhn(tmp_path / "svhn", "test_32x32.mat")
    raises_data_error(
        tmp_path,
        lambda: load_dataset("svhn", tmp_path),
        "train_32x32.mat",
        "e26dedcc434d2e4c54c9b2d4a06d8373",
    )


def test_missing_optional_dependencies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("scipy", "scipy.io", "sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'pip install "vbdropout\[data\]"'):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ImportError, match=r'pip install "vbdropout\[demo\]"'):
        load_dataset("digits")


# ---------------------------------------------------------------- digits


def test_digits_split() -> None:
    pytest.importorskip("sklearn")
    a, b = load_dataset("digits"), load_dataset("digits", "/nonexistent")
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert a.input_shape == (1, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 per class
    assert a.train_x.mean().item() == pytest.approx(0, abs=1e-5)
    assert denormalize(a, a.train_x).max().item() == pytest.approx(1.0, abs=1e-5)  # 16 / 16


# ---------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served on 127.0.0.1 by a background thread; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve_mnist(served: Path, monkeypatch: pytest.MonkeyPatch, base: str, good: bool) -> None:
    write_mnist(served)
    monkeypatch.setattr(mnist_module, "MIRRORS", (base + "nowhere/", base + "mnist/"))
    for names in MNIST_FILES.values():
        for name in names:
            digest = md5(served / "mnist" / name) if good else "0" * 32
            monkeypatch.setitem(mnist_module.MD5, name, digest)


def test_download_mnist(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    served, base = http_root
    _serve_mnist(served, monkeypatch, base, good=True)
    root = tmp_path / "data"
    ds = load_dataset("mnist", root, download=True, strict=False)
    assert ds.train_x.shape == (24, 1, 28, 28)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        name for names in MNIST_FILES.values() for name in names
    )
    assert "downloading train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert torch.equal(load_dataset("mnist", root, strict=False).train_x, ds.train_x)


def test_corrupted_download_leaves_nothing(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = http_root
    _serve_mnist(served, monkeypatch, base, good=False)
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root, download=True, strict=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz: download failed" in message
    assert "404" in message and "md5 mismatch: expected 00000000" in message
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_offline_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(mnist_module, "MIRRORS", (f"http://127.0.0.1:{port}/",))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=True)
    message = str(info.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "download failed" in message and f"Data dir searched: {tmp_path}" in message
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_download_cifar_archive(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = http_root
    archive, batches = _cifar_archive(tmp_path)
    (served / archive.name).write_bytes(archive.read_bytes())
    monkeypatch.setattr(cifar_module, "ARCHIVE_URL", base + archive.name)
    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", md5(archive))
    root = tmp_path / "data"
    ds = load_dataset("cifar10", root, download=True, strict=False)
    assert ds.test_y.tolist() == batches["test_batch"][1]
    assert (root / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()


def test_download_svhn(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("scipy")
    served, base = http_root
    write_svhn(served, "train_32x32.mat")
    write_svhn(served, "test_32x32.mat", n=3)
    monkeypatch.setattr(svhn_module, "BASE_URL", base)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        monkeypatch.setitem(svhn_module.MD5, name, md5(served / name))
    ds = load_dataset("svhn", tmp_path / "data", download=True, strict=False)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)


# ---------------------------------------------------------------- API details


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="known datasets: mnist, cifar10, svhn, digits"):
        load_dataset("imagenet")
    assert set(DATASETS) == {"mnist", "cifar10", "svhn", "digits"}


def test_dataset_is_frozen(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path, strict=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    assert "mnist" in repr(ds) and "tensor" not in repr(ds)


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBD_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("VBD_DATA_DIR")
    assert resolve_data_dir(None) == tmp_path / "xdg" / "vbdropout"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "vbdropout"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "vbdropout"
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel/../x") == tmp_path / "x"
    assert resolve_data_dir("~/d") == tmp_path / "home" / "d"


def test_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path)
    monkeypatch.setenv("VBD_DATA_DIR", str(tmp_path))
    assert load_dataset("mnist", strict=False).train_x.shape[0] == 24


# ---------------------------------------------------------------- iterate_batches


def test_iterate_batches_shuffled_covers_each_index_once() -> None:
    x = torch.arange(23).float().view(23, 1)
    y = torch.arange(23)
    gen = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(iterate_batches(x, y, 5, shuffle=True, generator=gen))
        assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
        for xb, yb in batches:
            assert torch.equal(xb[:, 0].long(), yb)
        order = torch.cat([yb for _, yb in batches])
        assert sorted(order.tolist()) == list(range(23))
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation each epoch
    again = torch.cat(
        [yb for _, yb in iterate_batches(x, y, 5, True, torch.Generator().manual_seed(0))]
    )
    assert torch.equal(again, epochs[0])


def test_iterate_batches_in_order_and_drop_last() -> None:
    x, y = torch.randn(10, 2), torch.arange(10)
    batches = list(iterate_batches(x, y, 4, shuffle=False))
    assert [yb.tolist() for _, yb in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(batches[1][0], x[4:8])
    dropped = list(iterate_batches(x, y, 4, shuffle=True, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [4, 4]
    assert len(set(torch.cat([yb for _, yb in dropped]).tolist())) == 8
    assert len(list(iterate_batches(x, y, 20, shuffle=False))) == 1
    assert list(iterate_batches(x, y, 20, shuffle=False, drop_last=True)) == []
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(x, y, 0, shuffle=False))
    with pytest.raises(ValueError, match="examples"):
        next(iterate_batches(x, y[:9], 2, shuffle=False))
