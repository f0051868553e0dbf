"""Tests for projector.py: output shapes and token counts of every kind, and that pixel
shuffle folds exactly each s×s neighbourhood of patches (checked against a loop over
the image grid written independently of the view/permute in projector.py)."""

import pytest
import torch
import torch.nn.functional as F

from projector import PROJECTORS, make_projector, pixel_shuffle


@pytest.mark.parametrize("kind,grid,s,n_out", [
    ("linear", 8, 2, 64), ("mlp", 8, 2, 64), ("pixel_shuffle", 8, 2, 16),
    ("pixel_shuffle", 6, 3, 4), ("pixel_shuffle", 4, 4, 1),
])
def test_shapes_and_num_tokens(kind, grid, s, n_out):
    proj = make_projector(kind, d_vision=24, d_lm=40, grid=grid, shuffle_factor=s)
    y = proj(torch.randn(3, grid * grid, 24))
    assert y.shape == (3, n_out, 40)
    assert proj.num_tokens() == n_out
    assert proj.num_tokens(grid * grid) == n_out


def test_pixel_shuffle_groups_each_neighbourhood():
    # patch (r, c) of image b carries the distinct features (b, r, c, r·grid + c)
    B, grid, s = 2, 6, 3
    x = torch.tensor([[[b, r, c, r * grid + c] for r in range(grid) for c in range(grid)] for b in range(B)],
                     dtype=torch.float)  # (B, N, 4), row-major patches
    y = pixel_shuffle(x, grid, s)
    g = grid // s
    assert y.shape == (B, g * g, 4 * s * s)
    for b in range(B):
        for i in range(g):
            for j in range(g):
                # the s×s patches of this neighbourhood, row-major inside it, concatenated
                expected = torch.cat([x[b, (i * s + a) * grid + (j * s + c)] for a in range(s) for c in range(s)])
                assert torch.equal(y[b, i * g + j], expected)


def test_pixel_shuffle_output_token_depends_only_on_its_neighbourhood():
    torch.manual_seed(0)
    grid, s = 4, 2
    proj = make_projector("pixel_shuffle", 8, 16, grid=grid, shuffle_factor=s)
    x = torch.randn(1, grid * grid, 8)
    x2 = x.clone()
    x2[0, 2 * grid + 3] += 1.0  # patch at row 2, column 3 -> coarse cell (1, 1) = token 3
    changed = (proj(x2) - proj(x)).abs().sum(-1)[0] > 0  # (N',)
    assert changed.tolist() == [False, False, False, True]


def test_linear_and_mlp_compute_their_formulas_token_by_token():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12)
    lin = make_projector("linear", 12, 20, grid=4)
    torch.testing.assert_close(lin(x), x @ lin.proj.weight.T + lin.proj.bias)
    mlp = make_projector("mlp", 12, 20, grid=4)
    hidden = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias)
    torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="divisible"):
        make_projector("pixel_shuffle", 8, 8, grid=5, shuffle_factor=2)
    with pytest.raises(ValueError, match="unknown projector 'conv'") as err:
        make_projector("conv", 8, 8, grid=4)
    assert all(kind in str(err.value) for kind in PROJECTORS)  # the message lists the valid kinds
