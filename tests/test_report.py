"""snnet.report: the one count parser and the one percentile helper; snnet.sampling's one seeding helper."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from snnet.report import human, parse_count, percentile
from snnet.sampling import seed_everything


@pytest.mark.parametrize("text, value", [("20G", 2e10), ("5.5m", 5.5e6), ("1e9", 1e9), (" 10k ", 1e4), (".5T", 5e11), ("7", 7.0)])
def test_counts_read_back(text: str, value: float) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("n", [0, 999, 1234567, 5.9e9])
def test_what_human_writes_reads_back(n: float) -> None:
    assert parse_count(human(n)) == pytest.approx(n, rel=5e-3)


@pytest.mark.parametrize("n, text", [(999_999, "1.00M"), (999_994, "999.99K"), (999_000, "999.00K"), (999.6, "1.00K"), (999.4, "999"), (-999_999, "-1.00M"),
                                     (1_234_567, "1.23M"), (999_999_999, "1.00G")])
def test_a_count_that_rounds_up_to_the_next_unit_is_written_in_it(n: float, text: str) -> None:
    assert human(n) == text  # not "1000.00K"


@pytest.mark.parametrize("text", ["", "G", "1.2.3", "5 MB", "-3", "1x"])
def test_what_is_not_a_count_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_count(text)


def test_percentiles_interpolate_or_take_an_observed_value() -> None:
    values = [9.0, 1.0, 5.0, 3.0, 7.0, 2.0]
    assert percentile(values, 0.5) == 4.0  # between 3 and 5
    assert percentile(values, 0.9) == pytest.approx(float(torch.tensor(values).double().quantile(0.9)))
    assert percentile(values, 0.5, nearest=True) == 3.0  # 3 of 6 values are at or below it
    assert percentile(values, 0.95, nearest=True) == 9.0
    assert percentile(range(1, 21), 0.95, nearest=True) == 19  # 19 of 20 at or below: the 95th
    assert math.isnan(percentile([], 0.5)) and math.isnan(percentile([], 0.95, nearest=True))


@pytest.mark.parametrize("cuda", [True, False])
def test_one_seed_gives_the_same_draws_from_every_generator(cuda: bool) -> None:
    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    seed_everything(2**40 + 7, cuda=cuda)  # numpy takes 32 bits of it
    first = draws()
    seed_everything(2**40 + 7, cuda=cuda)
    assert draws() == first
    seed_everything(8, cuda=cuda)
    assert all(a != b for a, b in zip(draws(), first))
