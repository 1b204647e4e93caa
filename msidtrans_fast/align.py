"""Registering the sources of a focus stack onto the first one: estimate, warp, report.

Real focus stacks are not registered: refocusing changes the magnification ("focus breathing"), a
handheld camera shifts and turns between frames, a microscope stage drifts. Fusing such sources
unaligned doubles every edge, so :func:`align_sources` brings every source onto the first one's
pixel grid before the decision map is computed.

Conventions
    Images are numpy arrays (H, W) or (H, W, C), dtype uint8, uint16, or float32 in [0, 1].
    Positions are (x, y) = (column, row) with pixel centres at whole numbers (OpenCV's convention).
    A transform is a (3, 3) float64 matrix ``M`` in homogeneous coordinates that maps a position
    ``p`` on the *reference* grid (the first source's) to the position of the same scene point in
    the *moving* source: ``(u, v, w) = M @ (x, y, 1)``, position ``(u / w, v / w)``. Warping samples
    the moving source at ``M p`` for every pixel ``p`` of the reference grid, so the warped image
    lies on the reference grid (``cv2.WARP_INVERSE_MAP``).

Method
    Estimation runs OpenCV's ECC (``cv2.findTransformECC``, Evangelidis and Psarakis 2008) on a
    Gaussian pyramid of the luminance: phase correlation (``cv2.phaseCorrelate``) finds the shift at
    the coarsest level (long side at most :data:`COARSE_SIDE` px), ECC refines level by level up to
    a long side of :data:`REDUCED_SIDE` px and last at full resolution. The coarsest level
    estimates a similarity (fewest parameters, most robust), the finer levels the requested model.
    The ECC criterion is a normalised correlation, so it ignores gain and offset (small exposure
    changes). It is not neutral to a difference in sharpness, though: where one source is sharp and
    the other defocused, and above all near the boundaries between such regions, the best
    correlation lies off the true transform. So the full-resolution step (:func:`refine_matched`)
    first makes the sources alike: each is blurred, where it is the locally sharper, by the disc
    that best matches the other, the pixels near boundaries between the two cases are left out,
    and ECC finds the residual motion; a few such rounds, each warping the moving source with the
    current estimate (Lanczos).
    ECC has no similarity model: for ``"similarity"`` it estimates an affine transform and keeps the
    closest similarity (least squares over the image) after every level.
    A stack of more than two sources registers neighbouring frames (they look most alike) and
    composes the transforms: ``M_0k = M_(k-1)k @ ... @ M_01``.

Failures raise :class:`AlignmentError` naming the source: too little texture, no ECC convergence,
a transform outside the expected range (:data:`MAX_MOTION`), or sources that do not correlate
after alignment (:data:`MIN_CORRELATION`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

#: Motion models, from the fewest parameters: similarity (4: scale, rotation, shift), affine (6),
#: homography (8).
MODELS = ("similarity", "affine", "homography")
_ECC_MOTION = {"similarity": cv2.MOTION_AFFINE, "affine": cv2.MOTION_AFFINE,
               "homography": cv2.MOTION_HOMOGRAPHY}

#: Interpolators of :func:`warp` (OpenCV's). Lanczos (8x8 taps) keeps the most detail; the measured
#: comparison is in docs/fusing.md.
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "lanczos": cv2.INTER_LANCZOS4}
DEFAULT_INTERPOLATION = "lanczos"

#: Long side, in pixels, of the coarsest pyramid level (where phase correlation runs).
COARSE_SIDE = 384
#: The estimate is made on pyramid levels whose long side is at most this, then refined at full
#: resolution.
REDUCED_SIDE = 1024
#: Largest accepted motion: no image corner may move by more than this fraction of the diagonal.
MAX_MOTION = 0.1
#: Smallest accepted ECC correlation between the reference and the warped source (coarsest level).
MIN_CORRELATION = 0.6
#: At the coarsest level, a texture pixel has a luminance gradient of at least this much per pixel
#: (on [0, 1] values) and an image needs at least TEXTURE_MIN_FRACTION of them.
TEXTURE_GRADIENT = 0.02
TEXTURE_MIN_FRACTION = 0.005
#: ECC iterations at the coarsest level, at intermediate levels, at full resolution.
ITERATIONS = (100, 50, 30)
#: Stop ECC when the correlation gains less than this in an iteration.
ECC_EPS = 1e-6
#: Size of ECC's Gaussian pre-filter at each level (it evens out noise and defocus differences).
ECC_BLUR = 5
#: Refining at a finer level may move an image corner by at most this many pixels of the coarser
#: level the estimate came from; more means ECC went astray.
MAX_REFINEMENT_PX = 4.0
#: Defocus matching (:func:`refine_matched`), the last estimation step at full resolution: at most
#: this many rounds of warping the moving source with the current estimate and letting ECC find
#: the residual, until a round moves no corner by MATCH_TOLERANCE_PX or more (converged).
MATCH_ROUNDS = 6
MATCH_TOLERANCE_PX = 0.01
#: The matched estimate is kept when its last accepted round moved no corner by this many
#: full-resolution pixels or more (it was settling); else the plain ECC estimate is used.
MATCH_SETTLED_PX = 0.1
#: Side, in pixels of the matching level, of the window over which local sharpness is compared.
SHARPNESS_WINDOW = 15
#: Candidate radii, in pixels of the matching level, of the disc that blurs the sharper source.
DEFOCUS_RADII = tuple(0.5 * k for k in range(1, 17))
#: Pixels within (twice the blur radius + this) of a boundary between "reference sharper" and
#: "moving sharper" are left out of the matched ECC.
BOUNDARY_MARGIN = 5
#: A matched round after the first may move an image corner by at most this many full-resolution
#: pixels (the first as much as a plain refinement, MAX_REFINEMENT_PX per pixel of the level the
#: estimate came from); more means it went astray, and the rounds end there.
MAX_MATCH_STEP_PX = 1.0
#: The matched rounds run on the finest pyramid level whose long side is at most this many pixels
#: (full resolution up to that size; a 12-megapixel pair is matched at half resolution).
MATCH_SIDE = 2048


class AlignmentError(ValueError):
    """A source that cannot be aligned; the message names it and says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot align {source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class Alignment:
    """Where one source lies relative to the reference (the first source).

    ``matrix``: (3, 3) float64, maps reference-grid positions to positions in this source (see the
    module docstring). ``correlation``: ECC correlation coefficient with the warped source at the
    coarsest pyramid level (1.0 for the reference itself; for a stack, the lowest along the chain of
    neighbours). ``model``: one of :data:`MODELS`.
    """

    matrix: np.ndarray
    correlation: float
    model: str

    def corner_motion(self, height: int, width: int) -> float:
        """Largest displacement, in pixels, of the four image corners."""
        c = _corners(height, width)
        return float(np.linalg.norm(_map(self.matrix, c) - c, axis=1).max())

    def describe(self, height: int, width: int) -> str:
        """One line: scale, rotation and shift of the image centre, largest corner motion, ECC."""
        scale, angle, shift = similarity_parts(self.matrix, height, width)
        return (f"scale {scale:.4f}, rotation {angle:+.3f} deg, shift ({shift[0]:+.2f}, "
                f"{shift[1]:+.2f}) px, corners moved up to {self.corner_motion(height, width):.1f}"
                f" px, correlation {self.correlation:.3f}")


# ---------------------------------------------------------------------------------- geometry
def _corners(height: int, width: int) -> np.ndarray:
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                    dtype=np.float64)


def _map(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) positions mapped by a (3, 3) transform."""
    h = np.c_[points, np.ones(len(points))] @ matrix.T
    return h[:, :2] / h[:, 2:3]


def corner_error(estimated: np.ndarray, true: np.ndarray, height: int, width: int) -> float:
    """RMS distance, in pixels, between where two transforms put the four image corners."""
    c = _corners(height, width)
    d = _map(estimated, c) - _map(true, c)
    return float(np.sqrt((d ** 2).sum(1).mean()))


def similarity_parts(matrix: np.ndarray, height: int, width: int) -> tuple[float, float,
                                                                           np.ndarray]:
    """(scale, rotation in degrees, (dx, dy) shift of the image centre) of a transform's closest
    similarity."""
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    m = matrix / matrix[2, 2]
    a = m[:2, :2]
    scale = math.sqrt(abs(np.linalg.det(a)))
    angle = math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))
    return scale, angle, _map(m, centre[None])[0] - centre


def _to_similarity(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """The similarity closest to an affine ``matrix`` in least squares over the image: the
    rotation-and-scale part of its linear part, with the image centre mapped as before."""
    a = matrix[:2, :2]
    c, s = (a[0, 0] + a[1, 1]) / 2, (a[1, 0] - a[0, 1]) / 2
    lin = np.array([[c, -s], [s, c]])
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    out = np.eye(3)
    out[:2, :2] = lin
    out[:2, 2] = a @ centre + matrix[:2, 2] - lin @ centre
    return out


def _rescale(matrix: np.ndarray, factor: float) -> np.ndarray:
    """A transform between images scaled by ``factor`` (positions x -> factor * x)."""
    s = np.diag([factor, factor, 1.0])
    return s @ matrix @ np.linalg.inv(s)


def check_range(matrix: np.ndarray, height: int, width: int,
                max_motion: float = MAX_MOTION) -> str | None:
    """Why a transform is outside the expected range, or None if it is inside.

    Expected: every corner moves by at most ``max_motion`` times the image diagonal, and the image
    keeps its orientation (no flip, no corner behind the camera for a homography).
    """
    c = _corners(height, width)
    w = np.c_[c, np.ones(4)] @ matrix[2]
    if not np.isfinite(matrix).all() or (w <= 0).any():
        return "the transform is degenerate"
    mapped = _map(matrix, c)
    edges = np.roll(mapped, -1, axis=0) - mapped
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1,
                                                                                    axis=0)[:, 0]
    if (turns <= 0).any():
        return "the transform flips or folds the image"
    motion = np.linalg.norm(mapped - c, axis=1).max()
    limit = max_motion * math.hypot(height, width)
    if motion > limit:
        return (f"a corner would move by {motion:.0f} px, more than the expected "
                f"{limit:.0f} px ({max_motion:.0%} of the diagonal)")
    return None


# ------------------------------------------------------------------------------- estimation
def luminance(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 luminance in [0, 1] (Rec. 601 weights) of an (H, W) or (H, W, C) image."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1 / 255)
    if image.dtype == np.uint16:
        return image.astype(np.float32) * np.float32(1 / 65535)
    return image.astype(np.float32)


def pyramid(lum: np.ndarray, coarse_side: int = COARSE_SIDE) -> list[np.ndarray]:
    """Gaussian pyramid, full resolution first: halved (``cv2.pyrDown``) until the long side is at
    most ``coarse_side``. Level ``l`` pixel ``x`` sits at ``2**l * x`` at full resolution."""
    levels = [lum]
    while max(levels[-1].shape) > coarse_side:
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def texture_fraction(lum: np.ndarray) -> float:
    """Share of pixels whose luminance gradient (Sobel, per pixel) is at least
    :data:`TEXTURE_GRADIENT`."""
    gx = cv2.Sobel(lum, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(lum, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    return float((gx * gx + gy * gy >= TEXTURE_GRADIENT ** 2).mean())


def _ecc(template, moving, matrix, model, iterations, name, mask=None, blur=ECC_BLUR):
    motion = _ECC_MOTION[model]
    warp = (matrix if motion == cv2.MOTION_HOMOGRAPHY else matrix[:2]).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, ECC_EPS)
    try:
        rho, warp = cv2.findTransformECC(template, moving, warp, motion, criteria, mask, blur)
    except cv2.error as e:
        raise AlignmentError(name, "the registration (ECC) did not converge: the images do not "
                                   "match well enough") from e
    out = np.eye(3)
    out[:warp.shape[0]] = warp
    if model == "similarity":
        out = _to_similarity(out, *template.shape)
    return float(rho), out


def _initial_shift(template: np.ndarray, moving: np.ndarray) -> np.ndarray:
    window = cv2.createHanningWindow(template.shape[::-1], cv2.CV_32F)
    # Copies: OpenCV 5.0's phaseCorrelate multiplies its inputs by the window in place.
    (dx, dy), _ = cv2.phaseCorrelate(template.copy(), moving.copy(), window)
    m = np.eye(3)
    m[:2, 2] = (dx, dy)
    return m


# ------------------------------------------------------------------------ defocus matching
# Two sources focused differently differ in sharpness, and ECC's correlation is not neutral to
# that: near a boundary between a region where the reference is sharper and one where the moving
# source is, and wherever the sharp detail of one source faces a blurred version in the other, the
# correlation is maximised slightly off the true transform (a bias of up to a few tenths of a pixel
# at the image corners, measured in docs/fusing.md). The last estimation step therefore makes the
# sources look alike first: the locally sharper one is blurred by the disc (a defocus blur) that
# best matches the other, and the pixels near boundaries between the two cases are left out.

def disc_kernel(radius: float) -> np.ndarray:
    """(2n+1, 2n+1) float32 kernel summing to 1, n = ceil(radius): a uniform disc of ``radius``
    pixels (the blur of a defocused lens), its edge anti-aliased by sampling each pixel on an 8x8
    grid."""
    n = max(1, math.ceil(radius))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    y, x = np.mgrid[-n:n + 1, -n:n + 1]
    inside = ((x[:, :, None, None] + sub[None, None, None, :]) ** 2
              + (y[:, :, None, None] + sub[None, None, :, None]) ** 2 <= radius ** 2)
    k = inside.mean(axis=(2, 3))
    return (k / k.sum()).astype(np.float32)


def defocus(lum: np.ndarray, radius: float) -> np.ndarray:
    """(H, W) float32 ``lum`` blurred by :func:`disc_kernel` (``radius`` 0: unchanged)."""
    if radius <= 0:
        return lum
    return cv2.filter2D(lum, -1, disc_kernel(radius), borderType=cv2.BORDER_REFLECT)


def local_sharpness(lum: np.ndarray, window: int = SHARPNESS_WINDOW) -> np.ndarray:
    """(H, W) float32 local detail energy of an (H, W) float32 luminance: the mean, over a
    ``window`` x ``window`` box, of the squared difference from its Gaussian blur (sigma 1 px)."""
    detail = lum - cv2.GaussianBlur(lum, (0, 0), 1.0)
    return cv2.blur(detail * detail, (window, window))


def defocus_radii(reference: np.ndarray, moving: np.ndarray, sharper: np.ndarray,
                  valid: np.ndarray, radii: Sequence[float] = DEFOCUS_RADII
                  ) -> tuple[float, float]:
    """How much to blur each source so that it looks like the other where it is the sharper one.

    ``reference``, ``moving``: (H, W) float32 luminances on one grid (the moving source already
    warped); ``sharper``: (H, W) bool, True where the reference is the sharper; ``valid``: (H, W)
    bool, the pixels to compare. Returns ``(radius for the reference, radius for moving)``: for
    the valid pixels where that source is the sharper, the radius among 0 (no blur) and ``radii``
    whose :func:`defocus` of it differs least (mean squared) from the other source.
    """
    out = []
    for where, sharp, other in ((sharper & valid, reference, moving),
                                (~sharper & valid, moving, reference)):
        best = (float(np.mean((sharp[where] - other[where]) ** 2)) if where.any() else 0.0, 0.0)
        if where.mean() >= 0.001:
            for r in radii:
                err = float(np.mean((defocus(sharp, r)[where] - other[where]) ** 2))
                best = min(best, (err, r))
        out.append(best[1])
    return out[0], out[1]


def match_defocus(reference: np.ndarray, moving: np.ndarray, sharper: np.ndarray,
                  radii: tuple[float, float], margin: float = BOUNDARY_MARGIN
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two sources made alike for registration.

    ``reference``, ``moving``: (H, W) float32 on one grid; ``sharper``: (H, W) bool, True where the
    reference is the sharper; ``radii``: disc radii (reference, moving) from
    :func:`defocus_radii`. Returns ``(reference', moving', keep)``: each source blurred where it
    is the sharper, and an (H, W) bool mask that is False within ``2 * max(radii) + margin``
    pixels of a boundary between the two cases (there the blurs do not match).
    """
    ref = np.where(sharper, defocus(reference, radii[0]), reference)
    mov = np.where(sharper, moving, defocus(moving, radii[1]))
    reach = math.ceil(2 * max(radii) + margin)
    disc = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * reach + 1, 2 * reach + 1))
    near_ref = cv2.dilate(sharper.astype(np.uint8), disc) > 0
    near_mov = cv2.dilate((~sharper).astype(np.uint8), disc) > 0
    return ref.astype(np.float32), mov.astype(np.float32), ~(near_ref & near_mov)


def _resample(lum: np.ndarray, matrix: np.ndarray, flags: int, border: int,
              value: float = 0) -> np.ndarray:
    height, width = lum.shape
    flags |= cv2.WARP_INVERSE_MAP
    if np.allclose(matrix[2], (0, 0, 1)):
        return cv2.warpAffine(lum, matrix[:2], (width, height), flags=flags, borderMode=border,
                              borderValue=value)
    return cv2.warpPerspective(lum, matrix, (width, height), flags=flags, borderMode=border,
                               borderValue=value)


def refine_matched(reference: list[np.ndarray], moving: list[np.ndarray], matrix: np.ndarray,
                   model: str, name: str = "source", first_step: float = MAX_MATCH_STEP_PX
                   ) -> np.ndarray | None:
    """The last estimation step: rounds of warping the moving source onto the reference grid with
    the current ``matrix`` (Lanczos), making the two alike (:func:`match_defocus`) and composing
    the residual transform ECC finds between them, until a round moves no corner by
    :data:`MATCH_TOLERANCE_PX` or more (converged), for at most :data:`MATCH_ROUNDS` rounds.

    ``reference``, ``moving``: pyramids (:func:`pyramid`, full resolution first) of the two
    luminances; ``matrix``: (3, 3) current full-resolution estimate. The rounds run on the first
    level whose long side is at most :data:`MATCH_SIDE` px (full resolution up to that size);
    which source is sharper (every round) and the blur radii (first round) are decided on the first
    level whose long side is at most :data:`REDUCED_SIDE` px and scaled up. The rounds also end
    when one fails (too few pixels left to compare, ECC gives up) or would move a corner by more
    than ``first_step`` (first round) or :data:`MAX_MATCH_STEP_PX` (later rounds) full-resolution
    pixels. Returns the (3, 3) full-resolution estimate when the last accepted round moved no
    corner by :data:`MATCH_SETTLED_PX` or more (it was settling), else None (the caller then falls
    back to the plain ECC).
    """
    work = next((lv for lv, im in enumerate(reference) if max(im.shape) <= MATCH_SIDE),
                len(reference) - 1)
    decide = max(work, next((lv for lv, im in enumerate(reference)
                             if max(im.shape) <= REDUCED_SIDE), len(reference) - 1))
    full, mov = reference[work], moving[work]
    height, width = full.shape
    scale = 2 ** (decide - work)
    corners = _corners(height, width)
    matrix = _rescale(matrix, 2.0 ** -work)
    radii = None
    limit = first_step / 2 ** work
    last = math.inf  # corner step of the last accepted round
    for _ in range(MATCH_ROUNDS):
        warped = _resample(mov, matrix, cv2.INTER_LANCZOS4, cv2.BORDER_REFLECT)
        inside = _resample(np.full((height, width), 255, np.uint8), matrix, cv2.INTER_LINEAR,
                           cv2.BORDER_CONSTANT) == 255
        small = warped
        for _ in range(decide - work):
            small = cv2.pyrDown(small)
        small_ref = reference[decide]
        small_valid = cv2.resize(inside.astype(np.uint8), small.shape[::-1],
                                 interpolation=cv2.INTER_NEAREST) > 0
        sharper = local_sharpness(small_ref) > local_sharpness(small)
        if radii is None:
            radii = defocus_radii(small_ref, small, sharper, small_valid)
        if scale > 1:
            sharper = cv2.resize(sharper.astype(np.uint8), (width, height),
                                 interpolation=cv2.INTER_NEAREST) > 0
        ref2, mov2, keep = match_defocus(full, warped, sharper,
                                         (radii[0] * scale, radii[1] * scale),
                                         BOUNDARY_MARGIN * scale)
        # Not within 8 px of the warped source's edge (Lanczos reaches 4 px into the reflected
        # border), and at least 5 % of the image left to compare.
        keep &= cv2.erode(inside.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0
        if keep.mean() < 0.05:
            break
        try:
            _, residual = _ecc(ref2, mov2, np.eye(3), model, ITERATIONS[2], name,
                               keep.astype(np.uint8), 1)
        except AlignmentError:
            break
        new = matrix @ residual
        new /= new[2, 2]
        step = np.linalg.norm(_map(new, corners) - _map(matrix, corners), axis=1).max()
        if step > limit:
            break
        matrix, last = new, step
        limit = MAX_MATCH_STEP_PX / 2 ** work
        if step < MATCH_TOLERANCE_PX / 2 ** work:
            break
    return _rescale(matrix, 2.0 ** work) if last < MATCH_SETTLED_PX / 2 ** work else None


def estimate_pyramids(reference: list[np.ndarray], moving: list[np.ndarray], model: str,
                      name: str, max_motion: float = MAX_MOTION,
                      min_correlation: float = MIN_CORRELATION, match: bool = True) -> Alignment:
    """:func:`estimate` on pyramids already built by :func:`pyramid` (the same number of levels).
    ``match``: end with :func:`refine_matched` (False: plain ECC at full resolution only)."""
    if model not in MODELS:
        raise ValueError(f"unknown alignment model {model!r} (use one of {', '.join(MODELS)})")
    height, width = reference[0].shape
    for lum, who in ((reference[-1], "the reference"), (moving[-1], name)):
        share = texture_fraction(lum)
        if share < TEXTURE_MIN_FRACTION:
            raise AlignmentError(name, f"too little texture in {who} ({share:.2%} of the image has "
                                       f"detail, {TEXTURE_MIN_FRACTION:.1%} needed)")
    top = len(reference) - 1
    ref_c, mov_c = reference[top], moving[top]
    # Phase correlation gives the shift; ECC from there and, if that fails, from no motion.
    best = None
    for start in (_initial_shift(ref_c, mov_c), np.eye(3)):
        try:
            rho, m = _ecc(ref_c, mov_c, start, "similarity", ITERATIONS[0], name)
        except AlignmentError:
            continue
        if best is None or rho > best[0]:
            best = (rho, m)
        if rho >= min_correlation:
            break
    if best is None:
        raise AlignmentError(name, "the registration (ECC) did not converge at the coarsest "
                                   "level: the images do not match well enough")
    rho, matrix = best
    if rho < min_correlation:
        raise AlignmentError(name, f"the sources do not match after registration (correlation "
                                   f"{rho:.2f}, at least {min_correlation:.2f} expected)")
    why = check_range(_rescale(matrix, 2 ** top), height, width, max_motion)
    if why is not None:
        raise AlignmentError(name, why)
    # Levels between REDUCED_SIDE and full resolution are skipped: the estimate at REDUCED_SIDE is
    # already within a fraction of a full-resolution pixel, and each level costs a full ECC setup.
    # With ``match`` the defocus-matched rounds replace the plain ECC at full resolution; the plain
    # ECC remains the fallback when no matched round succeeds.
    levels = [lv for lv in range(top - 1, 0, -1) if max(reference[lv].shape) <= REDUCED_SIDE]
    if top > 0:
        levels.append(0)
    current = top
    for level in levels:
        factor = 2.0 ** (current - level)
        if level == 0 and match:
            refined = refine_matched(reference, moving, _rescale(matrix, 2.0 ** current), model,
                                     name, MAX_REFINEMENT_PX * factor)
            if refined is not None:
                matrix, current = refined, 0
                break
        previous = _rescale(matrix, factor)
        current = level
        _, matrix = _ecc(reference[level], moving[level], previous, model,
                         ITERATIONS[2] if level == 0 else ITERATIONS[1], name)
        corners = _corners(*reference[level].shape)
        step = np.linalg.norm(_map(matrix, corners) - _map(previous, corners), axis=1).max()
        if step > MAX_REFINEMENT_PX * factor:
            raise AlignmentError(name, f"the registration (ECC) did not converge: refining at "
                                       f"{reference[level].shape[1]}x{reference[level].shape[0]}"
                                       f" moved a corner by {step:.1f} px")
    if top == 0 and match:
        refined = refine_matched(reference, moving, matrix, model, name, MAX_REFINEMENT_PX)
        matrix = matrix if refined is None else refined
    why = check_range(matrix, height, width, max_motion)
    if why is not None:
        raise AlignmentError(name, why)
    return Alignment(matrix, rho, model)


def estimate(reference: np.ndarray, moving: np.ndarray, model: str = "similarity", *,
             name: str = "source", max_motion: float = MAX_MOTION,
             min_correlation: float = MIN_CORRELATION, match: bool = True) -> Alignment:
    """The transform that maps the reference grid onto ``moving`` (see the module docstring).

    Args:
        reference, moving: images of one size (H, W) or (H, W, C); uint8, uint16 or float32 in
            [0, 1]; may differ in channels and bit depth (the luminance is compared).
        model: one of :data:`MODELS`.
        name: how messages call ``moving``.
        max_motion: largest accepted corner motion, as a fraction of the image diagonal.
        min_correlation: smallest accepted ECC correlation at the coarsest level.
        match: end with the defocus-matched refinement (:func:`refine_matched`); False gives the
            plain ECC estimate (for comparison).

    Raises:
        AlignmentError: too little texture, no convergence, out of range, no match.
        ValueError: an unknown model or images of different sizes.
    """
    if np.shape(reference)[:2] != np.shape(moving)[:2]:
        raise ValueError(f"cannot align {name}: its size {np.shape(moving)[1]}x"
                         f"{np.shape(moving)[0]} differs from the reference's "
                         f"{np.shape(reference)[1]}x{np.shape(reference)[0]}")
    return estimate_pyramids(pyramid(luminance(reference)), pyramid(luminance(moving)), model,
                             name, max_motion, min_correlation, match)


def estimate_stack(images: Sequence[np.ndarray], model: str = "similarity", *,
                   names: Sequence[str] | None = None, max_motion: float = MAX_MOTION,
                   min_correlation: float = MIN_CORRELATION) -> list[Alignment]:
    """Transforms from the first image's grid to every image, by registering neighbours.

    Image ``k`` is registered to image ``k - 1`` and the transforms composed, so each estimate
    compares the two most alike frames; the composed transform is checked against ``max_motion``
    too. Returns one :class:`Alignment` per image, the first the identity. Arguments and errors as
    :func:`estimate`.
    """
    names = list(names) if names is not None else [f"source {i}" for i in range(len(images))]
    height, width = np.shape(images[0])[:2]
    for img, name in zip(images[1:], names[1:], strict=True):
        if np.shape(img)[:2] != (height, width):
            raise ValueError(f"cannot align {name}: its size {np.shape(img)[1]}x"
                             f"{np.shape(img)[0]} differs from the reference's {width}x{height}")
    result = [Alignment(np.eye(3), 1.0, model)]
    previous = pyramid(luminance(images[0]))
    for img, name in zip(images[1:], names[1:], strict=True):
        current = pyramid(luminance(img))
        step = estimate_pyramids(previous, current, model, name, max_motion, min_correlation)
        matrix = step.matrix @ result[-1].matrix
        why = check_range(matrix, height, width, max_motion)
        if why is not None:
            raise AlignmentError(name, f"relative to the first source, {why}")
        result.append(Alignment(matrix, min(step.correlation, result[-1].correlation), model))
        previous = current
    return result


# ------------------------------------------------------------------------------------ warping
def warp(image: np.ndarray, matrix: np.ndarray, interpolation: str = DEFAULT_INTERPOLATION,
         fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resamples ``image`` onto the reference grid (same size): ``out(p) = image(matrix @ p)``.

    Args:
        image: (H, W) or (H, W, C), uint8, uint16 or float32.
        matrix: (3, 3) transform from reference positions to positions in ``image``.
        interpolation: one of :data:`INTERPOLATIONS`.
        fill: optional array shaped like ``image`` whose pixels replace those without content.

    Returns:
        ``(warped, valid)``: ``warped`` with ``image``'s shape and dtype (interpolated in float32,
        rounded and clipped for integers); ``valid`` (H, W) bool, True where ``matrix @ p`` lies
        inside the image (``[0, W-1] x [0, H-1]``), i.e. where the warped image has content.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r} (use one of "
                         f"{', '.join(INTERPOLATIONS)})")
    image = np.asarray(image)
    height, width = image.shape[:2]
    flags = INTERPOLATIONS[interpolation] | cv2.WARP_INVERSE_MAP
    affine = np.allclose(matrix[2], (0, 0, 1))

    def resample(a, flags, border, value=0):
        if affine:
            return cv2.warpAffine(a, matrix[:2], (width, height), flags=flags, borderMode=border,
                                  borderValue=value)
        return cv2.warpPerspective(a, matrix, (width, height), flags=flags, borderMode=border,
                                   borderValue=value)

    # OpenCV interpolates integer images with 8-bit fixed-point weights and clips Lanczos's
    # overshoot per step; float32 keeps the full precision, rounded once at the end.
    src = image.astype(np.float32) if image.dtype != np.float32 else image
    out = resample(src, flags, cv2.BORDER_REFLECT)
    if out.ndim < image.ndim:
        out = out[..., None]
    if image.dtype != np.float32:
        top = np.iinfo(image.dtype).max
        out = np.clip(np.rint(out), 0, top).astype(image.dtype)
    else:
        out = np.clip(out, 0, 1)
    ones = np.full((height, width), 255, np.uint8)
    valid = resample(ones, cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, cv2.BORDER_CONSTANT) == 255
    if fill is not None:
        out = np.where(valid.reshape(valid.shape + (1,) * (image.ndim - 2)), out, fill)
    return out, valid


def common_area(valid: Sequence[np.ndarray]) -> tuple[int, int, int, int]:
    """An axis-aligned rectangle ``(top, bottom, left, right)`` (end-exclusive) inside which every
    mask is True: the masks' intersection (convex for the warps here) is shrunk from the side
    with the largest share of invalid pixels until its border is all valid.

    Raises:
        ValueError: the masks have no pixel in common.
    """
    both = np.logical_and.reduce([np.asarray(v, bool) for v in valid])
    rows, cols = np.flatnonzero(both.any(1)), np.flatnonzero(both.any(0))
    if rows.size == 0:
        raise ValueError("the aligned sources have no area in common")
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    while top < bottom and left < right:
        bad = [(~both[top, left:right]).mean(), (~both[bottom - 1, left:right]).mean(),
               (~both[top:bottom, left]).mean(), (~both[top:bottom, right - 1]).mean()]
        worst = int(np.argmax(bad))
        if bad[worst] == 0:
            return int(top), int(bottom), int(left), int(right)
        if worst == 0:
            top += 1
        elif worst == 1:
            bottom -= 1
        elif worst == 2:
            left += 1
        else:
            right -= 1
    raise ValueError("the aligned sources have no area in common")


@dataclass
class AlignedSources:
    """Sources on the first source's grid.

    ``images``: the sources as given for the first, warped for the others (same shapes and dtypes;
    where a warped source has no content it holds the first source's pixels). ``valid``: one
    (H, W) bool mask per source, True where it has content (all True for the first).
    ``alignments``: one :class:`Alignment` per source (identity for the first).
    """

    images: list[np.ndarray]
    valid: list[np.ndarray]
    alignments: list[Alignment]

    def crop(self) -> tuple[int, int, int, int]:
        """:func:`common_area` of the valid masks."""
        return common_area(self.valid)


def warp_sources(images: Sequence[np.ndarray], alignments: Sequence[Alignment],
                 interpolation: str = DEFAULT_INTERPOLATION) -> AlignedSources:
    """Warps every source but the first onto the first source's grid (:func:`warp`); where a
    warped source has no content it holds the first source's pixels (when the shapes agree).

    ``images``: (H, W) or (H, W, C) arrays of one size; ``alignments``: one per image, as
    :func:`estimate_stack` returns them.
    """
    ref = np.asarray(images[0])
    out, valid = [ref], [np.ones(ref.shape[:2], bool)]
    for img, a in zip(images[1:], alignments[1:], strict=True):
        img = np.asarray(img)
        w, v = warp(img, a.matrix, interpolation, fill=ref if ref.shape == img.shape else None)
        out.append(w)
        valid.append(v)
    return AlignedSources(out, valid, list(alignments))


def align_sources(images: Sequence[np.ndarray], model: str = "similarity", *,
                  names: Sequence[str] | None = None,
                  interpolation: str = DEFAULT_INTERPOLATION, max_motion: float = MAX_MOTION,
                  min_correlation: float = MIN_CORRELATION) -> AlignedSources:
    """Registers every source to the first (:func:`estimate_stack`) and warps it onto the first
    source's grid (:func:`warp_sources`).

    Raises:
        AlignmentError: a source cannot be aligned (the message names it).
    """
    alignments = estimate_stack(images, model, names=names, max_motion=max_motion,
                                min_correlation=min_correlation)
    return warp_sources(images, alignments, interpolation)


def report(alignments: Sequence[Alignment], names: Sequence[str], height: int,
           width: int) -> list[str]:
    """One line per source after the first: its name and :meth:`Alignment.describe`."""
    return [f"{n}: {a.describe(height, width)}"
            for a, n in zip(alignments[1:], names[1:], strict=True)]
