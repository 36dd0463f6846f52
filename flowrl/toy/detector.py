"""Classical-vision detector of the shapes world: GenEval detections from 32x32 renders, no weights.

GenEval scores an image with an instance detector and a colour classifier. In the shapes world both
are replaced by this module, which needs only numpy and scipy and runs in about a millisecond per
image on a CPU:

1. **Colour unmixing.** An anti-aliased or blurred edge pixel is a mix ``bg + a * (c - bg)`` of the
   background ``bg`` and a palette colour ``c``. For every pixel and palette colour the coverage
   ``a`` is the projection of ``pixel - bg`` onto ``c - bg``, and the residual is what that mix
   fails to explain. A pixel takes the colour with the smallest residual; pixels whose residual is
   too large (grey, black, far-off hues) belong to no colour and are ignored.
2. **Components.** Pixels at least half covered by their colour form a hard mask per colour, split
   into 8-connected components (``scipy.ndimage.label``). Specks below ``min_area`` are dropped.
   Touching objects of one colour merge into one component, as they do for GenEval's detector.
3. **Template fit.** Each shape class has a template with the world's proportions
   (:func:`flowrl.toy.scenes.extent`) and orientation (apex-up triangle, horizontal bar): a soft
   coverage map built from the exact profile of an anti-aliased edge under a Gaussian blur, with a
   product over a polygon's edges so that corners stay sharp. The template's size and centre come
   from the component's soft area and centroid; a few sizes and blurs are tried, and each class's
   best soft IoU with the component's coverage map is its fit. The best-fitting class wins. A
   fill-ratio cut would misread a blurred square (its corners round off) as a circle; blurred
   templates do not.
4. **Score.** A logistic function of the winning fit, lowered when the runner-up fits almost as well
   and for blobs far smaller or larger than the world's objects (a whole image painted one colour
   is not a confident square). Clean and mildly blurred renders score above 0.9 (GenEval's counting
   threshold), sloppy blobs in between, junk below 0.3.

Typical use::

    from flowrl.toy.detector import ShapesDetector
    from flowrl.rewards.geneval import judge

    detector = ShapesDetector()
    detections = detector(images)  # images: float [B, 3, H, W] in [0, 1], numpy or torch
    verdicts = [judge(record, d) for record, d in zip(records, detections)]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from flowrl.rewards.geneval import Detection
from flowrl.toy.scenes import ShapeObject
from flowrl.toy.world import BACKGROUND, COLORS, PALETTE, RESOLUTION, SHAPES

__all__ = ["Blob", "MatchCounts", "ShapesDetector", "box_iou", "detect_one", "match_objects"]

#: Area of each shape as a multiple of its nominal size squared (see `scenes.extent`).
_AREA_FACTOR: dict[str, float] = {
    "circle": math.pi / 4,
    "square": 0.86**2,
    "triangle": 0.5 * 0.9,
    "bar": 1.3 * 1.3 / 3.0,
}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Blob:
    """One connected component with its template fits: what a detection is made from.

    Attributes:
        mask: bool [H, W], the component's pixels (at least half covered by `color`).
        box: (x1, y1, x2, y2) in pixels, the tight box of `mask` (x2 = last column + 1).
        color: palette colour of the component, one of `world.COLORS`.
        area: soft area in pixels (sum of the colour's coverage over the component and its rim).
        fits: soft IoU of each shape's best template with the component, in `world.SHAPES` order.
        shape: the best-fitting shape.
        score: detection confidence in [0, 1].
    """

    mask: np.ndarray  # bool [H, W]
    box: tuple[int, int, int, int]
    color: str
    area: float
    fits: dict[str, float] = field(repr=False)
    shape: str
    score: float

    def detection(self) -> Detection:
        """The GenEval detection of this blob."""
        return Detection(box=self.box, score=self.score, color=self.color, mask=self.mask)


def _as_images(images: Any) -> np.ndarray:
    """float32 [B, 3, H, W] in [0, 1] from a numpy array or torch tensor of rank 3 or 4."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor; torch stays optional
        images = images.detach().cpu()
        if images.is_floating_point():
            images = images.float()
        images = images.numpy()
    array = np.asarray(images)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"ShapesDetector expects float images in [0, 1], got dtype {array.dtype}; convert 8-bit "
            "images with images.astype(np.float32) / 255"
        )
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(
            f"ShapesDetector expects images of shape [B, 3, H, W] or [3, H, W] (channels first, RGB), "
            f"got shape {tuple(array.shape)}; move channels first with images.transpose(0, 3, 1, 2) "
            "or stack single images into a batch"
        )
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array).all(axis=(1, 2, 3))))
        raise ValueError(
            f"{bad} of {array.shape[0]} images contain NaN or infinite values; the detector cannot "
            "score them. Check the sampler (a diverged model or a division by zero upstream)"
        )
    return np.clip(array.astype(np.float32, copy=False), 0.0, 1.0)


def _edge_profile(inside: np.ndarray, sigma: float) -> np.ndarray:
    """Coverage of a pixel whose centre lies `inside` px within a straight edge, blurred by `sigma`.

    The renderer's anti-aliasing averages a pixel's area: across an edge that is a linear ramp
    ``clip(0.5 + inside, 0, 1)``. A Gaussian blur of standard deviation sigma smooths the ramp to
    ``sigma * (g((inside + 1/2) / sigma) - g((inside - 1/2) / sigma))`` with
    ``g(a) = a Phi(a) + phi(a)``, an antiderivative of the normal CDF ``Phi``.
    """
    hi, lo = (inside + 0.5) / sigma, (inside - 0.5) / sigma
    gauss = 1.0 / math.sqrt(2.0 * math.pi)
    g_hi = hi * ndtr(hi) + gauss * np.exp(-0.5 * hi * hi)
    g_lo = lo * ndtr(lo) + gauss * np.exp(-0.5 * lo * lo)
    return np.clip(sigma * (g_hi - g_lo), 0.0, 1.0)


#: Lookup tables of `_edge_profile`: distances from -_EDGE_RANGE to +_EDGE_RANGE px in steps of
#: 1 / _EDGE_STEPS px (nearest entry: at most 0.002 off; the special functions cost 10x more).
_EDGE_RANGE, _EDGE_STEPS = 8.0, 256


@functools.lru_cache(maxsize=8)
def _edge_table(sigmas: tuple[float, ...]) -> np.ndarray:
    """float32 [S, N], `_edge_profile` of each sigma sampled on the lookup grid."""
    u = np.arange(-_EDGE_RANGE * _EDGE_STEPS, _EDGE_RANGE * _EDGE_STEPS + 1) / _EDGE_STEPS
    return np.stack([_edge_profile(u, s) for s in sigmas]).astype(np.float32)


def _edge(inside: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`_edge_profile` of every sigma of `table` ([S, N]) at distances `inside` [...] -> [S, ...]."""
    index = np.rint((inside + _EDGE_RANGE) * _EDGE_STEPS).astype(np.intp)
    return table[:, np.clip(index, 0, table.shape[1] - 1)]


def _templates(
    shape: str,
    x: np.ndarray,
    y: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    sizes: np.ndarray,
    table: np.ndarray,
) -> np.ndarray:
    """Soft coverage maps of one shape class, as `render.coverage` draws it, blurred a little.

    A circle is `_edge` of its signed distance; a polygon is the product of `_edge` over its edge
    lines, which keeps sharp corners sharp (the signed distance of a polygon would round them off
    and turn a square towards a circle).

    Args:
        shape: one of `world.SHAPES`.
        x, y: pixel-centre coordinates [h, w].
        cx, cy: centres of the shape's box in pixels [C].
        sizes: nominal sizes [C] (see `scenes.extent`).
        table: `_edge_table` of the S blurs to draw, [S, N].

    Returns:
        float [S, C, h, w] in [0, 1].
    """
    dx = x[None] - cx[:, None, None]  # [C, h, w]
    dy = y[None] - cy[:, None, None]
    size = sizes[:, None, None]
    if shape == "circle":
        return _edge(size / 2 - np.hypot(dx, dy), table)
    if shape in ("square", "bar"):
        half_w = size * (0.43 if shape == "square" else 0.65)
        half_h = half_w if shape == "square" else half_w / 3
        ax, ay = np.abs(dx), np.abs(dy)
        return _edge(half_w - ax, table) * _edge(half_h - ay, table)
    if shape == "triangle":
        # Apex up at (0, -h/2), base at y = h/2 with half-width w/2 (w = size, h = 0.9 size).
        half_w, height = size / 2, 0.9 * size
        depth = dy + height / 2
        norm = np.sqrt(height**2 + half_w**2)
        left = (half_w * depth + height * dx) / norm
        right = (half_w * depth - height * dx) / norm
        return _edge(height / 2 - dy, table) * _edge(left, table) * _edge(right, table)
    raise ValueError(f"unknown shape {shape!r}; the shapes world has {', '.join(SHAPES)}")


@dataclass(frozen=True)
class ShapesDetector:
    """Detect the shapes world's objects in images; callable on a batch.

    Attributes:
        background: the expected background colour (sRGB in [0, 1]).
        estimate_background: use the image's median colour as the background when it lies within
            `max_background_shift` of `background` (tolerates a model's slightly off background).
        max_background_shift: largest per-channel shift of an estimated background, else `background`.
        max_color_distance: a pixel whose colour is further than this (Euclidean, RGB in [0, 1]) from
            every background-to-palette mix belongs to no colour.
        min_area: components with fewer pixels are specks and dropped (pixels at 32x32; scaled with
            the image area).
        full_score_areas: blobs whose pixel count (at 32x32, scaled) lies in this range score in
            full; below it the score falls linearly to 0 at `min_area`, above it to 0 at
            `max_area`. The world's objects cover about 29 to 95 pixels; the upper limit keeps a
            model from scoring by painting the whole image one colour.
        max_area: blobs with this many pixels (at 32x32, scaled) or more score 0.
        size_factors: template sizes tried, as multiples of the size that matches the blob's area.
        edge_sigmas: blurs tried on the templates, Gaussian sigma in pixels on top of the
            renderer's anti-aliasing (0.05: a sharp render; larger values match blurred images).
        coverage_floor: coverage below this is treated as zero in blob and template alike, so that
            pixel noise around an object does not erode its fit.
        fit_center: winning fit (soft IoU) that scores 0.5.
        fit_width: logistic width of the fit-to-score map; smaller is sharper.
        margin_scale: the score is multiplied by ``min(1, 0.5 + margin / margin_scale)``, with
            margin the winning fit minus the runner-up's, so that ambiguous blobs score lower.
        min_score: blobs scoring below this are not reported as detections (`blobs` keeps them).
    """

    background: tuple[float, float, float] = BACKGROUND
    estimate_background: bool = True
    max_background_shift: float = 0.08
    max_color_distance: float = 0.25
    min_area: float = 4.0
    full_score_areas: tuple[float, float] = (16.0, 200.0)
    max_area: float = 450.0
    size_factors: tuple[float, ...] = (0.94, 1.0, 1.06)
    edge_sigmas: tuple[float, ...] = (0.05, 0.35, 0.55, 0.75, 1.0)
    coverage_floor: float = 0.08
    fit_center: float = 0.75
    fit_width: float = 0.06
    margin_scale: float = 0.1
    min_score: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.max_color_distance:
            raise ValueError(f"max_color_distance must be positive, got {self.max_color_distance}")
        low, high = self.full_score_areas
        if not 0.0 <= self.min_area <= low <= high <= self.max_area:
            raise ValueError(
                "areas must satisfy 0 <= min_area <= full_score_areas[0] <= full_score_areas[1] <= "
                f"max_area, got {self.min_area}, {self.full_score_areas}, {self.max_area}"
            )
        if not self.size_factors or not self.edge_sigmas or min(self.edge_sigmas) <= 0:
            raise ValueError(
                f"size_factors and edge_sigmas must be non-empty with positive sigmas, got "
                f"{self.size_factors} and {self.edge_sigmas}"
            )
        if not 0.0 <= self.coverage_floor < 1.0 or self.fit_width <= 0 or self.margin_scale <= 0:
            raise ValueError(
                "coverage_floor must lie in [0, 1) and fit_width, margin_scale must be positive; got "
                f"{self.coverage_floor}, {self.fit_width}, {self.margin_scale}"
            )

    # -- public API -----------------------------------------------------------------------------

    def __call__(self, images: Any) -> list[dict[str, list[Detection]]]:
        """Detections of a batch of images.

        Args:
            images: float [B, 3, H, W] or [3, H, W] in [0, 1], numpy array or torch tensor (values
                outside [0, 1] are clipped).

        Returns:
            One dict per image mapping every class of `world.SHAPES` to its detections scoring at
            least `min_score`, highest score first (empty lists when nothing was found).

        Raises:
            ValueError: wrong rank or channel count, a non-float dtype, or non-finite values.
        """
        out = []
        for blobs in self.blobs(images):
            found: dict[str, list[Detection]] = {s: [] for s in SHAPES}
            for blob in sorted(blobs, key=lambda b: -b.score):
                if blob.score >= self.min_score:
                    found[blob.shape].append(blob.detection())
            out.append(found)
        return out

    def detect_one(self, image: Any) -> dict[str, list[Detection]]:
        """Detections of one image, float [3, H, W] in [0, 1] (see `__call__`)."""
        array = _as_images(image)
        if array.shape[0] != 1:
            raise ValueError(f"detect_one takes one image [3, H, W], got a batch of {array.shape[0]}")
        return self(array)[0]

    def blobs(self, images: Any) -> list[list[Blob]]:
        """Every component of every image with its template fits (what `__call__` reports, and more).

        Args:
            images: as for `__call__`.

        Returns:
            Per image, its blobs in no particular order.
        """
        array = _as_images(images)
        batch, _, height, width = array.shape
        if batch == 0 or height == 0 or width == 0:
            return [[] for _ in range(batch)]
        label, coverage = self._unmix(array)
        return [self._image_blobs(label[i], coverage[i]) for i in range(batch)]

    # -- stages ---------------------------------------------------------------------------------

    def _backgrounds(self, images: np.ndarray) -> np.ndarray:
        """Background colour per image, float32 [B, 3]."""
        expected = np.asarray(self.background, dtype=np.float32)
        bg = np.broadcast_to(expected, (images.shape[0], 3)).copy()
        if self.estimate_background:
            median = np.median(images.reshape(images.shape[0], 3, -1), axis=2)
            near = np.all(np.abs(median - expected) <= self.max_background_shift, axis=1)
            bg[near] = median[near]
        return bg

    def _unmix(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel colour and coverage of every palette colour.

        Args:
            images: float32 [B, 3, H, W] in [0, 1].

        Returns:
            label: int8 [B, H, W], index into `world.COLORS` of the pixel's colour, -1 for none.
            coverage: float32 [B, K, H, W], coverage of each palette colour, 0 where that colour
                does not explain the pixel within `max_color_distance`.
        """
        bg = self._backgrounds(images)  # [B, 3]
        palette = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # [K, 3]
        diff = images - bg[:, :, None, None]  # [B, 3, H, W]
        direction = palette[None] - bg[:, None]  # [B, K, 3]
        norm2 = np.maximum(np.sum(direction**2, axis=2), 1e-6)  # [B, K]
        # Coverage may exceed 1 a little for a more saturated shade of the palette colour.
        alpha = np.einsum("bkc,bchw->bkhw", direction, diff) / norm2[:, :, None, None]
        alpha = np.clip(alpha, 0.0, 1.5)
        residual = diff[:, None] - alpha[:, :, None] * direction[:, :, :, None, None]  # [B, K, 3, H, W]
        distance = np.sqrt(np.sum(residual**2, axis=2))  # [B, K, H, W]
        explained = distance <= self.max_color_distance
        best = np.argmin(distance, axis=1)  # [B, H, W]
        best_alpha = np.take_along_axis(alpha, best[:, None], axis=1)[:, 0]
        best_ok = np.take_along_axis(explained, best[:, None], axis=1)[:, 0]
        label = np.where(best_ok & (best_alpha >= 0.5), best, -1).astype(np.int8)
        coverage = np.where(explained, np.minimum(alpha, 1.0), 0.0).astype(np.float32)
        return label, coverage

    def _image_blobs(self, label: np.ndarray, coverage: np.ndarray) -> list[Blob]:
        """Components of one image (label [H, W], coverage [K, H, W]) with their fits and scores."""
        height, width = label.shape
        area_scale = height * width / RESOLUTION**2
        min_area = self.min_area * area_scale
        blobs = []
        foreground = label >= 0
        for k, color in enumerate(COLORS):
            components, n = ndimage.label(label == k, structure=_EIGHT_CONNECTED)
            if n == 0:
                continue
            for index, slices in enumerate(ndimage.find_objects(components), start=1):
                ys, xs = slices
                mask = components == index
                pixels = int(mask[slices].sum())
                if pixels < min_area:
                    continue
                # The rim (2 px) holds the soft edge; pixels of other components are not ours.
                y0, y1 = max(ys.start - 2, 0), min(ys.stop + 2, height)
                x0, x1 = max(xs.start - 2, 0), min(xs.stop + 2, width)
                local = mask[y0:y1, x0:x1]
                rim = ndimage.binary_dilation(local, structure=_EIGHT_CONNECTED, iterations=2)
                others = foreground[y0:y1, x0:x1] & ~local
                soft = np.where(rim & ~others, coverage[k, y0:y1, x0:x1], 0.0)
                fits = self._fit(soft, x0, y0)
                ranked = sorted(fits.values(), reverse=True)
                shape = max(fits, key=fits.__getitem__)
                area = float(soft.sum())
                score = self._score(ranked[0], ranked[0] - ranked[1], pixels / area_scale)
                box = (xs.start, ys.start, xs.stop, ys.stop)
                blobs.append(Blob(mask, box, color, area, fits, shape, score))
        return blobs

    def _fit(self, soft: np.ndarray, x0: int, y0: int) -> dict[str, float]:
        """Best soft IoU of each shape's templates with a blob's coverage map.

        Args:
            soft: float [h, w], the blob's coverage in a crop whose top-left pixel is (x0, y0).

        Returns:
            Soft IoU in [0, 1] per shape, in `world.SHAPES` order.
        """
        h, w = soft.shape
        y, x = np.meshgrid(np.arange(h) + y0 + 0.5, np.arange(w) + x0 + 0.5, indexing="ij")
        mass = float(soft.sum())
        if mass <= 1e-6:
            return dict.fromkeys(SHAPES, 0.0)
        mx, my = float((soft * x).sum() / mass), float((soft * y).sum() / mass)
        floor = self.coverage_floor
        blob = np.clip((soft - floor) / (1 - floor), 0.0, 1.0)
        factors = np.asarray(self.size_factors, dtype=np.float64)
        table = _edge_table(tuple(self.edge_sigmas))
        fits = {}
        for shape in SHAPES:
            sizes = math.sqrt(mass / _AREA_FACTOR[shape]) * factors  # [C]
            # The triangle's centroid lies a sixth of its height below its box centre.
            cy = my - 0.9 * sizes / 6 if shape == "triangle" else np.full_like(sizes, my)
            template = _templates(shape, x, y, np.full_like(sizes, mx), cy, sizes, table)
            template = np.clip((template - floor) / (1 - floor), 0.0, 1.0)
            inter = np.minimum(template, blob).sum(axis=(2, 3))
            union = np.maximum(template, blob).sum(axis=(2, 3))
            fits[shape] = float(np.max(inter / np.maximum(union, 1e-9)))
        return fits

    def _score(self, fit: float, margin: float, pixels: float) -> float:
        """Confidence from the winning fit, its margin over the runner-up and the blob's pixel count
        (at 32x32)."""
        score = 1.0 / (1.0 + math.exp(-(fit - self.fit_center) / self.fit_width))
        score *= min(1.0, 0.5 + margin / self.margin_scale)
        low, high = self.full_score_areas
        ramp_up = (pixels - self.min_area) / max(low - self.min_area, 1e-9)
        ramp_down = (self.max_area - pixels) / max(self.max_area - high, 1e-9)
        score *= min(1.0, max(0.0, ramp_up), max(0.0, ramp_down))
        return float(min(1.0, max(0.0, score)))


def detect_one(image: Any, detector: ShapesDetector | None = None) -> dict[str, list[Detection]]:
    """Detections of one image, float [3, H, W] in [0, 1], with `detector` or the default one."""
    return (detector or ShapesDetector()).detect_one(image)


@dataclass(frozen=True)
class MatchCounts:
    """Detections matched one-to-one to ground-truth objects (for precision and recall).

    Attributes:
        matched: detections matched to an object of the same class and colour with box IoU >= the
            matching threshold.
        detected: detections scoring above the score threshold.
        expected: ground-truth objects.
    """

    matched: int
    detected: int
    expected: int

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(
            self.matched + other.matched, self.detected + other.detected, self.expected + other.expected
        )

    @property
    def precision(self) -> float:
        """Matched share of detections; 1.0 when nothing was detected."""
        return self.matched / self.detected if self.detected else 1.0

    @property
    def recall(self) -> float:
        """Matched share of objects; 1.0 when there was nothing to find."""
        return self.matched / self.expected if self.expected else 1.0


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when both are empty."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_objects(
    detections: Mapping[str, Sequence[Detection]],
    objects: Sequence[ShapeObject],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> MatchCounts:
    """Match one image's detections to its ground-truth objects, most confident detection first.

    A detection matches the unmatched object of its class and colour whose analytic box overlaps
    its box most, if that box IoU is at least `iou_threshold`. Only detections scoring strictly
    above `score_threshold` take part (GenEval's rule for kept detections).

    Args:
        detections: one image's detections per class, as `ShapesDetector` returns them.
        objects: the scene's objects (`Scene.objects`).
        score_threshold: keep detections scoring above this.
        iou_threshold: least box IoU of a match.
    """
    kept = sorted(
        ((cls, d) for cls, ds in detections.items() for d in ds if d.score > score_threshold),
        key=lambda item: -item[1].score,
    )
    free = list(range(len(objects)))
    matched = 0
    for cls, d in kept:
        candidates = [
            (box_iou(d.box, objects[i].box), i)
            for i in free
            if objects[i].shape == cls and objects[i].color == d.color
        ]
        if candidates:
            iou, best = max(candidates)
            if iou >= iou_threshold:
                free.remove(best)
                matched += 1
    return MatchCounts(matched, len(kept), len(objects))
