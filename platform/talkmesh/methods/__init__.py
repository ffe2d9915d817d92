"""Methods: one module (or folder) per published method, behind one contract
(``base.MotionMethod`` and ``base.MethodConfig``; ``methods/README.md`` describes it).

Nothing heavy is imported here; use the registry::

    from talkmesh.methods import available_methods, build_method, get_method
"""

from talkmesh.methods.registry import (
    UnknownMethodError,
    available_methods,
    build_config,
    build_method,
    get_config_class,
    get_method,
    register_method,
    unregister_method,
)

__all__ = [
    "UnknownMethodError",
    "available_methods",
    "build_config",
    "build_method",
    "get_config_class",
    "get_method",
    "register_method",
    "unregister_method",
]
