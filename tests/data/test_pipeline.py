"""The grain pipeline: shapes and masks, sharding, bad videos, exact resumption."""

import dataclasses

import grain
import numpy as np
import pytest
from etils import epath

from jaxgrounding.data import DataFailureError, PipelineConfig, VideoDecodeError, make_pipeline
from jaxgrounding.data.pipeline import reshard_state


def _config(**overrides):
    base = PipelineConfig(
        batch_size=3,
        seed=1,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
        buckets={"frames": (32, 64), "timestamps": (32, 64), "windows": (1,)},
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def samples_with_bad(synthetic_small, broken_videos):
    _, splits = synthetic_small
    good = splits["train"][:9]
    bad = [
        dataclasses.replace(good[0], id=f"bad/{reason}", video=path)
        for reason, path in sorted(broken_videos.items())[:2]
    ]
    return good + bad


def _run(it, limit=None):
    batches = []
    for batch in it:
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_are_padded_to_buckets_with_masks(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:4]
    it = iter(make_pipeline(samples, _config(num_epochs=1, shuffle=False)))
    first, second = list(it)
    assert first["frames"].shape[0] == 3 and first["frames"].shape[1] in (32, 64)
    assert first["frames"].shape[2:] == (64, 64, 3) and first["frames"].dtype == np.uint8
    lengths = first["frames_mask"].sum(1)
    for i, sample in enumerate(samples[:3]):
        assert lengths[i] == int(sample.duration)  # 1 fps, frames at 0..duration-1.
        np.testing.assert_allclose(first["timestamps"][i, : lengths[i]], np.arange(lengths[i]))
        assert not first["frames"][i, lengths[i] :].any()  # Padding is zeros.
        np.testing.assert_allclose(first["windows"][i, 0], sample.windows[0])
    # The short last batch keeps its shape; `valid` marks the real example.
    np.testing.assert_array_equal(second["valid"], [True, False, False])
    assert second["frames"].shape[0] == 3


def test_shards_are_disjoint_and_cover_the_data(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:8]

    def durations(index):
        config = _config(num_epochs=1, batch_size=1, shard_index=index, shard_count=2)
        return [float(b["duration"][0]) for b in make_pipeline(samples, config)]

    a, b = durations(0), durations(1)
    assert len(a) == len(b) == 4
    assert sorted(a + b) == sorted(s.duration for s in samples)


def _global_batches(samples, processes: int, steps: int, states=None):
    """`steps` global batches of 4 read by `processes` processes (rows concatenated in process order), and each
    process's iterator state after them; `states` resumes the processes first."""
    iterators = [
        iter(
            make_pipeline(
                samples, _config(batch_size=4 // processes, shard_index=p, shard_count=processes, num_epochs=None)
            )
        )
        for p in range(processes)
    ]
    for it, state in zip(iterators, states or [None] * processes):
        if state is not None:
            it.set_state(state)
    batches = [[next(it)["duration"] for it in iterators] for _ in range(steps)]
    return [np.concatenate(parts).tolist() for parts in batches], [it.get_state() for it in iterators]


def test_global_batches_do_not_depend_on_the_process_count(synthetic_small):
    """Every global batch has the same rows in the same order read by 1, 2 or 4 processes (5 steps of 4 cross the
    epoch boundary of 9 samples), and a state saved by n processes resumes the same stream on m processes."""
    _, splits = synthetic_small
    samples = splits["train"][:9]
    one, _ = _global_batches(samples, 1, 5)
    assert _global_batches(samples, 2, 5)[0] == one
    assert _global_batches(samples, 4, 5)[0] == one
    _, saved_by_two = _global_batches(samples, 2, 2)
    assert _global_batches(samples, 1, 3, reshard_state(saved_by_two, 1))[0] == one[2:]
    _, saved_by_one = _global_batches(samples, 1, 2)
    assert _global_batches(samples, 4, 3, reshard_state(saved_by_one, 4))[0] == one[2:]
    with pytest.raises(ValueError, match="cannot share evenly"):
        reshard_state(saved_by_one, 3)  # 8 examples consumed, 3 processes


def test_epochs_are_shuffled_differently(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:8]
    config = _config(batch_size=8, num_epochs=2)
    one, two = list(make_pipeline(samples, config))
    assert sorted(one["duration"]) == sorted(two["duration"])
    assert list(one["duration"]) != list(two["duration"])


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_videos_are_skipped_and_reported_per_epoch(samples_with_bad, workers):
    it = iter(make_pipeline(samples_with_bad, _config(worker_count=workers)))
    batches = _run(it)
    it.close()
    assert sum(int(b["valid"].sum()) for b in batches) == 2 * 9
    assert [r["count"] for r in it.epoch_reports] == [2, 2]
    assert {p for r in it.epoch_reports for p in r["paths"]} == {s.video for s in samples_with_bad[9:]}


def test_fail_fast_switch(samples_with_bad):
    config = _config(skip_bad_samples=False, batch_size=len(samples_with_bad))
    with pytest.raises(VideoDecodeError):
        list(make_pipeline(samples_with_bad, config))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_bad_videos(samples_with_bad, workers):
    config = _config(worker_count=workers)
    full_it = iter(make_pipeline(samples_with_bad, config))
    full = _run(full_it)
    full_it.close()
    for stop in (1, 4):
        it = iter(make_pipeline(samples_with_bad, config))
        head = _run(it, limit=stop)
        state = it.get_state()
        it.close()
        resumed = iter(make_pipeline(samples_with_bad, config))
        resumed.set_state(state)
        tail = _run(resumed)
        resumed.close()
        _assert_same(head + tail, full)
        # Skips seen before the checkpoint are kept in the state, so reports still add up.
        assert [r["count"] for r in resumed.epoch_reports][-1] == 2
        assert len(resumed.skipped) == 4


def test_orbax_checkpoint_handler_round_trip(samples_with_bad, tmp_path):
    config = _config()
    reference = _run(iter(make_pipeline(samples_with_bad, config)))
    it = iter(make_pipeline(samples_with_bad, config))
    head = _run(it, limit=2)
    handler = grain.checkpoint.CheckpointHandler()
    directory = epath.Path(tmp_path)
    handler.save(directory, item=it)
    restored = handler.restore(directory, item=iter(make_pipeline(samples_with_bad, config)))
    _assert_same(head + _run(restored), reference)


def test_custom_transform_and_length_over_bucket(synthetic_small):
    _, splits = synthetic_small

    def transform(sample, video, epoch):
        return {"n_frames": np.int32(len(video.frames)), "ids": np.arange(len(sample.query)), "epoch": np.int32(epoch)}

    config = _config(num_epochs=2, buckets={"ids": (128,)})
    epochs = [batch["epoch"].tolist() for batch in make_pipeline(splits["train"][:3], config, transform)]
    assert epochs == [[0, 0, 0], [1, 1, 1]]  # the transform knows which pass it is in
    batch = next(iter(make_pipeline(splits["train"][:3], config, transform)))
    assert batch["ids"].shape == (3, 128) and batch["ids_mask"].dtype == bool
    with pytest.raises(ValueError, match="largest bucket"):
        list(make_pipeline(splits["train"][:3], _config(num_epochs=1, buckets={"ids": (4,)}), transform))


def _failing_on(bad_ids):
    """The default transform, raising what the encoder raises for a query over max_tokens."""
    from jaxgrounding.data import default_transform

    def transform(sample, video, epoch):
        if sample.id in bad_ids:
            raise ValueError(f"sample {sample.id}: 4615 tokens exceed max_tokens=2048 (the query is too long)")
        return default_transform(sample, video, epoch)

    return transform


def test_transform_failures_are_skipped_and_counted_by_reason(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:10]
    bad = samples[3].id
    it = iter(make_pipeline(samples, _config(max_failure_fraction=0.2), _failing_on({bad})))
    batches = _run(it)
    assert sum(int(b["valid"].sum()) for b in batches) == 2 * 9  # every other sample, both epochs
    assert [r["reasons"] for r in it.epoch_reports] == [{"transform: ValueError": 1}] * 2
    assert [r["ids"] for r in it.epoch_reports] == [[bad], [bad]]
    assert "4615 tokens exceed max_tokens" in it.skipped[0][4]
    assert (it.read, it.failed) == (20, 2)


def test_failure_fraction_over_the_cap_stops_with_the_reasons(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:10]
    config = _config(num_epochs=None, max_failure_fraction=0.05)
    it = iter(make_pipeline(samples, config, _failing_on({samples[3].id})))
    with pytest.raises(DataFailureError, match=r"failed, more than data.max_failure_fraction=0.05.*transform: ValueError"):
        _run(it, limit=100)
    assert it.read >= 100  # judged on enough samples, not on the first batch


def test_a_source_with_every_video_missing_stops_within_seconds(synthetic_small, tmp_path):
    import time

    _, splits = synthetic_small
    missing = [dataclasses.replace(s, video=str(tmp_path / f"gone{i}.mp4")) for i, s in enumerate(splits["train"][:8])]
    tick = time.perf_counter()
    with pytest.raises(DataFailureError, match=r"all failed.*decode: file does not exist"):
        next(iter(make_pipeline(missing, _config(num_epochs=None))))
    assert time.perf_counter() - tick < 30
    # A finite pass (evaluation) with nothing readable says so too, instead of yielding nothing.
    with pytest.raises(DataFailureError, match="none of the 8 samples could be read"):
        list(make_pipeline(missing, _config(num_epochs=1, max_failure_fraction=1.0)))


def test_an_annotation_duration_the_video_contradicts_is_skipped_and_counted(synthetic_small):
    _, splits = synthetic_small
    samples = splits["train"][:4]
    # A 60-s annotation with a window at 40-50 s, on a video of about 10 s.
    lying = dataclasses.replace(samples[1], id="lying", duration=60.0, windows=((40.0, 50.0),))
    config = _config(num_epochs=1, batch_size=4, max_duration_error=0.1)
    it = iter(make_pipeline([samples[0], lying, *samples[2:]], config))
    (batch,) = list(it)
    assert int(batch["valid"].sum()) == 3
    assert it.epoch_reports[0]["ids"] == ["lying"] and it.epoch_reports[0]["reasons"] == {"label: duration_mismatch": 1}
    assert "the annotation says 60.00 s" in it.skipped[0][4]


def test_samples_a_later_stage_skips_count_toward_the_report_and_the_cap(synthetic_small):
    """GRPO builds prompts after the pipeline: its failures go through `skip`, counted and capped the same way."""
    _, splits = synthetic_small
    samples = splits["train"][:10]
    it = iter(make_pipeline(samples, _config(num_epochs=None, max_failure_fraction=0.05)))
    next(it)
    it.skip([(samples[0], "transform", "ValueError: sample x: 4615 tokens exceed max_tokens=2048")])
    assert (it.read, it.failed) == (3, 1)
    assert it.skipped == [(0, samples[0].id, samples[0].video, "transform", "ValueError: sample x: 4615 tokens exceed max_tokens=2048")]
    resumed = iter(make_pipeline(samples, _config(num_epochs=None, max_failure_fraction=0.05)))
    resumed.set_state(it.get_state())  # the skip is part of the checkpointed state
    assert (resumed.read, resumed.failed, len(resumed.skipped)) == (3, 1, 1)
    with pytest.raises(DataFailureError, match=r"more than data.max_failure_fraction=0.05.*'transform: ValueError': \d+"):
        for _ in range(50):
            next(resumed)
            resumed.skip([(samples[1], "transform", "ValueError: too long")])
    assert resumed.read >= 100
