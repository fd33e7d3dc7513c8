"""Tiny real videos whose pixels encode their frame index, for exact decode checks."""

import fractions

import av
import numpy as np

HEIGHT, WIDTH, BITS = 48, 64, 8
BAND = WIDTH // BITS


def index_frame(index: int) -> np.ndarray:
    """A frame whose 8 vertical bands spell ``index`` in binary (MSB left)."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        if (index >> (BITS - 1 - bit)) & 1:
            frame[:, bit * BAND : (bit + 1) * BAND] = 255
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Reads back ``index_frame``'s number from band centres (robust to compression)."""
    centre = frame[HEIGHT // 4 : 3 * HEIGHT // 4].astype(np.float32).mean(axis=(0, 2))
    bits = [centre[b * BAND + 2 : (b + 1) * BAND - 2].mean() > 127 for b in range(BITS)]
    return int(sum(int(v) << (BITS - 1 - i) for i, v in enumerate(bits)))


def write_indexed_video(path, codec: str, fps, num_frames: int, pix_fmt="yuv420p"):
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


# (name, codec, container extension, fps, pixel format): codecs and rates seen in the
# wild, including NTSC 29.97 and a 60 fps stream.
VIDEO_SPECS = [
    ("h264_30", "libx264", "mp4", 30, "yuv420p"),
    ("h264_2997", "libx264", "mp4", 30000 / 1001, "yuv420p"),
    ("mpeg4_25", "mpeg4", "mp4", 25, "yuv420p"),
    ("vp9_24", "libvpx-vp9", "webm", 24, "yuv420p"),
    ("mjpeg_60", "mjpeg", "avi", 60, "yuvj420p"),
    ("h264_mkv_25", "libx264", "mkv", 25, "yuv420p"),
]
SECONDS = 3
