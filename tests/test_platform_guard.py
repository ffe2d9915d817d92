"""platform/ is a source root, not a package: the stdlib `platform` must stay importable."""

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_is_stdlib():
    mod = importlib.import_module("platform")
    assert hasattr(mod, "python_version") and hasattr(mod, "system")
    assert "site-packages" not in (mod.__file__ or "") or "talkmesh" not in (mod.__file__ or "")
    assert Path(mod.__file__).resolve().parent != REPO / "platform"


def test_no_platform_init_file():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_uuid_works_with_talkmesh_imported():
    import uuid

    import talkmesh  # noqa: F401

    assert len(str(uuid.uuid4())) == 36
    assert "talkmesh" in sys.modules
