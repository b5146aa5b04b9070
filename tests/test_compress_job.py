"""compress.py end to end on a tiny trained model: metrics, fidelity, persistence, clear errors."""

import json

import pytest
from conftest import compose_config

from odllm.runner.compress import compress
from odllm.runner.evaluate import evaluate
from odllm.runner.train import train


def test_compress_evaluate_and_reload(tmp_path, trained):
    result = compress(compose_config([*trained, "ratio=0.5", "method=odllm"]), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["metrics"] == result["test"]["metrics"] and saved["test"]["invalid_beams"] == 0
    # half the decoder parameters gone: the next-item distribution moves (tiny model, 1 epoch: a little), most
    # of the top 10 stays
    # (ratio 1 below gives KL 0 and overlap 1, so a fidelity that ignores the compressed model fails here)
    assert saved["fidelity"]["kl"] > 1e-6 and 0.5 < saved["fidelity"]["top10_overlap"] < 1  # measured 1.2e-5
    assert saved["versions"]["torch"] and set(saved["versions"]) >= {"transformers", "lightning", "peft"}
    sizes = saved["sizes"]
    assert sizes["decoder_linear"]["params_after"] < sizes["decoder_linear"]["params_before"]
    assert sizes["model"]["params_after"] < sizes["model"]["params_before"]
    assert (tmp_path / "run" / "compression_report.json").exists() and (tmp_path / "run" / "spectra.png").exists()

    model_dir = tmp_path / "models" / "toy-odllm-r0.5"
    again = evaluate(compose_config([*trained, f"model_dir={model_dir}"]), tmp_path / "eval")
    assert again["test"]["metrics"] == result["test"]["metrics"]  # the reloaded model is the compressed one
    with pytest.raises(ValueError, match="holds a compressed model"):
        compress(compose_config([*trained, f"model_dir={model_dir}"]), tmp_path / "again")


def test_ratio_one_keeps_the_dense_model(tmp_path, trained):
    result = compress(compose_config([*trained, "ratio=1.0", "method=svd"]), tmp_path / "run")
    assert result["fidelity"]["kl"] == pytest.approx(0, abs=1e-6) and result["fidelity"]["top10_overlap"] == 1
    assert result["test"]["metrics"] == result["dense"]["metrics"]


@pytest.mark.parametrize("ratio", [0, -0.2, 1.5])
def test_ratio_outside_unit_interval(tmp_path, tiny_run_overrides, ratio):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        compress(compose_config([*tiny_run_overrides, f"ratio={ratio}"]), tmp_path / "run")


def test_too_many_calibration_samples(tmp_path, trained):
    with pytest.raises(ValueError, match="calibration.size=100000 but the training split has only"):
        compress(compose_config([*trained, "calibration.size=100000"]), tmp_path / "run")


def test_unknown_method_named_by_train_fails_before_training(tmp_path, tiny_run_overrides):
    with pytest.raises(ValueError, match="unknown compression method 'zip'"):
        train(compose_config([*tiny_run_overrides, "compress=zip"]), tmp_path / "run")


def test_benchmark_table_matches_runs(tmp_path, trained):
    from odllm.bench.compression import run_benchmark

    cfg = compose_config([*trained, "bench.methods=[odllm,svd,gptq]", "bench.ratios=[0.4,0.6]",
                          f"bench.out={tmp_path}/b", "bench.test_users=30"],
                         config_name="benchmark")
    payload = run_benchmark(cfg, tmp_path / "runs")
    table = (tmp_path / "b.md").read_text().splitlines()
    # header, dense, two low-rank methods at two ratios, gptq once (it has no ratio)
    assert len([line for line in table if line.startswith("| ")]) == 1 + 1 + 2 * 2 + 1
    assert [(r["method"]["name"], r["ratio"]) for r in payload["runs"]][-1] == ("gptq", None)
    assert "| gptq | w4g16 |" in table[-1]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    odllm_run = json.loads((tmp_path / "runs" / "odllm-r0.4" / "metrics.json").read_text())
    assert payload["runs"][0]["test"]["metrics"] == odllm_run["test"]["metrics"]
    assert payload["dense"]["metrics"] == odllm_run["dense"]["metrics"]
    assert payload["test_users"] == odllm_run["test"]["users"] == odllm_run["dense"]["users"] == 30
    assert "random subset" in table[0]
    assert f"{odllm_run['test']['metrics']['ndcg@10']['value']:.4f}" in table[5]


def test_benchmark_resumes_from_its_stored_rows(tmp_path, trained, monkeypatch):
    import odllm.bench.compression as benchmark

    computed = []
    real = benchmark.compress_recommender
    monkeypatch.setattr(benchmark, "compress_recommender",
                        lambda dense, split, method, job, *a: computed.append((method["name"], job.ratio))
                        or real(dense, split, method, job, *a))

    def run(*overrides):
        cfg = compose_config([*trained, "bench.methods=[svd]", f"bench.out={tmp_path}/b", "bench.test_users=20",
                              *overrides], config_name="benchmark")
        return benchmark.run_benchmark(cfg, tmp_path / "runs")

    first = run("bench.ratios=[0.4]")
    again = run("bench.ratios=[0.4,0.6]")  # a stopped or extended sweep: only the new setting is computed
    assert computed == [("svd", 0.4), ("svd", 0.6)]
    assert again["runs"][0] == first["runs"][0] and again["dense"] == first["dense"]
    assert again["runs"][1]["fidelity"]["kl"] > 0  # the stored dense beams still serve the new row's overlap
    run("bench.ratios=[0.4]", "bench.test_users=15")  # another protocol: nothing is reused
    run("bench.ratios=[0.4]", "bench.test_users=15", "bench.resume=false")
    assert computed[2:] == [("svd", 0.4), ("svd", 0.4)]
