"""Pure pieces of the toy pretraining recipe."""

from __future__ import annotations

import pytest
import torch

from flowrl.toy.pretrain import lr_at, make_dataset, shift_time


def test_shift_time_matches_sd3_schedule():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(shift_time(t, 1.0), t)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_dataset_is_seeded_and_captioned():
    a, b = make_dataset(6, seed=5, resolution=32), make_dataset(6, seed=5, resolution=32)
    assert torch.equal(a.images, b.images) and torch.equal(a.prompt_ids, b.prompt_ids)
    assert a.images.shape == (6, 3, 32, 32) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert len(a.prompts) == 236 and all(0 <= i < 236 for i in a.prompt_ids.tolist())


def test_dataset_does_not_depend_on_the_number_of_workers(monkeypatch):
    import flowrl.toy.pretrain as pt

    monkeypatch.setattr(pt, "CHUNK", 4)
    a, b = pt.make_dataset(10, seed=3, resolution=32, workers=1), pt.make_dataset(10, seed=3, resolution=32, workers=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.prompt_ids, b.prompt_ids)
    assert not torch.equal(a.images[:4], a.images[4:8]), "chunks must be seeded apart"


def test_tag_weights_set_the_odds_of_each_tag():
    from collections import Counter

    from flowrl.errors import FlowrlError
    from flowrl.toy.prompts import all_records
    from flowrl.toy.pretrain import tag_odds

    tags = sorted({r.tag for r in all_records()})
    odds = tag_odds(tags, (("position", 3.0), ("colors", 0.0)))
    assert odds[tags.index("position")] == pytest.approx(3 / 7) and odds[tags.index("colors")] == 0.0
    assert tag_odds(tags, ()) is None  # the shipped recipe: uniform
    data = make_dataset(600, seed=1, resolution=32, tag_weights=(("position", 3.0), ("colors", 0.0)))
    seen = Counter(all_records()[int(i)].tag for i in data.prompt_ids)
    assert seen["colors"] == 0 and seen["position"] > 2 * max(seen[t] for t in tags if t != "position")
    for bad in ((("positon", 1.0),), (("position", -1.0),), tuple((t, 0.0) for t in tags)):
        with pytest.raises(FlowrlError):
            tag_odds(tags, bad)
