"""The manifest of a features folder: a file is read whole once, then only when it changed since."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import extract.features.manifest as manifest_module
from extract.features.manifest import MANIFEST_NAME, Manifest, check_existing
from extract.features.slide_file import FORMAT_VERSION
from gigassl.synthetic.cohort import write_synthetic_cohort
from gigassl.training import data
from gigassl.training.data import scan_features_folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_synthetic_cohort(tmp_path, n_slides=3, n_tiles=16, n_augmentations=2, bank_size=8)
    return tmp_path


@pytest.fixture()
def full_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose every chunk was read (checksums verified)."""
    read: list[str] = []
    original = manifest_module.verify_checksums

    def counting(file, path):  # type: ignore[no-untyped-def]
        read.append(Path(path).name)
        return original(file, path)

    monkeypatch.setattr(manifest_module, "verify_checksums", counting)
    return read


def test_a_file_is_verified_once_then_again_only_when_it_changed(folder: Path, full_reads: list[str]) -> None:
    target = folder / "slide_000.h5"
    assert check_existing(target, Manifest(folder), require_plain=True, require_bank=True)[0] is None
    assert full_reads == ["slide_000.h5"] and (folder / MANIFEST_NAME).is_file()
    reason, facts = check_existing(target, Manifest(folder), require_plain=True)  # a new job reads the manifest
    assert (
        reason is None
        and facts is not None
        and facts.has_bank
        and facts.settings == {"synthetic": True, "seed": 0, "planted": True}
    )
    assert full_reads == ["slide_000.h5"]
    # Changed after it was recorded (same size, new mtime): read whole again, and damage is found.
    data_bytes = bytearray(target.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    target.write_bytes(bytes(data_bytes))
    reason, facts = check_existing(target, Manifest(folder), require_plain=True)
    assert full_reads == ["slide_000.h5"] * 2
    assert reason is not None and facts is None
    # A full check reads a recorded, unchanged file anyway.
    other = folder / "slide_001.h5"
    check_existing(other, Manifest(folder))
    check_existing(other, Manifest(folder), full=True)
    assert full_reads.count("slide_001.h5") == 2


def test_a_touched_file_is_reverified_and_a_torn_manifest_line_ignored(folder: Path, full_reads: list[str]) -> None:
    target = folder / "slide_002.h5"
    check_existing(target, Manifest(folder))
    with open(folder / MANIFEST_NAME, "a") as handle:
        handle.write('{"name": "slide_002.h5", "inode"')  # a job killed while appending
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert check_existing(target, Manifest(folder))[0] is None
    assert full_reads == ["slide_002.h5"] * 2


def test_facts_recorded_for_another_file_format_are_not_trusted(folder: Path, full_reads: list[str]) -> None:
    # A package that reads another format version wrote the manifest: its facts are read again,
    # so a file of the old format is found (and redone by extract) rather than reused unread.
    target = folder / "slide_000.h5"
    manifest = Manifest(folder)
    check_existing(target, manifest)
    assert full_reads == ["slide_000.h5"]
    line = (folder / MANIFEST_NAME).read_text().splitlines()[-1]
    assert json.loads(line)["format_version"] == FORMAT_VERSION
    (folder / MANIFEST_NAME).write_text(line.replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 2') + "\n")
    assert Manifest(folder).known(target) is None
    check_existing(target, Manifest(folder))
    assert full_reads == ["slide_000.h5"] * 2


def test_what_a_file_lacks_is_said_without_reading_it(folder: Path) -> None:
    plain_only = folder / "plain"
    write_synthetic_cohort(plain_only, n_slides=1, n_tiles=16, n_augmentations=1, bank_size=8)
    target = plain_only / "slide_000.h5"
    Manifest(plain_only).record(target, verified=True, has_plain=True, has_bank=False)
    reason, _ = check_existing(target, Manifest(plain_only), require_bank=True)
    assert reason is not None and "has no augmented bank" in reason


def test_train_scans_a_bank_for_nan_once_until_it_changes(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[str] = []
    original = data.SlideFeatures.augmentation

    def counting(self, index, rows=None):  # type: ignore[no-untyped-def]
        scanned.append(self.path.name)
        return original(self, index, rows)

    monkeypatch.setattr(data.SlideFeatures, "augmentation", counting)
    scan_features_folder(folder, 3)
    assert sorted(set(scanned)) == ["slide_000.h5", "slide_001.h5", "slide_002.h5"]
    scanned.clear()
    scan_features_folder(folder, 3)
    assert scanned == []
    os.utime(folder / "slide_001.h5")  # rewritten (or touched): scanned again
    scan_features_folder(folder, 3)
    assert set(scanned) == {"slide_001.h5"}
    scanned.clear()
    scan_features_folder(folder, 3, recheck_finite=True)
    assert len(set(scanned)) == 3


def test_a_read_only_folder_keeps_its_facts_in_memory(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    manifest = Manifest(folder)
    monkeypatch.setattr(manifest_module.os, "open", refuse)
    facts = manifest.record(folder / "slide_000.h5", finite=True)
    assert manifest.known(folder / "slide_000.h5") == facts and not (folder / MANIFEST_NAME).exists()
    assert np.isfinite(facts.size)


def test_a_second_training_scan_opens_no_unchanged_file_and_reads_the_same_views(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = scan_features_folder(folder, 3)
    opened: list[str] = []
    original = data.SlideFeatures.__init__

    def counting(self, path, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path).name)
        original(self, path, **kwargs)

    monkeypatch.setattr(data.SlideFeatures, "__init__", counting)
    second = scan_features_folder(folder, 3)
    assert opened == [] and first.slides == second.slides
    for a, b in zip(first.slides, second.slides):
        assert a.chunks is not None and b.chunks is not None and a.chunks.identity == b.chunks.identity
        np.testing.assert_array_equal(a.chunks.feature_offsets, b.chunks.feature_offsets)
    views = [data.SlideViewDataset(cohort, 3, seed=1).views(0, 2) for cohort in (first, second)]
    for view_a, view_b in zip(*views):
        for array_a, array_b in zip(view_a, view_b):
            np.testing.assert_array_equal(array_a, array_b)
    os.utime(folder / "slide_000.h5")
    scan_features_folder(folder, 3)
    assert opened == ["slide_000.h5"]
