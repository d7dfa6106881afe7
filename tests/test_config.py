"""Pipeline configuration files and the shipped recipes: what `sidrec train --config` reads."""
from __future__ import annotations

import json

import pytest

from sidrec.training.cli import main as sidrec_main
from sidrec.training.config import PipelineConfig, load_config, recipe_names


def test_shipped_recipes_parse_and_differ_from_defaults():
    names = recipe_names()
    assert {"beauty-cpu", "beauty-gpu"} <= set(names)
    default = PipelineConfig()
    for name in names:
        cfg = load_config(name)
        assert cfg != default, f"recipe {name} changes nothing"
    cpu = load_config("beauty-cpu")
    assert cpu.train.arch == "decoder_only" and cpu.train.objective == "packed"
    assert cpu.train.fit_on == "train+valid" and cpu.sid.balanced
    assert cpu.train.time_budget_min is not None and cpu.train.time_budget_min <= 85  # a 90-minute run
    gpu = load_config("beauty-gpu")
    assert gpu.train.device == "cuda" and gpu.train.time_budget_min is None


def test_config_file_overrides_only_what_it_names(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"_note": "comments are ignored", "train": {"epochs": 3}, "sid": {"levels": 2}}))
    cfg = load_config(f)
    assert cfg.train.epochs == 3 and cfg.sid.levels == 2
    assert cfg.train.lr == PipelineConfig().train.lr and cfg.embed == PipelineConfig().embed


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"trian": {}}', "unknown sections ['trian']"),
    ('{"train": {"epoch": 3}}', "unknown TrainConfig keys: ['epoch']"),
    ('{"train": {"fit_on": "everything"}}', "train.fit_on must be"),
])
def test_bad_config_file_names_the_problem(tmp_path, content, needle):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        load_config(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_unknown_recipe_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="beauty-cpu"):
        load_config("beauty-tpu")
    assert sidrec_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                        "--config", "beauty-tpu"]) == 2
    err = capsys.readouterr().err
    assert "beauty-tpu" in err and "beauty-gpu" in err
