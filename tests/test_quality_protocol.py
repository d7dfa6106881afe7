"""The selection protocol (choose on validation, score test once), the published anchors printed
only for their own dataset, and the ablation harness. Tiny models on small synthetic data; the
sentence-transformer is replaced by the hashed bag-of-words embedding so nothing loads weights."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sidrec.training import embeddings as embeddings_mod
from sidrec.training.anchors import (KnownDataset, anchor_rows, file_sha256, identify_dataset,
                                     sequences_sha256)
from sidrec.training.config import PipelineConfig, TrainConfig, apply_overrides
from sidrec.training.data import InteractionData
from sidrec.training.protocol import read_record, recipe_key, run_protocol
from sidrec.training.synthetic import make_synthetic, write_p5
from sidrec.training.train import lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = {"sid": {"levels": 2, "codebook_size": 8, "niter": 5},
        "train": {"arch": "decoder_only", "objective": "packed", "d_model": 32, "n_heads": 2, "d_head": 16,
                  "d_ff": 64, "n_dec_layers": 1, "n_enc_layers": 1, "batch_size": 128, "warmup_steps": 2,
                  "epochs": 1, "eval_users": 40, "eval_beam": 10, "dtype": "float32", "num_threads": 1},
        "eval": {"beam": 10, "wide_beams": [], "batch_size": 256}}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def hashed_embeddings(monkeypatch):
    monkeypatch.setattr(embeddings_mod, "embed_items",
                        lambda texts, *a, **k: embeddings_mod.hashed_text_embeddings(texts, dim=24))


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(60, 150, seed=2)


def test_final_without_a_select_record_warns_and_select_then_final_records_validation(
        tmp_path, tiny_data, hashed_embeddings, capsys):
    cfg = apply_overrides(PipelineConfig.from_dict(TINY), {"train.fit_on": "train+valid"})
    reg, quiet = tmp_path / "selections", (lambda s: None)

    m, sel, _ = run_protocol("final", cfg, tiny_data, None, tmp_path / "final", reg, "tiny", log=quiet)
    err = capsys.readouterr().err
    assert sel is None and "WARNING: no selection record" in err
    assert m["selected_on"] == "unknown" and "no selection record" in m["selection_warning"]
    assert m["valid"] is None and "trained on the validation targets" in m["valid_skipped"]
    assert m["test"]["users"] == 150 and m["recall@10"] == m["test"]["recall@10"]

    s, _, _ = run_protocol("select", cfg, tiny_data, None, tmp_path / "select", reg, "tiny", log=quiet)
    assert s["selected_on"] == "validation" and s["protocol"] == "select"
    assert s["fit_on"] == "train" and s["recipe"]["name"] == "tiny"
    assert s["recipe"]["config"]["train"]["fit_on"] == "train" and s["recipe"]["config"]["eval"]["splits"] == ["valid"]
    assert set(s["valid"]) >= {"recall@5", "ndcg@5", "recall@10", "ndcg@10"} and "test" not in s
    rec, _ = read_record(reg, "select", tiny_data.fingerprint, cfg)
    assert rec["valid"]["ndcg@10"] == s["valid"]["ndcg@10"] and rec["recipe_key"] == recipe_key(cfg)

    m2, sel2, sel_path = run_protocol("final", cfg, tiny_data, None, tmp_path / "final", reg, "tiny", log=quiet)
    assert "WARNING" not in capsys.readouterr().err
    assert sel2 is not None and m2["selected_on"] == "validation"
    assert m2["selection_valid"] == s["valid"] and m2["selection_record"] == str(sel_path)
    on_disk = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert on_disk["selected_on"] == "validation" and "selection_warning" not in on_disk
    final_rec, _ = read_record(reg, "final", tiny_data.fingerprint, cfg)
    assert final_rec["test"]["ndcg@10"] == m2["test"]["ndcg@10"]


def test_recipe_key_ignores_what_the_protocol_sets_only():
    cfg = PipelineConfig.from_dict(TINY)
    same = apply_overrides(cfg, {"train.fit_on": "train+valid", "train.device": "cuda", "eval.beam": 50})
    assert recipe_key(same) == recipe_key(cfg)
    assert recipe_key(apply_overrides(cfg, {"train.lr": 1e-3})) != recipe_key(cfg)
    assert recipe_key(apply_overrides(cfg, {"train.time_budget_min": 5})) != recipe_key(cfg)


def _shaped(users: int, items: int, name: str = "shaped") -> InteractionData:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, items, 3) for _ in range(users)]
    return InteractionData(name, [str(i + 1) for i in range(items)], [{"title": "x"}] * items,
                           [str(u + 1) for u in range(users)], seqs, "fp")


def test_anchor_is_the_published_row_of_the_dataset_it_ran_on():
    beauty = identify_dataset(_shaped(22363, 12101))
    assert beauty.name == "Amazon Beauty" and beauty.how == "shape"
    tiger = [a for a in anchor_rows(beauty) if a.source == "TIGER (paper)"]
    assert tiger[0].metrics == {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}
    toys = identify_dataset(_shaped(19412, 11924))
    assert [a.metrics["ndcg@10"] for a in anchor_rows(toys)] == [0.0432]
    synthetic = make_synthetic(60, 150, seed=2)
    assert identify_dataset(synthetic) is None and anchor_rows(None) == []
    quality = _script("quality")
    rows = quality.table_rows(anchor_rows(None), None, None, {"fit_on": "train", "test": {
        "recall@5": 0.1, "ndcg@5": 0.1, "recall@10": 0.2, "ndcg@10": 0.1, "popularity": {}}}, None)
    assert [r[0] for r in rows if "paper" in r[0]] == []
    rows = quality.table_rows(anchor_rows(beauty), beauty, None, None, None)
    assert rows[0][0] == "TIGER (paper), Amazon Beauty *" and rows[0][2]["recall@10"] == 0.0648


def test_dataset_recognised_by_content_equals_the_p5_file_hash(tmp_path):
    data = make_synthetic(60, 150, seed=2)
    write_p5(data, tmp_path)
    digest = sequences_sha256(data)
    assert digest == file_sha256(tmp_path / "sequential_data.txt")  # "\n" endings: the same bytes
    known = (KnownDataset("Mine", 1, 1, sequences_sha256=(digest,)),)
    match = identify_dataset(data, tmp_path, known=known)
    assert match.name == "Mine" and match.how == "content"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "amazon-beauty").is_dir(), reason="no Beauty data")
def test_real_beauty_is_recognised_by_content():
    from sidrec.training.data import read_p5

    path = ROOT.parent / "shared" / "data" / "amazon-beauty"
    match = identify_dataset(read_p5(path), path)
    assert match.name == "Amazon Beauty" and match.how == "content"


def test_overrides_name_unknown_keys_and_bad_types():
    cfg = PipelineConfig()
    with pytest.raises(ValueError, match=r"unknown setting 'train\.label_smothing'.*label_smoothing"):
        apply_overrides(cfg, {"train.label_smothing": 0.1})
    with pytest.raises(ValueError, match="no section 'trian'"):
        apply_overrides(cfg, ["trian.lr=0.1"])
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be int"):
        apply_overrides(cfg, {"train.epochs": "many"})
    with pytest.raises(ValueError, match="eval.splits"):
        apply_overrides(cfg, {"eval.splits": ["holdout"]})
    assert apply_overrides(cfg, ["train.lr=0.001", "embed.template={title}"]).embed.template == "{title}"


def test_inverse_sqrt_schedule_is_tigers():
    cfg = TrainConfig(lr=1e-2, warmup_steps=100, lr_schedule="inverse_sqrt", min_lr_ratio=0.01)
    assert lr_at(99, 10_000, cfg) == pytest.approx(1e-2)
    assert lr_at(399, 10_000, cfg) == pytest.approx(1e-2 * 0.5)  # sqrt(100 / 400)
    assert lr_at(10**7, 10_000, cfg) == pytest.approx(1e-4)  # the floor
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def _variants(tmp_path: Path, variants: list) -> Path:
    f = tmp_path / "variants.json"
    f.write_text(json.dumps({"variants": variants}))
    base = tmp_path / "base.json"
    base.write_text(json.dumps(TINY))
    return f


def test_ablation_rejects_an_unknown_key_before_training(tmp_path):
    ablate = _script("ablate")
    f = _variants(tmp_path, [{"name": "ok", "set": {}}, {"name": "typo", "set": {"train.dropuot": 0.2}}])
    with pytest.raises(SystemExit, match=r"variant 'typo': unknown setting 'train\.dropuot'"):
        ablate.main(["--data", "synthetic:60x150", "--base", str(tmp_path / "base.json"), "--variants", str(f),
                     "--time-budget", "0.05", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists(), "nothing may train before every variant's keys are checked"
    f = _variants(tmp_path, [{"name": "long", "set": {"train.time_budget_min": 9}}])
    with pytest.raises(SystemExit, match="equal wall time"):
        ablate.main(["--data", "synthetic:60x150", "--variants", str(f), "--time-budget", "0.05",
                     "--out", str(tmp_path / "out")])


def test_ablation_runs_two_variants_into_a_table_and_curves(tmp_path, hashed_embeddings, capsys):
    ablate = _script("ablate")
    f = _variants(tmp_path, [{"name": "base", "set": {}},
                             {"name": "smooth", "about": "label smoothing", "set": ["train.label_smoothing=0.1"]}])
    res = ablate.main(["--data", "synthetic:60x150", "--base", str(tmp_path / "base.json"), "--variants", str(f),
                       "--time-budget", "0.05", "--out", str(tmp_path / "out"),
                       "--selections", str(tmp_path / "sel")])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert res["selected_on"] == "validation" and [v["name"] for v in res["variants"]] == ["base", "smooth"]
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| smooth | train.label_smoothing=0.1 |" in table and "| base | (base) |" in table
    for v in res["variants"]:
        assert Path(v["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert v["test"] is None and 0.0 <= v["valid"]["ndcg@10"] <= v["valid"]["recall@10"] <= 1.0
        recipe = json.loads(Path(v["recipe"]).read_text())
        assert recipe["train"]["time_budget_min"] == 0.05
    smooth = json.loads((tmp_path / "out" / "smooth" / "metrics.json").read_text())
    assert smooth["recipe"]["config"]["train"]["label_smoothing"] == 0.1 and smooth["selected_on"] == "validation"


@pytest.mark.parametrize("name", ["ablations.json", "ablations-smoke.json"])
def test_shipped_variant_lists_name_only_existing_settings(name):
    from sidrec.training.config import load_config

    ablate = _script("ablate")
    base, variants = ablate.load_variants(ROOT / "benchmarks" / name)
    cfgs = ablate.build_configs(load_config(base), variants, 20.0, [])
    assert len({recipe_key(c) for c in cfgs}) == len(cfgs), "two variants train the same recipe"
    assert all(c.train.time_budget_min == 20.0 for c in cfgs)


def test_missing_selection_names_how_the_nearest_record_differs(tmp_path):
    from sidrec.training.protocol import provenance, record_path, write_record

    cfg = apply_overrides(PipelineConfig.from_dict(TINY), {"train.time_budget_min": 20})
    metrics = {"dataset": "d", "dataset_fingerprint": "abcdef0123456789", "valid": {"ndcg@10": 0.1}}
    write_record(tmp_path, "select", metrics, cfg, "tiny", tmp_path / "run")
    other = apply_overrides(cfg, {"train.time_budget_min": 80, "train.fit_on": "train+valid"})
    expected = record_path(tmp_path, "select", "abcdef0123456789", other)
    prov = provenance("final", "tiny", other, None, expected)
    assert prov["selected_on"] == "unknown" and str(expected) in prov["selection_warning"]
    assert "train.time_budget_min: 20.0 there, 80.0 here" in prov["selection_warning"]
    assert "fit_on" not in prov["selection_warning"]  # the protocol's own setting is no difference


def test_rerank_tune_chooses_on_validation_and_the_pipeline_scores_the_same_knobs(tmp_path, hashed_embeddings,
                                                                                   capsys):
    """benchmarks/rerank_tune.py on a select run: its all-off row is the select run's own
    validation score, its table-alone row the pipeline's baseline, it picks the grid's best
    NDCG@10, and a select run evaluated with a grid point's knobs (the transition mixture with
    extra next items and the text re-rank: the engine's `hybrid_rerank`, through
    training.evaluate) scores what the tuner said. A grid on test is refused."""
    tune = _script("rerank_tune")
    data, _ = __import__("sidrec.training.protocol", fromlist=["resolve_data"]).resolve_data("synthetic:60x150")
    cfg, reg, quiet = PipelineConfig.from_dict(TINY), tmp_path / "sel", (lambda s: None)
    s, _, _ = run_protocol("select", cfg, data, None, tmp_path / "run", reg, "tiny", log=quiet)
    capsys.readouterr()
    assert tune.main([str(tmp_path / "run"), "--data", "synthetic:60x150", "--weights", "0", "1", "4", "50",
                      "--decays", "0.4", "1.0", "--mix-weights", "0", "0.5", "--mix-decays", "0.1",
                      "--extras", "0", "5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    grid = json.loads((tmp_path / "run" / "rerank_tune-valid.json").read_text())["grid"]
    # mix 0: 4 weights x 2 decays; mix 0.5: x 2 extras
    assert len(grid) == 8 + 16 and (tmp_path / "run" / "rerank_tune-valid.png").read_bytes()[:4] == b"\x89PNG"
    for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert res["off"][k] == pytest.approx(s["valid"][k], abs=1e-5)
        assert res["transitions_alone"]["0.1"][k] == pytest.approx(s["valid"]["transitions_alone"][k], abs=1e-5)
    assert res["best"]["ndcg@10"] == max(r["ndcg@10"] for r in grid)
    assert len({r["ndcg@10"] for r in grid}) > 1, "the hybrid ranking changed nothing on any knob"

    chosen = next(r for r in grid if r["mix_weight"] == 0.5 and r["extra"] == 5 and r["weight"] == 4
                  and r["decay"] == 1.0)
    on = apply_overrides(cfg, {"eval.rerank_weight": 4.0, "eval.rerank_decay": 1.0, "eval.transitions_weight": 0.5,
                               "eval.transitions_decay": 0.1, "eval.transitions_extra": 5})
    s2, _, _ = run_protocol("select", on, data, None, tmp_path / "run", reg, "tiny", log=quiet)
    assert s2["rerank"] == {"weight": 4.0, "decay": 1.0, "vectors": "text embeddings"}
    assert s2["transitions"]["weight"] == 0.5 and s2["transitions"]["fit_on"] == "train"
    for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert s2["valid"][k] == pytest.approx(chosen[k], abs=1e-5)

    with pytest.raises(SystemExit):
        tune.main([str(tmp_path / "run"), "--data", "synthetic:60x150", "--split", "test", "--weights", "1", "2"])
    assert "a grid on test would choose on test" in capsys.readouterr().err


def test_an_int_for_a_float_setting_is_the_same_recipe():
    """`time_budget_min: 60` in a recipe file and `--time-budget 60.0` on the command line are one
    recipe: a final run must find the select run's record."""
    cfg = PipelineConfig.from_dict(TINY)
    a = apply_overrides(cfg, ["train.time_budget_min=60", "train.lr=1", "eval.rerank_weight=2"])
    b = apply_overrides(cfg, ["train.time_budget_min=60.0", "train.lr=1.0", "eval.rerank_weight=2.0"])
    assert recipe_key(a) == recipe_key(b) and a.to_dict() == b.to_dict()
    assert isinstance(a.train.time_budget_min, float) and isinstance(a.train.epochs, int)
    with pytest.raises(ValueError, match="rerank"):
        apply_overrides(cfg, ["eval.rerank_weight=-1"])
