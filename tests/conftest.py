import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))   # examples/vision_models.py
torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true", help="rewrite the golden files from current output")


@pytest.fixture
def golden(request):
    """compare(name, obj): equal to tests/golden/name.json, or rewrite it with --regen-golden."""
    import json
    regen = request.config.getoption("--regen-golden")

    def compare(name, obj):
        path = Path(__file__).parent / "golden" / f"{name}.json"
        text = json.dumps(obj, indent=1, sort_keys=True)
        if regen or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            if not regen:
                pytest.fail(f"golden file {path} was missing and has been written; rerun")
        assert json.loads(path.read_text()) == json.loads(text), f"differs from golden {path} (--regen-golden)"
    return compare
