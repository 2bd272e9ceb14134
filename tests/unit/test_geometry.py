"""Strip geometry: a pure function of resolution, strip count and the model's unit."""
import pytest
import torch
import torch.nn.functional as F

from parafuse.parallel.geometry import GeometryError, StripGeometry, conv_halo


@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (2, 2, 0, 1), (4, 2, 1, 1)])
def test_conv_halo_reproduces_the_whole_image_conv(k, s, p, d):
    """Convolving each strip plus its halo (zeros at the image edge) gives the whole-image rows."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 3, 24, 8), torch.randn(4, 3, k, k)
    full = F.conv2d(x, w, stride=s, padding=p, dilation=d)
    top, bottom = conv_halo(k, s, p, d)
    padded = F.pad(x, (0, 0, top, bottom))
    pieces = []
    for a, b in [(0, 8), (8, 12), (12, 24)]:          # strip starts are multiples of the stride
        pieces.append(F.conv2d(padded[:, :, a: b + top + bottom], w, stride=s, padding=(0, p), dilation=d))
    assert torch.allclose(torch.cat(pieces, 2), full, atol=1e-5)


def test_uneven_strips_in_units():
    g = StripGeometry(height=20 * 4, width=32, n=3, unit=4)
    assert g.units == (7, 7, 6)
    assert g.rows == (28, 28, 24)
    assert g.level(4).rows == (7, 7, 6) and g.level(2).offsets == (0, 14, 28)
    assert g.row_range(2) == (56, 80)
    assert g.level_of_width(8).factor == 4


def test_a_strips_token_count_names_its_level():
    """A flattened activation (a cross-attention's queries) names its level by the strip's token
    count, at every level and strip of uneven strips; a count of no level is refused."""
    g = StripGeometry(height=20 * 8, width=24, n=3, unit=8)
    for factor in (1, 2, 4, 8):
        level = g.level(factor)
        for strip in range(3):
            assert g.level_of_tokens(level.rows[strip] * level.width, strip) == level
    with pytest.raises(GeometryError, match="no level of strip 2"):
        g.level_of_tokens(g.level(2).rows[0] * g.level(2).width, 2)        # strip 0's count, strip 2's rows


def test_any_strip_count():
    for n in range(1, 9):
        g = StripGeometry(64, 64, n, 8)
        assert sum(g.rows) == 64 and max(g.rows) - min(g.rows) <= 8


def test_errors_say_what_to_change():
    with pytest.raises(GeometryError, match="fewer than the 5 strips"):
        StripGeometry(16, 16, 5, 4)
    with pytest.raises(GeometryError, match="not a multiple"):
        StripGeometry(18, 16, 2, 4)
    g = StripGeometry(8, 16, 4, 2)
    with pytest.raises(GeometryError, match="needs 3 halo rows"):
        g.check_halo(1, 3, 3, "conv x")
    g.check_halo(1, 2, 2, "conv x")
