"""Readers, leave-one-out split, sliding windows and popularity (training/data.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sidrec.training.data import (DataError, InteractionData, leave_one_out, load_dataset, popularity, read_interactions,
                           read_p5, read_recbole, sliding_windows)

ITEM_TEXT = ("item_id\tasin\ttitle\tcategories\tbrand\n"
             "1\tA1\tRed Lipstick\tBeauty > Makeup > Lips\tAcme\n"
             "2\tA2\tBlue Mascara\tBeauty > Makeup > Eyes\t\n"
             "3\tA3\tGreen Shampoo\tBeauty > Hair\tHairCo\n"
             "4\tA4\tFace Wash\tBeauty > Skin\tAcme\n")


def _p5(tmp_path, seqs="1 1 2 3\n2 4 3 2 1\n3 2 4 1\n", items=ITEM_TEXT, items_name="item_text.tsv"):
    d = tmp_path / "p5"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sequential_data.txt").write_text(seqs)
    (d / items_name).write_text(items)
    return d


def _data(seqs: list[list[int]], n_items: int = 10) -> InteractionData:
    return InteractionData("tiny", [str(i) for i in range(n_items)], [{"title": f"t{i}"} for i in range(n_items)],
                           [f"u{u}" for u in range(len(seqs))], [np.array(s, dtype=np.int64) for s in seqs], "fp")


def test_leave_one_out_on_hand_made_data():
    split = leave_one_out(_data([[0, 1, 2, 3, 4], [5, 6, 7], [9, 8, 7, 6]]))
    assert [s.tolist() for s in split.train] == [[0, 1, 2], [5], [9, 8]]
    assert [s.tolist() for s in split.valid_history] == [[0, 1, 2], [5], [9, 8]]
    assert split.valid_target.tolist() == [3, 6, 7]
    assert [s.tolist() for s in split.test_history] == [[0, 1, 2, 3], [5, 6], [9, 8, 7]]
    assert split.test_target.tolist() == [4, 7, 6]
    assert split.valid_target.dtype == np.int64 and split.test_target.dtype == np.int64
    with pytest.raises(DataError, match="'u1'"):
        leave_one_out(_data([[0, 1, 2], [3, 4]]))


def test_read_p5(tmp_path):
    data = read_p5(_p5(tmp_path))
    assert data.item_ids == ["1", "2", "3", "4"]
    assert data.user_ids == ["1", "2", "3"]
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2], [3, 2, 1, 0], [1, 3, 0]]
    assert data.item_fields[0] == {"asin": "A1", "title": "Red Lipstick", "categories": "Beauty > Makeup > Lips",
                                   "brand": "Acme"}
    assert "brand" not in data.item_fields[1]  # empty fields are omitted, not ""
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 10)
    assert len(data.fingerprint) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert read_p5(_p5(elsewhere)).fingerprint == data.fingerprint  # same bytes elsewhere, same fingerprint
    assert read_p5(_p5(tmp_path, seqs="1 1 2 3\n2 4 3 2 1\n3 2 4 2\n")).fingerprint != data.fingerprint


def test_read_p5_titles_fallback_without_header(tmp_path):
    d = _p5(tmp_path, items="1\tA1\tRed\n2\tA2\tBlue\n3\tA3\t\n4\tA4\tFour\n", items_name="item_titles.tsv")
    with pytest.warns(UserWarning, match=r"1 items have no text.*'3'"):
        data = read_p5(d)
    assert data.item_fields[0] == {"asin": "A1", "title": "Red"}
    d2 = _p5(tmp_path / "t", items="item_id\ttitle\n1\tRed\n2\tBlue\n3\tGreen\n4\tFour\n", items_name="item_titles.tsv")
    assert read_p5(d2).item_fields[2] == {"title": "Green"}


def test_read_p5_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_p5(tmp_path / "nope")
    d = _p5(tmp_path)
    (d / "sequential_data.txt").write_text("1 1 2 3\n2 4 3 2 1\n3 2 x 1\n")
    with pytest.raises(DataError, match=r"sequential_data.txt:3:.*'x'"):
        read_p5(d)
    (d / "sequential_data.txt").write_text("1 1 2 3\n2 4 3 9 1\n")
    with pytest.raises(DataError, match=r"sequential_data.txt:2: item '9'"):
        read_p5(d)
    (d / "sequential_data.txt").write_text("1 1 2 3\n1 4 3 2\n")
    with pytest.raises(DataError, match=r":2: user '1' already appears on line 1"):
        read_p5(d)
    (d / "sequential_data.txt").unlink()
    with pytest.raises(DataError, match="sequential_data.txt"):
        read_p5(d)
    d = _p5(tmp_path / "b", items=ITEM_TEXT + "5\tA5\tonly three\n")
    with pytest.raises(DataError, match=r"item_text.tsv:6: expected 5 tab-separated fields"):
        read_p5(d)
    d = _p5(tmp_path / "c", items=ITEM_TEXT + "4\tA4\tdup\tBeauty\tX\n")
    with pytest.raises(DataError, match=r"item id '4' already defined on line 5"):
        read_p5(d)
    d = _p5(tmp_path / "e", items="item_id\tasin\ttitle\n")
    with pytest.raises(DataError, match="catalogue is empty"):
        read_p5(d)
    d = _p5(tmp_path / "f")
    (d / "item_text.tsv").unlink()
    with pytest.raises(DataError, match="item_text.tsv or item_titles.tsv"):
        read_p5(d)


def test_short_users_dropped_with_warning_or_strict_error(tmp_path):
    d = _p5(tmp_path, seqs="1 1 2 3\n7 4\n2 4 3 2 1\n8\n")
    with pytest.warns(UserWarning, match=r"2 of 4 users have fewer than 3.*'7', '8'"):
        data = read_p5(d)
    assert data.user_ids == ["1", "2"]
    with pytest.raises(DataError, match="fewer than 3"):
        read_p5(d, strict=True)
    with pytest.warns(UserWarning, match=r"1 of 4 users have fewer than 1 interactions.*'8'"):
        assert read_p5(d, min_interactions=1).user_ids == ["1", "7", "2"]


def _tables(tmp_path, fmt: str):
    inter = pd.DataFrame({
        "user_id": ["u1", "u2", "u1", "u1", "u2", "u2", "u1", "u3", "u3", "u3"],
        "item_id": ["b", "a", "a", "c", "c", "b", "d", "a", "b", "c"],
        "timestamp": [30, 5, 10, 30, 1, 9, 40, 3, 2, 1],  # u1: a(10) b(30) c(30, later row) d(40)
    })
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["Alpha", "Beta", "Gamma", "Delta"],
                          "price": ["1.5", "", "3", "4"], "brand": ["X", "Y", "Z", "W"]})
    ip, tp = tmp_path / f"interactions.{fmt}", tmp_path / f"items.{fmt}"
    if fmt == "parquet":
        inter.to_parquet(ip)
        items.to_parquet(tp)
    else:
        inter.to_csv(ip, index=False)
        items.to_csv(tp, index=False)
    return ip, tp


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_read_interactions(tmp_path, fmt):
    ip, tp = _tables(tmp_path, fmt)
    data = read_interactions(ip, tp)
    assert data.item_ids == ["a", "b", "c", "d"]
    assert data.user_ids == ["u1", "u2", "u3"]  # order of first appearance
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2, 3], [2, 0, 1], [2, 1, 0]]  # ties keep file order
    assert data.item_fields[1] == {"title": "Beta", "brand": "Y"}
    assert read_interactions(ip, tp, text_columns=["title"]).item_fields[0] == {"title": "Alpha"}
    assert load_dataset(tmp_path).fingerprint == data.fingerprint


def test_read_interactions_bad_input(tmp_path):
    ip, tp = _tables(tmp_path, "csv")
    with pytest.raises(DataError, match=r"missing column\(s\) \['ts'\]"):
        read_interactions(ip, tp, time_col="ts")
    with pytest.raises(DataError, match="does not exist"):
        read_interactions(tmp_path / "missing.csv", tp)
    pd.DataFrame({"user_id": ["u1"] * 3, "item_id": ["a", "zz", "b"], "timestamp": [1, 2, 3]}).to_csv(ip, index=False)
    with pytest.raises(DataError, match=r"interactions.csv:3: item 'zz' is not in the item table"):
        read_interactions(ip, tp)
    pd.DataFrame({"user_id": ["u1"] * 3, "item_id": ["a", "c", "b"], "timestamp": [1, "soon", 3]}).to_csv(ip, index=False)
    with pytest.raises(DataError, match=r"interactions.csv:3: 'timestamp' must be a number or a date"):
        read_interactions(ip, tp)
    pd.DataFrame({"item_id": [], "title": []}).to_csv(tp, index=False)
    with pytest.raises(DataError, match="catalogue is empty"):
        read_interactions(ip, tp)


def test_read_recbole(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    (d / "toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                 "7\t10\t5\t300\n7\t11\t4\t100\n8\t12\t3\t5\n7\t12\t5\t200\n8\t10\t1\t6\n8\t11\t2\t7\n")
    (d / "toy.item").write_text("item_id:token\ttitle:token_seq\tcategories:token_seq\n"
                                "10\tTen lipstick\tBeauty Lips\n11\tEleven\t\n12\tTwelve cream\tBeauty Skin\n")
    data = read_recbole(d)
    assert data.item_ids == ["10", "11", "12"] and data.user_ids == ["7", "8"]
    assert [s.tolist() for s in data.sequences] == [[1, 2, 0], [2, 0, 1]]
    assert data.item_fields[1] == {"title": "Eleven"}
    assert read_recbole(d / "toy").fingerprint == data.fingerprint
    assert load_dataset(d).fingerprint == data.fingerprint
    (d / "toy.item").unlink()
    with pytest.raises(DataError, match=r"toy.item does not exist"):
        read_recbole(d)


def test_load_dataset_detects_p5_and_rejects_unknown(tmp_path):
    assert load_dataset(_p5(tmp_path)).num_users == 3
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no known dataset layout.*readme.txt"):
        load_dataset(tmp_path / "empty")


def _windows_naive(train, H):
    rows = []
    for s in train:
        for t in range(1, len(s)):
            h = list(s[max(0, t - H):t])
            rows.append(([-1] * (H - len(h)) + h, len(h), s[t]))
    return rows


@pytest.mark.parametrize("H", [1, 3, 20])
def test_sliding_windows_match_definition(H):
    rng = np.random.default_rng(H)
    lens = np.concatenate([[0, 1, 2], rng.integers(0, 30, size=40)])
    train = [rng.integers(0, 50, size=n).astype(np.int64) for n in lens]
    hist, hlen, target = sliding_windows(train, H)
    S = int(np.maximum(lens - 1, 0).sum())
    assert hist.shape == (S, H) and hlen.shape == (S,) and target.shape == (S,)
    assert hist.dtype == hlen.dtype == target.dtype == np.int64
    naive = _windows_naive(train, H)
    assert hist.tolist() == [r[0] for r in naive]
    assert hlen.tolist() == [r[1] for r in naive]
    assert target.tolist() == [r[2] for r in naive]


def test_sliding_windows_empty_and_popularity():
    hist, hlen, target = sliding_windows([np.array([3]), np.array([], dtype=np.int64)], 4)
    assert hist.shape == (0, 4) and len(hlen) == len(target) == 0
    rng = np.random.default_rng(7)
    train = [rng.integers(0, 9, size=n) for n in (4, 0, 7)]
    pop = popularity(train, 12)
    assert pop.shape == (12,) and pop.sum() == 11 and pop[9:].sum() == 0
    assert pop.tolist() == np.bincount(np.concatenate(train), minlength=12).tolist()
