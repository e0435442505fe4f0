"""`vbd reproduce`: tables as data, end-to-end runs on generated CIFAR-10/SVHN files, resume."""

import functools
import importlib
import json
from pathlib import Path

import pytest
import torch
from data_fakes import write_cifar, write_svhn

from vbdropout.cli import main
from vbdropout.data import load_dataset
from vbdropout.experiments import TABLES, reproduce


def test_tables_hold_every_published_cell():
    sizes = {name: len(t.rows) for name, t in TABLES.items()}
    assert sizes == {"table1": 35, "table2": 21, "table3": 7, "table4": 14, "table5": 10}
    for table in TABLES.values():
        keys = [row.key for row in table.rows]
        assert len(keys) == len(set(keys)), "cell keys must be unique"
    vbd_t1 = [r.paper_error for r in TABLES["table1"].rows if r.method == "vbd"]
    assert vbd_t1 == [1.56, 1.53, 1.53, 1.52, 1.45]
    ours = [
        r
        for r in TABLES["table4"].rows
        if r.label == "Ours (high sparsity)" and r.model == "lenet300_100"
    ]
    assert ours[0].paper_ratio == 81 and ours[0].paper_sparsity == "98.9-98.1-90.9"
    sbp = [r for r in TABLES["table5"].rows if r.method == "sbp" and r.model == "lenet5_caffe"]
    assert sbp[0].paper_neurons == "3-18-284-283" and sbp[0].init_from == "Original"


@pytest.fixture
def lenient_data(monkeypatch):
    """Small generated files are well-formed but not of canonical size."""
    lenient = functools.partial(load_dataset, strict=False)
    # train.runs.run_data loads the data of every run: training and the trained runs
    monkeypatch.setattr("vbdropout.train.runs.load_dataset", lenient)


def test_table2_runs_end_to_end_on_generated_cifar_files(tmp_path, lenient_data, monkeypatch):
    write_cifar(tmp_path / "data" / "cifar10" / "cifar-10-batches-py", n=20)
    result = reproduce(
        "table2", only="^(No Dropout|Ours) .* scale 1$", out=tmp_path / "results",
        data_dir=str(tmp_path / "data"), epochs=1, train_subset=60, progress=False, device="cpu",
    )  # fmt: skip
    labels = sorted(c["label"] for c in result["cells"])
    assert labels == ["No Dropout", "Ours"]
    markdown = (tmp_path / "results" / "table2-custom-e1-n60.md").read_text()
    assert "| Ours | scale 1 | 39.50 |" in markdown and "QUICK" in markdown
    cell_files = list((tmp_path / "results").rglob("seed0.json"))
    assert len(cell_files) == 2
    cell = json.loads(cell_files[0].read_text())
    for key in ("command", "seed", "versions", "wall_seconds", "device", "test_error"):
        assert key in cell

    def no_training(*args, **kwargs):
        raise AssertionError("finished cells must not be retrained")

    monkeypatch.setattr("vbdropout.train.trainer.train", no_training)
    again = reproduce(
        "table2", only="^(No Dropout|Ours) .* scale 1$", out=tmp_path / "results",
        data_dir=str(tmp_path / "data"), epochs=1, train_subset=60, progress=False, device="cpu",
    )  # fmt: skip
    assert [c["test_error"] for c in again["cells"]] == [c["test_error"] for c in result["cells"]]
    one_row = reproduce(
        "table2", only="^Ours .* scale 1$", out=tmp_path / "results",
        data_dir=str(tmp_path / "data"), epochs=1, train_subset=60, progress=False, device="cpu",
    )  # fmt: skip
    assert [c["label"] for c in one_row["cells"]] == ["Ours"]
    markdown = (tmp_path / "results" / "table2-custom-e1-n60.md").read_text()
    assert "| No Dropout | scale 1 |" in markdown, "rows of earlier runs stay in the table"


@pytest.fixture
def table3_argv(tmp_path, lenient_data) -> list[str]:
    """`vbd reproduce table3` for the Ours row on generated SVHN files, 1 epoch."""
    write_svhn(tmp_path / "data" / "svhn", "train_32x32.mat", n=40)
    write_svhn(tmp_path / "data" / "svhn", "test_32x32.mat", n=20, seed=1)
    return ["reproduce", "table3", "--only", "^Ours", "--out", str(tmp_path / "results"),
            "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--train-subset", "40",
            "--device", "cpu", "--json"]  # fmt: skip


def test_table3_runs_end_to_end_on_generated_svhn_files(table3_argv, capsys):
    assert main(table3_argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["label"] for c in result["cells"]] == ["Ours"]
    assert result["skipped"] == []


def test_quick_table4_rows_on_real_mnist_with_plots(tmp_path, shared_data, capsys):
    pytest.importorskip("matplotlib")
    import shutil

    moved = tmp_path / "data"  # the runs' data folder, gone before the second call
    shutil.copytree(shared_data / "mnist", moved / "mnist")
    options = dict(out=tmp_path, epochs=2, train_subset=2000, progress=False, device="cpu")
    result = reproduce("table4", only="^Ours .*lenet300_100", data_dir=str(moved), **options)
    low, high = result["cells"]
    assert low["compression"]["layers"][0]["weights"] == 784 * 300
    # the high-sparsity row re-evaluates the same trained network at threshold 2
    assert high["run_dir"] == low["run_dir"]
    assert high["compression"]["nonzero"] <= low["compression"]["nonzero"]
    assert any(p.endswith("learning_curves.png") for p in result["plots"])
    assert any("log_alpha_" in p for p in result["plots"])
    markdown = (tmp_path / "table4-custom-e2-n2000.md").read_text()
    assert "98.7-97.4-87.4" in markdown and "98.9-98.1-90.9" in markdown
    # every cell finished: `vbd reproduce --data-dir` redraws the log α histograms from the
    # runs with its own data folder, not the one the runs were trained with
    shutil.rmtree(moved)
    cell_files = {p: p.read_bytes() for p in tmp_path.glob("*/cells/*/seed*.json")}
    argv = ["reproduce", "table4", "--only", "^Ours .*lenet300_100", "--out", str(tmp_path),
            "--epochs", "2", "--train-subset", "2000", "--device", "cpu",
            "--data-dir", str(shared_data), "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {p: p.read_bytes() for p in cell_files} == cell_files  # nothing recomputed
    assert len(cell_files) == 2
    assert any("log_alpha_" in p for p in again["plots"])


def test_table5_vd_row_is_weight_level_sparse_vd_counted_in_whole_units(
    tmp_path, shared_data, capsys
):
    """The paper's Table 5 "VD" is [25], weight-level sparse VD: through ``vbd reproduce``
    its cell trains ``sparse_vd`` from the trained "Original" (pixels in [0, 1], no KL
    warm-up) and counts as neurons the inputs of each layer that keep a weight."""
    from vbdropout.nn.gaussian import GaussianWeight
    from vbdropout.train.runs import load_run

    argv = ["reproduce", "table5", "--only", "^(Original|VD) .*lenet500", "--out",
            str(tmp_path), "--data-dir", str(shared_data), "--epochs", "1",
            "--train-subset", "1000", "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    cells = json.loads(capsys.readouterr().out.splitlines()[-1])["cells"]
    (vd,) = [c for c in cells if c["label"] == "VD"]
    cells_dir = tmp_path / "table5-custom-e1-n1000" / "cells"
    cell = json.loads((cells_dir / "lenet500_300-sparse_vd-vd" / "seed0.json").read_text())
    assert cell["method"] == "sparse_vd" and cell["test_error"] == vd["test_error"]
    trained = load_run(cell["run_dir"])
    model, config = trained.model, trained.config
    assert (config.input_scaling, tuple(config.kl_warmup)) == ("unit", (0, 0))
    assert config.init is not None and "none-original" in config.init
    layers = [m for m in model.modules() if isinstance(m, GaussianWeight)]
    assert [layer.prior.name for layer in layers] == ["log_uniform"] * 3
    # shrink's rule to a fixed point: a hidden unit stays while a kept unit of the next
    # layer reads it and a kept input feeds it; an input pixel while a kept unit reads it
    masks = [layer.keep_mask() for layer in layers]  # (out, in)
    alive = [torch.ones(m.shape[1], dtype=torch.bool) for m in masks]
    alive.append(torch.ones(masks[-1].shape[0], dtype=torch.bool))  # the 10 classes
    for _ in range(len(masks)):
        for i, mask in enumerate(masks):
            alive[i] &= mask[alive[i + 1]].any(0)
            if i > 0:
                alive[i] &= masks[i - 1][:, alive[i - 1]].any(1)
    assert cell["neurons_per_layer"] == [int(a.sum()) for a in alive]


def test_rows_without_an_implemented_method_are_listed_not_run(tmp_path, monkeypatch):
    from vbdropout.models import METHODS

    module = importlib.import_module("vbdropout.experiments.reproduce")
    # a copy without sparse_vd where reproduce looks methods up: deleting from the registry
    # itself would put the method back at its end and reorder the CLI's listing
    monkeypatch.setattr(module, "METHODS", {k: v for k, v in METHODS.items() if k != "sparse_vd"})
    result = reproduce("table4", only="^VD .*lenet300", out=tmp_path, progress=False)
    assert result["cells"] == []
    assert result["skipped"] == ["VD (sparse_vd): method not implemented yet"]
    assert "Not run:" in (tmp_path / "table4-quick.md").read_text()
    with pytest.raises(ValueError, match="unknown table"):
        reproduce("table9")


def test_a_seed_range_runs_only_those_seeds(table3_argv, tmp_path, capsys):
    """``--seeds A-B`` lets processes split a table's seeds; a count still means 0..N-1."""
    argv = table3_argv
    assert main([*argv, "--seeds", "1-2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(c["seed"] for c in result["cells"]) == [1, 2]
    cells = tmp_path / "results" / "table3-custom-e1-n40" / "cells"
    assert sorted(p.name for p in cells.rglob("seed*.json")) == ["seed1.json", "seed2.json"]
    for bad in ("2-1", "a-b", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--seeds", bad])
        assert exit_info.value.code == 2
    assert "seed range" in capsys.readouterr().err


def test_without_matplotlib_reproduce_says_once_which_extra_to_install(
    tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "vbdropout.experiments.plots", None)
    from vbdropout.models import METHODS

    module = importlib.import_module("vbdropout.experiments.reproduce")
    # no training needed: without sparse_vd (in reproduce's view) the row is listed, not run
    monkeypatch.setattr(module, "METHODS", {k: v for k, v in METHODS.items() if k != "sparse_vd"})
    assert main(["reproduce", "table4", "--only", "^VD .*lenet300", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count('pip install "vbdropout[plots]"') == 1


def test_quick_budgets_use_all_data_and_scale_their_schedules(tmp_path):
    """Every quick cell trains fewer epochs with the protocol's schedule shrunk to fit."""
    from vbdropout.experiments.reproduce import cell_config
    from vbdropout.train.config import resolve_config
    from vbdropout.train.protocols import PROTOCOLS
    from vbdropout.train.schedules import kl_weight

    for name, table in TABLES.items():
        quick = table.budgets["quick"]
        assert quick.epochs is not None and quick.columns, name
        if table.dataset != "svhn":
            assert quick.train_subset is None, f"{name}: quick uses all training data"
        rows = [r for r in table.rows if r.column in quick.columns]
        assert rows, f"{name}: the quick columns {quick.columns} name no column"
        for row in rows:
            config = resolve_config(cell_config(row, table, "quick", 0, tmp_path))
            protocol = PROTOCOLS[row.model]
            epochs = quick.per_method.get(row.method, {}).get("epochs", quick.epochs)
            assert config.epochs == epochs < protocol.epochs
            assert config.lr == quick.per_method.get(row.method, {}).get("lr", protocol.lr)
            explicit = row.method_options.get("kl_warmup")  # a row's own schedule stays
            warmup = tuple(explicit) if explicit is not None else protocol.kl_warmup
            end = config.kl_warmup[1]
            assert end <= config.epochs // 2 + 1, f"{name}: KL warm-up ends by mid-run"
            last_step = config.epochs - 0.01  # where a run's last steps are
            assert kl_weight(last_step, *config.kl_warmup) >= 0.99, f"{name}: full KL at the end"
            if explicit is not None:
                assert config.kl_warmup == warmup
            else:
                scale = config.epochs / protocol.epochs
                assert end == pytest.approx(protocol.kl_warmup[1] * scale, abs=1)
            assert (
                config.lr_decay_start == protocol.lr_decay_start * config.epochs // protocol.epochs
            )
            paper = resolve_config(cell_config(row, table, "paper", 0, tmp_path))
            assert (paper.epochs, paper.kl_warmup) == (protocol.epochs, warmup)
            assert (paper.lr, paper.lr_decay_start) == (protocol.lr, protocol.lr_decay_start)


def test_a_budgets_per_method_overrides_reach_only_that_methods_rows(tmp_path, monkeypatch):
    """Per-method epochs/lr apply to that method's cells; --epochs then wins for every row."""
    import dataclasses

    from vbdropout.experiments import tables
    from vbdropout.experiments.reproduce import cell_config
    from vbdropout.train.config import resolve_config

    spec = tables.TABLES["table5"]
    quick = dataclasses.replace(
        spec.budgets["quick"], epochs=10, per_method={"sbp": {"epochs": 30, "lr": 3e-3}}
    )
    spec = dataclasses.replace(spec, budgets={**spec.budgets, "quick": quick})
    rows = {r.method: r for r in spec.rows if r.model == "lenet500_300"}
    sbp = resolve_config(cell_config(rows["sbp"], spec, "quick", 0, tmp_path))
    plain = resolve_config(cell_config(rows["none"], spec, "quick", 0, tmp_path))
    assert (sbp.epochs, sbp.lr, sbp.lr_decay_start, sbp.kl_warmup) == (30, 3e-3, 15, (0, 0))
    assert (plain.epochs, plain.lr, plain.lr_decay_start) == (10, 1e-3, 5)
    assert sbp.input_scaling == "unit" and sbp.init.endswith(f"{rows['none'].key}-seed0")

    seen = {}

    def fake_cell(runner, row, seed):
        config = cell_config(row, runner.table, runner.budget, seed, tmp_path)
        seen[row.method] = (runner.budget, config.epochs, config.lr)
        return {"label": row.label, "model": row.model, "column": row.column, "seed": 0,
                "test_error": 0.02, "epochs": config.epochs, "compression": {
                "compression_ratio": 1, "sparsity_per_layer": "0", "layers": []},
                "neurons_per_layer": [1]}  # fmt: skip

    module = importlib.import_module("vbdropout.experiments.reproduce")
    monkeypatch.setattr(module, "TABLES", {**module.TABLES, "table5": spec})
    monkeypatch.setattr(module._CellRunner, "_compute", fake_cell)
    monkeypatch.setattr(module, "_plots", lambda *a: [])
    reproduce("table5", out=tmp_path, progress=False, only="SBP|Original")
    assert seen == {"none": ("quick", 10, None), "sbp": ("quick", 30, 3e-3)}
    assert "(sbp: epochs 30, lr 0.003)" in (tmp_path / "table5-quick.md").read_text()
    reproduce("table5", out=tmp_path, progress=False, only="SBP|Original", epochs=4)
    assert seen == {"none": ("custom-e4-nNone", 4, None), "sbp": ("custom-e4-nNone", 4, 3e-3)}


def test_quick_budget_runs_only_its_columns(tmp_path, monkeypatch):
    ran = []

    def fake_cell(runner, row, seed):
        ran.append(row.column)
        return {"label": row.label, "model": row.model, "column": row.column, "seed": 0,
                "test_error": 0.02, "epochs": 1, "compression": {"compression_ratio": 1,
                "sparsity_per_layer": "0", "layers": []}, "neurons_per_layer": [1]}  # fmt: skip

    module = importlib.import_module("vbdropout.experiments.reproduce")
    monkeypatch.setattr(module._CellRunner, "_compute", fake_cell)
    monkeypatch.setattr(module, "_plots", lambda *a: [])
    result = reproduce("table4", out=tmp_path, progress=False)
    assert set(ran) == {"lenet300_100"} and len(result["cells"]) == 7
    markdown = (tmp_path / "table4-quick.md").read_text()
    assert "columns lenet300_100 only" in markdown and "all training examples" not in markdown


def test_plots_show_the_spread_over_seeds(tmp_path):
    """Two seeds of one cell: grouped, their mean curve with a band, sparsity with error bars."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from vbdropout.experiments import plots

    def cell(seed, errors, sparsity):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        rows = [{"epoch": i + 1, "test_error": e} for i, e in enumerate(errors)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        layers = [{"sparsity": s} for s in sparsity]
        return {"label": "Ours", "model": "m", "column": "", "seed": seed,
                "run_dir": str(run), "compression": {"layers": layers}}  # fmt: skip

    cells = [cell(1, [0.5, 0.3, 0.2], [80, 60]), cell(0, [0.4, 0.2], [90, 50])]
    other = {**cells[0], "label": "VD", "seed": 0}
    groups = plots.seed_groups([*cells, other])
    assert [[c["seed"] for c in g] for g in groups] == [[0, 1], [0]]
    drawn = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, path, **kw):
        drawn[Path(path).name] = fig
        return real_savefig(fig, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        plots._learning_curves(cells, tmp_path / "curves.png", "t")
        plots._sparsity_bars(cells, tmp_path / "bars.png", "t")
    (curves,) = drawn["curves.png"].axes
    (line,) = curves.get_lines()
    # the mean over the two epochs that both seeds have
    assert line.get_ydata().tolist() == pytest.approx([45.0, 25.0])
    assert len(curves.collections) == 1  # the ± sd band
    (bars,) = drawn["bars.png"].axes
    heights = [p.get_height() for p in bars.patches]
    assert heights == pytest.approx([85.0, 55.0])
    assert any(isinstance(c, ErrorbarContainer) for c in bars.containers)  # ± sd
    assert len([m for m in bars.get_lines() if m.get_marker() == "o"]) == 2  # one per seed
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cells_kept_without_their_runs_still_make_the_table_and_plots(tmp_path, capsys):
    """docs/results keeps cell files, not runs: copied back under OUT/table5/cells, a
    reproduce that finds every cell finished writes the table and the plots that need
    no run (learning curves and log α histograms are skipped for lack of their files)."""
    pytest.importorskip("matplotlib")
    import shutil

    cells = Path(__file__).parent.parent / "docs" / "results" / "table5-paper" / "cells"
    shutil.copytree(cells, tmp_path / "table5" / "cells")
    for path in (tmp_path / "table5" / "cells").glob("*/seed*.json"):
        # the runs lived on the machine that made them: gone here, whatever this machine holds
        cell = json.loads(path.read_text())
        cell["run_dir"] = str(tmp_path / "gone" / Path(cell["run_dir"]).name)
        path.write_text(json.dumps(cell))
    argv = ["reproduce", "table5", "--budget", "paper", "--only", "^(Original|SBP|Ours) .*lenet500",
            "--seeds", "0-2", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(result["cells"]) == 9
    assert [Path(p).name for p in result["plots"]] == [
        "learning_curves.png",
        "sparsity_per_layer.png",
    ]
    assert "Ours − SBP (lenet500_300, n = 3 vs 3)" in (tmp_path / "table5.md").read_text()
