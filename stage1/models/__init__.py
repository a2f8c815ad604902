"""Getting a Qwen2 checkpoint onto disk as a Hugging Face directory: GGUF import and the default model's fetch.

    resolve_model(None)            -> the default model's directory, fetched into the cache on first use
    resolve_model("/path/hf_dir")  -> that directory, as it is (a HF checkpoint needs no conversion)
"""

from __future__ import annotations

from pathlib import Path

from .errors import FetchError, GGUFImportError, ModelError
from .fetch import default_gguf_path, default_model_dir


def import_gguf(gguf_path, out_dir, dtype: str = "bf16", **kwargs) -> Path:
    """See gguf_import.import_gguf (imported on use: it pulls in torch and gguf)."""
    from .gguf_import import import_gguf as _import_gguf
    return _import_gguf(gguf_path, out_dir, dtype=dtype, **kwargs)


def resolve_model(path: str | Path | None, fetch: bool = True) -> Path:
    """The HF directory to load: `path` itself, or the default model when `path` is None."""
    if path is None:
        return default_model_dir(fetch=fetch)
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelError(f"{path} is a GGUF file; convert it once with `python -m stage1.models import-gguf "
                         f"{path} OUT_DIR` and pass OUT_DIR instead.")
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; pass a Hugging Face checkpoint directory "
                         "(config.json, *.safetensors, tokenizer.json), or omit it to use the default model.")
    raise ModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json in it).")


__all__ = ["FetchError", "GGUFImportError", "ModelError", "default_gguf_path", "default_model_dir", "import_gguf",
           "resolve_model"]
