"""Synthetic interaction data with learnable structure, and a P5 writer.

`make_synthetic` builds a small beauty-shop catalogue (category paths x brands, generated titles,
prices) and user sequences a sequence model can learn far beyond popularity:
- every user likes one or two leaf categories;
- every item has three "successor" items in its own category; the next item is one of the
  previous item's successors with probability `p_successor` (weights 0.6/0.3/0.1), otherwise a
  random item of the user's categories (or, rarely, of any category);
- successors are drawn uniformly, so item popularity is fairly flat and a popularity baseline is
  weak, while "most frequent successor of the last item" is a strong oracle.
Titles share words within a category (its nouns and descriptors) and brands are tied to a few
categories, so text embeddings, and SIDs built from them, reflect the structure.

Deterministic given the seed. Item and user ids are "1".."N" so `write_p5` output reads back
identically with `training.data.read_p5` (same fingerprint too). This module is not a benchmark.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from sidrec.training.data import DataError, InteractionData, P5_ITEM_FILES, P5_SEQUENCES, fingerprint_bytes, p5_options

# (leaf path under "Beauty", nouns, descriptors, base price)
_CATEGORIES = [
    ("Skin Care > Face > Cleansers", ["cleanser", "face wash", "cleansing foam"], ["foaming", "gentle", "purifying"], 14),
    ("Skin Care > Face > Moisturizers", ["moisturizer", "day cream", "face lotion"], ["hydrating", "nourishing", "spf"], 28),
    ("Skin Care > Face > Serums", ["serum", "essence", "ampoule"], ["vitamin c", "retinol", "brightening"], 35),
    ("Skin Care > Eyes > Eye Creams", ["eye cream", "eye gel", "eye balm"], ["depuffing", "firming", "caffeine"], 30),
    ("Skin Care > Body > Body Lotions", ["body lotion", "body butter", "body milk"], ["shea", "cocoa", "silky"], 12),
    ("Skin Care > Sun > Sunscreens", ["sunscreen", "sun lotion", "sun spray"], ["spf 50", "mineral", "water resistant"], 16),
    ("Makeup > Face > Foundations", ["foundation", "bb cream", "tinted fluid"], ["matte", "full coverage", "luminous"], 25),
    ("Makeup > Face > Concealers", ["concealer", "corrector", "cover stick"], ["creamy", "full coverage", "brightening"], 18),
    ("Makeup > Eyes > Mascaras", ["mascara", "lash primer", "lash serum"], ["volumizing", "lengthening", "waterproof"], 15),
    ("Makeup > Eyes > Eyeshadows", ["eyeshadow palette", "eye shadow", "shadow stick"], ["shimmer", "smoky", "nude"], 22),
    ("Makeup > Lips > Lipsticks", ["lipstick", "lip crayon", "lip tint"], ["velvet", "matte", "long wear"], 17),
    ("Makeup > Lips > Lip Glosses", ["lip gloss", "lip oil", "lip lacquer"], ["glossy", "plumping", "sheer"], 13),
    ("Makeup > Nails > Nail Polish", ["nail polish", "nail lacquer", "nail color"], ["glitter", "crackle", "quick dry"], 9),
    ("Makeup > Nails > Nail Treatments", ["base coat", "top coat", "cuticle oil"], ["strengthening", "ridge filling", "gel effect"], 10),
    ("Hair Care > Shampoos", ["shampoo", "clarifying wash", "dry shampoo"], ["volumizing", "sulfate free", "repair"], 11),
    ("Hair Care > Conditioners", ["conditioner", "hair mask", "leave in treatment"], ["argan", "keratin", "detangling"], 12),
    ("Hair Care > Styling > Hair Sprays", ["hair spray", "texturizing spray", "finishing mist"], ["strong hold", "flexible", "humidity proof"], 10),
    ("Hair Care > Styling Tools > Flat Irons", ["flat iron", "hair straightener", "styling iron"], ["ceramic", "tourmaline", "titanium"], 60),
    ("Hair Care > Styling Tools > Hair Dryers", ["hair dryer", "blow dryer", "diffuser dryer"], ["ionic", "ceramic", "compact"], 55),
    ("Fragrance > Women > Eau de Parfum", ["eau de parfum", "perfume spray", "parfum"], ["floral", "oriental", "musk"], 65),
    ("Fragrance > Men > Cologne", ["cologne", "eau de toilette", "aftershave"], ["woody", "citrus", "aquatic"], 55),
    ("Tools & Accessories > Brushes > Makeup Brushes", ["brush set", "foundation brush", "blending brush"], ["synthetic", "kabuki", "angled"], 20),
    ("Tools & Accessories > Sponges > Makeup Sponges", ["makeup sponge", "beauty blender", "sponge set"], ["latex free", "teardrop", "microfiber"], 8),
    ("Bath & Body > Bath > Bath Salts", ["bath salts", "bath bomb", "soaking salts"], ["lavender", "eucalyptus", "detox"], 9),
]
_BRANDS = ["Lumina", "Aurelia", "Kestrel", "Nomada", "Velour", "Brisa", "Odette", "Marisol", "Talon",
           "Verdant", "Cirrus", "Halcyon", "Pomme", "Saffra", "Ondine", "Rivelle", "Zephra", "Mirelle",
           "Calyx", "Boreal", "Sable", "Elowen", "Juniper", "Amaro", "Solenne", "Quill", "Tamsin",
           "Vireo", "Ysolde", "Fennel"]
_ADJECTIVES = ["Classic", "Ultra", "Pure", "Daily", "Pro", "Essential", "Radiant", "Soft", "Intense", "Fresh"]
_SIZES = ["1 oz", "1.7 oz", "3.4 oz", "6.8 oz", "0.5 fl oz", "2 pack", "8 oz", "250 ml"]
SUCCESSOR_WEIGHTS = np.array([0.6, 0.3, 0.1])


def _catalogue(num_items: int, rng: np.random.Generator) -> tuple[list[dict[str, str]], np.ndarray]:
    """Item fields and each item's category index; categories get near-equal item counts."""
    n_cat = min(len(_CATEGORIES), max(1, num_items // 4))
    cat_of = rng.permutation(np.arange(num_items) % n_cat)  # (N,)
    # each brand sells in three categories; each category keeps the brands that chose it
    brand_cats = [rng.choice(n_cat, size=min(3, n_cat), replace=False) for _ in _BRANDS]
    brands_of_cat = [[b for b, cs in enumerate(brand_cats) if c in cs] or [c % len(_BRANDS)] for c in range(n_cat)]
    fields = []
    for i in range(num_items):
        c = int(cat_of[i])
        path, nouns, descriptors, base = _CATEGORIES[c]
        brand = _BRANDS[int(rng.choice(brands_of_cat[c]))]
        title = (f"{brand} {_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} "
                 f"{descriptors[rng.integers(len(descriptors))].title()} {nouns[rng.integers(len(nouns))].title()} "
                 f"No. {rng.integers(1, 100)}, {_SIZES[rng.integers(len(_SIZES))]}")
        price = base * float(np.exp(rng.normal(0.0, 0.3)))
        fields.append({"title": title, "categories": f"Beauty > {path}", "brand": brand, "price": f"{price:.2f}"})
    return fields, cat_of


def make_synthetic(num_items: int = 400, num_users: int = 1500, *, seed: int = 0, min_len: int = 5,
                   max_len: int = 20, p_successor: float = 0.75, p_taste: float = 0.2) -> InteractionData:
    """A structured synthetic dataset (see the module docstring). Deterministic given `seed`."""
    if num_items < 4:
        raise ValueError(f"num_items must be >= 4 (each item needs 3 successors), got {num_items}")
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len (leave-one-out needs 3), got {min_len}, {max_len}")
    if not (0 <= p_successor and 0 <= p_taste and p_successor + p_taste <= 1):
        raise ValueError(f"p_successor + p_taste must lie in [0, 1], got {p_successor} + {p_taste}")
    rng = np.random.default_rng(seed)
    fields, cat_of = _catalogue(num_items, rng)
    n_cat = int(cat_of.max()) + 1
    members = [np.flatnonzero(cat_of == c) for c in range(n_cat)]
    successors = np.empty((num_items, 3), dtype=np.int64)  # (N, 3) ranked successors
    for i in range(num_items):
        pool = members[cat_of[i]][members[cat_of[i]] != i]
        if len(pool) < 3:  # tiny category: borrow from the whole catalogue
            pool = np.setdiff1d(np.arange(num_items), [i])
        successors[i] = rng.choice(pool, size=3, replace=False)

    sequences = []
    for _ in range(num_users):
        tastes = rng.choice(n_cat, size=1 if rng.random() < 0.5 or n_cat == 1 else 2, replace=False)
        liked = np.concatenate([members[c] for c in tastes])
        n = int(rng.integers(min_len, max_len + 1))
        seq = np.empty(n, dtype=np.int64)
        seq[0] = rng.choice(liked)
        u = rng.random(n)
        for t in range(1, n):
            if u[t] < p_successor:
                seq[t] = successors[seq[t - 1], rng.choice(3, p=SUCCESSOR_WEIGHTS)]
            elif u[t] < p_successor + p_taste:
                seq[t] = rng.choice(liked)
            else:
                seq[t] = rng.integers(num_items)
        sequences.append(seq)
    data = InteractionData(f"synthetic-{num_items}x{num_users}-s{seed}", [str(i + 1) for i in range(num_items)],
                           fields, [str(u + 1) for u in range(num_users)], sequences, "")
    return dataclasses.replace(data, fingerprint=fingerprint_bytes(_p5_bytes(data), p5_options()))


def _p5_bytes(data: InteractionData) -> tuple[bytes, bytes]:
    """(sequential_data.txt, item_text.tsv) contents for `data`; raises DataError if P5 cannot hold it."""
    for kind, ids in (("item", data.item_ids), ("user", data.user_ids)):
        bad = next((x for x in ids if not (x.isascii() and x.isdigit())), None)
        if bad is not None:
            raise DataError(f"P5 needs integer {kind} ids; {kind} id {bad!r} is not one")
    columns: dict[str, None] = {}
    for f in data.item_fields:
        columns.update(dict.fromkeys(f))
    lines = ["\t".join(["item_id", *columns])]
    for iid, f in zip(data.item_ids, data.item_fields):
        for k, v in f.items():
            if "\t" in v or "\n" in v or "\r" in v or v != v.strip():
                raise DataError(f"item {iid!r}: field {k!r} has a tab, newline or edge whitespace, "
                                f"which item_text.tsv cannot hold: {v[:60]!r}")
        lines.append("\t".join([iid, *(f.get(c, "") for c in columns)]))
    items = ("\n".join(lines) + "\n").encode("utf-8")
    ids = data.item_ids
    seqs = "".join(" ".join([u, *(ids[i] for i in s)]) + "\n" for u, s in zip(data.user_ids, data.sequences))
    return seqs.encode("utf-8"), items


def _write_atomic(path: Path, content: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_p5(data: InteractionData, directory: str | Path) -> Path:
    """Write `sequential_data.txt` and `item_text.tsv` (header: item_id + field names) into
    `directory`, each atomically, so `read_p5(directory)` returns the same data. Returns the directory."""
    directory = Path(directory)
    seqs, items = _p5_bytes(data)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / P5_ITEM_FILES[0], items)
    _write_atomic(directory / P5_SEQUENCES, seqs)
    return directory
