"""``extract.errors.one_line``: how the command line (``gigassl``), the extraction summary and the DICOM
reader put an exception on one line."""

from __future__ import annotations

from extract.errors import UserError, one_line

WORKER_TEXT = (
    "Caught FeatureFileError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    '  File "x.py", line 1, in f\nextract.features.slide_file.FeatureFileError: a.h5: NaN; re-extract this slide'
)


def test_an_error_from_a_dataloader_worker_keeps_only_the_original_line() -> None:
    original = "extract.features.slide_file.FeatureFileError: a.h5: NaN; re-extract this slide"
    assert one_line(UserError(WORKER_TEXT)) == original
    assert one_line(RuntimeError(WORKER_TEXT), with_type=True) == original  # the line names its type already


def test_a_message_of_several_lines_is_joined_and_spacing_inside_a_line_kept() -> None:
    assert one_line(OSError("  slides/My  Slide.svs: cannot open\n\n   check the file  ")) == (
        "slides/My  Slide.svs: cannot open check the file"
    )


def test_an_empty_message_is_the_type_and_with_type_prefixes_it() -> None:
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError("  \n ")) == "ValueError"
    assert one_line(KeyError("patch_size"), with_type=True) == "KeyError: 'patch_size'"
    assert one_line(IndexError(), with_type=True) == "IndexError"
    assert one_line(UserError("a.h5: bad\nre-extract it")) == "a.h5: bad re-extract it"
