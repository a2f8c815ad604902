"""Nothing at the repository root shadows an installed distribution.

`python -m pytest` (the README's and CI's test command) and `python -c` put the current directory first on sys.path,
so from the root a folder with an `__init__.py` or a `.py` file wins over site-packages. transformers imports
Hugging Face's `kernels` distribution; our `kernels/` folder (the Triton kernels, `stage1.kernels`) once shadowed it
and every test that imported transformers failed on a fresh machine.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _root_module_names() -> set[str]:
    """What `import NAME` would find first at the repository root: regular packages and modules."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.is_dir() and any((entry / f"__init__{suffix}").exists() for suffix in (".py", ".pyc")):
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyc"):
            names.add(entry.name.split(".")[0])
    return names


def test_no_root_module_is_an_installed_distributions_name():
    """Our own `stage1` aside (an editable install of this checkout), no root name is another distribution's."""
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {name: installed[name] for name in _root_module_names() - {"stage1"} if name in installed}
    assert not clashes, f"these names at the repository root shadow installed distributions: {clashes}"


def test_transformers_and_hf_kernels_import_from_the_root():
    """A subprocess started at the root with the current directory first on sys.path, as `python -m pytest` runs."""
    code = ("import sys; assert sys.path[0] in ('', '.'), sys.path[:2]\n"
            "import transformers\n"
            "from transformers import Qwen2ForCausalLM\n"
            "import importlib.metadata, kernels, stage1.kernels.rotary as ours\n"
            "from pathlib import Path\n"
            f"root = Path({str(ROOT)!r})\n"
            "if importlib.metadata.packages_distributions().get('kernels'):  # Hugging Face's, a transformers dep\n"
            "    found = Path(kernels.__file__ or root / 'kernels' / 'x').resolve().parent\n"
            "    assert found != root / 'kernels', kernels.__path__  # (a venv may live inside the checkout)\n"
            "assert Path(ours.__file__).resolve().parent == root / 'kernels', ours.__file__\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
