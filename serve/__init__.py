"""Ray Serve application for exported policies (imported as ``vla_ray.serve``).

``start(ServeSettings(model=EXPORT_DIR), port=8000)`` serves ``POST /v1/act``, ``GET /v1/health``,
``GET /v1/spec`` and ``/docs``; ``vla-ray serve --model EXPORT_DIR`` does the same from the shell.
"""

from vla_ray.serve.app import APP_NAME, ServeSettings, VLAPolicy, build_app, shutdown, start
from vla_ray.serve.backends import BACKENDS, load_backend
from vla_ray.serve.shield import Shield, ShieldConfig

__all__ = [
    "APP_NAME",
    "BACKENDS",
    "ServeSettings",
    "Shield",
    "ShieldConfig",
    "VLAPolicy",
    "build_app",
    "load_backend",
    "shutdown",
    "start",
]
