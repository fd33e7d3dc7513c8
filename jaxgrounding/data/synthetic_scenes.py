"""Procedural scenes for the synthetic grounding set: objects, events, frames, text.

A scene is a background and a few objects, each a distinct shape and colour, so "the
red circle" names one object. Some objects take part in one event each (move, spin,
grow, shrink, appear, disappear, bounce, change colour); events never overlap in time,
their windows are snapped to the frame grid and placed uniformly at random, so only a
model that looks at the frames can localise them. Every event yields a query (explicit
or task-oriented phrasing), a query-focused caption and its verb lemmas.
"""

import dataclasses
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 200),
}
# Rotation is invisible on a circle, so circles never spin.
EVENT_KINDS = ("move", "spin", "grow", "shrink", "appear", "disappear", "bounce", "change_colour")
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

_EXPLICIT = {
    "move": "when does the {obj} move {direction}?",
    "spin": "when does the {obj} spin?",
    "grow": "when does the {obj} grow bigger?",
    "shrink": "when does the {obj} shrink?",
    "appear": "when does the {obj} appear?",
    "disappear": "when does the {obj} disappear?",
    "bounce": "when does the {obj} bounce?",
    "change_colour": "when does the {obj} change colour to {new_colour}?",
}
_TASK = {
    "move": "find the moment the {obj} travels {direction} across the scene.",
    "spin": "locate the part of the video where the {obj} rotates in place.",
    "grow": "find the segment in which the {obj} gets larger.",
    "shrink": "find the segment in which the {obj} gets smaller.",
    "appear": "find when the {obj} first shows up in the scene.",
    "disappear": "find when the {obj} vanishes from the scene.",
    "bounce": "locate the moment the {obj} hops up and down.",
    "change_colour": "find when the {obj} turns {new_colour}.",
}
_CAPTION = {
    "move": "The {obj} slides {direction} while the other objects stay still.",
    "spin": "The {obj} turns around in place.",
    "grow": "The {obj} grows to about one and a half times its size.",
    "shrink": "The {obj} shrinks to about half its size.",
    "appear": "The {obj} fades into view.",
    "disappear": "The {obj} fades away until it is gone.",
    "bounce": "The {obj} bounces up and down.",
    "change_colour": "The {obj} gradually turns {new_colour}.",
}
_VERBS = {
    "move": ("move",),
    "spin": ("spin",),
    "grow": ("grow",),
    "shrink": ("shrink",),
    "appear": ("appear",),
    "disappear": ("disappear",),
    "bounce": ("bounce",),
    "change_colour": ("change",),
}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Knobs of one scene family (all sizes in pixels, times in seconds).

    min_duration, max_duration: video length range.
    size: frame side (square frames). fps: frame rate written to the file.
    min_objects, max_objects: objects per scene (at most len(SHAPES)).
    max_events: events per scene (at most the number of objects).
    min_event_fraction, max_event_fraction: event length as a fraction of the video.
    task_phrasing: probability of the task-oriented phrasing instead of the explicit one.
    object_scale: object radius as a fraction of the frame side (larger = easier to see).
    """

    min_duration: float = 20.0
    max_duration: float = 60.0
    size: int = 64
    fps: float = 1.0
    min_objects: int = 2
    max_objects: int = 3
    max_events: int = 2
    min_event_fraction: float = 0.1
    max_event_fraction: float = 0.3
    task_phrasing: float = 0.5
    object_scale: float = 0.13


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    obj: int  # Index into Scene.objects.
    start: float
    end: float
    direction: str | None = None
    new_colour: str | None = None
    hops: int = 1  # bounce: one hop per ~4 frames, so every hop is seen by some frame.


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float  # Centre, pixels.
    y: float
    radius: float


@dataclasses.dataclass(frozen=True)
class Scene:
    num_frames: int
    fps: float
    size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    events: tuple[Event, ...]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def _place_events(rng: np.random.Generator, cfg: SceneConfig, num_frames: int, count: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end] frame windows, start uniform over the video."""
    windows: list[tuple[int, int]] = []
    for _ in range(50 * count):
        if len(windows) == count:
            break
        fraction = rng.uniform(cfg.min_event_fraction, cfg.max_event_fraction)
        length = max(2, int(round(fraction * num_frames)))
        start = int(rng.integers(0, max(1, num_frames - length)))
        end = min(start + length, num_frames - 1)
        # One idle frame between events keeps their boundaries separable.
        if all(end + 1 < s or start > e + 1 for s, e in windows):
            windows.append((start, end))
    return sorted(windows)


def sample_scene(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    """Draws one scene (objects, events) from ``cfg``."""
    duration = rng.uniform(cfg.min_duration, cfg.max_duration)
    num_frames = max(4, int(round(duration * cfg.fps)))
    num_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.permutation(SHAPES)[:num_objects]
    colour_names = list(COLOURS)
    colours = [colour_names[i] for i in rng.permutation(len(colour_names))]
    radius = cfg.size * cfg.object_scale
    # Objects start in distinct cells of a 3x3 grid so they rarely overlap.
    cells = rng.permutation(9)[:num_objects]
    objects = tuple(
        SceneObject(
            shape=str(shapes[i]),
            colour=colours[i],
            x=(cells[i] % 3 + 0.5) * cfg.size / 3,
            y=(cells[i] // 3 + 0.5) * cfg.size / 3,
            radius=radius,
        )
        for i in range(num_objects)
    )
    spare_colours = colours[num_objects:]
    count = int(rng.integers(1, min(cfg.max_events, num_objects) + 1))
    windows = _place_events(rng, cfg, num_frames, count)
    actors = rng.permutation(num_objects)[: len(windows)]
    events = []
    for (start, end), obj in zip(windows, actors):
        kinds = [k for k in EVENT_KINDS if not (k == "spin" and objects[obj].shape == "circle")]
        kind = str(rng.choice(kinds))
        direction = new_colour = None
        if kind == "move":
            # Only directions with room for a move of 1/3 of the frame.
            o = objects[obj]
            room = [
                d
                for d, (dx, dy) in _DIRECTIONS.items()
                if 0 < o.x + dx * cfg.size / 3 < cfg.size and 0 < o.y + dy * cfg.size / 3 < cfg.size
            ]
            direction = str(rng.choice(room))
        elif kind == "change_colour":
            new_colour = str(rng.choice(spare_colours))
        hops = max(1, (end - start) // 4)
        events.append(Event(kind, int(obj), start / cfg.fps, end / cfg.fps, direction, new_colour, hops))
    background = tuple(int(c) for c in rng.integers(20, 90, size=3))
    return Scene(num_frames, cfg.fps, cfg.size, background, objects, tuple(events))


def _progress(t: float, event: Event) -> float:
    """0 before the event, rising linearly to 1 at its end, 1 after."""
    if event.end <= event.start:
        return float(t >= event.start)
    return min(max((t - event.start) / (event.end - event.start), 0.0), 1.0)


def _object_state(obj: SceneObject, events: list[Event], t: float, size: int):
    """(x, y, radius, angle, rgb, alpha) of an object at time t."""
    x, y, radius, angle = obj.x, obj.y, obj.radius, 0.0
    rgb = np.array(COLOURS[obj.colour], np.float32)
    alpha = 1.0
    for event in events:
        p = _progress(t, event)
        if event.kind == "move":
            dx, dy = _DIRECTIONS[event.direction]
            x, y = x + dx * p * size / 3, y + dy * p * size / 3
        elif event.kind == "spin":
            # 3/8 of a turn: no step of it is a symmetry of a square, triangle or diamond,
            # so every frame of the spin differs from the one before.
            angle = 0.75 * math.pi * p
        elif event.kind == "grow":
            radius *= 1 + 0.5 * p
        elif event.kind == "shrink":
            radius *= 1 - 0.5 * p
        elif event.kind == "appear":
            alpha = p
        elif event.kind == "disappear":
            alpha = 1 - p
        elif event.kind == "bounce":
            inside = 0 < p < 1
            # Frames sit at p = k / (4 * hops) or finer, never all at the hops' landings.
            y -= inside * abs(math.sin(event.hops * math.pi * p)) * size / 6
        elif event.kind == "change_colour":
            rgb = (1 - p) * rgb + p * np.array(COLOURS[event.new_colour], np.float32)
    return x, y, radius, angle, rgb, alpha


def _mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """u, v: pixel offsets from the centre in the object's rotated frame."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r * 1.1
    # Triangle pointing up: below two slanted edges, above the base.
    return (v <= r * 0.6) & (v >= -r + 1.8 * np.abs(u))


def render(scene: Scene) -> np.ndarray:
    """frames: [T, size, size, 3] uint8."""
    size = scene.size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # A fixed vertical gradient so frames are not flat (flat frames compress oddly).
    base = np.array(scene.background, np.float32)[None, None] * (0.8 + 0.4 * ys[..., None] / size)
    per_object = [[e for e in scene.events if e.obj == i] for i in range(len(scene.objects))]
    frames = np.empty((scene.num_frames, size, size, 3), np.uint8)
    for k in range(scene.num_frames):
        t = k / scene.fps
        canvas = base.copy()
        for obj, events in zip(scene.objects, per_object):
            x, y, r, angle, rgb, alpha = _object_state(obj, events, t, size)
            if alpha <= 0 or r <= 0:
                continue
            c, s = math.cos(angle), math.sin(angle)
            u = c * (xs - x) + s * (ys - y)
            v = -s * (xs - x) + c * (ys - y)
            mask = _mask(obj.shape, u, v, r)[..., None]
            canvas = np.where(mask, (1 - alpha) * canvas + alpha * rgb, canvas)
        frames[k] = np.clip(canvas, 0, 255).astype(np.uint8)
    return frames


@dataclasses.dataclass(frozen=True)
class EventText:
    query: str
    caption: str
    verbs: tuple[str, ...]


def describe(scene: Scene, event: Event, rng: np.random.Generator, task_phrasing: float) -> EventText:
    """Query (explicit or task-oriented), query-focused caption and verbs of an event."""
    obj = scene.objects[event.obj]
    fields = {
        "obj": f"{obj.colour} {obj.shape}",
        "direction": event.direction,
        "new_colour": event.new_colour,
    }
    template = _TASK if rng.random() < task_phrasing else _EXPLICIT
    return EventText(
        query=template[event.kind].format(**fields),
        caption=_CAPTION[event.kind].format(**fields),
        verbs=_VERBS[event.kind],
    )
