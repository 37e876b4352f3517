"""Video and image I/O for offline segmentation: input discovery, decoding, PNG and MP4 writing.

Decoding uses PyAV (torchcodec when asked for). Frames come out as ``(T, H, W, 3)`` uint8 chunks, as a
player shows them (display-matrix rotation, EXIF orientation of photos, edit lists), so that the device
does the resize and normalization; a damaged or truncated video is an error (:func:`check_complete`).
PNGs are written by a small zlib encoder (8/16-bit grayscale, 8-bit RGB; no Pillow needed) and read
back with PyAV's PNG decoder, an independent implementation.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Iterator, Sequence

import numpy as np

VIDEO_EXTS = frozenset(
    ".mp4 .m4v .mov .mkv .avi .webm .mpg .mpeg .ts .mts .m2ts .wmv .flv .3gp .ogv .y4m .gif".split()
)
IMAGE_EXTS = frozenset(".png .jpg .jpeg .bmp .tif .tiff .webp .ppm .pgm".split())
LIST_EXTS = frozenset(".txt .lst .list".split())


class VideoReadError(RuntimeError):
    """A video (or frame folder) could not be opened or decoded; the message names the input."""


class InputListError(ValueError):
    """A list file named as an input cannot be read as UTF-8 text; the message names it."""


@dataclass
class VideoSource:
    """One video to segment: a video file, or a folder of frames (``frames`` in order)."""

    path: str
    kind: str  # "video" or "frames"
    name: str = ""  # unique output name within one run
    frames: list[str] = field(default_factory=list)
    base: str = ""  # the name before de-duplication (``name`` is ``base`` or ``base-<path hash>``)

    def __str__(self) -> str:
        return self.path


# ---------------------------------------------------------------------------------- discovery


def _natural_key(text: str) -> list:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_frame(name: str) -> bool:
    """An image file name that counts as a frame: hidden files (``.cover.png``) do not, as hidden videos and
    folders do not count either."""
    return _ext(name) in IMAGE_EXTS and not name.startswith(".")


def _frame_files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    files = [n for n in names if _is_frame(n) and os.path.isfile(os.path.join(directory, n))]
    return [os.path.join(directory, n) for n in sorted(files, key=_natural_key)]


def _walk_folder(root: str, exclude: Sequence[str] = ()) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    """Video files anywhere under ``root``; every folder holding images is one frame-folder video. Also
    returns ``(folder, reason)`` for each folder that could not be read (never skipped silently).

    Symbolic links are followed, but every real folder is walked once (a link back to a parent would
    otherwise make the walk loop, exponentially when two links branch). Folders in ``exclude`` (an
    output folder inside an input folder) and hidden ones are skipped.
    """
    found: list[VideoSource] = []
    unreadable: list[tuple[str, str]] = []
    skip = {os.path.realpath(p) for p in exclude}
    seen: set[str] = set()

    def refused(exc: OSError) -> None:
        unreadable.append((exc.filename or root, f"cannot read the folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=refused, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skip:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in dirnames:
            if not d.startswith("."):
                sub = os.path.realpath(os.path.join(dirpath, d))
                if sub not in seen and sub not in skip:
                    keep.append(d)
        dirnames[:] = sorted(keep, key=_natural_key)
        if any(_is_frame(f) for f in filenames):
            found.append(VideoSource(dirpath, "frames", frames=_frame_files(dirpath)))
        for f in sorted(filenames, key=_natural_key):
            if _ext(f) in VIDEO_EXTS and not f.startswith("."):
                found.append(VideoSource(os.path.join(dirpath, f), "video"))
    return found, unreadable


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise InputListError(f"{path}: a list file must be UTF-8 text, one path per line ({exc})") from exc
    except OSError as exc:
        raise InputListError(f"{path}: cannot read the list file ({exc.strerror or exc})") from exc
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = os.path.expanduser(line)
        entries.append(line if os.path.isabs(line) else os.path.join(base, line))
    return entries


def discover_inputs(
    inputs: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    """Expand files, folders (recursively), list files and frame folders into videos.

    Returns ``(sources, problems)``; ``problems`` lists ``(input, reason)`` for inputs that do not
    exist, cannot be read, or hold nothing to segment (an empty folder and an empty list alike). Every
    source gets a unique ``name`` (its output folder).
    Folders in ``exclude`` are not searched. A list file that is not UTF-8 text raises
    :class:`InputListError`.
    """
    sources: list[tuple[VideoSource, str | None]] = []  # (source, root folder it was found under)
    problems: list[tuple[str, str]] = []
    seen_lists: set[str] = set()

    def add(entry: str, from_list: bool) -> None:
        if os.path.isdir(entry):
            found, unreadable = _walk_folder(entry, exclude)
            problems.extend(unreadable)
            if not found and not unreadable:
                problems.append((entry, "folder holds no videos or frames"))
            root = os.path.abspath(entry)
            # a folder that is itself a frame folder is named after itself, not after its parent
            for src in found:
                sources.append((src, None if os.path.abspath(src.path) == root else root))
        elif os.path.isfile(entry):
            if _ext(entry) in LIST_EXTS and not from_list:
                real = os.path.realpath(entry)
                if real in seen_lists:
                    return
                seen_lists.add(real)
                items = _read_list(entry)
                if not items:
                    problems.append((entry, "the list names no videos or frames (it is empty)"))
                for item in items:
                    add(item, True)
            elif _ext(entry) in IMAGE_EXTS:
                problems.append((entry, "a single image is not a video; pass its folder to segment the frames"))
            else:  # anything else is tried as a video (a bad one fails at decode, by name)
                sources.append((VideoSource(entry, "video"), None))
        else:
            problems.append((entry, "no such file or folder"))

    for entry in inputs:
        add(os.fspath(entry), False)

    unique: dict[str, VideoSource] = {}
    for src, root in sources:
        key = os.path.realpath(src.path)
        if key not in unique:
            unique[key] = src
            src.name = src.base = _base_name(src, root)
    named = list(unique.values())
    _dedupe_names(named)
    return named, problems


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._+=@-]+", "_", text).strip("._")
    return text or "video"


def _base_name(src: VideoSource, root: str | None) -> str:
    path = os.path.abspath(src.path)
    if root is not None:
        rel = os.path.relpath(path, root)
    else:
        rel = os.path.basename(path.rstrip(os.sep))
    if src.kind == "video":
        rel = os.path.splitext(rel)[0]
    return "__".join(_safe(part) for part in rel.split(os.sep) if part)


def _dedupe_names(sources: list[VideoSource]) -> None:
    """Same base name from different paths: add a short hash of the full path."""
    counts: dict[str, int] = {}
    for src in sources:
        counts[src.name] = counts.get(src.name, 0) + 1
    for src in sources:
        if counts[src.name] > 1:
            src.name = hashed_name(src)


def hashed_name(src: VideoSource) -> str:
    """``base-<8 hex digits of the real path>``: the name a source gets when its base name is taken."""
    digest = hashlib.sha1(os.fsencode(os.path.realpath(src.path))).hexdigest()[:8]
    return f"{src.base or src.name}-{digest}"


def output_frame_names(source: VideoSource, start: int, count: int) -> list[str]:
    """Output file stems of frames ``start .. start + count``: ``000000``... for a video file; for a frame
    folder the frames' own stems, or their whole file names when two stems clash (``1.png``, ``1.jpg``)."""
    if source.kind != "frames":
        return [f"{i:06d}" for i in range(start, start + count)]
    names = [os.path.basename(p) for p in source.frames]
    stems = [os.path.splitext(n)[0] for n in names]
    clash = len({s.lower() for s in stems}) < len(stems)  # case-insensitive: some file systems fold case
    return (names if clash else stems)[start : start + count]


def sampled_sha256(path: str, sample: int = 1 << 20) -> str:
    """SHA-256 of a file's size and its first and last ``sample`` bytes: a cheap content fingerprint."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as fh:
        digest.update(fh.read(sample))
        if size > sample:
            fh.seek(max(sample, size - sample))
            digest.update(fh.read())
    return digest.hexdigest()


def source_identity(source: VideoSource) -> dict:
    """What identifies a source's content cheaply: its real path and size, and a hash of its first and
    last 64 KiB (a video: headers and index sit there, so a re-encode or a replacement changes it) or of its
    frame files' names and sizes (a frame folder). Recorded in ``done.json``; read for every input of a
    run, so it stays small."""
    if source.kind == "frames":
        digest = hashlib.sha256()
        size = 0
        for path in source.frames:
            st = os.stat(path)
            size += st.st_size
            digest.update(os.fsencode(os.path.basename(path)) + f"\0{st.st_size}\n".encode())
        return {"path": os.path.realpath(source.path), "kind": "frames", "frames": len(source.frames),
                "bytes": size, "sha256": digest.hexdigest()}
    return {"path": os.path.realpath(source.path), "kind": "video", "bytes": os.path.getsize(source.path),
            "sha256": sampled_sha256(source.path, 1 << 16)}


# ---------------------------------------------------------------------------------- decoding


def torchcodec_available() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:
        return False
    return True


def resolve_decoder(name: str) -> str:
    """``auto`` is PyAV: only it shows the decoder's corrupt-frame flags, which prove a video complete.
    ``torchcodec`` is used only when asked for (and importable)."""
    if name == "auto":
        return "pyav"
    if name == "torchcodec" and not torchcodec_available():
        raise ValueError("--decoder torchcodec: torchcodec is not importable (pip install torchcodec)")
    if name not in ("pyav", "torchcodec"):
        raise ValueError(f"unknown decoder {name!r}; choose pyav, torchcodec or auto")
    return name


@dataclass
class VideoInfo:
    height: int  # as displayed: after the container's rotation (a photo's EXIF orientation)
    width: int
    num_frames: int | None  # None when the container does not say
    fps: float | None
    rotation: int = 0  # degrees counter-clockwise applied to decoded frames (a display matrix, as phones write)
    stream: int = 0  # the container's stream index decoded (the one players show)
    video_streams: int = 1  # video streams in the file, attached pictures (cover art) left out


def rotate_frame(frame: np.ndarray, rotation: int) -> np.ndarray:
    """``(H, W, C)`` turned ``rotation`` degrees counter-clockwise (a multiple of 90)."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def _rotation(frame) -> int:
    """The frame's display-matrix rotation rounded to a multiple of 90 degrees (0 when there is none)."""
    try:
        angle = frame.rotation
    except Exception:
        return 0
    return int(round((angle or 0) / 90.0)) * 90 % 360


def _is_picture(stream) -> bool:
    """An attached picture (cover art, a thumbnail): one still image, not the video."""
    try:
        import av

        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except Exception:
        return False


def _video_streams(container) -> list:
    return [s for s in container.streams.video if not _is_picture(s)]


def _video_stream(container):
    """The video stream a player shows: FFmpeg's best one (``av_find_best_stream``: the default stream,
    else the one with the most frames seen), never an attached picture; None when there is none."""
    streams = _video_streams(container)
    try:
        best = container.streams.best("video")
    except Exception:
        best = None
    if best is not None and any(best.index == s.index for s in streams):
        return best
    return streams[0] if streams else None


def probe(source: VideoSource, rotation: bool = True) -> VideoInfo:
    """Size (as displayed), frame count (when known) and rate, decoding at most one frame (for the
    rotation; ``rotation=False`` skips it and reports the coded size)."""
    import av

    if source.kind == "frames":
        if not source.frames:
            raise VideoReadError(f"{source.path}: frame folder holds no images")
        first = read_image(source.frames[0])
        return VideoInfo(first.shape[0], first.shape[1], len(source.frames), None)
    try:
        with av.open(source.path) as container:
            stream = _video_stream(container)
            if stream is None:
                raise VideoReadError(f"{source.path}: no video stream")
            frames = int(stream.frames) if stream.frames else None
            rate = float(stream.average_rate) if stream.average_rate else None
            height, width = stream.codec_context.height, stream.codec_context.width
            turn = 0
            if rotation:
                try:
                    turn = _rotation(next(container.decode(stream)))
                except (StopIteration, av.error.FFmpegError):
                    turn = 0  # no decodable frame: decoding reports it by name
            if turn in (90, 270):
                height, width = width, height
            return VideoInfo(height, width, frames, rate, turn, stream.index, len(_video_streams(container)))
    except VideoReadError:
        raise
    except Exception as exc:
        raise VideoReadError(f"{source.path}: cannot open as a video ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------- photos: EXIF orientation


def _exif_tiff(data: bytes) -> bytes | None:
    """The EXIF block (a TIFF structure) of a JPEG, PNG, WebP or TIFF file's first bytes, if any."""
    if data[:2] == b"\xff\xd8":  # JPEG: marker segments up to the image data
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xDA:  # start of scan: no EXIF before it
                return None
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
                return data[i + 10 : i + 2 + length]
            i += 2 + length
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: an eXIf chunk
        i = 8
        while i + 8 <= len(data):
            length, tag = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
            if tag == b"eXIf":
                return data[i + 8 : i + 8 + length]
            i += 12 + length
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # WebP: an EXIF chunk
        i = 12
        while i + 8 <= len(data):
            tag, length = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
            if tag == b"EXIF":
                block = data[i + 8 : i + 8 + length]
                return block[6:] if block.startswith(b"Exif\0\0") else block
            i += 8 + length + (length & 1)
        return None
    if data[:4] in (b"II*\0", b"MM\0*"):  # TIFF: the file is the structure
        return data
    return None


def exif_orientation(path: str) -> int:
    """A photo's EXIF orientation (1 to 8; 1, as stored, when it has none or it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            tiff = _exif_tiff(fh.read(1 << 17))
    except OSError:
        return 1
    if not tiff or len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """``(H, W, C)`` as stored -> as displayed, for an EXIF orientation: 2 mirrored, 3 turned 180 degrees,
    4 flipped, 5 transposed, 6 turned 90 clockwise, 7 transversed, 8 turned 90 counter-clockwise."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 0, 2)  # 5; then 6 = 5 mirrored, 7 = 5 turned 180, 8 = 5 flipped
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        image = image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    elif orientation == 4:
        image = image[::-1]
    return np.ascontiguousarray(image)


def read_image(path: str) -> np.ndarray:
    """An image file as displayed: ``(H, W, 3)`` uint8 RGB with its EXIF orientation applied."""
    import av

    try:
        with av.open(path) as container:
            frame = next(container.decode(video=0))
            image = frame.to_ndarray(format="rgb24")
    except Exception as exc:
        raise VideoReadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return orient(image, exif_orientation(path))


# ---------------------------------------------------------------------------------- decoding, with proof of completeness


def _chunks_of(frames: Iterable[np.ndarray], chunk: int, label: str) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    shape = None
    for frame in frames:
        if shape is None:
            shape = frame.shape
        elif frame.shape != shape:
            raise VideoReadError(f"{label}: frame size changes mid-video ({shape[1]}x{shape[0]} -> {frame.shape[1]}x{frame.shape[0]})")
        buf.append(frame)
        if len(buf) == chunk:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


TRANSPORT_PACKETS = (188, 192, 204)  # MPEG-TS packet sizes (plain, M2TS with time codes, with FEC bytes)


def _declared_seconds(container, stream) -> float | None:
    """How long the file says this video stream lasts, where it says so: the stream's duration, Matroska's
    per-track ``DURATION`` tag, or the file's duration when the video is its only stream."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if isinstance(tag, str):
        match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", tag.strip())
        if match:
            h, m, sec = match.groups()
            return int(h) * 3600 + int(m) * 60 + float(sec)
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return None


def check_complete(path: str, *, listed: int | None, packets: int, shown: int, decoded: int,
                   end: float | None, declared: float | None, interval: float | None,
                   transport: bool) -> None:
    """Raise :class:`VideoReadError` unless a decode read the whole video, as a player shows it.

    ``listed``: the frame count the container's index gives (None when it gives none); ``packets``: the
    stream's packets read, ``shown`` of them not hidden by an edit list; ``decoded``: frames the decoder
    gave. ``end``: when the last decoded frame ends (seconds); ``declared``: how long the file says the
    stream lasts; ``interval``: one frame's duration; ``transport``: an MPEG transport stream.
    """
    if listed is not None:
        if packets < listed:
            raise VideoReadError(f"{path}: truncated: the file holds {packets} of the {listed} frames its index lists")
        if decoded < shown:
            raise VideoReadError(f"{path}: decoded {decoded} of the {shown} frames it shows (corrupt or truncated)")
        return
    if transport:
        size = os.path.getsize(path)
        if all(size % n for n in TRANSPORT_PACKETS):
            raise VideoReadError(f"{path}: truncated: {size} bytes is not a whole number of transport stream packets")
    if declared is not None and end is not None:
        slack = 1.5 * interval if interval else 0.1
        if end + slack < declared:
            raise VideoReadError(f"{path}: truncated: its frames end at {end:.2f} s of the {declared:.2f} s it declares")


def _pyav_frames(path: str, threads: int, stream_index: int | None = None) -> Iterator[np.ndarray]:
    """Decoded RGB frames, turned upright by the display matrix, then :func:`check_complete`.

    Damage is an error: a packet the demuxer flags as corrupt, a frame the decoder flags as corrupt (it
    concealed missing or broken data; FFmpeg's frame threads report nothing else), a decoder error, or a
    decode that falls short of what the container lists or declares. Frames an edit list hides are not
    shown (as players do) and not counted as missing.
    """
    import av

    try:
        container = av.open(path)
    except Exception as exc:
        raise VideoReadError(f"{path}: cannot open as a video ({type(exc).__name__}: {exc})") from exc
    try:
        stream = container.streams[stream_index] if stream_index is not None else _video_stream(container)
        if stream is None or stream.type != "video":
            raise VideoReadError(f"{path}: no video stream")
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        listed = int(stream.frames) if stream.frames else None
        interval = 1.0 / float(stream.average_rate) if stream.average_rate else None
        packets = hidden = decoded = 0
        end = None
        try:
            for packet in container.demux(stream):
                if packet.is_corrupt:
                    raise VideoReadError(
                        f"{path}: corrupt or truncated data after {decoded} frames" + (f" of {listed}" if listed else "")
                    )
                if packet.size:
                    packets += 1
                    hidden += bool(packet.is_discard)
                for frame in packet.decode():
                    if frame.is_corrupt:
                        raise VideoReadError(f"{path}: frame {decoded} is corrupt (damaged data the decoder concealed)")
                    if frame.pts is not None and frame.time_base is not None:
                        length = float(frame.duration * frame.time_base) if frame.duration else (interval or 0.0)
                        end = max(end or 0.0, float(frame.pts * frame.time_base) + length)
                    decoded += 1
                    yield rotate_frame(frame.to_ndarray(format="rgb24"), _rotation(frame))
        except VideoReadError:
            raise
        except Exception as exc:
            raise VideoReadError(f"{path}: decoding failed after {decoded} frames ({type(exc).__name__}: {exc})") from exc
        check_complete(path, listed=listed, packets=packets, shown=packets - hidden, decoded=decoded, end=end,
                       declared=_declared_seconds(container, stream), interval=interval,
                       transport=container.format.name == "mpegts")
    finally:
        container.close()


def _torchcodec_chunks(path: str, chunk: int, threads: int, stream_index: int) -> Iterator[np.ndarray]:
    """torchcodec's frames: it checks the count, but cannot see frames the decoder flagged as corrupt."""
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(path, stream_index=stream_index, dimension_order="NHWC", num_ffmpeg_threads=threads)
        total = len(decoder)
    except Exception as exc:
        raise VideoReadError(f"{path}: cannot open as a video ({type(exc).__name__}: {exc})") from exc
    for start in range(0, total, chunk):
        try:
            batch = decoder.get_frames_in_range(start, min(start + chunk, total)).data
        except Exception as exc:
            raise VideoReadError(f"{path}: decoding failed at frame {start} ({type(exc).__name__}: {exc})") from exc
        if batch.shape[0] != min(chunk, total - start):
            raise VideoReadError(f"{path}: decoded {start + batch.shape[0]} frames, the container lists {total}")
        yield batch.numpy()


def iter_chunks(source: VideoSource, chunk: int, decoder: str = "pyav", threads: int = 0) -> Iterator[np.ndarray]:
    """Decoded frames as ``(t, H, W, 3)`` uint8 arrays, ``t <= chunk``, in order, as a player shows them.

    Raises :class:`VideoReadError` (naming the input) when the video cannot be opened or decoded, or is
    damaged or truncated (:func:`check_complete`).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be a positive whole number of frames, got {chunk!r}")
    if source.kind == "frames":
        return _chunks_of((read_image(p) for p in source.frames), chunk, source.path)
    if decoder == "torchcodec":
        info = probe(source)
        if info.rotation == 0:  # rotated videos: PyAV turns them upright
            return _torchcodec_chunks(source.path, chunk, threads, info.stream)
    return _chunks_of(_pyav_frames(source.path, threads), chunk, source.path)


# ---------------------------------------------------------------------------------- PNG


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, level: int = 3, palette: np.ndarray | None = None) -> bytes:
    """Lossless PNG bytes for ``(H, W)`` uint8/uint16 grayscale or ``(H, W, 3)`` uint8 RGB.

    With ``palette`` (``(n, 3)`` uint8, ``n <= 256``) an ``(H, W)`` uint8 image is written as an 8-bit
    palette PNG instead: the stored values stay the ids, and image viewers show ``palette[id]``.
    Every row uses the "Up" filter (byte difference to the row above), which compresses label maps
    well and is cheap to compute in numpy.
    """
    image = np.asarray(image)
    plte = b""
    if palette is not None and image.ndim == 2 and image.dtype == np.uint8:
        palette = np.asarray(palette)
        if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256 or palette.dtype != np.uint8:
            raise ValueError(f"encode_png: palette must be (n <= 256, 3) uint8, got {palette.shape} {palette.dtype}")
        if int(image.max(initial=0)) >= palette.shape[0]:
            raise ValueError(f"encode_png: value {int(image.max())} has no palette entry (palette has {palette.shape[0]})")
        bit_depth, color_type, raw = 8, 3, image
        plte = _png_chunk(b"PLTE", np.ascontiguousarray(palette).tobytes())
    elif image.ndim == 2 and image.dtype == np.uint8:
        bit_depth, color_type, raw = 8, 0, image
    elif image.ndim == 2 and image.dtype == np.uint16:
        bit_depth, color_type, raw = 16, 0, image.astype(">u2")
    elif image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        bit_depth, color_type, raw = 8, 2, image
    else:
        raise ValueError(f"encode_png: expected (H, W) uint8/uint16 or (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"encode_png: empty image {image.shape}")
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"".join(
        (b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), plte, _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)), _png_chunk(b"IEND", b""))
    )


def write_png(path: str, image: np.ndarray, level: int = 3, palette: np.ndarray | None = None) -> None:
    data = encode_png(image, level, palette)
    with open(path, "wb") as fh:
        fh.write(data)


def read_png(path: str) -> np.ndarray:
    """Decode a PNG with PyAV: ``(H, W)`` uint8/uint16 for grayscale, the ``(H, W)`` uint8 indices for a
    palette PNG, ``(H, W, 3)`` uint8 for colour."""
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0))
    name = frame.format.name
    if name == "pal8":
        indices = frame.to_ndarray()
        return indices[0] if isinstance(indices, tuple) else indices  # PyAV >= 14 also returns the palette
    if name in ("gray", "gray8"):
        return frame.to_ndarray()
    if name.startswith("gray16"):
        return frame.reformat(format="gray16le").to_ndarray() if name != "gray16le" else frame.to_ndarray()
    return frame.to_ndarray(format="rgb24")


def label_map_image(ids: np.ndarray) -> np.ndarray:
    """Non-negative integer map -> uint8 when every value fits, else uint16 (error above 65535)."""
    ids = np.asarray(ids)
    top = int(ids.max()) if ids.size else 0
    low = int(ids.min()) if ids.size else 0
    if low < 0:
        raise ValueError(f"label map holds negative values (min {low}); shift them first")
    if top <= 255:
        return ids.astype(np.uint8)
    if top <= 65535:
        return ids.astype(np.uint16)
    raise ValueError(f"label map value {top} does not fit 16 bits")


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic colour encoding: ``id = R + 256 G + 256^2 B``."""
    ids = np.asarray(ids).astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ---------------------------------------------------------------------------------- overlays


def palette(n: int, seed: int = 7) -> np.ndarray:
    """``(n, 3)`` uint8 distinct-ish colours; entry 0 is black (background)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(max(n, 1), 3), dtype=np.int64).astype(np.uint8)
    colours[0] = 0
    return colours


def blend(frame: np.ndarray, ids: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Tint ``frame`` (H, W, 3) uint8 by ``ids`` (H, W, 0 = none) with ``colours[ids % len]``."""
    ids = np.asarray(ids).astype(np.int64)
    tint = colours[ids % len(colours)]
    mask = (ids > 0)[..., None]
    mixed = (frame.astype(np.float32) * (1 - alpha) + tint.astype(np.float32) * alpha).astype(np.uint8)
    return np.where(mask, mixed, frame)


class Mp4Writer:
    """Append RGB frames to an MP4 (H.264 when libx264 is there, else MPEG-4 Part 2) with PyAV.

    Odd frame sizes are padded by one edge row/column (yuv420p needs even sizes).
    """

    def __init__(self, path: str, fps: float | None = None, crf: int = 23):
        import av

        self.path = path
        self.container = av.open(path, "w", format="mp4")
        self.fps = Fraction(fps or 25).limit_denominator(1001)
        self.crf = crf
        self.stream = None
        self.size: tuple[int, int] | None = None

    def _open(self, height: int, width: int) -> None:
        import av

        for codec in ("libx264", "mpeg4"):
            try:
                av.codec.Codec(codec, "w")
            except Exception:
                continue
            stream = self.container.add_stream(codec, rate=self.fps)
            break
        else:
            raise RuntimeError("no H.264 or MPEG-4 encoder in this PyAV build")
        self.size = (height + height % 2, width + width % 2)
        stream.height, stream.width = self.size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        self.stream = stream

    def write(self, frame: np.ndarray) -> None:
        import av

        if self.stream is None:
            self._open(*frame.shape[:2])
        h, w = self.size
        if frame.shape[:2] != (h, w):
            frame = np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)), mode="edge")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


def write_test_video(
    path: str,
    num_frames: int,
    height: int,
    width: int,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    fps: int = 10,
    seed: int = 0,
    rotation: int = 0,
    faststart: bool = False,
) -> list[np.ndarray]:
    """Encode moving synthetic shapes (a few rectangles and a disc on a gradient); returns the RGB frames
    as encoded (coded orientation).

    Used by the tests and handy for smoke runs. ``pix_fmt`` defaults to yuv420p for even sizes and
    yuv444p for odd ones. ``rotation`` (degrees counter-clockwise) writes a display matrix, as phones
    do; ``faststart`` puts an MP4's index before the data (a truncated copy then still opens).
    """
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 96)], -1).astype(np.uint8)
    shapes = [
        (rng.integers(0, 256, 3), rng.uniform(0.1, 0.3), rng.uniform(-2, 2, 2), rng.uniform(0, 1, 2))
        for _ in range(3)
    ]
    frames = []
    container = av.open(path, "w", options={"movflags": "faststart"} if faststart else None)
    try:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = height, width
        if rotation:
            stream.set_display_rotation(rotation)
        stream.pix_fmt = pix_fmt or ("yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p")
        for t in range(num_frames):
            img = base.copy()
            for k, (colour, size, vel, pos) in enumerate(shapes):
                cy = (pos[0] * height + vel[0] * t) % height
                cx = (pos[1] * width + vel[1] * t) % width
                r = size * min(height, width)
                if k == 2:
                    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                else:
                    inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r * 1.5)
                img[inside] = colour
            frames.append(img)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if num_frames == 0:  # still write a valid (empty) file: header and trailer only
            container.start_encoding()
    finally:
        container.close()
    return frames
