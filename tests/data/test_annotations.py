"""Parsers of the upstream annotation formats, with their edge cases."""

import json

import pytest

from jaxgrounding.data import load_annotations
from jaxgrounding.data.sample import AnnotationError, Validation
from tests.data.media import write_indexed_video


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CHARADES_CSV = (
    "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    'AO8RW,HR43,Kitchen,6,7,Yes,"A person cooks, then eats.",food;pan,"A person, cooking.",c092 0.0 6.9,33.67\n'
    "Y6R7T,HR44,Bedroom,5,7,Yes,A person sleeps.,bed,A person sleeping.,,20.0\n"
)


def test_charades_sta(tmp_path):
    ann = _write(
        tmp_path,
        "charades_sta_train.txt",
        (
            "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
            "AO8RW 30.1 40.0##person opens the door.\n"  # end past the video: clipped
            "Y6R7T 12.5 4.0##a person lies on the bed.\n"  # reversed: swapped
            "\n"
            "Y6R7T 1.0 2.0##   \n"  # empty query: rejected
            "ZZZZZ 1.0 2.0##not in the csv.\n"  # unknown duration: rejected
        ),
    )
    csv = _write(tmp_path, "Charades_v1_train.csv", CHARADES_CSV)
    result = load_annotations(ann, "charades_sta", video_root="/videos", durations=csv)
    samples = result.samples
    assert [s.id for s in samples] == ["AO8RW:1", "AO8RW:2", "Y6R7T:3"]
    assert samples[0].video == "/videos/AO8RW.mp4"
    assert samples[0].duration == 33.67
    assert samples[0].query == "a person is putting a book on a shelf."
    assert samples[0].windows == ((0.0, 6.9),)
    assert samples[1].windows == ((30.1, 33.67),)
    assert samples[2].windows == ((4.0, 12.5),)
    assert result.report.fixed == {"clipped_window": 1, "swapped_window": 1}
    assert result.report.rejected == {"empty_query": 1, "bad_duration": 1}


def test_charades_duration_from_video_file(tmp_path):
    write_indexed_video(tmp_path / "AB12C.mp4", "libx264", 10, 25)
    ann = _write(tmp_path, "a.txt", "AB12C 0.5 1.5##a person waves.\n")
    (sample,) = load_annotations(ann, "charades_sta", video_root=str(tmp_path)).samples
    assert sample.duration == pytest.approx(2.5)


def test_charades_bad_line_raises_with_file_and_line(tmp_path):
    ann = _write(tmp_path, "a.txt", "AO8RW 0.0 6.9##ok.\nAO8RW zero 6.9##bad start\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:2"):
        load_annotations(ann, "charades_sta", durations={"AO8RW": 30.0})
    skipped = load_annotations(ann, "charades_sta", durations={"AO8RW": 30.0}, on_bad_line="skip")
    assert len(skipped.samples) == 1
    assert skipped.report.rejected == {"unparsable_line": 1}


def test_reversed_windows_rejected_by_switch(tmp_path):
    ann = _write(tmp_path, "a.txt", "AO8RW 9.0 3.0##backwards.\n")
    result = load_annotations(
        ann,
        "charades_sta",
        durations={"AO8RW": 30.0},
        validation=Validation(swap_reversed=False),
    )
    assert result.samples == [] and result.report.rejected == {"reversed_window": 1}


def test_activitynet_captions(tmp_path):
    (tmp_path / "v_QOlSCBRmfWY.mkv").write_bytes(b"")  # Extension found on disk.
    ann = _write(
        tmp_path,
        "train.json",
        json.dumps(
            {
                "v_QOlSCBRmfWY": {
                    "duration": 82.73,
                    "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 85.0]],
                    "sentences": ["A young woman is seen standing.", " She then dances. ", ""],
                },
                "v_ehGHCYKzyZ8": {"duration": 0, "timestamps": [[0, 1]], "sentences": ["x"]},
            }
        ),
    )
    result = load_annotations(ann, "activitynet", video_root=str(tmp_path))
    assert [s.id for s in result.samples] == ["v_QOlSCBRmfWY:0", "v_QOlSCBRmfWY:1"]
    assert result.samples[0].video.endswith("v_QOlSCBRmfWY.mkv")
    assert result.samples[1].query == "She then dances."
    assert result.report.rejected == {"empty_query": 1, "bad_duration": 1}


def test_activitynet_mismatched_lists_raise(tmp_path):
    ann = _write(
        tmp_path,
        "val.json",
        json.dumps(
            {
                "v_a": {"duration": 10, "timestamps": [[0, 1], [2, 3]], "sentences": ["one"]},
            }
        ),
    )
    with pytest.raises(AnnotationError, match="v_a"):
        load_annotations(ann, "activitynet")


def test_activitynet_broken_json_names_line(tmp_path):
    ann = _write(tmp_path, "val.json", '{\n"v_a": {"duration": 10,\n}')
    with pytest.raises(AnnotationError, match=r"val\.json:3"):
        load_annotations(ann, "activitynet")


def test_qvhighlights(tmp_path):
    lines = [
        {
            "qid": 2579,
            "query": "A girl and her mother cooked while talking.",
            "duration": 150,
            "vid": "j7rJstUseKg_360.0_510.0",
            "relevant_clip_ids": [0, 1, 2],
            "saliency_scores": [[1, 2, 3]] * 3,
            "relevant_windows": [[0, 6], [20, 34], [140, 152]],
        },
        {
            "qid": 9769,
            "query": "some test query",
            "duration": 126,
            "vid": "NUsG9BgSes0_210.0_360.0",
        },  # Test split: no windows.
    ]
    ann = _write(tmp_path, "highlight_val_release.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    with pytest.raises(AnnotationError, match=r"highlight_val_release\.jsonl:3"):
        load_annotations(ann, "qvhighlights")
    result = load_annotations(ann, "qvhighlights", on_bad_line="skip")
    first, second = result.samples
    assert first.id == "2579" and first.windows == ((0, 6), (20, 34), (140, 150))
    assert first.video == "j7rJstUseKg_360.0_510.0.mp4"
    assert second.windows == ()
    assert result.report.fixed == {"clipped_window": 1}
    assert result.report.rejected == {"unparsable_line": 1}


def test_et_instruct(tmp_path):
    entries = [
        {
            "task": "tvg",
            "source": "didemo",
            "video": "didemo/1234.mp4",
            "duration": 30.0,
            "tgt": [5.0, 10.0],
            "conversations": [
                {"from": "human", "value": "<image>\nLocalize 'a dog runs' in the video."},
                {"from": "gpt", "value": "The event happens in 5.0 - 10.0 seconds."},
            ],
        },
        {
            "task": "slc",
            "source": "how_to_step",
            "video": "how_to_step/PJi8ZEHAFcI.mp4",
            "duration": 200.767,
            "src": [12, 18],
            "tgt": [36, 44, 49, 57],
            "conversations": [
                {"from": "human", "value": "<image>\nLocalize the steps and describe them."},
                {"from": "gpt", "value": "36 - 44 seconds, clean the bananas. 49 - 57..."},
            ],
        },
        {
            "task": "vhd",
            "source": "qvhighlights",
            "video": "qvh/x.mp4",
            "duration": 150.0,
            "tgt": [42.5],
            "conversations": [
                {"from": "human", "value": "<image>\nWhen is the highlight of 'cooking'?"},
                {"from": "gpt", "value": "The highlight is at 42.5 seconds."},
            ],
        },
        {
            "task": "tvg",
            "video": "a.mp4",
            "duration": 10.0,
            "tgt": [1, 2],
            "conversations": [{"from": "human", "value": "<image>\n"}],
        },
    ]
    ann = _write(tmp_path, "et_instruct_164k_txt.json", json.dumps(entries))
    result = load_annotations(ann, "et_instruct", video_root="/et/videos")
    tvg, slc, vhd = result.samples
    assert tvg.query == "Localize 'a dog runs' in the video."
    assert tvg.response == "The event happens in 5.0 - 10.0 seconds."
    assert tvg.windows == ((5.0, 10.0),) and tvg.task == "tvg"
    assert tvg.video == "/et/videos/didemo/1234.mp4"
    assert slc.windows == ((36.0, 44.0), (49.0, 57.0))
    assert vhd.windows == ((42.5, 42.5),)
    assert result.report.rejected == {"empty_query": 1}
    assert len({s.id for s in result.samples}) == 3


def test_generic_jsonl(tmp_path):
    lines = [
        {
            "video": "a.mp4",
            "duration": 30.0,
            "query": "when does it spin?",
            "windows": [[3, 8], [10, 12]],
            "captions": ["it spins", "again"],
            "verbs": ["spin"],
            "id": "x1",
        },
        {"video": "/abs/b.mp4", "duration": 10.0, "query": "q", "windows": [[12, 15]]},
        {"video": "c.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]], "captions": ["one", "two"]},
        {"video": "d.mp4", "duration": -1.0, "query": "q", "windows": [[1, 2]]},
        {"video": "e.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]], "task": "verb_completion"},
    ]
    ann = _write(tmp_path, "mine.jsonl", "\n".join(json.dumps(x) for x in lines))
    result = load_annotations(ann, "jsonl", video_root="/root")
    first, last = result.samples
    assert first.id == "x1" and first.video == "/root/a.mp4"
    assert first.captions == ("it spins", "again") and first.verbs == ("spin",)
    assert last.id == "mine:5" and last.task == "verb_completion"
    assert result.report.rejected == {"window_outside_video": 1, "captions_windows_mismatch": 1, "bad_duration": 1}


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_annotations(_write(tmp_path, "a", ""), "csv")


def test_a_non_utf8_line_is_named_by_file_and_line(tmp_path):
    ann = tmp_path / "a.jsonl"
    good = json.dumps({"video": "a.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]]}).encode()
    ann.write_bytes(good + b"\n" + b'{"video": "b.mp4", "query": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(AnnotationError, match=r"a\.jsonl:2: cannot parse \(UnicodeDecodeError"):
        load_annotations(str(ann), "jsonl", video_root=str(tmp_path))
    skipped = load_annotations(str(ann), "jsonl", video_root=str(tmp_path), on_bad_line="skip")
    assert len(skipped.samples) == 2 and skipped.report.rejected == {"unparsable_line": 1}
    whole = tmp_path / "b.json"
    whole.write_bytes(b'{\n"v": {"duration": 1,\n "sentences": ["caf\xe9"]}}')
    with pytest.raises(AnnotationError, match=r"b\.json:3: not UTF-8"):
        load_annotations(str(whole), "activitynet")


def test_non_finite_windows_are_rejected_and_counted(tmp_path):
    lines = [
        '{"video": "a.mp4", "duration": 10.0, "query": "q", "windows": [[NaN, 5]]}',
        '{"video": "b.mp4", "duration": 10.0, "query": "q", "windows": [[1, Infinity]]}',
        '{"video": "c.mp4", "duration": Infinity, "query": "q", "windows": [[1, 2]]}',
        '{"video": "d.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]]}',
    ]
    result = load_annotations(_write(tmp_path, "a.jsonl", "\n".join(lines)), "jsonl", video_root=str(tmp_path))
    assert [s.video for s in result.samples] == [str(tmp_path / "d.mp4")]
    assert result.report.rejected == {"non_finite_window": 2, "bad_duration": 1}


def test_videos_outside_the_video_root_are_rejected_unless_allowed(tmp_path):
    root = tmp_path / "videos"
    lines = [
        {"video": "../../x.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]]},
        {"video": "/etc/x.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]]},
        {"video": "sub/../ok.mp4", "duration": 10.0, "query": "q", "windows": [[1, 2]]},
    ]
    ann = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(x) for x in lines))
    result = load_annotations(ann, "jsonl", video_root=str(root))
    assert [s.video for s in result.samples] == [str(root / "sub/../ok.mp4")]
    assert result.report.rejected == {"video_outside_root": 2}
    assert len(load_annotations(ann, "jsonl", video_root=str(root), allow_outside_video_root=True).samples) == 3
