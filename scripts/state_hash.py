"""One SHA-256 over a saved model's tensors: names, dtypes, shapes and bytes, in name order.

Two runs whose final weights are bit-identical print the same hash whatever the safetensors header
holds (metadata, tensor order), which is how the package move of issue #25 shows behaviour unchanged.

    python scripts/state_hash.py runs/smoke/final runs/default/final
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open


def state_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="model folders (holding *.safetensors)")
    for folder in p.parse_args(argv).folders:
        files = list(Path(folder).glob("*.safetensors"))
        if not files:
            raise SystemExit(f"{folder}: no *.safetensors here")
        print(f"{state_hash(Path(folder))}  {folder}")


if __name__ == "__main__":
    main()
