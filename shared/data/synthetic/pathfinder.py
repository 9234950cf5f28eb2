"""Pathfinder images (Linsley et al., NeurIPS 2018; Kim et al., ICLR 2020), as Long Range Arena generated them.

An image shows two target contours ("snakes") made of short paddles, distractor snakes, and two circle markers;
the label is 1 when both markers sit on the same snake and 0 when they sit on different ones. This is a port of
the `snakes2` generator of drewlinsley/pathfinder (the script LRA's TFDS builders cite), with numpy and PIL only:

1. `label ~ randint(0, 2)`; a paddle margin is drawn from `paddle_margin_list`.
2. Two seed paddles: the first at a free position at least `2 * seed_distance` from the border, the second
   `seed_distance` away from it in a random direction; each snake then grows `contour_length - 1` more paddles.
   A new paddle's end point is drawn on a circle of radius `paddle_length + margin` around the next pivot, with
   probability proportional to cos^2(min(continuity * turn angle, pi/2)) on free pixels (so snakes are smooth),
   and the paddle is rejected when its mask overlaps the occupied mask (`max(mask + m) >= 1.8`).
   If any step fails the pair is drawn again.
3. `num_distractor_snakes` snakes of `distractor_length` paddles each, placed the same way (failures skipped).
4. Circle markers of `marker_radius` at the origin tip of one target and the far tip of the same target
   (label 1) or of the other one (label 0).
5. The float image is scaled by its maximum to 0..255, as `scipy.misc.imsave` wrote the release PNGs.

Paddles are drawn `antialias_scale` times larger with PIL and downsampled with Lanczos, as the original does
through `scipy.misc.imresize` (whose byte scaling is reproduced); the `cv2.dilate` of the original is a grey
dilation written with numpy shifts (same anchor and border). The rendered paddle patches depend only on the
orientation, so they are cached: a 32x32 image takes a few milliseconds.

Parameters (`PathfinderParams`, `pathfinder_params(resolution, difficulty)`): the values in the docstrings of
LRA's `Pathfinder32/64/128/256` builders, over the defaults of the snakes2 wrapper script; the difficulty levels
are the wrapper's folders `curv_baseline` (contour length 6), `curv_contour_length_9` and
`curv_contour_length_14` (LRA's "hard", the split every paper reports), with `distractor_length =
contour_length // 3` and `num_distractor_snakes = budget // distractor_length` (the wrapper ran under Python 2:
integer division). Single-paddle distractors exist in snakes2 but the wrapper turns them off
(`use_single_paddles = False`); they are available here behind the same flag.

Release layout (`lra_release/pathfinder32/curv_contour_length_14/`): `imgs/<batch>/sample_<i>.png` and
`metadata/<batch>.npy`, a text file (despite its name) with one line per image:
`imgs/<batch> sample_<i>.png <i> <label> <continuity> <contour_length> <distractor_length> <paddle_length>
<paddle_thickness> <margin> <number of paddle contrasts>`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1

DIFFICULTIES = {"curv_baseline": 6, "curv_contour_length_9": 9, "curv_contour_length_14": 14}
# LRA's TFDS split names for the three folders.
DIFFICULTY_ALIASES = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9",
                      "hard": "curv_contour_length_14"}


@dataclass(frozen=True)
class PathfinderParams:
    """The arguments of the snakes2 wrapper (`Args`), with the wrapper script's defaults."""

    window_size: int = 32
    padding: int = 22
    antialias_scale: int = 2
    seed_distance: int = 27
    marker_radius: float = 3.0
    contour_length: int = 14
    distractor_length: int = 4
    num_distractor_snakes: int = 6
    snake_contrast_list: tuple[float, ...] = (1.0,)
    use_single_paddles: bool = False
    max_target_contour_retrial: int = 4
    max_distractor_contour_retrial: int = 4
    max_paddle_retrial: int = 2
    continuity: float = 1.4
    paddle_length: int = 5
    paddle_thickness: float = 1.5
    paddle_margin_list: tuple[int, ...] = (4,)
    paddle_contrast_list: tuple[float, ...] = (1.0,)


# Per resolution: LRA's builder docstrings; `budget` is the numerator of num_distractor_snakes.
_RESOLUTIONS: dict[int, dict] = {
    32: dict(paddle_margin_list=(1,), padding=1, paddle_length=2, marker_radius=1.5, paddle_thickness=0.5,
             antialias_scale=2, seed_distance=7, continuity=1.0, snake_contrast_list=(2.0,),
             paddle_contrast_list=(0.75,), budget=20),
    64: dict(padding=1, antialias_scale=2, paddle_margin_list=(1,), seed_distance=12, marker_radius=2.5,
             paddle_thickness=1.0, continuity=1.8, snake_contrast_list=(0.8,), budget=22),
    128: dict(padding=1, antialias_scale=2, paddle_margin_list=(2, 3), seed_distance=20, marker_radius=3.0,
              paddle_thickness=1.5, continuity=1.8, snake_contrast_list=(0.9,), budget=35),
    256: dict(antialias_scale=2, paddle_margin_list=(3,), marker_radius=5.0, paddle_thickness=2.0, continuity=1.8,
              snake_contrast_list=(1.0,), budget=30),
}


def pathfinder_params(resolution: int = 32, difficulty: str = "curv_contour_length_14") -> PathfinderParams:
    """The LRA parameters of `resolution` (32, 64, 128 = Path-X, 256) at `difficulty` (a folder name or
    LRA's split name easy / intermediate / hard)."""
    difficulty = DIFFICULTY_ALIASES.get(difficulty, difficulty)
    if resolution not in _RESOLUTIONS:
        raise ValueError(f"Pathfinder resolution must be one of {sorted(_RESOLUTIONS)}, got {resolution}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"Pathfinder difficulty must be one of {sorted(DIFFICULTIES) + sorted(DIFFICULTY_ALIASES)}, "
                         f"got {difficulty!r}")
    values = dict(_RESOLUTIONS[resolution])
    budget = values.pop("budget")
    contour_length = DIFFICULTIES[difficulty]
    distractor_length = contour_length // 3
    return PathfinderParams(window_size=resolution, contour_length=contour_length,
                            distractor_length=distractor_length,
                            num_distractor_snakes=budget // distractor_length, **values)


# ----------------------------------------------------------------------------------------------------------------
# Geometry and rendering


def translate_coord(coord: Sequence[float], orientation: float, dist: float) -> tuple[int, int]:
    """Move (y, x) by `dist` along `orientation` (radians), rounding up as the original does."""
    return (int(math.ceil(coord[0] + dist * math.sin(orientation))),
            int(math.ceil(coord[1] + dist * math.cos(orientation))))


def flip_by_pi(orientation: float) -> float:
    return orientation + math.pi if orientation < 0 else orientation - math.pi


def disk(radius: int) -> np.ndarray:
    """The (2r+1)^2 binary disk the original dilates with (`generate_dilation_struct`)."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x ** 2 + y ** 2 <= radius ** 2).astype(np.float32)


def kernel_offsets(kernel: np.ndarray) -> np.ndarray:
    """(K, 2) offsets of a dilation kernel's ones relative to its centre (cv2's default anchor)."""
    ys, xs = np.nonzero(kernel.astype(np.uint8))  # cv2 casts the kernel to uint8: only values >= 1 count
    return np.stack([ys - kernel.shape[0] // 2, xs - kernel.shape[1] // 2], axis=1)


def dilate(image: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Grey dilation: out[p] = max over offsets o of image[p + o], outside the image counting as 0 (cv2.dilate)."""
    if len(offsets) == 0:
        return np.zeros_like(image)
    r = int(np.abs(offsets).max())
    h, w = image.shape
    padded = np.zeros((h + 2 * r, w + 2 * r), dtype=image.dtype)
    padded[r:r + h, r:r + w] = image
    out = np.zeros_like(image)
    for dy, dx in offsets:
        np.maximum(out, padded[r + dy:r + dy + h, r + dx:r + dx + w], out=out)
    return out


def bytescale(image: np.ndarray) -> np.ndarray:
    """scipy.misc.bytescale: floats mapped linearly from [min, max] to 0..255 and rounded; uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    low, high = float(image.min()), float(image.max())
    scale = 255.0 / ((high - low) or 1.0)
    return (np.clip((image - low) * scale, 0, 255) + 0.5).astype(np.uint8)


def imresize(image: np.ndarray, size: int) -> np.ndarray:
    """scipy.misc.imresize(image, (size, size), interp='lanczos'): byte-scaled, Lanczos on an 8-bit image."""
    return np.asarray(Image.fromarray(bytescale(image)).resize((size, size), Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=8192)
def paddle_patch(orientation: float, length: int, thickness: float, margin: int, aa_scale: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The rendered paddle and its exclusion mask around a start point: two (2R+1)^2 float32 arrays in [0, 1],
    R = length + ceil(thickness) + margin (the original `draw_line_n_mask` before placement)."""
    if round(thickness * aa_scale) != thickness * aa_scale:
        raise ValueError(f"paddle_thickness * antialias_scale = {thickness * aa_scale} must be an integer")
    radius = length + math.ceil(thickness) + margin
    blown_size = radius * 2 * aa_scale + 1
    centre = radius * aa_scale
    head = translate_coord((centre, centre), orientation, length * aa_scale)
    blown = Image.new("F", (blown_size, blown_size), 0.0)
    ImageDraw.Draw(blown).line([(centre, centre), (head[1], head[0])], fill=255.0,
                               width=int(round(thickness * aa_scale)))
    blown = np.asarray(blown, dtype=np.float32)
    line = imresize(blown, 2 * radius + 1).astype(np.float32) / 255.0
    blown_mask = dilate(blown, kernel_offsets(disk(margin * aa_scale))).astype(np.uint8)
    mask = imresize(blown_mask, 2 * radius + 1).astype(np.float32) / 255.0
    line.flags.writeable = False
    mask.flags.writeable = False
    return line, mask


def _window(shape: tuple[int, int], size: int, coord: Sequence[int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    # The part of a (size x size) patch centred on `coord` that lies inside `shape`: (image slices, patch slices),
    # clipped as the original `draw_line_n_mask` clips.
    r = size // 2
    y0, x0 = coord[0] - r, coord[1] - r
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(coord[0] + r, shape[0] - 1) + 1, min(coord[1] + r, shape[1] - 1) + 1
    return (slice(ys, ye), slice(xs, xe)), (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))


def stamp(dst: np.ndarray, patch: np.ndarray, coord: Sequence[int]) -> None:
    """dst = max(dst, patch centred on coord), in place (the original's `np.maximum(image, placed patch)`)."""
    into, part = _window(dst.shape, patch.shape[0], coord)
    np.maximum(dst[into], patch[part], out=dst[into])


@dataclass(frozen=True)
class _Paddle:
    coord: tuple[int, int]
    line: np.ndarray  # already scaled by its contrast
    mask: np.ndarray

    def overlaps(self, mask: np.ndarray) -> bool:
        """The original's rejection test `max(mask + paddle mask) >= 1.8` (mask <= 1 outside the paddle)."""
        into, part = _window(mask.shape, self.mask.shape[0], self.coord)
        return bool((mask[into] + self.mask[part]).max() >= 1.8)


@functools.lru_cache(maxsize=8192)
def _seed_struct_offsets(orientation: float, length: int, thickness: float, margin: int, aa_scale: int) -> np.ndarray:
    # The head-centric dilation structure of a seed paddle: its mask drawn from (l+m+1, l+m+1) in a (2(l+m)+1)^2
    # frame; positions where dilating the occupied mask by it stays free can take the paddle's tail.
    size = (length + margin) * 2 + 1
    _, mask = paddle_patch(orientation, length, thickness, margin, aa_scale)
    struct = np.zeros((size, size), dtype=np.float32)
    stamp(struct, mask, (length + margin + 1, length + margin + 1))
    return kernel_offsets(struct)


@functools.lru_cache(maxsize=64)
def _arc(step: int, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The candidate end points of `extend_snake` relative to the pivot: about one per pixel of arc on the circle of
    # radius `step`, truncated to integers, deduplicated and sorted as `np.unique(axis=0)` sorts them; their
    # orientations; and (K, S, 2) the offsets of each candidate's small-disk neighbourhood (where the occupied
    # mask, dilated by that disk, is read). Pivots are integers, so truncating pivot + offset equals
    # pivot + truncated offset wherever the original keeps a point, and the order survives the shift.
    angles = np.arange(0, 360, 360.0 / (2 * step * math.pi)) * math.pi / 180
    offsets = np.unique(np.floor(np.stack([step * np.sin(angles), step * np.cos(angles)], axis=1)).astype(int), axis=0)
    neighbours = offsets[:, None, :] + kernel_offsets(disk(margin))[None, :, :]
    return offsets, np.arctan2(offsets[:, 0], offsets[:, 1]), neighbours


@functools.lru_cache(maxsize=65536)
def _continuity_weights(orientation: float, step: int, margin: int, continuity: float) -> np.ndarray:
    # cos^2(min(continuity * turn, pi/2)) for every candidate of `_arc(step, margin)` after a paddle of `orientation`.
    _, orientations, _ = _arc(step, margin)
    delta = np.abs(orientations - orientation)
    delta = np.minimum(np.minimum(delta, 2 * np.pi - delta) * continuity, 0.5 * np.pi)
    return np.maximum(np.cos(delta), 0) ** 2


def circle(size: int, coord: Sequence[int], radius: float, aa_scale: int) -> np.ndarray:
    """A marker disk of `radius` around `coord`, drawn `aa_scale` times larger and resized (uint8)."""
    big = size * aa_scale
    y = np.arange(big)[:, None] - coord[0] * aa_scale
    x = np.arange(big)[None, :] - coord[1] * aa_scale
    image = (x ** 2 + y ** 2 <= (radius * aa_scale) ** 2).astype(np.float64)
    return imresize(image, size)


# ----------------------------------------------------------------------------------------------------------------
# Snakes


@dataclass
class _Snake:
    pivot: tuple[int, int]
    orientation: float
    tip: tuple[int, int]
    last: _Paddle  # its newest paddle, whose mask joins the occupied mask when the next paddle is placed


class _Canvas:
    """One image being drawn: the random generator, the parameters and the dilation structures.

    Images and masks are float32 arrays updated in place; a caller that may have to undo a snake works on copies.
    """

    def __init__(self, rng: np.random.Generator, p: PathfinderParams, margin: int) -> None:
        self.rng, self.p, self.margin = rng, p, margin
        self.shape = (p.window_size, p.window_size)
        self.small_offsets = kernel_offsets(disk(margin))

    def random_orientation(self) -> float:
        return int(self.rng.integers(-180, 180)) * math.pi / 180

    def contrast(self, contrasts: Sequence[float]) -> float:
        return contrasts[int(self.rng.integers(0, len(contrasts)))]

    def paddle(self, start: tuple[int, int], orientation: float, contrast: float) -> _Paddle:
        p = self.p
        line, mask = paddle_patch(orientation, p.paddle_length, p.paddle_thickness, self.margin, p.antialias_scale)
        return _Paddle(start, line * contrast if contrast != 1.0 else line, mask)

    def free_tails(self, lined: np.ndarray, orientation: float) -> np.ndarray:
        """(K, 2) positions where a seed paddle of `orientation` keeps clear of `lined` (occupied mask + border)."""
        p = self.p
        struct = _seed_struct_offsets(orientation, p.paddle_length, p.paddle_thickness, self.margin,
                                      p.antialias_scale)
        return np.argwhere(np.ceil(dilate(lined, struct) - 0.3) == 0)

    def in_bounds(self, *coords: tuple[int, int]) -> bool:
        return all(0 <= c[0] < self.shape[0] and 0 <= c[1] < self.shape[1] for c in coords)

    def extend(self, snake: _Snake, image: np.ndarray, mask: np.ndarray, contrast: float) -> bool:
        """Grow `snake` by one paddle drawn into `image`, adding its previous paddle to `mask` (the original
        `extend_snake`); False, with nothing drawn, when no paddle fits."""
        p, rng = self.p, self.rng
        h, w = self.shape
        step = p.paddle_length + self.margin
        new_pivot = translate_coord(snake.pivot, snake.orientation, p.paddle_length + 2 * self.margin)
        offsets, orientations, neighbours = _arc(step, self.margin)
        coords = offsets + np.asarray(new_pivot)  # (K, 2)
        inside = (coords[:, 0] >= 0) & (coords[:, 0] < h) & (coords[:, 1] >= 0) & (coords[:, 1] < w)
        if not inside.any():
            return False
        # The occupied mask dilated by the small disk, read at the candidates only (outside the image counts 0).
        ys = neighbours[:, :, 0] + new_pivot[0]  # (K, S)
        xs = neighbours[:, :, 1] + new_pivot[1]  # (K, S)
        valid = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        occupied = (mask[ys.clip(0, h - 1), xs.clip(0, w - 1)] * valid).max(axis=1)  # (K,)
        weights = _continuity_weights(snake.orientation, step, self.margin, p.continuity)
        pmf = (1 - occupied) * weights * inside  # candidates outside the image can never be drawn
        total = pmf.sum()
        if total < 1e-4:
            return False
        cmf = np.cumsum(pmf / total)
        for _ in range(p.max_paddle_retrial + 1):
            index = int(np.argmax(cmf - rng.random() > 0))
            head = (int(coords[index, 0]), int(coords[index, 1]))
            paddle = self.paddle(head, flip_by_pi(float(orientations[index])), contrast)
            if not paddle.overlaps(mask):
                stamp(image, paddle.line, head)
                stamp(mask, snake.last.mask, snake.last.coord)
                snake.pivot, snake.orientation = new_pivot, float(orientations[index])
                snake.tip, snake.last = head, paddle
                return True
        return False

    def seed(self, image: np.ndarray, mask: np.ndarray, contrast: float, stop_with_availability: float | None
             ) -> _Snake | None:
        """The first paddle of a distractor snake, drawn into `image` (the original `seed_snake`)."""
        p, rng = self.p, self.rng
        available = float((np.ceil(mask - 0.3) == 0).mean())
        lined = mask.copy()
        lined[0, :] = lined[-1, :] = lined[:, 0] = lined[:, -1] = 1
        for _ in range(p.max_paddle_retrial + 1):
            orientation = self.random_orientation()
            if stop_with_availability is not None and available < stop_with_availability:
                return None
            free = self.free_tails(lined, orientation)
            if len(free) == 0:
                return None
            tail = tuple(int(v) for v in free[int(rng.integers(0, len(free)))])
            head = translate_coord(tail, orientation, p.paddle_length)
            pivot = translate_coord(head, flip_by_pi(orientation), p.paddle_length + self.margin)
            if self.in_bounds(head, pivot):
                paddle = self.paddle(tail, orientation, contrast)
                stamp(image, paddle.line, tail)
                return _Snake(pivot, orientation, tail, paddle)
        return None

    def snake(self, image: np.ndarray, mask: np.ndarray, num_segments: int, contrasts: Sequence[float],
              stop_with_availability: float | None) -> tuple[np.ndarray, np.ndarray] | None:
        """One whole distractor snake drawn into copies of `image` and `mask` (the original `make_snake`), or None
        when it does not fit."""
        image, mask = image.copy(), mask.copy()
        snake = self.seed(image, mask, self.contrast(contrasts), stop_with_availability)
        if snake is None:
            return None
        for _ in range(num_segments - 1):
            if not self.extend(snake, image, mask, self.contrast(contrasts)):
                return None
        stamp(mask, snake.last.mask, snake.last.coord)
        return image, mask

    def many_snakes(self, image: np.ndarray, mask: np.ndarray, num_snakes: int, max_snake_trial: int,
                    num_segments: int, contrasts: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """`num_snakes` distractors, each retried `max_snake_trial` times and skipped when it never fits
        (`make_many_snakes` with allow_incomplete=True, stop_with_availability=0.01)."""
        for _ in range(num_snakes):
            for _ in range(max_snake_trial + 1):
                drawn = self.snake(image, mask, num_segments, contrasts, 0.01)
                if drawn is not None:
                    image, mask = drawn
                    break
        return image, mask

    def _target_seed(self, sample_tail, contrast: float) -> _Snake | None:
        # Up to max_paddle_retrial + 1 draws of (orientation, tail) until the paddle's head and pivot are inside.
        p = self.p
        for _ in range(p.max_paddle_retrial + 1):
            orientation = self.random_orientation()
            tail = sample_tail(orientation)
            if tail is None:
                return None
            head = translate_coord(tail, orientation, p.paddle_length)
            pivot = translate_coord(head, flip_by_pi(orientation), p.paddle_length + self.margin)
            if self.in_bounds(head, pivot):
                return _Snake(pivot, orientation, tail, self.paddle(tail, orientation, contrast))
        return None

    def two_seeds(self, contrast_mu: Sequence[float]) -> tuple[np.ndarray, list[_Snake]] | None:
        """The two target snakes' first paddles, `seed_distance` apart (the original `initialize_two_seeds`),
        and the occupied mask (the border `padding`)."""
        p, rng = self.p, self.rng
        h, w = self.shape
        mask = np.zeros(self.shape, dtype=np.float32)
        mask[:p.padding, :] = mask[-p.padding:, :] = mask[:, :p.padding] = mask[:, -p.padding:] = 1
        lined = mask.copy()
        d = 2 * p.seed_distance
        lined[:d, :] = lined[h - d:, :] = lined[:, :d] = lined[:, w - d:] = 1

        def first_tail(orientation: float) -> tuple[int, int] | None:
            free = self.free_tails(lined, orientation)
            return None if len(free) == 0 else tuple(int(v) for v in free[int(rng.integers(0, len(free)))])

        def second_tail(orientation: float) -> tuple[int, int]:
            direction = int(rng.integers(0, 360)) * math.pi / 180
            return (int(round(first.tip[0] + p.seed_distance * math.sin(direction))),
                    int(round(first.tip[1] + p.seed_distance * math.cos(direction))))

        def contrast(mu: float) -> float:
            contrasts = p.paddle_contrast_list
            return (self.contrast(contrasts) if len(contrasts) > 1 else contrasts[0]) * mu

        first = self._target_seed(first_tail, contrast(contrast_mu[0]))
        if first is None:
            return None
        second = self._target_seed(second_tail, contrast(contrast_mu[1]))
        if second is None:
            return None
        return mask, [first, second]

    def two_snakes(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], list[tuple[int, int]]] | None:
        """The two target snakes (the original `two_snakes`): image, mask, origin tips, terminal tips."""
        p = self.p
        contrast_mu = list(p.snake_contrast_list) * 2
        contrast_mu = [contrast_mu[i] for i in self.rng.permutation(len(contrast_mu))][:2]
        seeded = self.two_seeds(contrast_mu)
        if seeded is None:
            return None
        mask, snakes = seeded
        origins = [s.tip for s in snakes]
        images = [np.zeros(self.shape, dtype=np.float32) for _ in snakes]
        for image, s in zip(images, snakes):
            stamp(image, s.last.line, s.last.coord)
        for _ in range(p.contour_length - 1):
            contrast = self.contrast(p.paddle_contrast_list)
            for image, s, mu in zip(images, snakes, contrast_mu):
                if not self.extend(s, image, mask, contrast * mu):
                    return None
        # As in the original, only the second snake's last paddle joins the occupied mask.
        stamp(mask, snakes[-1].last.mask, snakes[-1].last.coord)
        return np.maximum(images[0], images[1]), mask, origins, [s.tip for s in snakes]


def generate_image(rng: np.random.Generator, p: PathfinderParams) -> tuple[np.ndarray, int, int]:
    """One Pathfinder image: (uint8 (H, W) pixels as the release PNG stores them, label, paddle margin)."""
    label = int(rng.integers(0, 2))
    margin = p.paddle_margin_list[int(rng.integers(0, len(p.paddle_margin_list)))]
    canvas = _Canvas(rng, p, margin)
    targets = None
    while targets is None:
        targets = canvas.two_snakes()
    image, mask, origins, terminals = targets
    if p.num_distractor_snakes > 0:
        image, mask = canvas.many_snakes(image, mask, p.num_distractor_snakes, p.max_distractor_contour_retrial,
                                         p.distractor_length, p.snake_contrast_list)
    if p.use_single_paddles:
        margin_factor = (7.5 + 13 * margin + 4 * margin * margin) / 123.5
        num_single = int(150 / margin_factor) - 2 * p.contour_length - p.num_distractor_snakes * p.distractor_length
        image, _ = canvas.many_snakes(image, mask, num_single, p.max_paddle_retrial, 1, p.snake_contrast_list)
    origin = int(rng.integers(0, 2))
    terminal = origin if label == 1 else 1 - origin
    markers = np.maximum(circle(p.window_size, origins[origin], p.marker_radius, p.antialias_scale),
                         circle(p.window_size, terminals[terminal], p.marker_radius, p.antialias_scale))
    image = np.maximum(image, markers.astype(np.float32) / 255.0)
    return bytescale(image), label, margin


def generate(num_images: int, seed: int, params: PathfinderParams | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """`num_images` images from one seeded stream: uint8 (num_images, H, W) and int64 labels (num_images,)."""
    params = params or pathfinder_params()
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, params.window_size, params.window_size), dtype=np.uint8)
    labels = np.empty(num_images, dtype=np.int64)
    for i in range(num_images):
        images[i], labels[i], _ = generate_image(rng, params)
    return images, labels


# ----------------------------------------------------------------------------------------------------------------
# The release layout


def metadata_line(batch: int, index: int, label: int, p: PathfinderParams, margin: int) -> str:
    """One line of `metadata/<batch>.npy` as the original `accumulate_meta` records it."""
    fields = [f"imgs/{batch}", f"sample_{index}.png", index, label, p.continuity, p.contour_length,
              p.distractor_length, p.paddle_length, p.paddle_thickness, margin, len(p.paddle_contrast_list)]
    return " ".join(str(f) for f in fields)


def write_release(folder: str | Path, images: np.ndarray, labels: np.ndarray, p: PathfinderParams,
                  batch: int = 0, margin: int | None = None) -> None:
    """Write images in the release layout under `folder` (e.g. `pathfinder32/curv_contour_length_14`)."""
    folder = Path(folder)
    (folder / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    margin = p.paddle_margin_list[0] if margin is None else margin
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / "imgs" / str(batch) / f"sample_{i}.png")
        lines.append(metadata_line(batch, i, int(label), p, margin))
    (folder / "metadata" / f"{batch}.npy").write_text("\n".join(lines) + "\n")


def read_metadata(path: str | Path) -> list[tuple[str, int]]:
    """(image path relative to the difficulty folder, label) for every line of one metadata file.

    The release's files are text; a real NumPy file (the original `np.save` of the string table) is read too.
    ValueError names the file and line when a row has too few fields.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        rows = [[str(v) for v in row] for row in np.load(path, allow_pickle=False)]
    else:
        rows = [line.split() for line in raw.decode("utf-8").splitlines() if line.strip()]
    out = []
    for number, fields in enumerate(rows, start=1):
        if len(fields) < 4 or not fields[3].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<imgs dir> <file> <index> <label> ...', got {fields!r}")
        out.append((f"{fields[0]}/{fields[1]}", int(fields[3])))
    return out
