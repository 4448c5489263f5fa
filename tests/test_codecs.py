"""Every site codec is lossless on random and on smooth (image-like) data."""
import numpy as np
import pytest

from micon.data.codecs import CODECS, decode, encode


@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip(codec):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (5, 33, 47), dtype=np.uint8)
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (5, 64, 64)), axis=-1) + 128, 0, 255).astype(np.uint8)
    for arr in (noise, smooth, np.zeros((5, 8, 8), np.uint8), np.full((5, 8, 8), 255, np.uint8)):
        out = decode(encode(arr, codec), codec, channels=5)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        encode(np.zeros((5, 8, 8), np.float32))
    with pytest.raises(ValueError, match="unknown codec 'jpeg'"):
        encode(np.zeros((5, 8, 8), np.uint8), "jpeg")
