"""The pruning contract: every pruning layer answers keep_mask(threshold), and whole-model
functions take thresholds as arguments without changing the model."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from vbdropout import LinearVBD, compression_report
from vbdropout.cli import main
from vbdropout.compress.shrink import neurons_per_layer, shrink
from vbdropout.data import Dataset
from vbdropout.models import build_model
from vbdropout.models.methods import METHODS
from vbdropout.nn.base import StochasticModule
from vbdropout.nn.deterministic import to_deterministic
from vbdropout.nn.prunable import Prunable, PrunableWeight, check_thresholds, threshold_for
from vbdropout.nn.structured import StructuredBayesianPruning, StructuredVBD
from vbdropout.train.config import TrainConfig, resolve_config
from vbdropout.train.loop import evaluate
from vbdropout.train.runs import build_run_model, load_run


def spread_layer(seed=0):
    """A LinearVBD whose log α spread over [−6, 6], so every cut keeps a different set."""
    gen = torch.Generator().manual_seed(seed)
    layer = LinearVBD(20, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 20, generator=gen))
        log_alpha = torch.empty(10, 20).uniform_(-6, 6, generator=gen)
        layer.log_sigma2.copy_(log_alpha + torch.log(layer.weight**2 + 1e-8))
    return layer


def spread_units(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = StructuredVBD(n)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.empty(n).uniform_(-4, 4, generator=gen))
    return layer


def test_gaussian_keep_mask_is_a_query_at_any_threshold():
    layer = spread_layer()
    for cut in (-2.0, 0.0, 2.0, 3.0):
        expected = layer.log_alpha <= cut
        assert torch.equal(layer.keep_mask(cut), expected)
        assert torch.equal(layer.masked_weight(cut), layer.weight * expected)
    assert torch.equal(layer.keep_mask(), layer.log_alpha <= 3.0)  # "own": built with 3
    assert layer.keep_mask(None).all()
    assert layer.threshold == 3.0  # asking changed nothing
    with pytest.raises(ValueError, match="log α"):
        layer.keep_mask(20.0)


def test_unit_keep_mask_and_multiplier_follow_the_threshold():
    layer = spread_units()
    for cut in (-1.0, 0.0, 1.5):
        mask = layer.keep_mask(cut)
        assert torch.equal(mask, layer.log_alpha <= cut)
        assert torch.equal(layer.multiplier(cut), layer.theta * mask)
    assert torch.equal(layer.keep_mask(), layer.log_alpha <= 0.0)
    assert layer.keep_mask(None).all()
    sbp = StructuredBayesianPruning(8)
    with torch.no_grad():
        sbp.log_sigma.copy_(torch.linspace(-5, 2, 8))
    assert torch.equal(sbp.keep_mask(), sbp.snr() > 1.0)
    assert torch.equal(sbp.keep_mask(0.5), sbp.snr() > 0.5)


def test_layers_with_a_learned_mask_refuse_a_numeric_threshold():
    model = build_model("lenet300_100", "pruning", method_options={"dataset_size": 100})
    layer = next(m for m in model.modules() if isinstance(m, PrunableWeight))
    with torch.no_grad():
        keep = torch.rand(layer.weight.shape) < 0.5
        layer.set_mask_(keep)
    assert torch.equal(layer.keep_mask(), keep)
    assert layer.keep_mask(None).all()
    with pytest.raises(ValueError, match="learns its mask"):
        layer.keep_mask(3.0)
    assert threshold_for(layer, {"log_alpha_threshold": 2.0}) == "own"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_layer_that_prunes_declares_the_contract(method):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = Dataset("fake", x, y, x[:8], y[:8], 10, (0.0,), (1.0,))
    config = resolve_config(TrainConfig(model="lenet5_caffe", method=method))
    model = build_run_model(config, data)  # the way a run builds it
    for m in model.modules():
        assert isinstance(m, Prunable) == callable(getattr(m, "keep_mask", None)), type(m)
        if isinstance(m, StochasticModule):  # declared: overridden, not the base's raise
            assert type(m).deterministic is not StochasticModule.deterministic, type(m)
    plain = to_deterministic(model)
    assert not any(isinstance(m, StochasticModule) for m in plain.modules())


def test_a_stochastic_module_without_an_evaluation_equivalent_is_named():
    class Noisy(StochasticModule):
        def forward(self, x):
            return x + torch.randn_like(x) if self.sampling() else x

    with pytest.raises(NotImplementedError, match="Noisy"):
        to_deterministic(nn.Sequential(nn.Linear(3, 3), Noisy()))


def test_to_deterministic_at_a_threshold_equals_layers_built_with_it():
    torch.manual_seed(0)
    model = nn.Sequential(spread_layer(0), nn.ReLU(), LinearVBD(10, 10))
    x = torch.randn(16, 20)
    before = model.eval()(x)
    for cut in (-1.0, 2.0, None):
        rebuilt = copy.deepcopy(model)
        for m in rebuilt.modules():
            if isinstance(m, LinearVBD):
                m.threshold = cut
        assert torch.equal(to_deterministic(model, log_alpha_threshold=cut)(x), rebuilt(x))
    assert torch.equal(model(x), before)  # the model itself is unchanged
    assert all(m.threshold == 3.0 for m in model.modules() if isinstance(m, LinearVBD))


def test_compression_report_at_a_threshold_leaves_the_model_alone():
    model = nn.Sequential(spread_layer(0))
    own = compression_report(model)
    at_0 = compression_report(model, log_alpha_threshold=0.0)
    assert at_0.nonzero == int((model[0].log_alpha <= 0).sum()) < own.nonzero
    assert at_0.threshold == 0.0 and own.threshold == 3.0
    assert compression_report(model).nonzero == own.nonzero
    assert compression_report(model, log_alpha_threshold=None).nonzero == 200
    with pytest.warns(DeprecationWarning, match="log_alpha_threshold"):
        assert compression_report(model, threshold=0.0).nonzero == at_0.nonzero


def test_shrink_at_a_unit_threshold_removes_exactly_those_units():
    torch.manual_seed(0)
    units = spread_units(30)
    model = nn.Sequential(nn.Flatten(), units, nn.Linear(30, 12), nn.ReLU(), nn.Linear(12, 4))
    model.eval()
    x = torch.randn(8, 30)
    for cut in (-1.0, 0.0, 1.0):
        small = shrink(model, unit_threshold=cut)
        assert neurons_per_layer(small)[0] == int(units.keep_mask(cut).sum())
        assert torch.allclose(small(x), to_deterministic(model, unit_threshold=cut)(x), atol=1e-5)
    assert units.threshold == 0.0
    report = compression_report(model, unit_threshold=1.0)
    assert report.layers[0].nonzero == 12 * int(units.keep_mask(1.0).sum())


def test_unknown_threshold_keyword_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="rms_threshold"):
            check_thresholds(nn.Linear(2, 2), {"rms_threshold": 1.0})


@pytest.mark.parametrize(
    ("method", "keyword"),
    [("sbp", "unit_threshold"), ("pruning", "log_alpha_threshold"), ("none", "unit_threshold"),
     ("vbd", "unit_threshold"), ("vbd_structured", "log_alpha_threshold")],
)  # fmt: skip
def test_a_cut_for_layers_the_model_lacks_is_refused(method, keyword):
    """A cut that would change nothing is refused by every whole-model function instead
    of being reported as used; "own", None (keep everything: benchmarks/bench_inference's
    unpruned network) and a model's own kind of cut are taken."""
    options = {"dataset_size": 100} if method == "pruning" else None
    model = build_model("lenet300_100", method, method_options=options)
    for function in (compression_report, to_deterministic, shrink):
        with pytest.raises(ValueError, match=f"{keyword} 1.0 cuts no layer of this model"):
            function(model, **{keyword: 1.0})
        function(model, **{keyword: "own"})
        function(model, log_alpha_threshold=None, unit_threshold=None)
    own = {"unit_threshold": "log_alpha_threshold", "log_alpha_threshold": "unit_threshold"}
    if method.startswith("vbd"):
        compression_report(model, **{own[keyword]: 1.0})


FIXTURES = Path(__file__).parent / "fixtures" / "v0"


def _json_of(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("method", "flag", "keyword", "cut"),
    [
        ("vbd", "--log-alpha-threshold", "log_alpha_threshold", -6.0),
        ("vbd_structured", "--unit-threshold", "unit_threshold", -9.2),
    ],
)
def test_eval_and_compress_take_a_threshold_without_touching_the_run(
    method, flag, keyword, cut, tmp_path, capsys
):
    pytest.importorskip("safetensors")
    run = Path(shutil.copytree(FIXTURES / method, tmp_path / method))
    checkpoint = (run / "checkpoint.pt").read_bytes()
    trained = load_run(run)
    model, data = trained.model, trained.data
    expected = evaluate(to_deterministic(model, **{keyword: cut}), data.test_x, data.test_y)
    own = _json_of(capsys, ["eval", str(run), "--json"])
    at_cut = _json_of(capsys, ["eval", str(run), flag, str(cut), "--mc-samples", "2", "--json"])
    assert at_cut[keyword] == cut and own[keyword] == "own"
    assert at_cut["test_error"] == pytest.approx(expected["error"])
    assert at_cut["test_error"] != own["test_error"]  # the cut matters for this run
    report = _json_of(
        capsys, ["compress", str(run), "--out", str(tmp_path / "x"), flag, str(cut), "--json"]
    )
    assert report["weights"]["nonzero"] == compression_report(model, **{keyword: cut}).nonzero
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    bad = "50" if keyword == "log_alpha_threshold" else "inf"  # weights' log α lies in [−8, 8]
    assert main(["eval", str(run), flag, bad]) == 1
    err = capsys.readouterr().err
    assert "log α" in err and len(err.strip().splitlines()) == 1
    other = "--unit-threshold" if keyword == "log_alpha_threshold" else "--log-alpha-threshold"
    for command in (["eval", str(run)], ["compress", str(run), "--out", str(tmp_path / "y")]):
        assert main([*command, other, "1"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cuts no layer of this model" in err[0]
    assert not (tmp_path / "y").exists()
