"""Reading a batch's encoded images from a dataset's files."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from augserve.core.sample import SourceImage
from augserve.data.datasets import Manifest

log = logging.getLogger(__name__)


def read_sources(manifest: Manifest, sample_ids: Sequence[int]) -> list[SourceImage]:
    """The encoded bytes of each sample, with the file's identity (size, mtime) for header
    caching. An unreadable file becomes empty bytes: a bad image, which the policy decides."""
    sources = []
    for sample_id in sample_ids:
        path = manifest.path(sample_id)
        identity = None
        try:
            with open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                identity = (status.st_size, status.st_mtime_ns)
                data = handle.read()
        except OSError as error:
            data = b""
            log.warning("cannot read %s: %s", path, error)
        sources.append(SourceImage(sample_id, int(manifest.labels[sample_id]), path, data, identity))
    return sources
