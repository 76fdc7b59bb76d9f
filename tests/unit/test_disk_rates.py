"""Which chunks an instance loads from the tier's disk: none before it has prefilled anything (the
first request after a restart is computed); then, until it has measured its disk reads, two chunks
of a prompt (to measure the disk); then all of them where reading is faster than computing, none
where it is slower."""

from __future__ import annotations

import json
import time

import pytest

from pdrun.pd.rates import Rates


def measured_prefill(rates: Rates, tokens: int = 4096, seconds: float = 0.02) -> None:
    rates.step(tokens)
    time.sleep(seconds)
    rates.step(0)  # the step of `tokens` took the time to this one


def test_nothing_measured_means_no_verdict():
    rates = Rates(chunk_size=256)
    assert rates.disk_pays() is None and rates.disk_chunks(10) == 0  # nothing prefilled yet: compute
    measured_prefill(rates)
    assert rates.disk_pays() is None and rates.disk_chunks(10) == Rates.PROBE_CHUNKS and rates.disk_chunks(1) == 1
    rates = Rates(chunk_size=256)
    rates.disk_read({"cache_disk_loaded_tokens": 512, "cache_disk_load_seconds": 0.05})
    assert rates.disk == 10240 and rates.disk_pays() is None  # prefill not measured yet


def test_prefill_is_measured_from_steps_that_compute_a_chunk_or_more():
    rates = Rates(chunk_size=256)
    rates.step(4096)
    time.sleep(0.05)
    rates.step(16)  # the 4096-token step took the time to this one
    assert rates.prefill is not None and 4096 / 0.2 < rates.prefill <= 4096 / 0.05
    measured = rates.prefill
    time.sleep(0.05)
    rates.step(0)  # the 16-token step is a decode step: not a prefill sample
    assert rates.prefill == measured


def test_the_disk_pays_only_when_it_reads_faster_than_the_instance_prefills():
    rates = Rates(chunk_size=256)
    measured_prefill(rates, tokens=3000, seconds=0.1)  # ~30k tokens/s, less with the sleep's overshoot
    rates.disk_read({"cache_disk_loaded_tokens": 1024, "cache_disk_load_seconds": 0.5})  # 2k tokens/s  # 10k tokens/s
    assert rates.disk_pays() is False and rates.disk_chunks(10) == 0
    for _ in range(30):  # the disk got faster (the files are in the page cache): the average follows
        rates.disk_read({"cache_disk_loaded_tokens": 1024, "cache_disk_load_seconds": 0.01})
    assert rates.disk_pays() is True and rates.disk_chunks(10) == 10


def test_kept_rates_let_a_restarted_instance_decide_at_its_first_request(tmp_path):
    path = tmp_path / "rates-model.json"
    first = Rates(chunk_size=256, path=path)
    measured_prefill(first)
    assert json.loads(path.read_text())["prefill_tokens_per_s"] == first.prefill  # the first rate: kept at once
    first.disk_read({"cache_disk_loaded_tokens": 1 << 20, "cache_disk_load_seconds": 0.01})  # far faster
    first.save()  # as at shutdown (between, at most every SAVE_EVERY_S)
    again = Rates(chunk_size=256, path=path)
    assert again.prefill == first.prefill and again.disk == first.disk
    assert again.disk_chunks(10) == 10  # the disk pays: read at once, no request computed to measure

    only_prefill = tmp_path / "rates-other.json"
    kept = Rates(chunk_size=256, path=only_prefill)
    measured_prefill(kept)
    kept.save()
    # The disk never measured: nothing read (no probe) before this run has prefilled itself.
    assert Rates(chunk_size=256, path=only_prefill).disk_chunks(10) == 0


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '{"prefill_tokens_per_s": -1, "disk_tokens_per_s": "fast"}', '{"x": 1}']
)
def test_kept_rates_not_understood_are_ignored(tmp_path, text):
    path = tmp_path / "rates.json"
    path.write_text(text)
    rates = Rates(chunk_size=256, path=path)
    assert rates.prefill is None and rates.disk is None and rates.disk_chunks(10) == 0
