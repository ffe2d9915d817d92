"""talkmesh: speech-driven 3D facial animation platform.

Nothing heavy is imported here: submodules (data, audio, face, metrics, methods, ...)
are imported where they are used.
"""

__version__ = "0.1.0"
