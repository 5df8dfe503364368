from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "oasst"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def byte_tokenizer():
    from pipeline.import_base import byte_tokenizer

    return byte_tokenizer()
