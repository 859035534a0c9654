"""The test bed's exceptions that ``netfence`` reports as one line (``netfence.cli.main``)."""

from __future__ import annotations

from netfence_lab.cluster import ClusterError
from netfence_lab.pki import PkiError
from netfence_lab.process import StartupError
from netfence_lab.tools import ToolsError

LAB_ERRORS: tuple[type[BaseException], ...] = (ClusterError, PkiError, StartupError, ToolsError)
