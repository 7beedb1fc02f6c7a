"""The shared checkpoint reader: zips that zipfile itself rejects in odd ways."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from prunenet.analysis.features import FEATURE_VERSION
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import METADATA_FILE, read_metadata

METADATA = {"format": 2, "feature_version": FEATURE_VERSION, "algo": "ppo",
            "feature_set": "selfgen"}  # fmt: skip


def _patched_zip(path: Path, flag: int = 0, method: int | None = None) -> Path:
    """A one-member checkpoint whose headers claim encryption (`flag` bit 0) or another
    compression `method`: zipfile raises RuntimeError / NotImplementedError reading it."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA_FILE, json.dumps(METADATA))
    data = bytearray(path.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local, central header
        start = data.index(signature)
        data[start + flag_at] |= flag
        if method is not None:
            data[start + flag_at + 2 : start + flag_at + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def test_an_encrypted_member_is_refused_as_corrupt(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="corrupt.*encrypted"):
        read_metadata(_patched_zip(tmp_path / "p.zip", flag=1))


def test_an_unsupported_compression_method_is_refused_as_corrupt(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="corrupt.*NotImplementedError"):
        read_metadata(_patched_zip(tmp_path / "p.zip", method=99))


def test_a_zip_without_metadata_is_refused_saying_it_may_be_damaged(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", b"{}")
    with pytest.raises(PruneNetError, match="corrupt or not a PruneNet policy checkpoint"):
        read_metadata(path)
