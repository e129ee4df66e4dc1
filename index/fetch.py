"""An index where the replicas of a deployment can all reach it: a path on shared storage, or a URL
of a packed index (`.tar.gz` of its directory: http(s)://, an object store's signed URL, file://)
fetched once per machine into $AIMLQA_HOME/indexes/fetched and checked before it is used.

    tar czf course.tar.gz -C ~/.cache/aimlqa/indexes course      # pack one built by `aimlqa index build`
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from pathlib import Path

from aimlqa import settings
from aimlqa.files import built_once
from aimlqa.settings import UserError
from index.store import read_manifest

URL_SCHEMES = ("http://", "https://", "file://")


def materialize(source: str | Path) -> Path:
    """A local index directory for `source`; a URL is fetched and unpacked once (atomically)."""
    source = str(source)
    if not source.startswith(URL_SCHEMES):
        return Path(source)
    out = settings.home() / "indexes" / "fetched" / hashlib.sha256(source.encode()).hexdigest()[:16]
    path = built_once(out, lambda work: _unpack(source, work), ready=lambda p: (p / "manifest.json").is_file())
    read_manifest(path)  # the format this code reads, or a clear error
    return path


def _unpack(url: str, work: Path) -> Path:
    archive = work / "index.tar.gz"
    try:
        with urllib.request.urlopen(url, timeout=60) as reply, open(archive, "wb") as f:
            while block := reply.read(1 << 20):
                f.write(block)
    except OSError as e:
        raise UserError(f"could not fetch the index from {url}: {e}") from None
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work / "x", filter="data")  # no absolute paths, links out or devices
    except tarfile.TarError as e:
        raise UserError(f"{url} is not a packed index (.tar.gz of an index directory): {e}") from None
    found = [m.parent for m in (work / "x").glob("**/manifest.json")]
    if len(found) != 1:
        raise UserError(f"{url} holds {len(found)} index manifests; pack exactly one index directory")
    return found[0]
