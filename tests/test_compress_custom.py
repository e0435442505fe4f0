"""Shrinking and exporting a user's own converted model (not one Sequential)."""

import json
import textwrap

import pytest
import torch
from torch import nn

from vbdropout import compression_report
from vbdropout.cli import main
from vbdropout.compress.export import export_compressed, load_shrunk, load_sparse
from vbdropout.compress.shrink import shrink_with_parts

USER_NET = '''
import torch
from torch import nn

import vbdropout


class UserNet(nn.Module):
    """A two-branch convnet: a conv trunk, a side branch added in forward, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU()
        )
        self.side = nn.Conv2d(3, 6, 5, stride=2)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(6 * 3 * 3, 40), nn.ReLU(), nn.Linear(40, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.trunk(x) + self.side(x)[..., :3, :3]))


def build() -> nn.Module:
    return vbdropout.convert(UserNet(), "vbd")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user's model file, importable as ``user_net`` from the working directory."""
    (tmp_path / "user_net.py").write_text(textwrap.dedent(USER_NET))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_net

    yield importlib.reload(user_net)


def trained(user_module, seed=0):
    """The converted model with pruned weights, units never read and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = user_module.build()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "log_sigma2"):
                m.log_sigma2.copy_(torch.where(torch.rand_like(m.weight) < 0.6, 10.0, -20.0))
        model.trunk[0].log_sigma2[:3] = 10.0  # 3 trunk channels never written → constants
        model.head[3].log_sigma2[:, 25:] = 10.0  # 15 hidden units never read
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_shrink_replaces_the_supported_parts_and_keeps_the_function(user_module):
    model = trained(user_module)
    x = torch.randn(16, 3, 12, 12)
    small, parts = shrink_with_parts(model)
    assert parts == ["trunk", "head"]
    assert type(small) is user_module.UserNet, "the user's forward still runs"
    assert small.trunk[0].out_channels == 5 and small.head[-1].in_features <= 25
    assert isinstance(small.norm, nn.BatchNorm2d) and small.side.weight.shape == (6, 3, 5, 5)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    count = sum(p.numel() for p in small.parameters())
    assert count < sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if hasattr(m, "log_sigma2")
    )
    assert compression_report(model).layers[0].name == "trunk.0"


def test_sequential_with_an_unsupported_layer_is_shrunk_in_parts():
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), nn.Tanh())
    with torch.no_grad():
        model[0][0].weight[:3] = 0.0
        model[0][0].bias[:3] = 0.0
    small, parts = shrink_with_parts(model)
    assert parts == ["0"] and small[0][0].out_features == 5
    x = torch.randn(3, 6)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_channels_before_an_adaptive_pool_are_removed_and_export_round_trips(tmp_path):
    from vbdropout import Conv2dVBD, LinearVBD

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dVBD(3, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        LinearVBD(32, 6),
    )
    with torch.no_grad():
        model[0].log_sigma2[:2] = 10.0  # channels 0, 1 never written: constant relu(bias)
        model[5].log_sigma2[:, 8:12] = 10.0  # channel 2 never read
    model.eval()
    x = torch.randn(5, 3, 12, 12)
    small = shrink_with_parts(model)[0]
    assert small[0].out_channels == 5 and small[-1].in_features == 20
    assert torch.allclose(small(x), model(x), atol=1e-5)
    export_compressed(model, tmp_path, (3, 12, 12))
    assert torch.allclose(load_shrunk(tmp_path / "shrunk.safetensors")(x), model(x), atol=1e-5)
    assert torch.allclose(load_sparse(tmp_path / "sparse.safetensors")(x), model(x), atol=1e-5)


def test_a_model_that_onnx_cannot_express_is_exported_without_it(tmp_path, monkeypatch):
    pytest.importorskip("onnx")

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    (tmp_path / "shrunk.onnx").write_bytes(b"from an earlier export")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="frobnicate"):
        report = export_compressed(model, tmp_path, (4,))
    assert report["onnx"] == "not written: Unsupported: ONNX export of operator frobnicate"
    assert "shrunk.onnx" not in report["files"] and not (tmp_path / "shrunk.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert "shrunk.onnx: not written: Unsupported" in (tmp_path / "report.md").read_text()


def test_exported_custom_model_gives_the_same_outputs(tmp_path, user_module):
    model = trained(user_module)
    x = torch.randn(8, 3, 12, 12)
    reference = model(x)
    out = tmp_path / "export"
    report = export_compressed(model, out, (3, 12, 12))
    assert report["shrunk_parts"] == ["trunk", "head"]
    assert report["input_normalization"]["mean"] is None
    fresh = user_module.build()  # the user's code, untrained values
    assert torch.allclose(
        load_shrunk(out / "shrunk.safetensors", like=fresh)(x), reference, atol=1e-5
    )
    assert torch.allclose(
        load_sparse(out / "sparse.safetensors", like=fresh)(x), reference, atol=1e-5
    )
    with open(out / "shrunk.pt", "rb") as f:
        program = torch.export.load(f).module()
    assert torch.allclose(program(x), reference, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out / "shrunk.onnx"))
    onnx_out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(onnx_out, reference, atol=1e-4)
    with pytest.raises(ValueError, match="custom model .*UserNet.*like="):
        load_shrunk(out / "shrunk.safetensors")
    assert report["parameters"]["shrunk"] < report["parameters"]["dense"]
    assert report["macs"]["shrunk"] < report["macs"]["dense"]


def test_sparse_file_stores_every_conv_and_linear_weight_as_csr(tmp_path, user_module):
    from safetensors.torch import load_file

    model = trained(user_module)
    report = export_compressed(model, tmp_path, (3, 12, 12))
    tensors = load_file(tmp_path / "sparse.safetensors")
    values = {
        k.removesuffix(".weight.values"): v for k, v in tensors.items() if k.endswith(".values")
    }
    assert sorted(values) == ["head.1", "head.3", "side", "trunk.0", "trunk.3"]
    assert sum(int(torch.count_nonzero(v)) for v in values.values()) == report["weights"]["nonzero"]
    assert "norm.running_var" in tensors and "side.weight" not in tensors


def test_compress_command_with_a_factory(tmp_path, user_module, capsys):
    model = trained(user_module)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "model.pt")
    argv = ["compress", "model.pt", "--factory", "user_net:build", "--out", "export"]
    assert main([*argv, "--input-shape", "3,12,12", "--mean", "0.5,0.5,0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["source"] == {"checkpoint": "model.pt", "factory": "user_net:build"}
    assert report["input_normalization"]["mean"] == [0.5, 0.5, 0.5]
    x = torch.randn(4, 3, 12, 12)
    small = load_shrunk(tmp_path / "export" / "shrunk.safetensors", like=user_module.build())
    assert torch.allclose(small(x), model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--factory", "user_net:build"], "--factory needs --input-shape"),
        (["--factory", "user_net", "--input-shape", "3,12,12"], "package.module:function"),
        (["--factory", "no_such_module:build", "--input-shape", "3,12,12"], "cannot import"),
        (["--factory", "user_net:nothing", "--input-shape", "3,12,12"], "has no attribute"),
        (["--factory", "user_net:UserNet", "--input-shape", "3,12,12"], "does not fit the model"),
        (["--input-shape", "3,12,12"], "go with --factory"),
    ],
)
def test_compress_command_errors(tmp_path, user_module, capsys, extra, message):
    torch.save(trained(user_module).state_dict(), tmp_path / "model.pt")
    assert main(["compress", "model.pt", "--out", "export", *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_bad_input_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "m.pt", "--out", "o", "--factory", "a:b", "--input-shape", "3,x"])
    assert exit_info.value.code == 2
    assert "comma-separated ints" in capsys.readouterr().err


class Residual(nn.Sequential):
    """A Sequential subclass with its own forward: must not be shrunk as a chain."""

    def forward(self, x):
        return x + super().forward(x)


class Gain(nn.Linear):
    """A Linear subclass with its own forward."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


class Heads(nn.Module):
    """A Sequential used as a container of parallel heads, not as a chain."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 12), nn.ReLU())
        self.heads = nn.Sequential(nn.Linear(12, 3), nn.Linear(12, 3))
        self.memory = nn.Module()
        self.memory.register_buffer("values", torch.ones(3))  # a name the CSR layout uses

    def forward(self, x):
        h = self.trunk(x)
        return sum(head(h) for head in self.heads) + self.memory.values


class Sequence(nn.Module):
    """Linear layers applied to (batch, time, features) inputs."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(10, 8)
        self.decode = nn.Sequential(nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.decode(self.encode(x)).mean(1)


def _zero_rows(linear, rows):
    with torch.no_grad():
        linear.weight[rows] = 0.0
        if linear.bias is not None:
            linear.bias[rows] = 0.0


def _cases():
    torch.manual_seed(5)
    residual = nn.Sequential(
        Residual(nn.Linear(10, 10), nn.ReLU()), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3)
    )
    _zero_rows(residual[0][0], [0, 1])
    _zero_rows(residual[1], [2])
    gain = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), Gain(6, 3))
    _zero_rows(gain[0], [0])
    heads = Heads()
    _zero_rows(heads.trunk[0], [0, 1])
    convs = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 3, 3, padding_mode="reflect",
                                                                  padding=1),
        nn.Flatten(start_dim=2), nn.Linear(16, 5),
    )  # fmt: skip
    _zero_rows(convs[0], [0])
    sequence = Sequence()
    _zero_rows(sequence.decode[1], [0])
    return [
        ("residual", residual, (10,)),
        ("gain", gain, (10,)),
        ("heads", heads, (10,)),
        ("convs", convs, (2, 4, 4)),
        ("sequence", sequence, (7, 10)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_layers_the_rules_do_not_cover_keep_their_function(tmp_path, case):
    name, model, shape = _cases()[case]
    model.train()
    x = torch.randn(3, *shape)
    reference = model.eval()(x)
    model.train()
    export_compressed(model, tmp_path, shape)
    assert model.training, "export leaves the caller's model as it was"
    like = _cases()[case][1]
    assert torch.allclose(
        load_shrunk(tmp_path / "shrunk.safetensors", like)(x), reference, atol=1e-5
    )
    assert torch.allclose(
        load_sparse(tmp_path / "sparse.safetensors", like)(x), reference, atol=1e-5
    )
    with open(tmp_path / "shrunk.pt", "rb") as f:
        assert torch.allclose(torch.export.load(f).module()(x), reference, atol=1e-5), name


def test_scale_right_after_a_linear_layer_is_folded_into_its_rows():
    from vbdropout.nn.structured import StructuredVBD

    unit = StructuredVBD(6)
    with torch.no_grad():
        unit.log_sigma2[:3] = 5.0  # three units pruned
    model = nn.Sequential(nn.Linear(4, 6), unit, nn.ReLU(), nn.Linear(6, 2)).eval()
    small, parts = shrink_with_parts(model)
    assert parts == [""] and small[0].out_features == 3
    x = torch.randn(5, 4)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_adversarial_dropout_run_exports_as_one_sequential(tmp_path):
    from vbdropout.models import build_model

    model = build_model("lenet300_100", "adversarial", method_options={"dataset_size": 100})
    model.eval()
    report = export_compressed(model, tmp_path, (1, 28, 28))
    assert report["shrunk_parts"] == "whole model"
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(load_shrunk(tmp_path / "shrunk.safetensors")(x), model(x), atol=1e-5)


def test_report_warns_about_unit_noise_it_cannot_fold():
    from vbdropout.nn.structured import StructuredVBD

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b = nn.Linear(8, 16), StructuredVBD(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.gate(self.a(x))) + 1.0)

    with pytest.warns(UserWarning, match=r"unit-noise layers \['gate'\]"):
        compression_report(Gated())


def test_report_without_normalization_says_so(tmp_path):
    export_compressed(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), tmp_path, (4,))
    assert "input normalization: not recorded" in (tmp_path / "report.md").read_text()
