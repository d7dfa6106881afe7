"""The offline pipeline end to end on synthetic data: it learns, exports, reloads and resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sidrec.model.bundle import BundleError, load_bundle
from sidrec.model.engine import RecommendEngine
from sidrec.training.cli import demo_config, main as cli_main
from sidrec.training.config import TrainConfig
from sidrec.training.pipeline import run_pipeline
from sidrec.training.synthetic import make_synthetic
from sidrec.training.train import lr_at, make_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data = make_synthetic(400, 1500, seed=3)
    cfg = demo_config(epochs=8)
    logs: list[str] = []
    run = run_pipeline(None, out, cfg, until="export", data=data, log=logs.append)
    return run, out, logs


@pytest.mark.slow
def test_tiny_model_beats_popularity_clearly(trained_run):
    _, out, _ = trained_run
    m = json.loads((out / "metrics.json").read_text())
    pop = m["popularity"]["recall@10"]
    assert m["recall@10"] > 2 * pop and m["recall@10"] > pop + 0.05, (m["recall@10"], pop)
    assert m["ndcg@10"] > m["popularity"]["ndcg@10"]
    assert 0.0 <= m["ndcg@10"] <= m["recall@10"] <= m["recall@100"] <= 1.0


@pytest.mark.slow
def test_bundle_round_trip_gives_identical_recommendations(trained_run):
    run, out, _ = trained_run
    bundle = load_bundle(out / "bundle")
    assert bundle.item_ids == run.data.item_ids
    assert torch.equal(bundle.sid_map, run.sid_map.to(torch.int64))
    for k, v in run.model.state_dict().items():
        assert torch.equal(v.cpu(), bundle.model.state_dict()[k]), k
    books = {k: v for k, v in bundle.codebooks.items() if k.startswith("codebook_")}
    assert books and all(v.dtype == torch.float32 for v in books.values())
    emb = bundle.codebooks["item_embeddings"]  # the base items' text embeddings, for the cold-start blend
    assert emb.dtype == torch.float16 and emb.shape == (len(bundle.item_ids), books["codebook_0"].shape[1])
    torch.testing.assert_close(emb.float(), torch.as_tensor(run.embeddings).float(), atol=1e-3, rtol=1e-2)
    assert (out / "bundle" / "report" / "learning_curves.png").is_file()
    assert (out / "bundle" / "report" / "codebook_usage.png").is_file()
    assert bundle.config["evaluation"]["recall@10"] == bundle.metrics["recall@10"]
    eng = RecommendEngine(bundle)
    hist = [list(run.split.test_history[0]), list(run.split.test_history[1])]
    a = eng.recommend(hist, 20, 10)
    b = RecommendEngine(load_bundle(out / "bundle")).recommend(hist, 20, 10)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.slow
def test_broken_bundle_is_refused(trained_run, tmp_path):
    import shutil

    _, out, _ = trained_run
    broken = tmp_path / "b"
    shutil.copytree(out / "bundle", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="model.safetensors"):
        load_bundle(broken)
    (broken / "sid_map.safetensors").unlink()
    with pytest.raises(BundleError, match="sid_map.safetensors is missing"):
        load_bundle(broken)
    assert not list(out.glob(".bundle.tmp-*")), "no temporary bundle directory may be left behind"


@pytest.mark.slow
def test_rerun_skips_fresh_stages_and_redoes_changed_ones(trained_run):
    run, out, _ = trained_run
    stamps = {p.name: p.read_text() for p in (out / "stages").glob("*.json")}
    logs: list[str] = []
    run_pipeline(None, out, demo_config(epochs=8), until="evaluate", data=run.data, log=logs.append)
    for name in ("embed.json", "sids.json", "train.json", "evaluate.json"):
        assert (out / "stages" / name).read_text() == stamps[name], f"{name} was recomputed"
    assert not any(l.startswith("train:") for l in logs)
    # A changed quantiser setting invalidates sids and everything downstream.
    cfg = demo_config(epochs=1)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "sid": {**cfg.to_dict()["sid"], "seed": 7}})
    run_pipeline(None, out / "changed", cfg, until="sids", data=run.data, log=logs.append)
    assert json.loads((out / "changed" / "stages" / "sids.json").read_text())["fingerprint"] != \
        json.loads(stamps["sids.json"])["fingerprint"]


@pytest.mark.slow
def test_spread_collisions_gives_unique_sids_without_a_dedup_digit_end_to_end(trained_run, tmp_path):
    """On the synthetic catalogue spreading removes every collision, so the SIDs lose their dedup
    digit (3 decoding steps, not 4); such a bundle trains, exports, serves and takes new items."""
    import shutil

    from sidrec.training.embeddings import render_text
    from sidrec.training.new_items import assign_new_items

    run, out, _ = trained_run
    for name in ("embeddings.npy", "item_ids.json", "stages/data.json", "stages/embed.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(out / name, tmp_path / name)  # a fresh embed stage: only the SIDs on are recomputed
    cfg = demo_config(epochs=1)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "sid": {**cfg.to_dict()["sid"], "spread_collisions": True}})
    spread = run_pipeline(None, tmp_path, cfg, until="export", data=run.data, log=lambda _: None)
    plain = json.loads((out / "report" / "sid_report.json").read_text())
    rep = json.loads((tmp_path / "report" / "sid_report.json").read_text())
    assert plain["collision_rate_before_dedup"] > 0.5  # 400 template-made items on 16 x 16 x 16 codes
    assert rep["spread_collisions"]["collision_rate_of_quantiser"] == plain["collision_rate_before_dedup"]
    assert rep["spread_collisions"]["items_moved"] > 0 and rep["collision_rate_before_dedup"] == 0.0
    assert spread.layout.cardinalities == (16, 16, 16) and spread.sid_map.shape == (3, len(run.data.item_ids))
    assert torch.equal(spread.sid_map[:2], run.sid_map[:2].to(spread.sid_map.dtype))  # first levels kept
    assert len({tuple(c) for c in spread.sid_map.T.tolist()}) == len(run.data.item_ids)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.config["sid"]["dedup_digit"] is False and bundle.sid_map.shape[0] == 3
    res = RecommendEngine(bundle).recommend([[0, 1, 2]], 20, 10)
    assert (res.items[0] >= 0).all() and len(set(res.items[0].tolist())) == 10
    new = assign_new_items(tmp_path / "bundle", [render_text(run.data.item_fields[0])])
    # Item 0's codes are held (by it, or by a closer item that kept them), so the new item moves
    # to a free code of its prefix and fits, or finds none and does not fit: never a taken SID.
    assert new.sids.shape == (1, 3) and new.nearest_existing[0] is not None
    assert bool(new.fits[0]) == (tuple(new.sids[0].tolist()) not in {tuple(c) for c in bundle.sid_map.T.tolist()})


def test_length_buckets_cover_every_window_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 21, size=1037)
    batches = make_batches(lengths, 64, rng)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1037))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert np.median(spread) <= 1, "batches should hold windows of near-equal length"


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_cli_rejects_unknown_setting_and_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown setting"):
        cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "train.nope=1"])
    rc = cli_main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "absent" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_process_smoke(tmp_path):
    """Two gloo ranks train one epoch together and rank 0 writes the checkpoint."""
    data_dir = tmp_path / "data"
    assert cli_main(["synth", "--out", str(data_dir), "--items", "120", "--users", "300"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "sidrec.training.cli", "train", "--data", str(data_dir), "--out", str(tmp_path / "run"),
           "--until", "train", "--set", "train.epochs=1", "--set", "train.d_model=32", "--set", "train.n_heads=2",
           "--set", "train.d_head=16", "--set", "train.d_ff=64", "--set", "train.n_enc_layers=1",
           "--set", "train.n_dec_layers=1", "--set", "train.eval_users=50", "--set", "sid.codebook_size=8",
           "--set", "train.batch_size=64", "--set", "train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()
    stamp = json.loads((tmp_path / "run" / "stages" / "train.json").read_text())
    assert stamp["epochs_run"] == 1


@pytest.mark.slow
def test_new_item_gets_the_sid_of_its_text_without_retraining(trained_run):
    from sidrec.training.embeddings import render_text
    from sidrec.training.new_items import assign_new_items

    run, out, _ = trained_run
    texts = [render_text(run.data.item_fields[p]) for p in (0, 1)]
    res = assign_new_items(out / "bundle", texts + texts[:1])
    sid_map = run.sid_map.numpy()
    for j, p in enumerate((0, 1, 0)):
        # Same text as an existing item -> same codes, and a dedup digit no other item holds.
        assert res.sids[j, :-1].tolist() == sid_map[:-1, p].tolist()
    assert res.sids[0, -1] != res.sids[2, -1]
    existing = {tuple(c) for c in sid_map.T.tolist()}
    assert not any(tuple(s) in existing for s in res.sids.tolist())
    assert res.nearest_existing[0] is not None


@pytest.mark.parametrize("arch,objective", [("encoder_decoder", "windows"), ("decoder_only", "windows"),
                                            ("decoder_only", "packed")])
def test_both_architectures_train_and_decode(arch, objective):
    """A few steps of either architecture lower the loss and its checkpoint decodes valid items."""
    from sidrec.kernels.trie import PrefixTrie
    from sidrec.model.beam_search import beam_search, encode_histories
    from sidrec.model.config import SIDLayout
    from sidrec.training.data import leave_one_out, sliding_windows
    from sidrec.training.train import WindowSet, train_model

    torch.set_num_threads(1)
    data = make_synthetic(120, 300, seed=5)
    sp = leave_one_out(data)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, size=(3, data.num_items))
    from sidrec.model.sid_assign import append_dedup_digit

    sid, dcard = append_dedup_digit(torch.as_tensor(codes))
    layout = SIDLayout((8, 8, 8, dcard))
    cfg = TrainConfig(arch=arch, d_model=32, n_heads=2, d_head=16, d_ff=64, n_enc_layers=1, n_dec_layers=1,
                      batch_size=64, epochs=2, warmup_steps=5, lr=3e-3, eval_users=50, dtype="float32",
                      objective=objective)
    from sidrec.training.packing import PackedSet

    data = PackedSet.from_sequences(sp.train, 20) if objective == "packed" else WindowSet(*sliding_windows(sp.train, 20))
    res = train_model(cfg, layout, sid, data, sp.valid_history,
                      np.asarray(sp.valid_target), progress=False, log=lambda s: None)
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    trie = PrefixTrie.build(sid, layout.cardinalities)
    src, mask = encode_histories([list(h) for h in sp.test_history[:4]], sid, res.model.offsets, 20)
    out = beam_search(res.model, trie, src, mask, 16, 5)
    assert (out.items >= 0).all() and (out.n_valid == 5).all()
    assert torch.equal(trie.lookup(out.sids.reshape(-1, 4)).reshape(4, 5), out.items)


@pytest.mark.slow
def test_refit_on_train_plus_valid_resumes_from_its_own_checkpoint(tmp_path):
    data = make_synthetic(120, 300, seed=9)
    cfg = demo_config(epochs=1)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "refit_epochs": 1}})
    logs: list[str] = []
    run_pipeline(None, tmp_path, cfg, until="train", data=data, log=logs.append)
    assert any("refit for 1 epoch" in l for l in logs)
    assert (tmp_path / "checkpoints" / "refit.safetensors").is_file()
    stamp = json.loads((tmp_path / "stages" / "train.json").read_text())
    assert stamp["refit_epochs"] == 1
    logs.clear()
    run = run_pipeline(None, tmp_path, cfg, until="train", data=data, log=logs.append)
    from safetensors.torch import load_file

    refit = load_file(str(tmp_path / "checkpoints" / "refit.safetensors"))
    assert all(torch.equal(refit[k], v) for k, v in run.model.state_dict().items())
    assert not any("refit" in l for l in logs), "a fresh train stage must not refit again"


def test_fit_on_train_plus_valid_trains_on_every_validation_target(tmp_path):
    """fit_on=train+valid trains on seq[:-1] windows (one more target per user) with no
    validation-based selection; the schedule runs to its end and the last epoch is kept."""
    from sidrec.training.data import leave_one_out, sliding_windows

    data = make_synthetic(120, 300, seed=4)
    cfg = demo_config(epochs=2)
    d = cfg.to_dict()
    cfg = type(cfg).from_dict({**d, "train": {**d["train"], "fit_on": "train+valid"}})
    logs: list[str] = []
    run_pipeline(None, tmp_path, cfg, until="train", data=data, log=logs.append)
    sp = leave_one_out(data)
    n_valid_fit = len(sliding_windows(sp.test_history, cfg.train.max_history)[2])
    assert n_valid_fit == len(sliding_windows(sp.train, cfg.train.max_history)[2]) + data.num_users
    assert any(f"train: {n_valid_fit} training targets" in l and "train+valid" in l for l in logs)
    stamp = json.loads((tmp_path / "stages" / "train.json").read_text())
    assert stamp["best_epoch"] == stamp["epochs_run"] == 2
    assert not any("valid_recall@10" in l for l in logs)
    with pytest.raises(ValueError, match="refit_epochs"):
        TrainConfig(fit_on="train+valid", refit_epochs=1)


def test_auto_dtype_is_bf16_only_where_it_is_fast(monkeypatch):
    import sidrec.model.engine as engine_mod
    from sidrec.training import train as train_mod

    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: False)
    assert train_mod.autocast_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: True)
    assert train_mod.autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert train_mod.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert train_mod.autocast_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp16")
