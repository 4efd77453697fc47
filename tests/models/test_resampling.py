"""Separable spline resampling: the exact result of scipy's 3-D cubic resampling, as three
matrix products (the dose prediction's return to the CT grid, issue 21)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rtcontour.models.dose.features import make_model_grid, to_input_grid
from rtcontour.models.resampling import axis_operator, resample_separable


def test_separable_cubic_equals_scipys_affine_transform():
    rng = np.random.default_rng(0)
    array = rng.random((9, 11, 13)).astype(np.float32)
    scale, shape, offset = (0.37, 0.25, 0.3), (22, 40, 38), (0.2, -0.4, 0.0)
    expected = np.empty(shape, np.float32)
    ndimage.affine_transform(array, np.array(scale), offset=offset, output_shape=shape,
                             output=expected, order=3, mode="nearest", prefilter=True)
    np.testing.assert_allclose(resample_separable(array, scale, shape, offset=offset),
                               expected, atol=1e-5)


def test_axis_operator_interpolates_the_nodes_and_keeps_a_constant():
    operator = axis_operator(7, 0.5, 13)
    np.testing.assert_allclose(operator.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(operator[::2], np.eye(7), atol=1e-9)


def test_cubic_return_of_a_smooth_dose_beats_linear_and_never_goes_negative():
    # a Gaussian dose peak sampled on the model grid, returned to a fine grid
    body = np.zeros((60, 96, 96), dtype=bool)
    body[5:55, 10:86, 10:86] = True
    spacing = (2.5, 1.5, 1.5)
    grid = make_model_grid(body, spacing)
    coarse = np.indices(grid.shape).astype(np.float32)
    centre = [n / 2 for n in grid.shape]
    model = 70.0 * np.exp(-sum(((c - m) * s) ** 2 for c, m, s in
                               zip(coarse, centre, grid.spacing_mm, strict=True)) / 800.0)
    fine = np.indices(body.shape).astype(np.float32)[(slice(None), *grid.box)]
    origin = [b.start for b in grid.box]
    truth = 70.0 * np.exp(-sum(((f - o) * sp - m * s) ** 2 for f, o, sp, m, s in
                               zip(fine, origin, spacing, centre, grid.spacing_mm, strict=True))
                          / 800.0)
    cubic = to_input_grid(model, grid, body.shape)[grid.box]
    linear = to_input_grid(model, grid, body.shape, order=1)[grid.box]
    assert np.abs(cubic - truth).mean() < 0.5 * np.abs(linear - truth).mean()
    assert cubic.min() >= 0.0
