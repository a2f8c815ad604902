"""What the native-op tests share: the `isa` fixture, which runs a test once per CPU kernel set this machine has
(scalar always, avx2 where the CPU has it) and restores the one in use after."""

from __future__ import annotations

import pytest

from stage1.engine.native import native_available


def _isas() -> list[str]:
    if not native_available():
        return ["scalar"]  # the modules that use the fixture skip themselves without stage1._C
    from stage1 import _C

    return ["scalar"] + (["avx2"] if _C.cpu_isa() == "avx2" else [])


@pytest.fixture(params=_isas())
def isa(request):
    from stage1 import _C

    previous = _C._set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa(previous)
