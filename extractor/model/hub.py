"""Models by name: `--model org/name[@revision]` and `--adapter org/lora[@revision]` from the Hugging Face Hub.

A Qwen2-Audio-7B checkpoint is ~16 GB, of which the audio tower is ~1.3 GB, and the checkpoint's
index says which shards hold `audio_tower.*`. So a repo id is resolved to a snapshot in the HF
cache that holds only what this job reads:

    config.json, model.safetensors.index.json, the shards the index maps `audio_tower.*` to
        (or model.safetensors when the checkpoint is not sharded);
    adapter_config.json and adapter_model.safetensors (or adapter_model.bin).

The rest of the job reads that snapshot directory like any local checkpoint. Everything goes
through `huggingface_hub.hf_hub_download`, so the HF cache (HF_HOME, HF_HUB_CACHE), HF_ENDPOINT,
HF_TOKEN and HF_HUB_OFFLINE=1 work as users know them. The first file is asked for at the given
revision (a branch, a tag or a commit); the others at the commit that answer named, so a branch
that moves while we download cannot mix two commits, and files already cached at that commit
cost no request at all (a nightly rerun makes one HEAD request per repo).

A directory that exists always wins over a repo id. A string that is neither is refused (exit 2).

Errors. What retrying cannot fix is a ConfigError (exit 2): no such repo or revision, a gated or
private repo without a token, a repo without the files, HF_HUB_OFFLINE=1 with files missing from
the cache, an endpoint that does not speak the Hub's protocol. What retrying may fix is
HubUnavailable (exit 1, "unexpected: retry"): connection refused or reset, a timeout, HTTP 408,
429 or 5xx, a download cut short. huggingface_hub itself falls back to the cache when the Hub
cannot be reached, so these only end a run whose files are not cached yet.

`huggingface_hub` is imported only when a repo id is given: `--help` and reruns over local
directories do not pay for it, and nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import EXIT_UNEXPECTED, ConfigError
from .config import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS, CONFIG_FILE, INDEX_FILE, SINGLE_FILE, tower_files

logger = logging.getLogger(__name__)

# org/name, optionally @revision (a branch, a tag, refs/pr/N, or a commit). The Hub's own rule
# (huggingface_hub.utils.validate_repo_id) is applied after this: this only decides "meant as a
# repo id". A namespace is required: a bare `name` is more likely a mistyped local directory.
REPO_SPEC = re.compile(r"^(?P<repo_id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
DEFAULT_REVISION = "main"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The HF cache's layout (huggingface_hub.file_download): <cache>/models--<org>--<name>/snapshots/<commit>/
CACHE_REPO_PREFIX = "models--"
CACHE_SNAPSHOTS = "snapshots"
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)  # huggingface_hub's own retry list (utils/_http.py)


class HubUnavailable(Exception):
    """The Hub could not be reached or answered with a transient error, and the cache does not
    hold the files (exit 1: retry; or fill the cache once and run with HF_HUB_OFFLINE=1)."""

    exit_code = EXIT_UNEXPECTED


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def parse_ref(spec: str, flag: str) -> HubRef | None:
    """None for a local directory; the repo id and revision for `org/name[@revision]`; ConfigError
    (naming the flag and the value) for anything else."""
    if os.path.isdir(spec):
        return None  # a directory that exists always wins
    if os.path.exists(spec):
        raise ConfigError(f"{flag} {spec}: is a file; name the checkpoint's directory or a Hub repo id (org/name[@revision])")
    m = REPO_SPEC.match(spec)
    if m is None:
        raise ConfigError(f"{flag} {spec!r}: neither an existing directory nor a Hugging Face Hub repo id (org/name or org/name@revision)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(m["repo_id"])
    except HFValidationError as e:
        raise ConfigError(f"{flag} {spec!r}: not an existing directory, and not a valid Hub repo id: {e}") from e
    return HubRef(m["repo_id"], m["revision"] or DEFAULT_REVISION)


def resolve_model(spec: str, flag: str = "--model") -> str:
    """A checkpoint directory for `spec`: itself if it is a directory, else the cached snapshot of
    the Hub repo with config.json, the index and the tower's shards (downloaded if missing)."""
    ref = parse_ref(spec, flag)
    if ref is None:
        return spec
    where = f"{flag} {spec}"
    snapshot = _fetch(ref, CONFIG_FILE, where).parent  # <cache>/models--org--name/snapshots/<commit>
    pinned = HubRef(ref.repo_id, snapshot.name)
    if _fetch(pinned, INDEX_FILE, where, optional=True) is not None:
        for shard in tower_files(snapshot):  # read from the index alone: the shards it maps audio_tower.* to
            _fetch(pinned, shard.relative_to(snapshot).as_posix(), where)
    else:
        _fetch(pinned, SINGLE_FILE, where, missing=f"neither {INDEX_FILE} nor {SINGLE_FILE}")
    logger.info("%s: %s at commit %s, in %s", where, ref.repo_id, snapshot.name, snapshot)
    return str(snapshot)


def resolve_adapter(spec: str, flag: str = "--adapter") -> str:
    """An adapter directory for `spec`: itself if it is a directory, else the cached snapshot of
    the Hub repo with adapter_config.json and its weights."""
    ref = parse_ref(spec, flag)
    if ref is None:
        return spec
    where = f"{flag} {spec}"
    snapshot = _fetch(ref, ADAPTER_CONFIG, where, missing=f"no {ADAPTER_CONFIG}: not a PEFT adapter").parent
    pinned = HubRef(ref.repo_id, snapshot.name)
    if _fetch(pinned, ADAPTER_SAFETENSORS, where, optional=True) is None:
        _fetch(pinned, ADAPTER_PICKLE, where, missing=f"neither {ADAPTER_SAFETENSORS} nor {ADAPTER_PICKLE}")
    logger.info("%s: %s at commit %s, in %s", where, ref.repo_id, snapshot.name, snapshot)
    return str(snapshot)


def readable_source(path: str | None) -> tuple[str | None, str | None]:
    """(repo id, commit) for a snapshot directory of the HF cache, (the path, None) for any other
    directory: what `_run.json` and the parts' metadata name. Read from the path itself, so it is
    the same in every process that runs a shard, whichever engine started it."""
    if path is None:
        return None, None
    p = Path(path)
    repo = p.parent.parent.name
    if p.parent.name == CACHE_SNAPSHOTS and COMMIT.match(p.name) and repo.startswith(CACHE_REPO_PREFIX):
        return repo.removeprefix(CACHE_REPO_PREFIX).replace("--", "/"), p.name  # the Hub forbids "--" in names
    return str(path), None


def pinned_spec(path: str | None) -> str | None:
    """`org/name@<commit>` for a snapshot directory, else the path: what to hand a process on
    another host (a Ray task), which resolves it from its own cache without asking for a branch."""
    repo_id, commit = readable_source(path)
    return f"{repo_id}@{commit}" if commit else path


def _fetch(ref: HubRef, filename: str, where: str, *, optional: bool = False, missing: str | None = None) -> Path | None:
    """One file of the repo, from the cache or downloaded. None when `optional` and the repo has no
    such file at that revision: as the Hub says, or as the cache recorded it saying (a commit's
    files never change), or, offline, when the cache does not hold it.

    huggingface_hub's errors become this job's: ConfigError (exit 2) or HubUnavailable (exit 1),
    each naming the flag, the repo, the file and where it looked."""
    from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, FileMetadataError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    if optional and try_to_load_from_cache(ref.repo_id, filename, revision=ref.revision) is _CACHED_NO_EXIST:
        return None
    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision))
    except LocalEntryNotFoundError as e:  # the Hub did not answer (or offline), and the cache does not hold it
        if constants.HF_HUB_OFFLINE:
            if optional:
                return None
            raise ConfigError(f"{where}: HF_HUB_OFFLINE is set and the cache {cache} does not hold {filename} of {ref}; "
                              "resolve it once online, or unset HF_HUB_OFFLINE") from e
        cause = e.__cause__
        if isinstance(cause, FileMetadataError):
            raise ConfigError(f"{where}: {endpoint} did not answer as a Hugging Face Hub ({cause}); check HF_ENDPOINT") from e
        if isinstance(cause, HfHubHTTPError) and cause.response.status_code not in TRANSIENT_STATUS:
            raise ConfigError(f"{where}: {endpoint} refused {filename} of {ref}: {_first_line(cause)}") from e
        raise HubUnavailable(f"{where}: cannot reach {endpoint} for {filename} of {ref} ({_first_line(cause or e)}), and the "
                             f"cache {cache} does not hold it; retry, or fill the cache once and set HF_HUB_OFFLINE=1") from e
    except EntryNotFoundError as e:  # the Hub says the repo has no such file at this revision
        if optional:
            return None
        raise ConfigError(f"{where}: {ref} has {missing or f'no {filename}'}") from e
    except GatedRepoError as e:
        raise ConfigError(f"{where}: {ref.repo_id} is gated on {endpoint}: accept its terms there and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ConfigError(f"{where}: not a local directory, and {endpoint} has no repo {ref.repo_id} "
                          "(or it is private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise ConfigError(f"{where}: {endpoint} has no revision {ref.revision!r} of {ref.repo_id}") from e
    except HfHubHTTPError as e:
        if e.response.status_code in TRANSIENT_STATUS:
            raise HubUnavailable(f"{where}: {endpoint} answered {e.response.status_code} for {filename} of {ref}; retry later") from e
        raise ConfigError(f"{where}: {endpoint} refused {filename} of {ref}: {_first_line(e)}") from e
    except PermissionError as e:
        raise ConfigError(f"{where}: cannot write {filename} of {ref} into the HF cache {cache}: {e}; "
                          "set HF_HUB_CACHE to a writable directory") from e
    except Exception as e:  # the connection dropped mid-download, a size check failed, a full disk: worth a retry
        raise HubUnavailable(f"{where}: downloading {filename} of {ref} from {endpoint} into {cache} failed "
                             f"({_first_line(e)}); retry") from e


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
