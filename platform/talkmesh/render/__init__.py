"""Motion -> preview video: a small numpy software rasteriser and an ffmpeg writer.

Used for the MLflow preview artifact of every run and by the Serve API's optional preview,
so it runs headless on one CPU with no OpenGL, display or GPU.

Modules:

* :mod:`~talkmesh.render.raster` - camera, z-buffered triangle rasteriser, shading, point splats;
* :mod:`~talkmesh.render.frames` - motion -> RGB frames (:func:`render_frames`,
  :func:`iter_frames`, :func:`side_by_side`, :func:`error_colors`);
* :mod:`~talkmesh.render.video` - frames (+ audio) -> MP4/GIF through imageio-ffmpeg
  (:func:`write_video`, :func:`render_motion`);
* :mod:`~talkmesh.render.inputs` - the input checks they share.

Importing this package imports numpy only; scipy, imageio-ffmpeg and Pillow are imported
where used.
"""

from talkmesh.render.frames import (
    DEFAULT_BACKGROUND,
    DEFAULT_COLOR,
    DEFAULT_INTERIOR,
    DEFAULT_SIZE,
    Shading,
    View,
    error_colors,
    iter_frames,
    render_frames,
    side_by_side,
)
from talkmesh.render.inputs import MAX_SIDE
from talkmesh.render.video import FFmpegNotFoundError, find_ffmpeg, render_motion, write_video

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_COLOR",
    "DEFAULT_INTERIOR",
    "DEFAULT_SIZE",
    "MAX_SIDE",
    "FFmpegNotFoundError",
    "Shading",
    "View",
    "error_colors",
    "find_ffmpeg",
    "iter_frames",
    "render_frames",
    "render_motion",
    "side_by_side",
    "write_video",
]
