"""The fused GEMVs' fixed tile table (runs without Triton: default_config is plain Python)."""
from __future__ import annotations

import pytest

from qstream.quant import gemv_triton


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_default_tiles_are_powers_of_two_of_whole_groups(bits, group):
    """tl.arange needs powers of two and a tile holds whole groups: a 3-bit width once gave BK = 682."""
    for n, k in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (17, 200), (1, 32)]:
        for mode in ("loop", "bcast"):
            cfg = gemv_triton.default_config(n, k, bits, group, mode)
            bk = max(cfg.bk, group)  # what the launchers pass
            assert bk & (bk - 1) == 0 and bk % group == 0, (n, k, cfg)
            assert cfg.bn & (cfg.bn - 1) == 0 and cfg.mode == mode


def test_config_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        gemv_triton.Config(8, 512, mode="fast")
