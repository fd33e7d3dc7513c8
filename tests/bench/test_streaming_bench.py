"""bench/streaming.py end to end on a toy setting (the 7B estimate is too slow for the suite; its
line fit is checked on its own)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_streaming", os.path.join(ROOT, "bench", "streaming.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streaming_and_full_rows(bench):
    # 56x56 frames: 4 tokens per grid; 16 and 32 frames: 2 and 4 segments of 4 grids.
    rows = bench.main(
        "--frames 16,32 --frame-size 56 56 --segment-frames 4 --temporal 2 --hidden 64 --layers 2 "
        "--vision-depth 1 --vision-hidden 32 --no-estimate-24gb".split()
    )
    assert [(r["mode"], r["frames"]) for r in rows] == [
        ("streaming", 16),
        ("full", 16),
        ("streaming", 32),
        ("full", 32),
    ]
    stream16, full16, stream32, full32 = rows
    for row in rows:
        assert row["peak_bytes"] >= row["params_bytes"] > 0
    assert stream16["ratio_to_full"] == full16["ratio_to_full"] == stream16["peak_bytes"] / full16["peak_bytes"]
    assert stream32["max_segments"] == stream32["segments"] == 4
    assert stream32["host_bytes"] == 4 * stream32["dvr_bytes_per_segment"]
    assert stream32["resident_bytes"] == 0
    assert stream32["seconds"] > 0 and full32["seconds"] is None and full32["compiled_only"]
    assert stream32["step"]["alias"] == stream32["buffer_bytes"]  # the donated buffer is reused
    assert stream32["growth_vs_first"] < full32["growth_vs_first"]
    assert stream32["frames_ratio"] == 2.0


def test_device_placement_counts_the_dvr_as_resident(bench):
    (row,) = bench.main(
        "--frames 24 --frame-size 56 56 --segment-frames 4 --temporal 2 --hidden 64 --layers 2 --vision-depth 1 "
        "--vision-hidden 32 --modes streaming --dvr-placement device --no-estimate-24gb".split()
    )
    assert row["segments"] == 3 and row["host_bytes"] == 0
    assert row["resident_bytes"] == 2 * row["dvr_bytes_per_segment"]
    assert row["peak_bytes"] == row["step"]["step_bytes"] + row["resident_bytes"]


def test_fit_budgets_solves_the_line(bench):
    gib = bench.GIB
    # 20 GiB + 1 MiB fixed, 16 MiB per segment: 255 segments fit in the remaining 4 GiB - 1 MiB.
    points = [{"max_segments": m, "peak_bytes": 20 * gib + (1 << 20) + m * (16 << 20)} for m in (16, 64, 256)]
    fit = bench.fit_budgets(points, frames_per_segment=16)
    assert fit["fit_max_residual_bytes"] < 1e3
    assert fit["max_segments_24gb"] == 255 and fit["frames_in_24gb"] == 255 * 16
    assert fit["max_segments_80gb"] == 60 * 64 - 1


def test_bad_frames_are_rejected(bench):
    with pytest.raises(ValueError, match="multiple of temporal_patch_size"):
        bench.main("--frames 15 --frame-size 56 56 --segment-frames 4 --temporal 2 --no-estimate-24gb".split())
    with pytest.raises(SystemExit):
        bench.parse_args(["--segment-frames", "6", "--temporal", "4"])
