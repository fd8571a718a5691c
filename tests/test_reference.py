"""The reference fixtures in tests/reference are complete and unchanged: size and SHA-256 of every file in index.json."""

import hashlib
import json


def test_every_indexed_file_exists_with_its_size_and_sha256(reference_dir):
    index = json.loads((reference_dir / "index.json").read_text())
    files = index["files"]
    assert len(files) == 56 and index["total_bytes"] == sum(entry["bytes"] for entry in files.values())
    for name, entry in files.items():
        path = reference_dir / name
        assert path.is_file(), f"{name} is listed in index.json but missing"
        content = path.read_bytes()
        assert len(content) == entry["bytes"], name
        assert hashlib.sha256(content).hexdigest() == entry["sha256"], name


def test_every_fixture_file_is_indexed(reference_dir):
    on_disk = {path.relative_to(reference_dir).as_posix() for path in reference_dir.rglob("*") if path.is_file()}
    indexed = set(json.loads((reference_dir / "index.json").read_text())["files"])
    assert on_disk - indexed == {"README.md", "index.json"}
    assert indexed <= on_disk
