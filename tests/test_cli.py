"""The command line: error messages (no tracebacks), data listing, bench end to end."""

import csv
import json
import sqlite3

import pytest
import torch

from bnnkit.bench import BenchConfig, run_bench
from bnnkit.cli import main
from bnnkit.data import load_bundle
from bnnkit.errors import ConfigError
from bnnkit.evaluate import EvalConfig, evaluate
from bnnkit.methods import ModelSpec, UQModel, build_method


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_method_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "bench", "--methods", "deterministic,swag", "--out", str(tmp_path)
    )
    assert code == 2
    assert "unknown method 'swag'" in err and "deep_ensemble" in err
    assert "Traceback" not in err


def test_unknown_model_and_dataset(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--model", "vgg", "--out", str(tmp_path / "r"))
    assert code == 2 and "unknown model 'vgg'" in err
    code, _, err = run_cli(capsys, "train", "--dataset", "imagenet", "--out", str(tmp_path / "s"))
    assert code == 2 and "unknown data set 'imagenet'" in err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "train", "--out", str(blocker / "run"))
    assert code == 2 and "not writable" in err and "--out" in err


def test_evaluate_needs_a_trained_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path))
    assert code == 2 and "holds no trained model" in err


def test_bad_subset_and_option(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--subset", "lots", "--out", str(tmp_path))
    assert code == 2 and "argument --subset: expected an int >= 1, or 'all'" in err
    code, _, err = run_cli(capsys, "train", "--option", "p", "--out", str(tmp_path / "x"))
    assert code == 2 and "key=value" in err


def test_bench_config_file_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("methods: [deterministic]\nepochz: 3\n")
    code, _, err = run_cli(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "epochz" in err


def test_data_lists_sets(capsys):
    code, out, _ = run_cli(capsys, "data")
    assert code == 0
    assert "fashion_mnist" in out and "train 60,000" in out and "test 10,000" in out
    # the Debian files' decompressed contents match the recorded sha256 values
    assert "t10k-images-idx3-ubyte.gz" in out
    fm_lines = [line for line in out.splitlines() if "fashion-mnist/" in line and "ubyte" in line]
    assert len(fm_lines) == 4 and all(" ok " in line for line in fm_lines)


def test_methods_lists_registry(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "temperature_scaling" in out and "post hoc on deterministic" in out


def test_num_classes_mismatch():
    bundle = load_bundle("fashion_mnist", val_size=100, subset=100, test_size=100)
    model = build_method("deterministic", ModelSpec("lenet5", (1, 28, 28), 5))
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        evaluate(model, bundle, EvalConfig(corruptions=[], angles=[], progress=False))


def test_bench_end_to_end_and_resume(tmp_path, ood_root):
    cfg = BenchConfig(
        methods=["temperature_scaling", "deep_ensemble"],
        method_options={"deep_ensemble": {"members": 2}},
        epochs=1,
        seeds=2,
        subset=300,
        val_size=300,
        out=str(tmp_path / "bench"),
        corruptions=["gaussian_noise", "rotate"],
        n_corrupt=100,
        n_rotate=100,
        angles=[0, 90, 180],
        progress=False,
    )
    table = run_bench(cfg, log=lambda *_: None)
    assert "temperature_scaling" in table and "deep_ensemble" in table
    out = tmp_path / "bench"
    for name in ["results.md", "results.csv", "results.sqlite", "bench_config.json"]:
        assert (out / name).is_file()
    for fig in ["reliability.png", "ood_hist.png", "corruption.png", "rotation.png",
                "training_curves.png"]:  # fmt: skip
        assert (out / "figures" / fig).stat().st_size > 1000
    # the convergence table: trained methods only (temperature scaling trains nothing), the
    # validation NLL the runs logged, averaged over the seeds
    md = (out / "results.md").read_text()
    conv = md.split("### Validation NLL during training")[1].split("###")[0]
    logged = []
    for seed in range(2):
        (log,) = (out / "runs" / f"deep_ensemble-seed{seed}" / "logs").glob("*/metrics.csv")
        with open(log, newline="") as f:
            logged += [float(r["val_nll"]) for r in csv.DictReader(f) if r["val_nll"]]
    assert len(logged) == 2
    assert f"| deep_ensemble | 1 | {sum(logged) / 2:.4f} |" in conv
    assert "| temperature_scaling |" not in conv
    db = sqlite3.connect(out / "results.sqlite")
    (n,) = db.execute(
        "SELECT COUNT(*) FROM results WHERE method='deep_ensemble' AND split='test'"
    ).fetchone()
    assert n == 2 * 4  # two seeds x (accuracy, nll, ece, brier)

    # mutual information: an ensemble's OOD score; a single network has none (not 50%)
    def mi_rows(method):
        q = "SELECT COUNT(*) FROM results WHERE method=? AND metric='auroc_mutual_info'"
        return db.execute(q, (method,)).fetchone()[0]

    assert mi_rows("deep_ensemble") > 0 and mi_rows("temperature_scaling") == 0
    ts_line = next(line for line in table.splitlines() if line.startswith("temperature_scaling"))
    assert "–" in ts_line
    (seeds,) = db.execute("SELECT COUNT(DISTINCT seed) FROM runs").fetchone()
    assert seeds == 2
    # deterministic was trained once per seed as the base of temperature scaling, not reported
    assert (out / "runs" / "deterministic-seed0" / "model.safetensors").is_file()
    assert "deterministic " not in table
    assert "±" in table
    # re-running reuses every finished run: nothing is retrained
    stamp = (out / "runs" / "deep_ensemble-seed1" / "model.safetensors").stat().st_mtime_ns
    run_bench(cfg, log=lambda *_: None)
    assert (out / "runs" / "deep_ensemble-seed1" / "model.safetensors").stat().st_mtime_ns == stamp
    # other settings in the same directory would mix results: refused, with the difference named
    cfg.epochs = 2
    with pytest.raises(ConfigError, match="epochs: 1 -> 2"):
        run_bench(cfg, log=lambda *_: None)
    cfg.epochs = 1
    cfg.method_options = {"deep_ensemble": {"members": 3}}
    with pytest.raises(ConfigError, match="different config"):
        run_bench(cfg, log=lambda *_: None)


def test_bench_variants_run_as_their_own_rows(tmp_path, ood_root):
    cfg = BenchConfig(
        methods=["laplace_subnetwork", "subnet-random"],
        method_options={"laplace_subnetwork": {"n_params": 40, "n_fit": 200}},
        variants={"subnet-random": {"method": "laplace_subnetwork", "strategy": "random"}},
        epochs=1,
        seeds=1,
        subset=300,
        val_size=300,
        test_size=200,
        out=str(tmp_path / "bench"),
        corruptions=[],
        angles=[0, 90],
        n_rotate=50,
        progress=False,
    )
    table = run_bench(cfg, log=lambda *_: None)
    assert "subnet-random" in table and "laplace_subnetwork" in table
    runs = tmp_path / "bench" / "runs"
    rc = json.loads((runs / "subnet-random-seed0" / "config.json").read_text())
    # the variant runs the base method with its own option over the method's shared ones
    assert rc["method"] == "laplace_subnetwork"
    assert rc["method_options"]["strategy"] == "random"
    assert rc["method_options"]["n_fit"] == 200 and rc["method_options"]["n_params"] == 40
    a = UQModel.load(runs / "laplace_subnetwork-seed0" / "model.safetensors").posterior
    b = UQModel.load(runs / "subnet-random-seed0" / "model.safetensors").posterior
    assert not torch.equal(a.indices, b.indices)
    # both start from the one deterministic run of that seed
    assert sorted(p.name for p in runs.iterdir()) == [
        "deterministic-seed0",
        "laplace_subnetwork-seed0",
        "subnet-random-seed0",
    ]


@pytest.mark.parametrize(
    "variants, match",
    [
        ({"v": {"strategy": "random"}}, "needs a 'method' key"),
        ({"mfvi": {"method": "mfvi"}}, "shadows the method"),
        ({"v": {"method": "laplace_subnetwork", "stratgy": "random"}}, "no option 'stratgy'"),
        ({"v": {"method": "nope"}}, "unknown method"),
    ],
)
def test_bench_variant_errors(variants, match, tmp_path):
    cfg = BenchConfig(methods=["v"] if "v" in variants else ["mfvi"], variants=variants)
    cfg.out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_a_refused_train_leaves_nothing_and_the_corrected_command_runs(capsys, tmp_path):
    """Every refusal comes before the first write: the run directory is not even made, so the
    corrected command is not refused as 'already holds an interrupted run'."""
    from bnnkit.train import is_complete

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"layers": {"fc": "mc_dropout"}, "samples": 2}))
    bad.write_text(json.dumps({"layers": {"nope": "mc_dropout"}, "samples": 2}))
    out = tmp_path / "run"
    common = ["train", "--model", "mlp", "--epochs", "1", "--subset", "256", "--batch-size",
              "64", "--quiet", "--out", str(out)]  # fmt: skip
    for extra, match in (
        (["--plan", str(bad)], "plan layer 'nope' matches no"),
        (["--plan", str(good), "--strategy", "nonsense"], "Lightning refused"),
        (["--plan", str(good), "--subset", "100000"], "is more than the 55,000 training"),
        (["--plan", str(good), "--option", "nope=1"], "nope"),
    ):
        code, _, err = run_cli(capsys, *common, *extra)
        assert code == 2 and match in err and "Traceback" not in err, err
        assert not out.exists()
    code, out_text, err = run_cli(capsys, *common, "--plan", str(good))
    assert code == 0, err
    assert is_complete(out)
    assert json.loads((out / "config.json").read_text())["method"] == "placement"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("", []), ("none", []), ("contrast, Gaussian_Noise", ["contrast", "gaussian_noise"])],
)
def test_bench_corruptions_flag(flag, expected):
    from bnnkit.cli import build_parser
    from bnnkit.cli.bench import config

    a = build_parser().parse_args(["bench", "--corruptions", flag])
    cfg = config(a)
    cfg.validate()
    assert cfg.corruptions == expected
    a = build_parser().parse_args(["bench", "--corruptions", "contrst"])
    with pytest.raises(ConfigError, match="contrst"):
        config(a).validate()
