"""Fetch pinned jars from Maven Central into a user cache, verified by SHA-256.

The exact set of jars is pinned in a lock file next to this file (`kafka-<version>.lock` for the
broker, `debezium-<version>.lock` for the Debezium benchmark), so running them needs Java and the
network once, not Maven. To pin a new version (needs Maven):

    python -m outbox.devstack.jars --relock 4.1.1
    python -m outbox.devstack.jars --relock-debezium 3.6.1.Final
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
    return parse_lock(path)


def parse_lock(path: Path) -> list[Jar]:
    """`group:artifact:version sha256 size` per line; `#` starts a comment line."""
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
    libs = (cache_dir or default_cache_dir()) / f"kafka-{version}" / "libs"
    return fetch_locked(read_lock(version), libs, f"Apache Kafka {version}", repo)


def fetch_locked(jars: list[Jar], libs: Path, label: str, repo: str = DEFAULT_REPO) -> Path:
    """Download into `libs` every jar of `jars` that is missing or does not match its SHA-256."""
    libs.mkdir(parents=True, exist_ok=True)
    missing = [j for j in jars if not _valid(libs / j.filename, j)]
    if not missing:
        return libs
    total = sum(j.size for j in missing)
    progress(f"Downloading {label}: {len(missing)} jars, {total / 2**20:.1f} MiB "
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
    deps = [("org.apache.kafka", "kafka_2.13", version), ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")]
    header = (f"# Apache Kafka {version} broker runtime (kafka_2.13 + log4j-slf4j-impl), pinned by SHA-256.\n"
              f"# Regenerate with: python -m outbox.devstack.jars --relock {version}\n")
    return write_lock(lockfile(version), deps, header)


DEBEZIUM_SLF4J = "1.7.36"  # the slf4j-api version Debezium's closure resolves to; the binding must match


def debezium_lockfile(version: str) -> Path:
    return LOCK_DIR / f"debezium-{version}.lock"


def relock_debezium(version: str) -> Path:
    """Pin Debezium's embedded engine + PostgreSQL connector runtime closure (with a quiet slf4j binding)."""
    deps = [("io.debezium", "debezium-embedded", version), ("io.debezium", "debezium-connector-postgres", version),
            ("org.slf4j", "slf4j-simple", DEBEZIUM_SLF4J)]
    header = (f"# Debezium {version} embedded engine + PostgreSQL connector runtime, pinned by SHA-256.\n"
              f"# Used by bench/debezium_bench.py only. Regenerate with:\n"
              f"#   python -m outbox.devstack.jars --relock-debezium {version}\n")
    return write_lock(debezium_lockfile(version), deps, header)


def ensure_debezium_jars(version: str, cache_dir: Path | None = None, repo: str = DEFAULT_REPO) -> Path:
    path = debezium_lockfile(version)
    if not path.exists():
        raise StackError(f"Debezium {version} is not pinned (no {path.name}). "
                         f"Fix: `python -m outbox.devstack.jars --relock-debezium {version}`.")
    libs = (cache_dir or default_cache_dir()) / f"debezium-{version}" / "libs"
    return fetch_locked(parse_lock(path), libs, f"Debezium {version}", repo)


def write_lock(out: Path, deps: list[tuple[str, str, str]], header: str) -> Path:
    """Resolve the runtime closure of `deps` (group, artifact, version) with Maven; write `out`."""
    dependencies = "".join(f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>"
                           f"</dependency>\n" for g, a, v in deps)
    pom = f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>jar-lock</artifactId><version>1</version><dependencies>
{dependencies}</dependencies></project>"""
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
    out.write_text(header + "\n".join(sorted(rows)) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--relock", metavar="VERSION", help="Kafka version to resolve and pin")
    group.add_argument("--relock-debezium", metavar="VERSION", help="Debezium version to resolve and pin")
    args = parser.parse_args()
    print(relock(args.relock) if args.relock else relock_debezium(args.relock_debezium))
    sys.exit(0)
