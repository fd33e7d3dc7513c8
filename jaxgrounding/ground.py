"""Ground one query in one video with a trained workdir.

    python -m jaxgrounding.ground --model runs/meco --video clip.mp4 --query "when does the door open?" \
        [--fps 1] [--memory auto|full|streaming] [--json] [--plot similarity.png]

Prints the ranked windows (seconds) and the generated text; --plot draws each generated
structural token's similarity to every frame over time, with the predicted windows shaded.
`--memory streaming` streams the video through TimeScope's HVR/DVR memory and grounds coarse to
fine (the default for workdirs trained with streaming settings, e.g. configs/timescope.py).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from jaxgrounding import data as data_lib
from jaxgrounding import evaluation, inference, settings
from jaxgrounding.data.padding import pad_and_stack
from jaxgrounding.data.sample import Sample
from jaxgrounding.tasks.encoding import EncoderConfig, StructuralEncoder
from jaxgrounding.training import experiment

_MODEL = flags.DEFINE_string("model", None, "A workdir written by jaxgrounding.train.", required=True)
_VIDEO = flags.DEFINE_string("video", None, "Video file.", required=True)
_QUERY = flags.DEFINE_string("query", None, "What to find.", required=True)
# Above any camera's rate: more only multiplies the frame grid (1e9 fps asked numpy for 82 GiB).
_MAX_FPS = 240.0
_FPS = flags.DEFINE_float(
    "fps", None, f"Sampling rate, in (0, {_MAX_FPS:g}] (default: the training config's).", lower_bound=0.0, upper_bound=_MAX_FPS
)
flags.register_validator("fps", lambda fps: fps is None or fps > 0, message="--fps must be > 0")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_PLOT = flags.DEFINE_string("plot", None, "Write a PNG of similarity over time with the windows marked.")
_MEMORY = flags.DEFINE_enum(
    "memory",
    "auto",
    ["auto", "full", "streaming"],
    "full: one causal pass; streaming: TimeScope coarse-to-fine; auto: as the model was trained.",
)


def plot(prediction: inference.Prediction, duration: float, query: str, path: str, segment_frames: int = 0) -> None:
    """Similarity of each generated structural token to every frame over time, the ranked windows
    shaded green; for a coarse-to-fine prediction also the coarse window (dashed) and the span
    whose DVR the fine stage reloaded (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2))
    centers = prediction.frame_times + prediction.frame_duration / 2
    for k, kind in enumerate(prediction.kinds):
        style = "-" if kind == "ent" else ":"
        ax.plot(centers, prediction.similarity[k], style, marker=".", label=f"<{kind}> #{k}")
    if prediction.reloaded and segment_frames:
        times = prediction.frame_times
        for k in prediction.reloaded:
            first, last = k * segment_frames, min((k + 1) * segment_frames, times.size) - 1
            if first < times.size:
                ax.axvspan(times[first], times[last] + prediction.frame_duration, color="0.85", zorder=0)
    if prediction.coarse is not None and prediction.coarse.windows:
        top = prediction.coarse.windows[0]
        ax.axvline(top.start, ls="--", color="0.25", label="coarse window")
        ax.axvline(top.end, ls="--", color="0.25")
    for rank, w in enumerate(prediction.windows):
        ax.axvspan(w.start, w.end, alpha=0.25 if rank == 0 else 0.1, color="tab:green")
        ax.text(w.start, ax.get_ylim()[1], f"#{rank + 1} {w.start:.1f}-{w.end:.1f}s", va="top", fontsize=8)
    ax.set_xlim(0, duration)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("token-frame similarity")
    ax.set_title(query, fontsize=10)
    if prediction.kinds or prediction.coarse is not None:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config = experiment.load_workdir_config(_MODEL.value)
    fps = config.data.fps if _FPS.value is None else _FPS.value
    model, tokenizer, checkpoint_dir, _ = experiment.restore_model(config, _MODEL.value)
    video = data_lib.read_video(
        _VIDEO.value, fps=fps, max_frames=config.data.max_frames, size=tuple(config.data.frame_size)
    )
    sample = Sample(
        id=os.path.basename(_VIDEO.value), video=_VIDEO.value, duration=float(video.duration), query=_QUERY.value
    )
    encoder = StructuralEncoder(checkpoint_dir, EncoderConfig.from_config(config, train=False))
    example = encoder.encode_prompt(sample, video)
    pipeline = settings.pipeline_config(config, train=False, batch_size=1)
    batch = pad_and_stack([example], 1, pipeline.buckets)
    (prediction,) = evaluation.predict(
        model, batch, tokenizer, config, jax.random.key(config.seed), memory=_MEMORY.value
    )
    windows = [
        {"start": round(w.start, 2), "end": round(w.end, 2), "score": round(float(w.score), 4)}
        for w in prediction.windows
    ]
    if _PLOT.value:
        segment_frames = config.streaming.segment_frames
        plot(prediction, float(video.duration), _QUERY.value, _PLOT.value, segment_frames)
    coarse = None
    if prediction.coarse is not None:
        coarse = {
            "windows": [{"start": round(w.start, 2), "end": round(w.end, 2)} for w in prediction.coarse.windows],
            "reloaded_segments": prediction.reloaded,
            "reload_capped": prediction.reload_capped,
            "score": round(prediction.coarse.score, 4),
        }
    if _JSON.value:
        out = {"query": _QUERY.value, "duration": float(video.duration), "windows": windows, "text": prediction.text}
        print(json.dumps(out | ({"coarse": coarse} if coarse else {})))
        return
    print(f"query: {_QUERY.value}  ({video.duration:.1f} s, {len(video.timestamps)} frames at {fps:g} fps)")
    for rank, w in enumerate(windows, 1):
        print(f"  #{rank}: {w['start']:7.2f} s - {w['end']:7.2f} s   score {w['score']:.3f}")
    if coarse:
        spans = ", ".join(f"{w['start']:.2f}-{w['end']:.2f} s" for w in coarse["windows"][:1]) or "none"
        note = " (capped at max_reload_segments: the most confident kept)" if coarse["reload_capped"] else ""
        print(
            f"  coarse stage: {spans}, confidence {coarse['score']:.3f}; "
            f"fine stage reloaded segments {coarse['reloaded_segments']}{note}"
        )
    print(f"generated: {prediction.text!r}")
    if _PLOT.value:
        print(f"plot: {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
