"""Third-party warnings that are not the user's business, silenced when ``gigassl`` is imported.

Every ``train`` / ``embed`` run and every ``import gigassl.embed`` printed 16 lines before
anything useful: spconv's FutureWarnings about ``torch.cuda.amp.custom_fwd`` (its own code, not
the user's) and torch's "is_fx_tracing will return true …" log warning (spconv calls
``is_fx_tracing``). Only those are silenced, by module and message; every other warning is
shown as usual.
"""

from __future__ import annotations

import logging
import warnings

FX_LOGGER = "torch.fx._symbolic_trace"
FX_MESSAGE = "is_fx_tracing will return true"


class _DropFxTracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(FX_MESSAGE)


def silence_third_party_warnings() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv(\..*)?$")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(spconv|cumm|ccimport|pccm)(\..*)?$")
    fx_logger = logging.getLogger(FX_LOGGER)
    if not any(isinstance(f, _DropFxTracingNotice) for f in fx_logger.filters):
        fx_logger.addFilter(_DropFxTracingNotice())
