"""Where an audit's images come from: a folder, a glob, a list of paths, a JSONL or CSV
manifest, or a Hugging Face dataset (saved with `save_to_disk`, or parquet files). A folder's
videos are items too, and a JSONL manifest row whose image field is a list is one post of
several images (one verdict; docs/video.md).

Every kind streams `SourceItem`s (id, position, image, metadata) without listing the dataset in
memory; only a folder's single directory listing and one Arrow record batch are held at once.
An item's id is stable across runs and machines (a path relative to the folder, a manifest's
`id` column or the path as written, `split/row` in a dataset), so resuming skips exactly what
is done and `--shard I/N` (a hash of the id) splits any source the same way everywhere.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aggregate import Post
from ..errors import PolicyEngineError
from ..images import ImageSource
from ..video import VIDEO_EXTENSIONS

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif"}
)
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_EXTENSIONS  # what a folder source picks up
PATH_COLUMNS = ("path", "image", "file", "url")
_GLOB_CHARS = frozenset("*?[")


class SourceError(PolicyEngineError):
    """A source that cannot be read: missing, unknown kind, a bad manifest line."""


@dataclass
class SourceItem:
    id: str
    seq: int  # position in the whole source, before sharding
    image: ImageSource | Post
    source: str  # printable: a path, or where in a dataset
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`: the items whose id hashes there."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise SourceError(f"--shard {text!r}: expected I/N, e.g. 1/4") from None
        if not 1 <= index <= count:
            raise SourceError(f"--shard {text!r}: I must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}" if self.count > 1 else ""

    def holds(self, item_id: str) -> bool:
        if self.count == 1:
            return True
        digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


class Source:
    """A dataset to audit. `Source.open(spec)` picks the kind from the spec."""

    kind = "source"

    def __init__(self, spec: str) -> None:
        self.spec = spec

    @staticmethod
    def open(spec: str, *, image_column: str | None = None, id_column: str | None = None) -> Source:
        path = Path(spec).expanduser()
        if any(c in spec for c in _GLOB_CHARS) and not path.exists():
            if spec.endswith(".parquet"):
                return DatasetSource(spec, image_column=image_column, id_column=id_column)
            return GlobSource(spec)
        if not path.exists():
            raise SourceError(f"source {spec}: no such file or directory")
        if path.is_dir():
            if _is_dataset_dir(path):
                return DatasetSource(spec, image_column=image_column, id_column=id_column)
            return FolderSource(spec)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return JsonlSource(spec)
        if suffix in (".csv", ".tsv"):
            return CsvSource(spec)
        if suffix in (".parquet", ".arrow"):
            return DatasetSource(spec, image_column=image_column, id_column=id_column)
        if suffix in (".txt", ".lst", ".list"):
            return ListSource(spec)
        if suffix in MEDIA_SUFFIXES:
            what = "video" if suffix in VIDEO_EXTENSIONS else "image"
            raise SourceError(f"source {spec} is one {what}; use `policy-engine assess` for it")
        raise SourceError(
            f"source {spec}: unknown kind (a folder, a glob, .txt list, .jsonl or .csv "
            "manifest, .parquet, or a saved Hugging Face dataset)"
        )

    def items(self) -> Iterator[SourceItem]:
        raise NotImplementedError

    def ids(self) -> Iterator[str]:
        """Just the ids, for counting and coverage checks (cheap where the kind allows)."""
        return (item.id for item in self.items())

    def describe(self) -> str:
        return f"{self.kind} {self.spec}"


class FolderSource(Source):
    """Image and video files under a folder, recursively, in sorted order; id = the relative
    path."""

    kind = "folder"

    def items(self) -> Iterator[SourceItem]:
        root = Path(self.spec).expanduser()
        for seq, path in enumerate(self._walk(root)):
            relative = path.relative_to(root).as_posix()
            yield SourceItem(relative, seq, str(path), str(path))

    def ids(self) -> Iterator[str]:
        root = Path(self.spec).expanduser()
        return (path.relative_to(root).as_posix() for path in self._walk(root))

    @staticmethod
    def _walk(root: Path) -> Iterator[Path]:
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for name in sorted(files):
                if Path(name).suffix.lower() in MEDIA_SUFFIXES and not name.startswith("."):
                    yield Path(directory) / name


class GlobSource(Source):
    """Files matching a glob (`**` recurses), in the file system's order; id = the path."""

    kind = "glob"

    def items(self) -> Iterator[SourceItem]:
        matches = glob.iglob(os.path.expanduser(self.spec), recursive=True)
        for seq, name in enumerate(m for m in matches if os.path.isfile(m)):
            yield SourceItem(name, seq, name, name)


class ListSource(Source):
    """A text file with one path (or data URL) per line; relative to the file; id = the line."""

    kind = "list"

    def items(self) -> Iterator[SourceItem]:
        base = Path(self.spec).expanduser().parent
        seq = 0
        for line in _lines(self.spec):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            image = _resolve(text, base)
            yield SourceItem(text, seq, image, _printable(image))
            seq += 1


class JsonlSource(Source):
    """A JSONL manifest: `id` (optional), `path`/`image`/`file`/`url` (a list of them: one
    post of several images), other keys -> metadata."""

    kind = "jsonl manifest"

    def items(self) -> Iterator[SourceItem]:
        base = Path(self.spec).expanduser().parent
        seq = 0
        for number, line in enumerate(_lines(self.spec), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{self.spec}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{self.spec}:{number}: expected a JSON object")
            yield _manifest_item(record, seq, base, f"{self.spec}:{number}")
            seq += 1


class CsvSource(Source):
    """A CSV (or TSV) manifest with a header row: the same columns as a JSONL manifest."""

    kind = "csv manifest"

    def items(self) -> Iterator[SourceItem]:
        path = Path(self.spec).expanduser()
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            handle = path.open(newline="", encoding="utf-8")
        except OSError as err:
            raise SourceError(f"{self.spec}: {err.strerror}") from None
        with handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for seq, record in enumerate(reader):
                where = f"{self.spec}:{reader.line_num}"
                clean = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
                yield _manifest_item(clean, seq, path.parent, where)


class DatasetSource(Source):
    """A Hugging Face dataset saved with `save_to_disk` (Arrow files, one folder per split),
    parquet files (a file, a folder of them, or a glob), streamed one record batch at a time.

    The image column is the one named `--image-column`, else `image`/`img`, else the first
    column holding HF Image structs ({bytes, path}); the id is `--id-column`, else `id`, else
    `<split or file>/<row>`. Other scalar columns become metadata."""

    kind = "dataset"

    def __init__(
        self, spec: str, *, image_column: str | None = None, id_column: str | None = None
    ) -> None:
        super().__init__(spec)
        self.image_column = image_column
        self.id_column = id_column

    def _files(self) -> list[tuple[str, Path, str]]:
        """(part name, file, format) in a stable order."""
        path = Path(self.spec).expanduser()
        if any(c in self.spec for c in _GLOB_CHARS) and not path.exists():
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.spec)))
            return [(p.stem, p, "parquet") for p in found]
        if path.is_file():
            fmt = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
            return [(path.stem, path, fmt)]
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            return [
                (split, file, "arrow")
                for split in splits
                for file in sorted((path / split).glob("*.arrow"))
            ]
        arrows = sorted(path.glob("*.arrow"))
        if arrows:
            return [(path.name, file, "arrow") for file in arrows]
        parquets = sorted(path.rglob("*.parquet"))
        if not parquets:
            raise SourceError(f"source {self.spec}: no .arrow or .parquet files")
        return [(p.relative_to(path).with_suffix("").as_posix(), p, "parquet") for p in parquets]

    def items(self) -> Iterator[SourceItem]:
        seq = 0
        rows_in_part: dict[str, int] = {}
        for part, file, fmt in self._files():
            for batch in _record_batches(file, fmt):
                columns = batch.schema.names
                image_column = self._image_column(batch.schema, file)
                data = batch.to_pydict()
                for row in range(batch.num_rows):
                    index = rows_in_part.get(part, 0)
                    rows_in_part[part] = index + 1
                    item_id = self._id(data, row, part, index)
                    image = _dataset_image(data[image_column][row], file.parent)
                    metadata = {
                        c: data[c][row]
                        for c in columns
                        if c not in (image_column, self.id_column)
                        and isinstance(data[c][row], str | int | float | bool)
                    }
                    where = f"{self.spec}#{part}/{index}"
                    yield SourceItem(item_id, seq, image, where, metadata)
                    seq += 1

    def ids(self) -> Iterator[str]:
        """The ids without reading any image: row counts, or the id column alone."""
        rows_in_part: dict[str, int] = {}
        for part, file, fmt in self._files():
            for batch in _record_batches(file, fmt, columns=self._id_columns(file, fmt)):
                data = batch.to_pydict() if batch.num_columns else {}
                for row in range(batch.num_rows):
                    index = rows_in_part.get(part, 0)
                    rows_in_part[part] = index + 1
                    yield self._id(data, row, part, index)

    def _id_columns(self, file: Path, fmt: str) -> list[str] | None:
        """The columns `ids()` needs: the id column if any (None: all, for Arrow streams)."""
        if fmt != "parquet":
            return None
        import pyarrow.parquet as pq

        names = pq.ParquetFile(file).schema_arrow.names
        column = self.id_column or ("id" if "id" in names else None)
        return [column] if column else []

    def _id(self, data: dict[str, list[Any]], row: int, part: str, index: int) -> str:
        column = self.id_column or ("id" if "id" in data else None)
        if column is not None:
            if column not in data:
                raise SourceError(f"source {self.spec}: no column {column!r}")
            return str(data[column][row])
        return f"{part}/{index}"

    def _image_column(self, schema: Any, file: Path) -> str:
        import pyarrow as pa

        names = list(schema.names)
        if self.image_column:
            if self.image_column not in names:
                raise SourceError(
                    f"source {file}: no column {self.image_column!r}; columns: {', '.join(names)}"
                )
            return self.image_column
        for name in ("image", "img"):
            if name in names:
                return name
        for item in schema:
            if pa.types.is_struct(item.type) and {"bytes", "path"} <= {f.name for f in item.type}:
                return str(item.name)
        raise SourceError(
            f"source {file}: no image column found; pass --image-column (columns: "
            f"{', '.join(names)})"
        )


# -- helpers ---------------------------------------------------------------------------------
def _is_dataset_dir(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or any(path.glob("*.arrow"))
        or (any(path.glob("*.parquet")) and not any(_images_in(path)))
    )


def _images_in(path: Path) -> Iterator[Path]:
    return (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _lines(spec: str) -> Iterator[str]:
    try:
        handle = Path(spec).expanduser().open(encoding="utf-8")
    except OSError as err:
        raise SourceError(f"{spec}: {err.strerror}") from None
    with handle:
        yield from handle


def _resolve(text: str, base: Path) -> str:
    """A path relative to the manifest's folder (absolute paths and data URLs as they are)."""
    if text.startswith("data:") or os.path.isabs(os.path.expanduser(text)):
        return os.path.expanduser(text)
    return str(base / text)


def _printable(image: str) -> str:
    return image if not image.startswith("data:") else image[: image.find(",")] + ",…"


def _manifest_item(record: dict[str, Any], seq: int, base: Path, where: str) -> SourceItem:
    column = next((c for c in PATH_COLUMNS if c in record), None)
    if column is None:
        raise SourceError(f"{where}: no image column (one of {', '.join(PATH_COLUMNS)})")
    value = record[column]
    if isinstance(value, list):
        return _post_item(record, column, seq, base, where)
    if not isinstance(value, str) or not value:
        raise SourceError(f"{where}: {column} must be a non-empty string or a list of them")
    item_id = str(record.get("id", value))
    image = _resolve(value, base)
    return SourceItem(item_id, seq, image, _printable(image), _manifest_metadata(record, column))


def _manifest_metadata(record: dict[str, Any], column: str) -> dict[str, Any]:
    metadata = {k: v for k, v in record.items() if k not in ("id", column)}
    nested = metadata.pop("metadata", None)
    if isinstance(nested, dict):
        metadata.update(nested)
    return metadata


def _post_item(record: dict[str, Any], column: str, seq: int, base: Path, where: str) -> SourceItem:
    """A row whose image field is a list: one post, judged as one item (its id: the `id`
    column, else its paths joined by '|')."""
    values = record[column]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise SourceError(f"{where}: {column} must be a non-empty list of non-empty strings")
    item_id = str(record.get("id", "|".join(values)))
    images = [_resolve(v, base) for v in values]
    printable = f"post {item_id} ({len(images)} images)"
    post = Post(images, source=printable)
    return SourceItem(item_id, seq, post, printable, _manifest_metadata(record, column))


def _record_batches(file: Path, fmt: str, columns: list[str] | None = None) -> Iterator[Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(
            "reading datasets needs pyarrow: pip install 'policy-engine[audit]'"
        ) from None
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(file)
            if columns == []:  # only the row count matters
                for group in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    yield pa.RecordBatch.from_pydict({"_": [None] * rows}).select([])
                return
            yield from parquet.iter_batches(batch_size=256, columns=columns)
            return
        with pa.memory_map(str(file)) as stream:
            try:
                reader: Any = pa.ipc.open_stream(stream)
            except pa.ArrowInvalid:
                stream.seek(0)
                reader = pa.ipc.open_file(stream)
                for index in range(reader.num_record_batches):
                    yield reader.get_batch(index)
                return
            yield from reader
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"{file}: cannot read ({err})") from None


def _dataset_image(value: Any, base: Path) -> ImageSource:
    """An HF Image cell ({bytes, path}), raw bytes, or a path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _resolve(str(value["path"]), base)
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        return _resolve(value, base)
    return b""  # an empty cell: load_image says what is wrong, as an error row
