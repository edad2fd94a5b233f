"""``python -m benchmarks.gpu``: the check, or (``--worker``) one training job of it."""

from benchmarks.gpu.cli import main

if __name__ == "__main__":
    main()
