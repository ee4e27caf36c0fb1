"""Batching and bad-case handling of contract datasets."""

import pytest
import torch

from anatomy_vlp_bundle.data.dataset import SkippingDataset, TooManyBadCases, vlp_collate


class _Flaky(torch.utils.data.Dataset):
    def __init__(self, n, bad):
        self.data = [{"id": f"case_{i}"} for i in range(n)]
        self.bad = set(bad)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i in self.bad:
            raise ValueError(f"/data/case_{i}.nii.gz: truncated")
        return {"id": self.data[i]["id"], "image": torch.full((1, 4, 4), float(i)),
                "sentences": [["a."], []], "report": f"r{i}"}


def test_collate_keeps_text_as_lists_and_stacks_tensors():
    ds = _Flaky(3, bad=[])
    batch = vlp_collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 4, 4)
    assert batch["sentences"] == [[["a."], []]] * 3
    assert batch["id"] == ["case_0", "case_1", "case_2"]


def test_bad_case_is_skipped_and_listed():
    ds = SkippingDataset(_Flaky(200, bad=[5]), max_bad_fraction=0.01)
    samples = [ds[i] for i in range(10)]
    assert samples[5] is None
    assert ds.bad_cases == [(5, "case_5", "ValueError: /data/case_5.nii.gz: truncated")]
    batch = vlp_collate(samples)
    assert batch["image"].shape[0] == 9 and "case_5" not in batch["id"]
    assert vlp_collate([None, None]) == {}


def test_more_than_one_percent_bad_stops_the_run():
    ds = SkippingDataset(_Flaky(100, bad=[1, 2]), max_bad_fraction=0.01)
    assert ds[1] is None  # 1 of 100 is still tolerated
    with pytest.raises(TooManyBadCases, match="case_1.*case_2|2 of 100"):
        ds[2]
