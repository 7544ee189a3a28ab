"""vla-ray: distributed, RL-first training of Vision-Language-Action policies on Ray.

Main entry points: ``vla_ray.models.vla.VLA`` (the policy, usable without RLlib),
``vla_ray.rl_module.VLAModule`` (the same policy as an RLlib RLModule), ``vla_ray.envs``
(gymnasium envs), ``vla_ray.train`` (presets -> RLlib runs), ``vla_ray.export`` (ONNX, TorchScript,
torch.export, OpenVINO, Triton), ``vla_ray.serve`` (the Ray Serve endpoint) and the ``vla-ray`` CLI.
"""

__version__ = "0.1.0"


# In a source checkout the sub-packages live beside this folder (algorithms/, envs/, serve/: see
# [tool.setuptools.package-dir] in pyproject.toml). Searching the checkout root too makes
# ``vla_ray.algorithms`` etc. resolve from the same tree as ``vla_ray`` itself when the tree is
# imported without installing it: e.g. a Ray job's ``--working-dir .``, which Ray puts first on
# PYTHONPATH, so the job runs the uploaded code rather than a mix with an installed copy.
def _add_checkout_root() -> None:
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    markers = ("pyproject.toml", os.path.join("algorithms", "__init__.py"))
    if all(os.path.exists(os.path.join(root, m)) for m in markers) and root not in __path__:
        __path__.append(root)


_add_checkout_root()
del _add_checkout_root
