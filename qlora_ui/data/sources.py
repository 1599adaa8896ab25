"""Datasets that are not one file: a Hub dataset (`hf://owner/name`, with a subset, split and revision) and a local
dataset folder (`save_to_disk` output, or data files with a README). Both are opened through `datasets` itself
(`load_dataset` / `load_from_disk`: the Hub's README configs, its cache, its progress bars), and their rows then go
through the same reading stage as an uploaded file (stages.py), so format detection, the report, the token preview
and the prepared-rows cache are the ones every file gets.

What identifies the rows, for the cache key and the run's dataset.json: for the Hub, the commit the revision
resolved to; for a folder, the sha256 of its files. Offline (HF_HUB_OFFLINE=1 or no network), a dataset the
`datasets` cache holds loads, so does one pre-downloaded with `huggingface-cli download --repo-type dataset`;
anything else is one message saying how to get it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .common import DataError, data_cache_dir, max_data_bytes
from .files import file_digest

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
# The Hub's repo id rule (owner/name; a few old canonical datasets have no owner).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")  # a subset, split or revision name as typed
# Files of a Hub dataset repository that are not its data (not counted against the size cap).
_NOT_DATA = (".md", ".gitattributes", ".gitignore", ".yaml", ".yml", ".py", ".png", ".jpg", ".svg")


@dataclass(frozen=True)
class Source:
    kind: Literal["hub", "folder"]
    ref: str  # the repo id, or the folder's resolved path
    config: str = ""
    split: str = "train"
    revision: str | None = None

    @property
    def shown(self) -> str:
        """How messages name it: hf://owner/name (subset) [split], or the folder's name [split]."""
        where = f"{HF_PREFIX}{self.ref}" if self.kind == "hub" else Path(self.ref).name
        sub = f" ({self.config})" if self.config else ""
        return f"{where}{sub} [{self.split}]"

    @property
    def repo_flags(self) -> str:
        return f"--data {HF_PREFIX}{self.ref}" if self.kind == "hub" else f"--data {self.ref}"


@dataclass
class Loaded:
    dataset: Any  # datasets.Dataset: the split's rows
    revision: str  # hub: the commit sha; folder: sha256 of its files
    size: int  # bytes of data files


def hub_repo(data_path: str | None) -> str | None:
    """'owner/name' when the dataset setting names a Hub dataset (hf://owner/name), else None."""
    s = (data_path or "").strip()
    return s[len(HF_PREFIX):].strip("/").partition("@")[0] if s.startswith(HF_PREFIX) else None


def source_of(data_path: str | None, config: str = "", split: str = "train",
              revision: str | None = None) -> Source | None:
    """The Source a dataset setting names, or None for a plain file (read by reading.py as ever)."""
    s = (data_path or "").strip()
    for what, v in (("data_config", config), ("data_split", split), ("data_revision", revision)):
        if v and not _NAME.fullmatch(v):
            raise DataError(f"{what} '{v[:60]}' is not a valid name: use letters, digits and . _ - / +.")
    if s.startswith(HF_PREFIX):
        repo, _, at = s[len(HF_PREFIX):].strip("/").partition("@")  # hf://owner/name@rev also names a revision
        if not _REPO_ID.fullmatch(repo):
            raise DataError(f"'{s[:120]}' is not a Hub dataset id. Write it as hf://owner/name, e.g. "
                            "hf://timdettmers/openassistant-guanaco.")
        return Source("hub", repo, config or "", split or "train", revision or at or None)
    if s and Path(s).expanduser().is_dir():
        return Source("folder", str(Path(s).expanduser().resolve()), config or "", split or "train", None)
    return None


def source_for(data) -> Source | None:
    """The Source of a DataConfig (None for a file)."""
    return source_of(data.data_path, data.data_config, data.data_split, data.data_revision)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def load_split(src: Source, *, max_bytes: int | None = None) -> Loaded:
    """The split's rows, downloaded into the HF cache when needed (datasets' progress bars show it), or a
    DataError naming the problem and the fix. One download per dataset and revision at a time, across the app's
    threads and a multi-process run's ranks (a file lock: the second waits, then reads the cache)."""
    limit = max_data_bytes() if max_bytes is None else max_bytes
    with _lock(src):
        if src.kind == "folder":
            return _load_folder(src, limit)
        return _load_hub(src, limit)


def _lock(src: Source):
    from filelock import FileLock

    locks = data_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{src.kind}:{src.ref}@{src.revision}".encode()).hexdigest()[:32]
    return FileLock(str(locks / f"download-{key}.lock"))


def _check_size(src: Source, size: int, limit: int) -> None:
    if size > limit:
        raise DataError(f"{src.shown} is {size / 2**20:,.1f} MB of data files, over the {limit / 2**20:,.0f} MB "
                        "limit for a dataset on this server (--max-data-size, QLORA_MAX_DATA_SIZE). Pick a smaller "
                        "subset (data_config) or dataset.")


def _data_files(folder: Path) -> list[Path]:
    # Hidden folders hold caches (.cache/huggingface from a local_dir download), not data.
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def _load_folder(src: Source, limit: int) -> Loaded:
    folder = Path(src.ref)
    files = _data_files(folder)
    size = sum(f.stat().st_size for f in files)
    _check_size(src, size, limit)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder)}\0{file_digest(f)}\n".encode())
    digest = h.hexdigest()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        from datasets import DatasetDict, load_from_disk

        try:
            d = load_from_disk(str(folder))
        except (OSError, ValueError) as e:
            raise DataError(f"{folder.name} looks like a `save_to_disk` folder but does not load ({str(e)[:200]}). "
                            "Save it again with Dataset.save_to_disk.") from None
        if isinstance(d, DatasetDict):
            if src.split not in d:
                raise _no_split(src, list(d))
            d = d[src.split]
        return Loaded(d, digest, size)
    return Loaded(_load(str(folder), src, None), digest, size)


def _offline_errors() -> tuple[type[BaseException], ...]:
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled, httpx.ConnectError, httpx.TimeoutException, ConnectionError


def _load_hub(src: Source, limit: int) -> Loaded:
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    info = None
    if not hub_constants.HF_HUB_OFFLINE:
        try:
            # Resolves the revision to a commit (what the run records) and gives every file's size (the cap),
            # before anything is downloaded.
            info = HfApi().dataset_info(src.ref, revision=src.revision, files_metadata=True, timeout=30)
        except GatedRepoError:
            raise DataError(f"{HF_PREFIX}{src.ref} is a gated dataset: accept its terms on its Hub page, then log in "
                            "on this machine (`hf auth login`) and try again.") from None
        except RevisionNotFoundError:
            raise DataError(f"{HF_PREFIX}{src.ref} has no revision '{src.revision}'. Give a branch, tag or commit it "
                            "has (data_revision), or leave it empty for main.") from None
        except RepositoryNotFoundError:
            raise _not_found(src) from None
        except _offline_errors():
            info = None  # no network: the cache decides below
        except HfHubHTTPError as e:
            raise DataError(f"The Hub refused {HF_PREFIX}{src.ref} ({str(e).splitlines()[0][:200]}). Try again "
                            "later, or check the id.") from None
    if info is not None:
        size = sum(s.size or 0 for s in (info.siblings or []) if not s.rfilename.lower().endswith(_NOT_DATA))
        _check_size(src, size, limit)
        # Loaded by the commit, not the branch: what the run records is exactly what was read.
        return Loaded(_load(src.ref, src, info.sha), info.sha, size)
    # Offline: the datasets cache first (a dataset loaded here once), then a snapshot in the hub cache.
    try:
        ds = _load(src.ref, src, src.revision)
        return Loaded(ds, _cached_commit(ds), _arrow_size(ds))
    except _NotCached:
        pass
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(src.ref, repo_type="dataset", revision=src.revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise _not_cached(src) from None
    files = _data_files(Path(folder))
    return Loaded(_load(folder, src, None), Path(folder).name, sum(f.stat().st_size for f in files))


def _cached_commit(ds) -> str:
    """The commit a cached Hub dataset was built from: datasets names its cache folder after it
    (.../owner___name/<config>/<version>/<commit>/name-train.arrow)."""
    try:
        return Path(ds.cache_files[0]["filename"]).parent.name
    except (IndexError, KeyError, AttributeError):
        return "unknown"


def _arrow_size(ds) -> int:
    try:
        return sum(Path(f["filename"]).stat().st_size for f in ds.cache_files)
    except (OSError, KeyError):
        return 0


class _NotCached(Exception):
    pass


def _load(path: str, src: Source, revision: str | None, *, streaming: bool = False):
    """datasets.load_dataset for one split, its errors turned into one DataError each."""
    from datasets import load_dataset
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    try:
        return load_dataset(path, name=src.config or None, split=src.split, revision=revision, streaming=streaming)
    except _offline_errors():
        if src.kind == "hub":
            raise _NotCached() from None
        raise
    except DatasetNotFoundError as e:
        if "Revision" in str(e):
            raise DataError(f"{HF_PREFIX}{src.ref} has no revision '{src.revision}'. Give a branch, tag or commit "
                            "it has (data_revision), or leave it empty for main.") from None
        raise _not_found(src) from None
    except (DataFilesNotFoundError, FileNotFoundError):  # EmptyDatasetError is a FileNotFoundError
        if src.kind == "folder":
            raise DataError(f"{Path(path).name} is a folder with no dataset in it: give the dataset file inside it "
                            "(CSV, JSON, JSONL, Parquet or TXT), a `save_to_disk` folder, or a folder of data "
                            "files.") from None
        raise DataError(f"{src.shown} has no data files this app can read. Check the id and subset.") from None
    except ValueError as e:
        msg = str(e)
        if "Unknown split" in msg or "Bad split" in msg:
            raise _no_split(src, _listed(msg)) from None
        if "BuilderConfig" in msg or "Config name is missing" in msg:
            configs = _listed(msg)
            what = f"no subset '{src.config}'" if src.config else "several subsets and none was chosen"
            raise DataError(f"{src.shown} has {what}"
                            + (f"; its subsets are {', '.join(configs)}" if configs else "")
                            + ". Pick one with data_config (--data-config).") from None
        raise DataError(f"{src.shown} could not be loaded ({msg.splitlines()[0][:300]}).") from None


def _listed(msg: str) -> list[str]:
    """The names in "... one of ['train', 'test']" / "Available: ['a', 'b']" of a datasets error."""
    m = re.search(r"\[([^\]]*)\]", msg)
    return re.findall(r"'([^']+)'", m.group(1)) if m else []


def _no_split(src: Source, splits: list[str]) -> DataError:
    have = f"; its splits are {', '.join(splits)}" if splits else ""
    return DataError(f"{src.shown}: there is no split '{src.split}'{have}. Pick one with data_split "
                     "(--data-split).")


def _not_found(src: Source) -> DataError:
    return DataError(f"{HF_PREFIX}{src.ref} was not found on the Hub (or is private). Check the id, as "
                     "owner/name, on huggingface.co/datasets; for a private one, log in first (`hf auth login`).")


def _not_cached(src: Source) -> DataError:
    rev = f" --revision {src.revision}" if src.revision else ""
    return DataError(f"{HF_PREFIX}{src.ref} is not in this machine's Hugging Face cache, and the Hub cannot be reached "
                     "(offline: HF_HUB_OFFLINE=1 or no network). Download it once while online: `huggingface-cli "
                     f"download --repo-type dataset {src.ref}{rev}`, or run this same command once online.")


# ---------------------------------------------------------------------------------------------------
# Before the download: the split list and the first rows
# ---------------------------------------------------------------------------------------------------

def split_names(src: Source) -> list[str]:
    """The splits the dataset has (for the split picker), or a DataError."""
    if src.kind == "folder":
        folder = Path(src.ref)
        if (folder / "dataset_dict.json").is_file():
            import json

            return list(json.loads((folder / "dataset_dict.json").read_text()).get("splits", []))
        if (folder / "state.json").is_file():
            return [src.split]
    from datasets import get_dataset_split_names

    try:
        return list(get_dataset_split_names(src.ref, config_name=src.config or None, revision=src.revision))
    except DataError:
        raise
    except _offline_errors():
        raise _not_cached(src) from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types here; each becomes one message
        try:
            _load(src.ref, src, src.revision)
        except DataError:
            raise
        except Exception:  # noqa: BLE001
            pass
        raise DataError(f"{src.shown}: its splits could not be listed ({str(e).splitlines()[0][:200]}).") from None


def preview_rows(src: Source, n: int) -> list[dict]:
    """The first `n` rows, streamed where the dataset allows (nothing is downloaded in full): the quick first
    answer of the Model & Data tab. A DataError when the dataset cannot be opened."""
    if src.kind == "folder":
        return _head(load_split(src).dataset, n)  # local: reading it is the quick way
    try:
        return [dict(r) for r in _load(src.ref, src, src.revision, streaming=True).take(n)]
    except DataError:
        raise
    except (_NotCached, *_offline_errors()):
        raise _not_cached(src) from None
    except Exception as e:  # noqa: BLE001 - a stream can fail midway in many ways; the full load says more
        raise DataError(f"{src.shown} could not be previewed ({str(e).splitlines()[0][:300]}).") from None


def _head(ds, n: int) -> list[dict]:
    return ds.select(range(min(n, len(ds)))).to_list()
