"""Read a video reference (a file, or a list of frame images) into sampled, resized uint8 frames.

Frame sampling follows qwen-vl-utils exactly (`smart_nframes`: `fps` frames per second, at least 4, at most
`max_frames`, an even count; or a fixed `nframes`; evenly spaced indices), so a model fine-tuned here sees videos
the way Qwen's own inference code shows them. The reading is ours because none of qwen-vl-utils' readers works
with the pinned stack: its torchvision reader needs `torchvision.io.read_video` (removed in torchvision 0.26),
decord and torchcodec are not dependencies, and transformers' PyAV reader trusts the container's frame count,
which WebM/MKV files leave at 0. PyAV itself comes with qwen-vl-utils. Frames are resized one at a time as they
are decoded (bicubic with antialiasing, as qwen-vl-utils does), so a long 4K clip never sits in memory whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

from qwenvl_ft.data.images import ImageLimits, describe, fetch_url, open_image
from qwenvl_ft.errors import DataError

FRAME_FACTOR = 2  # frames are consumed in pairs (temporal patch size)

# (width, height, frame count) of the source -> (height, width) of the frames the model sees
FrameSize = Callable[[int, int, int], Tuple[int, int]]


@dataclass
class Sampling:
    fps: Optional[float] = None  # None with nframes None: qwen-vl-utils' default, 2.0
    nframes: Optional[int] = None
    max_frames: int = 768


@dataclass
class Video:
    frames: torch.Tensor  # uint8 (T, 3, H, W), T even
    sample_fps: float  # frames per second of video time in `frames`
    source_size: Tuple[int, int]  # (width, height) before resizing
    source_frames: int  # frames in the file (or frames given)
    # Seconds of each frame in `frames` from the start of the video: its index / the file's frame rate, or, for a
    # frame list, its position / the sampling rate (what qwen-vl-utils hands the processor as video metadata);
    # the padding frames repeat the last time for a file and continue the count for a list, as there.
    frame_times: List[float] = field(default_factory=list)


def _frame_count(ele: dict, total: int, video_fps: float, where: str) -> int:
    from qwen_vl_utils.vision_process import smart_nframes

    try:
        return smart_nframes(ele, total_frames=total, video_fps=video_fps)
    except (ValueError, ZeroDivisionError) as err:
        raise DataError(f"{where}: video of {total} frames cannot be sampled ({err})") from None


def _resize(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvF

    if frame.shape[-2:] == (height, width):
        return frame
    return tvF.resize(frame, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _even(frames: List[torch.Tensor]) -> List[torch.Tensor]:
    if len(frames) % FRAME_FACTOR:
        frames = frames + [frames[-1]] * (FRAME_FACTOR - len(frames) % FRAME_FACTOR)
    return frames


def read_video_file(source: Any, where: str, sampling: Sampling, size: FrameSize, label: str) -> Video:
    """`source`: a path or a binary file object."""
    import av

    ele = {"nframes": sampling.nframes} if sampling.nframes is not None else \
        {"fps": sampling.fps if sampling.fps is not None else 2.0, "max_frames": sampling.max_frames}
    try:
        container = av.open(source)
    except FileNotFoundError:
        raise DataError(f"{where}: video file {label} not found") from None
    except Exception as err:  # av.error.InvalidDataError and friends
        raise DataError(f"{where}: video {label} cannot be opened ({type(err).__name__}: {err})") from None
    try:
        if not container.streams.video:
            raise DataError(f"{where}: video {label} has no video stream")
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
        if not total:  # WebM/MKV store no frame count: count the packets (no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        if video_fps <= 0:
            raise DataError(f"{where}: video {label} has no frame rate")
        count = _frame_count(ele, total, video_fps, where)
        indices = np.linspace(0, total - 1, count).round().astype(int).tolist()
        height, width = size(stream.width, stream.height, count)
        wanted, frames = iter(indices), []
        target = next(wanted)
        for number, frame in enumerate(container.decode(stream)):
            while number == target:  # an index repeats when fewer frames exist than are asked for
                frames.append(_resize(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1),
                                      height, width))
                target = next(wanted, None)
            if target is None:
                break
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: video {label} cannot be decoded ({type(err).__name__}: {err})") from None
    finally:
        container.close()
    if not frames:
        raise DataError(f"{where}: video {label} has no decodable frame")
    if len(frames) < count:  # the header promised more frames than the stream holds: keep what is there
        frames = frames + [frames[-1]] * (count - len(frames))
    frames = _even(frames)
    times = [index / video_fps for index in indices]
    times += [times[-1]] * (len(frames) - len(times))
    return Video(torch.stack(frames).contiguous(), count / max(total, 1) * video_fps,
                 (stream.width, stream.height), total, times)


def read_frame_list(refs: List[Any], where: str, limits: ImageLimits, size: FrameSize, fps: float) -> Video:
    """A video given as its frames (what qwen-vl-utils accepts as a list of images): every frame is used."""
    if len(refs) == 0:
        raise DataError(f"{where}: video frame list is empty")
    frames: List[torch.Tensor] = []
    height = width = None
    for index, ref in enumerate(refs):
        image = open_image(ref, f"{where}: frames[{index}]", limits)
        if height is None:
            source_size = image.size
            height, width = size(image.size[0], image.size[1], len(refs) + len(refs) % FRAME_FACTOR)
        frames.append(_resize(torch.from_numpy(np.array(image)).permute(2, 0, 1), height, width))
    frames = _even(frames)
    return Video(torch.stack(frames).contiguous(), fps, source_size, len(refs), [i / fps for i in range(len(frames))])


def load_video(ref: Any, where: str, limits: ImageLimits, sampling: Sampling, size: FrameSize) -> Video:
    """`ref`: a path / file:// URI / http(s) URL (with data.allow_remote_images), a list of frame references, or
    the `{"path", "frames"}` record a datasets column stores."""
    if isinstance(ref, dict):
        ref = ref.get("path") or ref.get("frames")
    if isinstance(ref, (list, tuple)):
        # qwen-vl-utils labels a frame list with 2 fps unless told otherwise; a fixed rate is all a list has.
        return read_frame_list(list(ref), where, limits, size, fps=sampling.fps or 2.0)
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"{where}: a video must be a path, a URL or a list of frames, got {describe(ref)}")
    if ref.startswith(("http://", "https://")):
        raw = fetch_url(ref, where, limits, kind="video")
        return read_video_file(io.BytesIO(raw), where, sampling, size, describe(ref))
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    return read_video_file(path, where, sampling, size, describe(ref))


def video_wrapper_replaced(processor) -> bool:
    """Whether the processor replaces the chat template's whole `<|vision_start|><|video_pad|><|vision_end|>` by
    what a video expands to, rather than only the `<|video_pad|>` inside it. A family whose expansion wraps every
    temporal patch in its own markers (timestamped spans) does the former from transformers 5.25 on, the latter
    before; families whose expansion is pads only always do the latter.

    Asked of the processor's own text replacement with a marker for the expansion, so the collator follows the
    installed version by what it does, not by its version number; a processor without that method (none in the
    supported range) keeps the markers, as every earlier one did."""
    start = getattr(processor, "vision_start_token", "<|vision_start|>")
    end = getattr(processor, "vision_end_token", "<|vision_end|>")
    video = getattr(processor, "video_token", "<|video_pad|>")
    marker = "qwenvl-ft video expansion"
    replace = getattr(processor, "get_text_with_replacements", None)
    if replace is None:
        return False
    texts, _ = replace([start + video + end], videos_replacements=[marker])
    return texts[0] == marker
