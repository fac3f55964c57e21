"""Fetch the Apache Kafka broker's jars from Maven Central into a user cache, verified by SHA-256.

The exact set of jars is pinned in `kafka-<version>.lock` next to this file, so running the broker
needs Java and the network once, not Maven. To pin a new Kafka version (needs Maven):

    python -m outbox.devstack.jars --relock 4.1.1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from outbox.devstack.procs import StackError, progress

LOCK_DIR = Path(__file__).parent
DEFAULT_REPO = "https://repo1.maven.org/maven2"


@dataclass(frozen=True)
class Jar:
    group: str
    artifact: str
    version: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.artifact}-{self.version}.jar"

    def url(self, repo: str) -> str:
        return f"{repo.rstrip('/')}/{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.filename}"


def lockfile(version: str) -> Path:
    return LOCK_DIR / f"kafka-{version}.lock"


def read_lock(version: str) -> list[Jar]:
    path = lockfile(version)
    if not path.exists():
        pinned = sorted(p.stem.removeprefix("kafka-") for p in LOCK_DIR.glob("kafka-*.lock"))
        raise StackError(
            f"Kafka {version} is not pinned in this release (pinned: {', '.join(pinned)}). "
            f"Fix: set OUTBOX_DEV_KAFKA_VERSION to one of those, or pin it with "
            f"`python -m outbox.devstack.jars --relock {version}`."
        )
    jars = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            coord, sha, size = line.split()
            group, artifact, ver = coord.split(":")
            jars.append(Jar(group, artifact, ver, sha, int(size)))
    return jars


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "outbox"


def ensure_jars(version: str, cache_dir: Path | None, repo: str = DEFAULT_REPO) -> Path:
    """Return a directory holding every jar of the pinned broker, downloading what is missing."""
    jars = read_lock(version)
    libs = (cache_dir or default_cache_dir()) / f"kafka-{version}" / "libs"
    libs.mkdir(parents=True, exist_ok=True)
    missing = [j for j in jars if not _valid(libs / j.filename, j)]
    if not missing:
        return libs
    total = sum(j.size for j in missing)
    progress(f"Downloading Apache Kafka {version}: {len(missing)} jars, {total / 2**20:.1f} MiB "
             f"from {repo} into {libs}")
    started, done_bytes, done = time.monotonic(), 0, 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {pool.submit(_download, j, libs, repo): j for j in missing}
        for future in as_completed(futures):
            future.result()
            done += 1
            done_bytes += futures[future].size
            if done == len(missing) or done % 8 == 0:
                progress(f"  {done}/{len(missing)} jars, {done_bytes / 2**20:.1f}/{total / 2**20:.1f} MiB")
    progress(f"  downloaded in {time.monotonic() - started:.1f} s")
    return libs


def _valid(path: Path, jar: Jar) -> bool:
    return path.exists() and path.stat().st_size == jar.size and _sha256(path) == jar.sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(jar: Jar, libs: Path, repo: str, attempts: int = 4) -> None:
    url = jar.url(repo)
    error = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(2**attempt)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, \
                    tempfile.NamedTemporaryFile(dir=libs, prefix=".part-", delete=False) as out:
                shutil.copyfileobj(resp, out)
            part = Path(out.name)
            if _valid(part, jar):
                part.replace(libs / jar.filename)
                return
            part.unlink(missing_ok=True)
            error = "checksum mismatch (corrupted download or a tampering mirror)"
        except (urllib.error.URLError, OSError) as exc:
            error = str(exc)
    raise StackError(
        f"could not download {url}: {error}. Fix: check network access to Maven Central, "
        f"or point OUTBOX_MAVEN_REPO at a mirror that serves the same artifacts."
    )


def relock(version: str) -> Path:
    """Resolve kafka_2.13:<version>'s runtime closure with Maven and write the lock file."""
    pom = f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>kafka-lock</artifactId><version>1</version><dependencies>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.24.3</version></dependency>
</dependencies></project>"""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "pom.xml").write_text(pom)
        subprocess.run(["mvn", "-q", "-B", "dependency:list", "-DincludeScope=runtime", "-DoutputFile=deps.txt",
                        "-DoutputAbsoluteArtifactFilename=true"], cwd=tmp, check=True)
        rows = []
        for line in Path(tmp, "deps.txt").read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) >= 6 and parts[2] == "jar":
                path = Path(":".join(parts[5:]))
                rows.append(f"{parts[0]}:{parts[1]}:{parts[3]} {_sha256(path)} {path.stat().st_size}")
    out = lockfile(version)
    out.write_text(f"# Apache Kafka {version} broker runtime (kafka_2.13 + log4j-slf4j-impl), pinned by SHA-256.\n"
                   f"# Regenerate with: python -m outbox.devstack.jars --relock {version}\n" + "\n".join(sorted(rows)) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relock", metavar="VERSION", required=True, help="Kafka version to resolve and pin")
    print(relock(parser.parse_args().relock))
    sys.exit(0)
