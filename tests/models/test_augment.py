from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.augment import (  # noqa: E402
    IntensityAugmentation,
    SpatialAugmentation,
    centre_crop,
    crop_size,
    intensity_augment,
    rotation_matrix,
    spatial_augment,
)
from rtcontour.models.train import PatchSampler  # noqa: E402

from .conftest import make_cases  # noqa: E402

PATCH = (16, 24, 24)
SPACING = (3.0, 4.0, 4.0)


def _phantom(crop: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright off-centre ellipsoid (image) and its label in channel 0; channel 1 all ones."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in crop], indexing="ij")).astype(float)
    centre = np.array(crop, dtype=float)[:, None, None, None] / 2.0
    mm = (grid - centre) * np.array(SPACING)[:, None, None, None]
    inside = ((mm[0] - 6.0) / 12.0) ** 2 + ((mm[1] + 10.0) / 20.0) ** 2 + (
        (mm[2] - 14.0) / 12.0) ** 2 <= 1.0
    image = np.where(inside, 0.8, -0.5).astype(np.float32)
    target = np.stack([inside, np.ones(crop, dtype=bool)]).astype(np.float32)
    return torch.from_numpy(image)[None, None], torch.from_numpy(target)[None]


def test_rotated_phantom_label_still_covers_its_rotated_object():
    augmentation = SpatialAugmentation(probability=1.0)
    crop = crop_size(PATCH, SPACING, augmentation)
    image, target = _phantom(crop)
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(6):
        out_image, out_target = spatial_augment(image, target, PATCH, SPACING, augmentation, rng)
        assert out_image.shape == (1, 1, *PATCH) and out_target.shape == (1, 2, *PATCH)
        bright = (out_image[0, 0] > 0.15).numpy()
        label = out_target[0, 0].numpy().astype(bool)
        dice = 2 * (bright & label).sum() / (bright.sum() + label.sum())
        assert dice > 0.9, dice
        unrotated = centre_crop(target, PATCH)[0, 0].numpy().astype(bool)
        moved += int((label != unrotated).sum() > 10)
    assert moved >= 5  # the transform did move the object


def test_crop_is_large_enough_that_no_padding_enters_the_patch():
    augmentation = SpatialAugmentation(probability=1.0, rotation_deg=15.0, tilt_deg=6.0,
                                       scale_range=(0.85, 1.2))
    crop = crop_size(PATCH, SPACING, augmentation)
    assert all((c - p) % 2 == 0 and c > p for c, p in zip(crop, PATCH, strict=True))
    image, target = _phantom(crop)
    rng = np.random.default_rng(1)
    for _ in range(10):
        _, out_target = spatial_augment(image, target, PATCH, SPACING, augmentation, rng)
        assert out_target[0, 1].all()  # channel of ones: nothing sampled from outside


def test_scale_enlarges_the_anatomy_by_the_factor():
    augmentation = SpatialAugmentation(probability=1.0, rotation_deg=0.0, tilt_deg=0.0,
                                       scale_range=(1.2, 1.2))
    crop = crop_size(PATCH, SPACING, augmentation)
    image, target = _phantom(crop)
    _, out_target = spatial_augment(image, target, PATCH, SPACING, augmentation,
                                    np.random.default_rng(2))
    before = float(centre_crop(target, PATCH)[0, 0].sum())
    assert float(out_target[0, 0].sum()) / before == pytest.approx(1.2 ** 3, rel=0.12)


def test_axial_rotation_turns_rows_into_columns_in_millimetres():
    # about the slice axis, 90 degrees: a step along rows becomes a step along columns
    matrix = rotation_matrix(np.pi / 2, 0.0, 0.0)
    np.testing.assert_allclose(matrix @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(matrix @ [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], atol=1e-12)


def test_probability_zero_is_the_exact_centre_crop():
    augmentation = SpatialAugmentation(probability=0.0)
    crop = crop_size(PATCH, SPACING, augmentation)
    image, target = _phantom(crop)
    out_image, out_target = spatial_augment(image, target, PATCH, SPACING, augmentation,
                                            np.random.default_rng(3))
    assert torch.equal(out_image, centre_crop(image, PATCH))
    assert torch.equal(out_target, centre_crop(target, PATCH))


def test_sampler_flip_then_rotation_keeps_parotids_on_their_sides():
    cases = make_cases(1, shape=(24, 48, 48))
    labels = np.zeros_like(cases[0].labels)
    labels[:, 8:40, 4:16] |= 1 << 3  # Parotid_R on patient right = low columns
    labels[:, 8:40, 32:44] |= 1 << 2  # Parotid_L on patient left = high columns
    cases[0].labels = labels
    cases[0].known[:] = True
    augmentation = SpatialAugmentation(probability=1.0)
    crop = crop_size(PATCH, SPACING, augmentation)
    rng = np.random.default_rng(4)
    sampler = PatchSampler(cases, PATCH, 0.0, rng, crop_size=crop)
    columns = torch.arange(PATCH[2], dtype=torch.float32)
    checked = 0
    for _ in range(12):
        image, target, _ = sampler.batch(1)
        assert image.shape[2:] == crop
        _, target = spatial_augment(image, target, PATCH, SPACING, augmentation, rng)
        left, right = target[0, 2], target[0, 3]
        if left.sum() > 20 and right.sum() > 20:
            mean_left = float((left.sum(dim=(0, 1)) * columns).sum() / left.sum())
            mean_right = float((right.sum(dim=(0, 1)) * columns).sum() / right.sum())
            assert mean_left > mean_right
            checked += 1
    assert checked >= 3


def test_sampler_crop_outside_the_volume_is_air_and_unlabelled():
    cases = make_cases(1, shape=(16, 24, 24))
    cases[0].labels[:] = 1
    sampler = PatchSampler(cases, PATCH, 0.0, np.random.default_rng(5), crop_size=(24, 40, 40))
    image, target, _ = sampler.batch(1)
    assert image.shape == (1, 1, 24, 40, 40)
    outside = image[0, 0, :4]  # air, after the sampler's intensity scale and shift
    assert torch.all(outside == outside.flatten()[0]) and float(outside[0, 0, 0]) < -0.7
    assert target[0, 0, :4].sum() == 0 and target[0, 0, 4:20, 8:32, 8:32].all()


def test_sampler_rejects_odd_crop_margin():
    with pytest.raises(ValueError, match="crop_size"):
        PatchSampler(make_cases(1), PATCH, 0.5, np.random.default_rng(0),
                     crop_size=(17, 24, 24))


def test_intensity_augmentation_changes_only_the_image_values():
    image = torch.linspace(-1, 1, 16 * 24 * 24).reshape(1, 1, *PATCH).repeat(2, 1, 1, 1, 1)
    never = IntensityAugmentation(0.0, (0.0, 0.1), 0.0, (0.5, 1.0), 0.0, (0.5, 1.0), 0.0,
                                  (0.7, 1.5))
    assert torch.equal(intensity_augment(image, never, np.random.default_rng(6)), image)
    always = IntensityAugmentation(1.0, (0.05, 0.1), 1.0, (0.5, 1.0), 1.0, (0.5, 0.6), 1.0,
                                   (1.4, 1.5))
    out = intensity_augment(image, always, np.random.default_rng(6))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.isfinite(out).all() and not torch.allclose(out, image, atol=1e-2)
    gamma_only = IntensityAugmentation(0.0, (0.0, 0.1), 0.0, (0.5, 1.0), 0.0, (0.5, 1.0), 1.0,
                                       (1.4, 1.5))
    out = intensity_augment(image, gamma_only, np.random.default_rng(7))
    # gamma changes the contrast but keeps the patch's mean and spread
    assert not torch.allclose(out, image, atol=1e-2)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3, 4)), image.mean(dim=(1, 2, 3, 4)),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3, 4)), image.std(dim=(1, 2, 3, 4)),
                               atol=1e-4, rtol=1e-4)
