"""Procedural scenes for the synthetic grounding set: objects, events, frames, text.

A scene is a background and a few objects, each a distinct shape and colour, so "the
red circle" names one object. Some objects take part in one event each (move, spin,
grow, shrink, appear, disappear, bounce, change colour); events never overlap in time,
their windows are snapped to the frame grid and placed uniformly at random, so only a
model that looks at the frames can localise them. Every event yields a query (explicit
or task-oriented phrasing), a query-focused caption and its verb lemmas.

Events are transient: the object is in an altered state (displaced, bigger, smaller, tilted,
visible, hidden, hopping, recoloured) on exactly the frames of the window and back to its
resting state outside it. Every frame of the window then differs from every frame outside all
windows by what it shows alone, which a small model trained from scratch for minutes can learn.
(It did not learn state changes, where the object goes from one state to another over the
window and stays there, so that finding the window means comparing frames across time.)
"""

import dataclasses
import math
import re

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

# The object is altered on the window's frames only, and the text says so (a "bigger" query, a
# caption that ends with the return to rest).
_EXPLICIT = {
    "move": "when is the {obj} shifted {direction} of its place?",
    "spin": "when is the {obj} turned at an angle?",
    "grow": "when is the {obj} bigger?",
    "shrink": "when is the {obj} smaller?",
    "appear": "when is the {obj} visible?",
    "disappear": "when is the {obj} gone?",
    "bounce": "when does the {obj} hop above its place?",
    "change_colour": "when is the {obj} {new_colour}?",
}
_TASK = {
    "move": "find the moment the {obj} steps {direction} and has not yet come back.",
    "spin": "locate the part of the video where the {obj} is tilted.",
    "grow": "find the segment in which the {obj} is larger than usual.",
    "shrink": "find the segment in which the {obj} is smaller than usual.",
    "appear": "find when the {obj} shows up in the scene.",
    "disappear": "find when the {obj} is missing from the scene.",
    "bounce": "locate the moment the {obj} hops up and down.",
    "change_colour": "find when the {obj} looks {new_colour}.",
}
_CAPTION = {
    "move": "The {obj} jumps {direction}, stays there, then returns to its place.",
    "spin": "The {obj} turns at an angle, then snaps back upright.",
    "grow": "The {obj} swells to about one and a half times its size, then returns to its size.",
    "shrink": "The {obj} shrinks to about half its size, then returns to its size.",
    "appear": "The {obj} shows up for a while, then vanishes again.",
    "disappear": "The {obj} vanishes for a while, then comes back.",
    "bounce": "The {obj} hops up and down above its place, then lands.",
    "change_colour": "The {obj} turns {new_colour} for a while, then back to {colour}.",
}
# The verbs (lemmas) that name the event in each query phrasing, keyed by task phrasing, for
# the inversion tasks (Invert4TVG): the event's verbs only, not "find" / "locate" (they name the task). A
# phrasing that names a state instead of a change ("when is the {obj} bigger?") records the verb of the
# event's caption, which shows it. tests/tasks/test_verbs.py checks every entry against the verbs that
# `tasks.verbs.verb_lemmas` finds in the query (and the caption).
_QUERY_VERBS = {
    False: {
        "move": ("shift",), "spin": ("turn",), "grow": ("swell",), "shrink": ("shrink",), "appear": ("show",),
        "disappear": ("go",), "bounce": ("hop",), "change_colour": ("turn",),
    },
    True: {
        "move": ("step",), "spin": ("tilt",), "grow": ("swell",), "shrink": ("shrink",), "appear": ("show",),
        "disappear": ("miss",), "bounce": ("hop",), "change_colour": ("look",),
    },
}  # fmt: skip


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
    grid: objects rest at the centres of distinct cells of a grid x grid layout. 2 matches
      the 2 x 2 visual tokens of a 56-px frame in Qwen2.5-VL (14-px patches merged 2 x 2), so
      each object sits in one token at rest; 3 matches 84-px frames the same way.
    event_kinds: the kinds events are drawn from (a subset of EVENT_KINDS).
    clock: burn a timecode into every frame (as on surveillance footage): the frame's whole
      second in binary along the bottom edge (`TIMECODE_BITS` blocks, lit for a 1-bit, least
      significant on the left; seconds wrap at 2 ** TIMECODE_BITS). A pretrained video-LLM reads
      absolute time from its temporal position ids; a tiny model trained from scratch for
      minutes cannot, so answers that *write* times (Time-R1's "12.00 to 17.00") are learnable
      on the synthetic set only with the clock. Bits, unlike a bar whose length grows with
      time, are read linearly: with the same warm start a model read them sooner.
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
    object_scale: float = 0.16
    grid: int = 2
    event_kinds: tuple[str, ...] = EVENT_KINDS
    clock: bool = False

    def __post_init__(self):
        # Circles never spin, so every object needs a kind other than spin.
        if set(self.event_kinds) - set(EVENT_KINDS) or not set(self.event_kinds) - {"spin"}:
            raise ValueError(f"event_kinds must be a subset of {EVENT_KINDS} with a kind other than spin")
        # Configs arrive from JSON / ml_collections as lists; a tuple keeps the dataclass hashable.
        object.__setattr__(self, "event_kinds", tuple(self.event_kinds))
        if not 1 <= self.max_objects <= min(len(SHAPES), self.grid * self.grid):
            raise ValueError(f"max_objects must be in [1, min({len(SHAPES)}, grid * grid)], got {self.max_objects}")


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    obj: int  # Index into Scene.objects.
    start: float
    end: float
    direction: str | None = None
    new_colour: str | None = None
    hops: int = 1  # bounce: one hop per ~4 frames, so every hop is seen by some frame.
    distance: float = 0.0  # move: pixels displaced (set by sample_scene)


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
    clock: bool = False  # a burned-in timecode on every frame (SceneConfig.clock)

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
    # Objects start in distinct cells of the grid so they rarely overlap.
    cells = rng.permutation(cfg.grid * cfg.grid)[:num_objects]
    objects = tuple(
        SceneObject(
            shape=str(shapes[i]),
            colour=colours[i],
            x=(cells[i] % cfg.grid + 0.5) * cfg.size / cfg.grid,
            y=(cells[i] // cfg.grid + 0.5) * cfg.size / cfg.grid,
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
        kinds = [k for k in cfg.event_kinds if not (k == "spin" and objects[obj].shape == "circle")]
        kind = str(rng.choice(kinds))
        direction = new_colour = None
        distance = 0.0
        if kind == "move":
            o = objects[obj]
            # Half a cell: the displaced object sits between resting places, so a single frame
            # shows it is off its place (a whole cell would look like a resting object).
            distance = cfg.size / cfg.grid / 2
            lo, hi = o.radius, cfg.size - o.radius
            room = [
                d
                for d, (dx, dy) in _DIRECTIONS.items()
                if lo < o.x + dx * distance < hi and lo < o.y + dy * distance < hi
            ]
            direction = str(rng.choice(room))
        elif kind == "change_colour":
            new_colour = str(rng.choice(spare_colours))
        hops = max(1, (end - start) // 4)
        events.append(
            Event(
                kind,
                int(obj),
                start / cfg.fps,
                end / cfg.fps,
                direction=direction,
                new_colour=new_colour,
                hops=hops,
                distance=distance,
            )
        )
    background = tuple(int(c) for c in rng.integers(20, 90, size=3))
    return Scene(num_frames, cfg.fps, cfg.size, background, objects, tuple(events), cfg.clock)


def _progress(t: float, event: Event) -> float:
    """0 before the event, rising linearly to 1 at its end, 1 after."""
    if event.end <= event.start:
        return float(t >= event.start)
    return min(max((t - event.start) / (event.end - event.start), 0.0), 1.0)


# Frame times are k / fps, a window end is snapped to the same grid: compare with slack.
_TIME_EPS = 1e-6


def _object_state(obj: SceneObject, events: list[Event], t: float, size: int):
    """(x, y, radius, angle, rgb, alpha) of an object at time t.

    Outside an event's [start, end] the object rests, so only "appear" changes anything there (the
    object is hidden at rest). Inside, the change is at full strength on every frame (no ramp), so
    each frame of the window can be told from the resting scene on its own.
    """
    x, y, radius, angle = obj.x, obj.y, obj.radius, 0.0
    rgb = np.array(COLOURS[obj.colour], np.float32)
    alpha = 1.0
    for event in events:
        inside = event.start - _TIME_EPS <= t <= event.end + _TIME_EPS
        if event.kind == "appear":
            alpha = float(inside)
        if not inside:
            continue
        p = _progress(t, event)
        if event.kind == "move":
            dx, dy = _DIRECTIONS[event.direction]
            x, y = x + dx * event.distance, y + dy * event.distance
        elif event.kind == "spin":
            # Between 1/16 and 3/16 of a turn: never a symmetry of a square, diamond (1/4 turn) or
            # triangle (1/3 turn), so every frame shows the object tilted, and the tilt still moves.
            angle = math.pi / 8 + math.pi / 4 * p
        elif event.kind == "grow":
            radius *= 1.5
        elif event.kind == "shrink":
            radius *= 0.5
        elif event.kind == "disappear":
            alpha = 0.0
        elif event.kind == "bounce":
            # Always at least half a hop up, so no frame of the window shows the object at rest.
            y -= (0.5 + 0.5 * abs(math.sin(event.hops * math.pi * p))) * size / 6
        elif event.kind == "change_colour":
            rgb = np.array(COLOURS[event.new_colour], np.float32)
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
        if scene.clock:
            _draw_timecode(canvas, int(t + _TIME_EPS))
        frames[k] = np.clip(canvas, 0, 255).astype(np.uint8)
    return frames


TIMECODE_BITS = 8  # seconds 0-255 before the code wraps; the synthetic videos are at most a few minutes


def _draw_timecode(canvas: np.ndarray, seconds: int) -> None:
    """The bottom eighth of the frame: TIMECODE_BITS equal blocks, white for the 1-bits of `seconds` (least
    significant first), black for the 0-bits. At 56 px the blocks are 7 px wide, so each 14-px patch holds two whole
    bits."""
    size = canvas.shape[1]
    rows = slice(size - max(2, size // 8), size)
    for bit in range(TIMECODE_BITS):
        cols = slice(bit * size // TIMECODE_BITS, (bit + 1) * size // TIMECODE_BITS)
        canvas[rows, cols] = 255.0 if (seconds >> bit) & 1 else 0.0


@dataclasses.dataclass(frozen=True)
class EventText:
    query: str
    caption: str
    verbs: tuple[str, ...]


def _template_pattern(template: str) -> re.Pattern:
    """A template as a regular expression: its fields match any text, the rest literally."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z")


_PHRASINGS = {
    "explicit": [_template_pattern(t) for t in _EXPLICIT.values()],
    "task_oriented": [_template_pattern(t) for t in _TASK.values()],
}


def query_phrasing(query: str) -> str | None:
    """"explicit" or "task_oriented" (TimeScope's ToTG phrasing: the query names a need, not the action) for a
    query this module wrote, None for any other text: evaluation splits its figures by it."""
    for name, patterns in _PHRASINGS.items():
        if any(p.match(query) for p in patterns):
            return name
    return None


def describe(scene: Scene, event: Event, rng: np.random.Generator, task_phrasing: float) -> EventText:
    """Query (explicit or task-oriented), query-focused caption and verbs of an event."""
    obj = scene.objects[event.obj]
    fields = {
        "obj": f"{obj.colour} {obj.shape}",
        "colour": obj.colour,
        "direction": event.direction,
        "new_colour": event.new_colour,
    }
    task_phrased = rng.random() < task_phrasing
    template = _TASK if task_phrased else _EXPLICIT
    return EventText(
        query=template[event.kind].format(**fields),
        caption=_CAPTION[event.kind].format(**fields),
        verbs=_QUERY_VERBS[task_phrased][event.kind],
    )
