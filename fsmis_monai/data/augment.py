"""Training augmentation of the FSMIS references (docs/reference.md#augmentation) as MONAI transforms.

The references (SSL-ALPNet, ADNet, Q-Net and later) use the transforms of Schlemper et al. (2018):
- **gamma**, gamma ~ U(0.5, 1.5) on the intensity range: MONAI's ``RandAdjustContrast`` is the same
  formula (it differs only in where the tiny epsilon goes), so it is used as is;
- **affine**: rotation U(+-5 deg), translation U(+-5 px), shear angle U(+-5 deg) with the matrix
  ``[[1, -sin t], [0, cos t]]``, one *isotropic* zoom U(0.9, 1.2), composed in that order about the image
  centre, constant border 0 (:class:`RandIsotropicAffine`);
- **elastic** (Simard et al., 2003): a U(-1, 1) field per axis, Gaussian-blurred (sigma 5, 21-tap kernel),
  times alpha = 10, applied with bilinear ``map_coordinates`` and reflected borders (:class:`RandSimardElastic`).

Labels are resampled nearest-neighbour (corrected default). ``faithful=True`` reproduces the released
code (docs/reference.md#quirk-label-warping): labels are warped with the *image* interpolation (bilinear) and rounded,
per class channel (ALP warps the one-hot label and takes the argmax; Q-Net warps the binary mask and rounds).

All transforms work on channel-first 2D arrays ``[C, H, W]`` (numpy or torch) and return numpy float32.
Each has a dictionary twin that draws its parameters once and applies them to every key.
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Affine, MapTransform, RandomizableTransform
from scipy.ndimage import gaussian_filter, map_coordinates

__all__ = [
    "EpisodeAugmentation",
    "RandIsotropicAffine",
    "RandIsotropicAffined",
    "RandSimardElastic",
    "RandSimardElasticd",
    "gamma_transform",
    "warp_label",
]


def gamma_transform(gamma: float | Sequence[float] = (0.5, 1.5), prob: float = 1.0):
    """MONAI ``RandAdjustContrast``: ``x <- ((x - min) / range) ** g * range + min`` with g ~ U(gamma)."""
    from monai.transforms import RandAdjustContrast

    return RandAdjustContrast(prob=prob, gamma=gamma)


def _as_numpy(img) -> np.ndarray:
    arr = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    return arr.astype(np.float32, copy=False)


def warp_label(label, warp, faithful: bool) -> np.ndarray:
    """Resample a label map ``[C, H, W]`` with ``warp(array, order)`` (order 0 nearest, 1 linear).

    Corrected: nearest neighbour. Faithful (the references): linear interpolation of each class's
    indicator channel, then the class with the largest value (= ``rint`` of a warped binary mask).
    """
    lab = _as_numpy(label)
    if not faithful:
        return warp(lab, 0)
    classes = np.unique(lab)
    if classes.size <= 1:
        return warp(lab, 0)
    stacked = np.stack([warp((lab == c).astype(np.float32), 1) for c in classes])  # [n_classes, C, H, W]
    # ties (0.5 on a binary mask) go to the lower class: np.rint(0.5) = 0 in the references too
    return classes[np.argmax(stacked, axis=0)].astype(np.float32)


# ------------------------------------------------------------------------------------------ affine


class RandIsotropicAffine(RandomizableTransform):
    """Random 2D affine of the Schlemper transforms: rotation, shift, shear, isotropic zoom.

    Custom because MONAI's ``RandAffine`` draws the zoom independently per axis (no isotropic option)
    and uses a standard shear matrix; the resampling itself is MONAI's ``Affine`` (bilinear, zero border).
    The forward map is rotation -> translation -> shear -> zoom about the image centre; MONAI samples the
    input at the inverse map of each output pixel.
    """

    def __init__(
        self,
        prob: float = 1.0,
        rotate_deg: float = 5.0,
        shift_px: float = 5.0,
        shear_deg: float = 5.0,
        zoom_range: tuple[float, float] = (0.9, 1.2),
        faithful: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.rotate_deg, self.shift_px, self.shear_deg = float(rotate_deg), float(shift_px), float(shear_deg)
        self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))
        self.faithful = faithful
        self.matrix = np.eye(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        rot = np.deg2rad(self.R.uniform(-self.rotate_deg, self.rotate_deg))
        tx, ty = self.R.uniform(-self.shift_px, self.shift_px, size=2)
        shear = np.deg2rad(self.R.uniform(-self.shear_deg, self.shear_deg))
        zoom = self.R.uniform(*self.zoom_range)
        rotation = np.array([[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]])
        translation = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        scaling = np.diag([zoom, zoom, 1.0])
        self.matrix = scaling @ shearing @ translation @ rotation  # forward: rotation applied first

    def _warp(self, arr: np.ndarray, order: int) -> np.ndarray:
        resample = Affine(affine=np.linalg.inv(self.matrix), mode="nearest" if order == 0 else "bilinear",
                          padding_mode="zeros", image_only=True)
        return _as_numpy(resample(arr))

    def __call__(self, img, randomize: bool = True, is_label: bool = False) -> np.ndarray:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return _as_numpy(img)
        if is_label:
            return warp_label(img, self._warp, self.faithful)
        return self._warp(_as_numpy(img), 1)


# ----------------------------------------------------------------------------------------- elastic


class RandSimardElastic(RandomizableTransform):
    """Simard-style elastic deformation: blurred uniform noise times ``alpha``, bilinear, reflected borders.

    Custom because MONAI's ``Rand2DElastic`` builds its field differently (a coarse control-point grid with
    a magnitude range, resampled through ``grid_sample``), so it cannot reproduce this per-pixel field.
    The blur mirrors cv2's ``GaussianBlur(ksize=int(4*sigma)|1)`` used by the references (21 taps for
    sigma 5: radius 2 sigma, reflect-101 borders = scipy ``"mirror"``).
    """

    def __init__(self, prob: float = 1.0, alpha: float = 10.0, sigma: float = 5.0, faithful: bool = False) -> None:
        RandomizableTransform.__init__(self, prob)
        self.alpha, self.sigma, self.faithful = float(alpha), float(sigma), faithful
        self.displacement: np.ndarray | None = None  # [2, H, W] in pixels (rows, columns)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        radius = int(4 * self.sigma) // 2  # ksize = int(4 sigma) | 1  ->  radius = ksize // 2
        noise = self.R.uniform(-1.0, 1.0, size=(2, *spatial_shape))
        self.displacement = np.stack(
            [gaussian_filter(n, self.sigma, mode="mirror", truncate=radius / self.sigma) * self.alpha for n in noise]
        )

    def _warp(self, arr: np.ndarray, order: int) -> np.ndarray:
        rows, cols = np.meshgrid(np.arange(arr.shape[-2]), np.arange(arr.shape[-1]), indexing="ij")
        coords = np.stack([rows + self.displacement[0], cols + self.displacement[1]])
        return np.stack([map_coordinates(ch, coords, order=order, mode="reflect") for ch in arr]).astype(np.float32)

    def __call__(self, img, randomize: bool = True, is_label: bool = False) -> np.ndarray:
        arr = _as_numpy(img)
        if randomize:
            self.randomize(arr.shape[-2:])
        if not self._do_transform:
            return arr
        if self.displacement is None or self.displacement.shape[1:] != arr.shape[-2:]:
            raise ValueError(f"displacement field {None if self.displacement is None else self.displacement.shape} "
                             f"does not fit an image of shape {arr.shape}: call randomize with its spatial shape")
        if is_label:
            return warp_label(arr, self._warp, self.faithful)
        return self._warp(arr, 1)


# ------------------------------------------------------------------------------------ dictionary twins


class _Geometricd(RandomizableTransform, MapTransform):
    """Draw one geometric transform and apply it to every key; ``label_keys`` are resampled as labels."""

    backend: list = []

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection, transform, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, transform.prob)
        self.label_keys = set([label_keys] if isinstance(label_keys, str) else label_keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def _randomize_for(self, data: Mapping[Hashable, object]) -> None:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self._randomize_for(d)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False, is_label=key in self.label_keys)
        return d


class RandIsotropicAffined(_Geometricd):
    """Dictionary twin of :class:`RandIsotropicAffine` (one draw shared by all keys)."""

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection = (), prob: float = 1.0,
                 faithful: bool = False, allow_missing_keys: bool = False, **kwargs) -> None:
        transform = RandIsotropicAffine(prob=prob, faithful=faithful, **kwargs)
        super().__init__(keys, label_keys, transform, allow_missing_keys)

    def _randomize_for(self, data) -> None:
        self.transform.randomize()


class RandSimardElasticd(_Geometricd):
    """Dictionary twin of :class:`RandSimardElastic` (one displacement field shared by all keys)."""

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection = (), prob: float = 1.0,
                 faithful: bool = False, allow_missing_keys: bool = False, **kwargs) -> None:
        transform = RandSimardElastic(prob=prob, faithful=faithful, **kwargs)
        super().__init__(keys, label_keys, transform, allow_missing_keys)

    def _randomize_for(self, data) -> None:
        first = next(iter(self.key_iterator(data)))
        self.transform.randomize(np.shape(data[first])[-2:])


# --------------------------------------------------------------------------------- episode policy


@contextlib.contextmanager
def _single_torch_thread():
    """Run MONAI's resampling of single 2D slices on one thread: on a busy machine the intra-op thread
    pool of the training process costs ~10x more than it saves on such small tensors (measured in
    bench/data_loading.py). DataLoader workers already run with one thread."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class EpisodeAugmentation:
    """Augment an episode's slices the way the references do.

    - ``policy="both"`` (SSL-ALPNet): every support and query slice is augmented independently
      (geometric, then gamma).
    - ``policy="one_side"`` (ADNet, Q-Net and later): gamma goes to the query *or* to the support side
      (p = 0.5 each), and, drawn independently, the geometric transform goes to the query *or* the support
      side. With several shots/queries each slice of the chosen side gets its own draw.

    Called with lists of ``(image [1, H, W], mask [1, H, W])`` pairs and the episode's
    ``numpy.random.Generator``, from which every MONAI transform is reseeded, so the result depends on the
    generator only (reproducible in any worker).
    """

    def __init__(
        self,
        policy: str = "one_side",
        gamma: tuple[float, float] | None = (0.5, 1.5),
        affine: bool = True,
        elastic: bool = True,
        faithful: bool = False,
    ) -> None:
        from monai.transforms import Compose, RandAdjustContrastd

        if policy not in ("one_side", "both"):
            raise ValueError(f"policy must be 'one_side' or 'both', got {policy!r}")
        self.policy = policy
        steps = []
        if affine:
            steps.append(RandIsotropicAffined(("image", "mask"), label_keys="mask", faithful=faithful))
        if elastic:
            steps.append(RandSimardElasticd(("image", "mask"), label_keys="mask", faithful=faithful))
        self.geometric = Compose(steps) if steps else None
        self.gamma = RandAdjustContrastd("image", prob=1.0, gamma=gamma) if gamma is not None else None

    @staticmethod
    def _apply(transform, pair, rng: np.random.Generator):
        transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = transform({"image": pair[0], "mask": pair[1]})
        return _as_numpy(out["image"]), _as_numpy(out["mask"])

    def __call__(self, supports: list, queries: list, rng: np.random.Generator) -> tuple[list, list]:
        with _single_torch_thread():
            return self._augment(supports, queries, rng)

    def _augment(self, supports: list, queries: list, rng: np.random.Generator) -> tuple[list, list]:
        if self.policy == "both":
            geo_sides = gamma_sides = ("support", "query")
        else:
            geo_sides = ("query" if rng.random() < 0.5 else "support",)
            gamma_sides = ("query" if rng.random() < 0.5 else "support",)
        sides = {"support": list(supports), "query": list(queries)}
        for name, items in sides.items():
            for i, pair in enumerate(items):
                if self.geometric is not None and name in geo_sides:
                    pair = self._apply(self.geometric, pair, rng)
                if self.gamma is not None and name in gamma_sides:
                    pair = self._apply(self.gamma, pair, rng)
                items[i] = pair
        return sides["support"], sides["query"]
