"""Shrinking and exporting compressed models gives the same outputs (real MNIST batches)."""

import json
from importlib.util import find_spec

import pytest
import torch
from torch import nn

from vbdropout import Conv2dVBD, LinearVBD, compression_report
from vbdropout.cli import main
from vbdropout.compress.export import export_compressed, load_shrunk, load_sparse
from vbdropout.compress.shrink import neurons_per_layer, shrink
from vbdropout.data import load_dataset
from vbdropout.nn.deterministic import to_deterministic
from vbdropout.nn.structured import StructuredBayesianPruning, StructuredVBD


@pytest.fixture(scope="module")
def mnist_batch(shared_data):
    data = load_dataset("mnist", shared_data)
    return data.test_x[:256], data


def structured_vbd(n, keep):
    layer = StructuredVBD(n)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.where(keep, torch.tensor(-9.0), torch.tensor(2.0)))
    return layer


def random_keep(n, p, gen):
    return torch.rand(n, generator=gen) < p


def structured_lenet500_300(gen):
    return nn.Sequential(
        nn.Flatten(),
        nn.Sequential(structured_vbd(784, random_keep(784, 0.3, gen)), nn.Linear(784, 500)),
        nn.ReLU(),
        nn.Sequential(structured_vbd(500, random_keep(500, 0.4, gen)), nn.Linear(500, 300)),
        nn.ReLU(),
        nn.Sequential(structured_vbd(300, random_keep(300, 0.5, gen)), nn.Linear(300, 10)),
    )


def structured_lenet5(gen):
    sbp = StructuredBayesianPruning(50)
    with torch.no_grad():  # large σ → low SNR → pruned
        sbp.log_sigma.copy_(
            torch.where(random_keep(50, 0.5, gen), torch.tensor(-5.0), torch.tensor(2.0))
        )
        sbp.mu.copy_(torch.where(sbp.log_sigma > 0, torch.tensor(-8.0), torch.tensor(0.0)))
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 20, 5), structured_vbd(20, random_keep(20, 0.5, gen))),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(20, 50, 5), sbp),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Sequential(structured_vbd(800, random_keep(800, 0.6, gen)), nn.Linear(800, 500)),
        nn.ReLU(),
        nn.Sequential(structured_vbd(500, random_keep(500, 0.3, gen)), nn.Linear(500, 10)),
    )


def sparse_lenet300_100(gen):
    model = nn.Sequential(
        nn.Flatten(),
        LinearVBD(784, 300),
        nn.ReLU(),
        LinearVBD(300, 100),
        nn.ReLU(),
        LinearVBD(100, 10),
    )
    with torch.no_grad():
        for layer in (model[1], model[3], model[5]):
            layer.log_sigma2.copy_(
                torch.where(torch.rand(layer.weight.shape, generator=gen) < 0.9, 10.0, -20.0)
            )
        model[1].log_sigma2[:40] = 10.0  # 40 hidden units never written: output relu(bias)
        model[1].bias[:20] = 0.5  # ... 20 of them a positive constant, folded into the next bias
        model[3].log_sigma2[:, 250:] = 10.0  # 50 hidden units never read
    return model


@pytest.mark.parametrize("build", [structured_lenet500_300, structured_lenet5, sparse_lenet300_100])
def test_shrunk_model_computes_the_masked_model(build, mnist_batch):
    x, _ = mnist_batch
    model = build(torch.Generator().manual_seed(0)).eval()
    reference = model(x)
    deterministic = to_deterministic(model)
    assert torch.equal(deterministic(x), reference)
    small = shrink(model)
    assert all(
        isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten))
        or type(m).__name__ == "InputSelect"
        for m in small
    )
    assert torch.allclose(small(x), reference, atol=1e-4)
    assert (
        sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    )


def test_units_are_removed_exactly_as_the_masks_say():
    gen = torch.Generator().manual_seed(0)
    model = structured_lenet500_300(gen)
    kept = [int(m[0].keep_mask().sum()) for m in (model[1], model[3], model[5])]
    units = neurons_per_layer(shrink(model))
    # inputs of each FC layer: a hidden unit survives when its own noise keeps it
    assert units[0] == kept[0] and units[-1] == 10
    assert units[1] <= kept[1] and units[2] <= kept[2]


def test_a_conv_net_reads_only_the_kept_positions_of_its_kept_channels(mnist_batch):
    """Table 5 counts LeNet-5's dense input as the features it reads: the positions whose
    own unit is kept, of the channels that are kept (not 16 per kept channel)."""
    x, _ = mnist_batch
    model = structured_lenet5(torch.Generator().manual_seed(0)).eval()
    channels = model[3][1].keep_mask()
    positions = model[7][0].keep_mask().view(50, 16)
    read = positions & channels.view(50, 1)
    small = shrink(model)
    assert any(type(m).__name__ == "InputSelect" for m in small[1:])
    units = neurons_per_layer(small)
    assert units[1] == int(read.any(1).sum())
    assert units[2] == int(read.sum()) < 16 * units[1]
    assert torch.allclose(small(x), model(x), atol=1e-4)


def test_weight_pruned_model_folds_constant_units_and_drops_unread_ones():
    model = sparse_lenet300_100(torch.Generator().manual_seed(1)).eval()
    small = shrink(model)
    hidden = [m.out_features for m in small if isinstance(m, nn.Linear)][:2]
    assert hidden[0] <= 300 - 40 and hidden[1] <= 100


def test_conv_with_padding_keeps_a_constant_channel():
    model = nn.Sequential(
        Conv2dVBD(1, 3, 3, padding=1),
        nn.ReLU(),
        Conv2dVBD(3, 2, 3, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 36, 4),
    )
    with torch.no_grad():
        model[0].log_sigma2[0] = 10.0  # channel 0 never written, bias 0.7 → constant 0.7
        model[0].bias[0] = 0.7
    x = torch.randn(5, 1, 6, 6)
    small = shrink(model.eval())
    assert small[0].out_channels == 3, "zero padding makes the constant channel non-constant"
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_compression_report_of_a_structured_model_counts_pruned_units():
    model = structured_lenet500_300(torch.Generator().manual_seed(0))
    report = compression_report(model)
    first_kept = int(model[1][0].keep_mask().sum())
    assert report.layers[0].nonzero == first_kept * 500


def test_export_files_give_the_same_outputs(tmp_path, mnist_batch):
    x, data = mnist_batch
    model = structured_lenet5(torch.Generator().manual_seed(2)).eval()
    reference = model(x)
    report = export_compressed(model, tmp_path, data.input_shape, data.mean, data.std)
    assert torch.allclose(load_shrunk(tmp_path / "shrunk.safetensors")(x), reference, atol=1e-4)
    assert torch.allclose(load_sparse(tmp_path / "sparse.safetensors")(x), reference, atol=1e-4)
    with open(tmp_path / "shrunk.pt", "rb") as f:
        program = torch.export.load(f).module()
    assert torch.allclose(program(x), reference, atol=1e-4)
    assert torch.allclose(program(x[:1]), reference[:1], atol=1e-4), "batch size is dynamic"
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "shrunk.onnx"))
    onnx_out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(onnx_out, reference, atol=1e-4)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["input_normalization"]["mean"] == pytest.approx([0.1307], abs=1e-4)
    assert on_disk["macs"]["shrunk"] < on_disk["macs"]["dense"]
    assert set(on_disk["files"]) == {
        "shrunk.pt",
        "shrunk.safetensors",
        "sparse.safetensors",
        "shrunk.onnx",
    }
    assert (tmp_path / "report.md").read_text().startswith("# Compression report")


@pytest.mark.parametrize(
    ("dtype", "build"),  # SBP's truncated normal has no bfloat16 kernels in torch
    [(torch.float64, structured_lenet5), (torch.bfloat16, sparse_lenet300_100)],
)
def test_export_keeps_the_models_precision(dtype, build, tmp_path, mnist_batch):
    """A model in another precision than float32 is exported and loaded in its own."""
    x, data = mnist_batch
    model = build(torch.Generator().manual_seed(4)).eval().to(dtype)
    x = x[:32].to(dtype)
    reference = model(x)
    export_compressed(model, tmp_path, data.input_shape)
    shrunk = load_shrunk(tmp_path / "shrunk.safetensors")
    assert all(p.dtype == dtype for p in shrunk.parameters())
    with open(tmp_path / "shrunk.pt", "rb") as f:
        program = torch.export.load(f).module()
    tolerance = 1e-9 if dtype == torch.float64 else 0.1  # bfloat16 keeps 8 bits
    for exported in (shrunk, program):
        out = exported(x)
        assert out.dtype == dtype
        assert torch.allclose(out.double(), reference.double(), atol=tolerance)
    sparse = load_sparse(tmp_path / "sparse.safetensors")  # bfloat16 runs in float32
    sparse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sparse_out = sparse(x.to(sparse_dtype))
    assert sparse_out.dtype == sparse_dtype
    assert torch.allclose(sparse_out.double(), reference.double(), atol=tolerance)


def test_reported_nonzero_counts_equal_the_exported_sparse_tensors(tmp_path, mnist_batch):
    from safetensors.torch import load_file

    _, data = mnist_batch
    model = sparse_lenet300_100(torch.Generator().manual_seed(3))
    report = export_compressed(model, tmp_path, data.input_shape, data.mean, data.std)
    tensors = load_file(tmp_path / "sparse.safetensors")
    values = [t for k, t in sorted(tensors.items()) if k.endswith(".values")]
    assert [int(torch.count_nonzero(v)) for v in values] == [
        layer["nonzero"] for layer in report["weights"]["layers"]
    ]
    assert sum(v.numel() for v in values) == report["weights"]["nonzero"]
    shrunk = load_file(tmp_path / "shrunk.safetensors")
    assert (
        sum(t.numel() for t in shrunk.values() if t.is_floating_point())
        == report["parameters"]["shrunk"]
    )


def test_compress_command_on_a_trained_run(tmp_path, shared_data, capsys):
    from vbdropout.train import TrainConfig, train

    config = TrainConfig(
        out=str(tmp_path / "run"), epochs=1, train_subset=500, data_dir=str(shared_data)
    )
    train(config, progress=False)
    assert (
        main(["compress", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["source"]["method"] == "vbd"
    assert (tmp_path / "export" / "shrunk.pt").is_file()


def test_shrink_terminates_when_a_layer_has_no_weight_left():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)
    )
    with torch.no_grad():
        model[3].weight.zero_()
    small = shrink(model)
    x = torch.randn(5, 1, 6)
    assert torch.allclose(small(x), model(x), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_shrink_of_a_gpu_model_with_a_bias_free_layer():
    """A bias-free layer's units are the constant 0 on the model's device."""
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)).cuda()
    with torch.no_grad():
        model[0].weight[1].zero_()
    small = shrink(model)
    x = torch.randn(5, 6, device="cuda")
    assert neurons_per_layer(small)[1] == 3 and torch.allclose(small(x), model(x), atol=1e-6)


def test_a_registered_exporter_writes_its_file_and_is_reported(tmp_path, monkeypatch):
    """A new export format is one function plus its registration: it gets the shrunk model,
    its file is listed in the report with its size, and a skipped one says why."""
    from vbdropout.compress import export

    monkeypatch.setattr(export, "EXPORTERS", dict(export.EXPORTERS))  # undone after the test
    seen = []

    @export.exporter("shrunk.txt")
    def write_text(compressed: export.Compressed, path):
        seen.append(compressed.small(compressed.example).shape)
        path.write_text(repr(compressed.small))

    @export.exporter("never.bin", skippable="never")
    def skip(compressed: export.Compressed, path):
        return "not written: this format is never written"

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    report = export_compressed(net, tmp_path, (1, 4, 4))
    assert seen == [(2, 3)]
    assert report["files"]["shrunk.txt"] == (tmp_path / "shrunk.txt").stat().st_size > 0
    assert "never.bin" not in report["files"] and not (tmp_path / "never.bin").exists()
    assert report["never"] == "not written: this format is never written"
    markdown = (tmp_path / "report.md").read_text()
    assert "| shrunk.txt |" in markdown and "- never.bin: not written" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["files"] == report["files"]

    @export.exporter("bad.bin")  # not skippable: a reason is an error, not a silent gap
    def bad(compressed: export.Compressed, path):
        return "not written"

    with pytest.raises(RuntimeError, match="bad.bin skipped it"):
        export_compressed(net, tmp_path / "again", (1, 4, 4))


def test_a_failed_export_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    """Files are renamed into place only when all are written: an exporter failing after
    others wrote theirs changes nothing in an earlier export and creates no directory;
    a format skipped this time loses its stale file from before."""
    from vbdropout.compress import export

    monkeypatch.setattr(export, "EXPORTERS", dict(export.EXPORTERS))  # undone after the test
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    export_compressed(net, tmp_path / "out", (1, 4, 4))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert "shrunk.pt" in before and "report.json" in before

    @export.exporter("broken.bin")
    def broken(compressed: export.Compressed, path):
        raise OSError("disk full")

    with torch.no_grad():
        net[1].weight.mul_(2)  # a different model: every file would change
    for folder in (tmp_path / "out", tmp_path / "new" / "out"):
        with pytest.raises(OSError, match="disk full"):
            export_compressed(net, folder, (1, 4, 4))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not (tmp_path / "new").exists()

    del export.EXPORTERS["broken.bin"]

    @export.exporter("shrunk.onnx", skippable="onnx")  # replaces the ONNX writer
    def no_onnx(compressed: export.Compressed, path):
        return "not written: no onnx this time"

    assert "shrunk.onnx" in before or find_spec("onnx") is None
    export_compressed(net, tmp_path / "out", (1, 4, 4))
    after = {p.name for p in (tmp_path / "out").iterdir()}
    assert after == {
        "shrunk.pt",
        "shrunk.safetensors",
        "sparse.safetensors",
        "report.json",
        "report.md",
    }
